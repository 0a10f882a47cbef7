"""Packed sequences, multi-token targets, token weights and empty batches.

A packed row holds several documents; with ``segment_ids`` every function
must give what scoring each document alone gives (a loop over the documents
with the same function), for every normalisation, dense and fused, values and
gradients, at shifts 0 to 3. Integer shifts equal slicing by hand; token
weights follow a NumPy float64 reference.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent import LinearLogits

V, D, CHUNK = 9, 5, 4
TOL = 2e-5
# Two packed rows of 13 positions: documents (id, start, stop); id 0 is padding.
DOCS = [
    [(3, 0, 5), (1, 5, 7), (4, 7, 11)],
    [(2, 0, 3), (5, 3, 10)],
]
B, T = 2, 13


def close(a, b, tol=TOL):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


def packed(rng):
    segments = np.zeros((B, T), np.int32)
    for r, docs in enumerate(DOCS):
        for doc, start, stop in docs:
            segments[r, start:stop] = doc
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    tokens[0, 2] = -100  # an ignored token inside a document
    where = segments != 0  # MaxText's convention: id 0 is padding
    hidden = rng.standard_normal((B, T, D)).astype(np.float32)
    kernel = (rng.standard_normal((D, V)) * 0.7).astype(np.float32)
    return segments, tokens, where, hidden, kernel


def documents():
    for r, docs in enumerate(DOCS):
        for _, start, stop in docs:
            yield r, start, stop


def as_logits(fused, h, k):
    return LinearLogits(h, k, chunk_size=CHUNK) if fused else h @ k


@pytest.mark.slow
@pytest.mark.parametrize(
    "fused, shift",
    [
        pytest.param(fused, shift, id=f"{'fused' if fused else 'dense'}-{shift}")
        for fused in (False, True)
        for shift in (0, 1, 2, 3)
    ],
)
def test_packed_rows_equal_each_document_scored_alone(rng, fused, shift):
    """One compiled program: every packed quantity and its documents-alone reference."""
    segments, tokens, where, hidden, kernel = packed(rng)
    nll = lambda x, t, **o: jxent.sequence_nll(x, t, shift=shift, **o)
    packed_opts = dict(segment_ids=segments, where=where)
    # A document's targets: its tokens from the shift-th on, less the ignored ones.
    doc_count = {(r, a, b): int(np.sum(tokens[r, a + shift:b] != -100))
                 for r, a, b in documents()}
    count = sum(doc_count.values())
    docs_with_targets = [doc for doc, n in doc_count.items() if n]
    long_docs = [(r, a, b) for r, a, b in documents() if b - a > shift]
    fn = lambda s: -s.log_prob + 0.1 * s.entropy

    def doc(h, k, r, a, b):
        return as_logits(fused, h[r:r + 1, a:b], k), tokens[r:r + 1, a:b]

    # name -> (packed f(h, k), documents-alone f(h, k)), each differentiated.
    pairs = {
        # "sum": the negative log-likelihood of the documents.
        "sum": (lambda h, k: nll(as_logits(fused, h, k), tokens, normalize="sum", **packed_opts),
                lambda h, k: sum(nll(*doc(h, k, *d), normalize="sum") for d in documents())),
        # token_objective: Σ fn over the documents.
        "token_objective": (
            lambda h, k: jxent.token_objective(as_logits(fused, h, k), tokens, fn, shift=shift,
                                               **packed_opts),
            lambda h, k: sum(jxent.token_objective(*doc(h, k, *d), fn, shift=shift)
                             for d in documents())),
    }
    if count:  # "tokens": the sums over the documents divided by their counts.
        pairs["tokens"] = (
            lambda h, k: nll(as_logits(fused, h, k), tokens, **packed_opts) * count,
            pairs["sum"][1])
    if docs_with_targets:  # "sequences": each document's mean, then their mean.
        pairs["sequences"] = (
            lambda h, k: nll(as_logits(fused, h, k), tokens, normalize="sequences",
                             **packed_opts),
            lambda h, k: sum(nll(*doc(h, k, *d)) for d in docs_with_targets)
            / len(docs_with_targets))

    @jax.jit
    def run(h, k):
        out = {name: tuple(jax.value_and_grad(f, (0, 1))(h, k) for f in pair)
               for name, pair in pairs.items()}
        x = as_logits(fused, h, k)
        out["stats"] = jxent.nll_stats(x, tokens, shift=shift, **packed_opts)
        # "none" and token_stats, per position: each document's values where it
        # predicts its own tokens, 0 where a position would predict across a boundary.
        out["per"] = nll(x, tokens, normalize="none", **packed_opts)
        out["log_prob"] = jxent.token_stats(x, tokens, shift=shift, **packed_opts).log_prob
        out["alone"] = [(nll(*doc(h, k, *d), normalize="none")[0],
                         jxent.token_stats(*doc(h, k, *d), shift=shift).log_prob[0])
                        for d in long_docs]
        return out

    out = run(hidden, kernel)
    for name in pairs:
        try:
            close(*out[name])
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert float(out["stats"].count) == count
    assert out["per"].shape == (B, T - shift) and out["log_prob"].shape == (B, T - shift)
    want_per = np.zeros((B, T - shift), np.float32)
    want_lp = np.zeros((B, T - shift), np.float32)
    for (r, a, b), (doc_per, doc_lp) in zip(long_docs, out["alone"], strict=True):
        want_per[r, a:b - shift], want_lp[r, a:b - shift] = doc_per, doc_lp
    close(out["per"], want_per)
    close(out["log_prob"], want_lp)


def test_cross_document_targets_change_the_loss(rng):
    """Without segment ids, the last token of a document predicts the next one's first."""
    segments, tokens, where, hidden, kernel = packed(rng)
    with_ids = jxent.nll_stats(hidden @ kernel, tokens, shift=True, segment_ids=segments,
                               where=where)
    without = jxent.nll_stats(hidden @ kernel, tokens, shift=True, where=where)
    boundaries = sum(len(docs) - 1 for docs in DOCS)  # 3 cross-document targets
    assert float(without.count) - float(with_ids.count) == boundaries


@pytest.mark.slow
@pytest.mark.parametrize(
    "fused, shift",
    [
        pytest.param(fused, shift, id=f"{'fused' if fused else 'dense'}-{shift}",
                     marks=() if (fused, shift) == (False, 2) else pytest.mark.slow)
        for fused in (False, True)
        for shift in (2, 3)
    ],
)
def test_integer_shift_equals_slicing_by_hand(rng, fused, shift):
    _, tokens, where, hidden, kernel = packed(rng)
    weights = rng.uniform(0.0, 2.0, (B, T)).astype(np.float32)
    for normalize in ("tokens", "sequences", "sum", "none"):
        f = lambda h, k, normalize=normalize: jxent.sequence_nll(
            as_logits(fused, h, k), tokens, shift=shift, where=where, weights=weights,
            normalize=normalize, label_smoothing=0.1,
        )
        g = lambda h, k, normalize=normalize: jxent.sequence_nll(
            as_logits(fused, h[:, :-shift], k), tokens[:, shift:], shift=False,
            where=where[:, shift:], weights=weights[:, shift:], normalize=normalize,
            label_smoothing=0.1,
        )
        scalar = (lambda f: f) if normalize != "none" else (lambda f: lambda *a: jnp.sum(f(*a)))
        close(jax.jit(jax.value_and_grad(scalar(f), (0, 1)))(hidden, kernel),
              jax.jit(jax.value_and_grad(scalar(g), (0, 1)))(hidden, kernel))


def test_a_shift_longer_than_the_sequence_counts_nothing(rng):
    _, tokens, _, hidden, kernel = packed(rng)
    per = jxent.sequence_nll(hidden @ kernel, tokens, shift=T + 2, normalize="none")
    assert per.shape == (B, 0)
    assert float(jxent.sequence_nll(hidden @ kernel, tokens, shift=T)) == 0.0
    assert float(jxent.nll_stats(hidden @ kernel, tokens, shift=T).count) == 0.0


# --------------------------------------------------------------------------- weights


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["dense", "fused"])
def test_token_weights_match_a_float64_reference(rng, fused):
    _, tokens, where, hidden, kernel = packed(rng)
    tokens = np.where(tokens < 0, 1, tokens)
    weights = rng.uniform(0.0, 3.0, (B, T)).astype(np.float32)
    weights[0, 3] = 0.0
    class_weights = rng.uniform(0.5, 2.0, V).astype(np.float32)
    logits = (hidden.astype(np.float64) @ kernel.astype(np.float64))[:, :-1]
    targets, w_tok, counted = tokens[:, 1:], weights[:, 1:].astype(np.float64), where[:, 1:]
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                               keepdims=True))
    log_p -= logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    for cw in (None, class_weights):
        w = w_tok * (1.0 if cw is None else cw.astype(np.float64)[targets])
        w = np.where(counted, w, 0.0)
        total, count = float((w * nll).sum()), float(w.sum())
        stats = jxent.nll_stats(as_logits(fused, hidden, kernel), tokens, shift=True,
                                where=where, weights=weights, class_weights=cw)
        assert float(stats.total) == pytest.approx(total, rel=1e-5)
        assert float(stats.count) == pytest.approx(count, rel=1e-6)
        mean = jxent.sequence_nll(as_logits(fused, hidden, kernel), tokens, shift=True,
                                  where=where, weights=weights, class_weights=cw)
        assert float(mean) == pytest.approx(total / count, rel=1e-5)
        per = jxent.sequence_nll(as_logits(fused, hidden, kernel), tokens, shift=True,
                                 where=where, weights=weights, class_weights=cw,
                                 normalize="none")
        np.testing.assert_allclose(per, w * nll, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_weighted_stats_accumulate_exactly(rng):
    _, tokens, where, hidden, kernel = packed(rng)
    weights = rng.uniform(0.0, 3.0, (B, T)).astype(np.float32)
    f = lambda sl: jxent.nll_stats(hidden[sl] @ kernel, tokens[sl], shift=True,
                                   where=where[sl], weights=weights[sl])
    whole = f(slice(None))
    close(tuple(f(slice(0, 1)) + f(slice(1, 2))), tuple(whole))


def test_weight_errors():
    logits, tokens = np.zeros((2, 4, 3), np.float32), np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0, got -1.0"):
        jxent.sequence_nll(logits, tokens, shift=True, weights=-np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"weights has shape \(2, 3\) but tokens has shape"):
        jxent.sequence_nll(logits, tokens, shift=True, weights=np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match=r"weights must be floating"):
        jxent.sequence_nll(logits, tokens, shift=True, weights=np.ones((2, 4), np.int32))
    with pytest.raises(TypeError, match=r"segment_ids must be integer"):
        jxent.sequence_nll(logits, tokens, shift=True, segment_ids=np.ones((2, 4), np.float32))


# --------------------------------------------------------------------------- empty batches


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["dense", "fused"])
def test_empty_batches_give_their_empty_result_with_every_option(rng, fused):
    """N = 0 positions: 0 for means and sums (zero gradient), empty per-position arrays."""
    hidden = np.zeros((0, D), np.float32)
    kernel = rng.standard_normal((D, V)).astype(np.float32)
    targets = np.zeros((0,), np.int32)
    options = dict(class_weights=rng.uniform(0.5, 2.0, V).astype(np.float32),
                   label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0)
    for reduction in ("mean", "sum", "none"):
        f = lambda h, k, reduction=reduction: jxent.softmax_cross_entropy(
            as_logits(fused, h, k), targets, reduction=reduction, **options)
        out = f(hidden, kernel)
        assert out.shape == ((0,) if reduction == "none" else ())
        if reduction != "none":
            assert float(out) == 0.0
            g = jax.grad(f, (0, 1))(hidden, kernel)
            assert not np.any(np.asarray(g[1]))
    seq = np.zeros((2, 1, D), np.float32)  # T = 1 with a shift: nothing to predict
    tokens = np.zeros((2, 1), np.int32)
    x = as_logits(fused, seq, kernel)
    assert float(jxent.sequence_nll(x, tokens, shift=True, **options)) == 0.0
    assert jxent.sequence_nll(x, tokens, shift=True, normalize="none", **options).shape == (2, 0)
    assert float(jxent.sequence_nll(x, tokens, shift=True, normalize="sequences")) == 0.0
    assert float(jxent.nll_stats(x, tokens, shift=True, weights=np.ones((2, 1), np.float32),
                                 **options).count) == 0.0
    assert jxent.token_stats(x, tokens, shift=True).log_prob.shape == (2, 0)
    assert float(jxent.token_objective(x, tokens, lambda s: s.log_prob, shift=True)) == 0.0
    assert float(jxent.distillation_loss(x, x, shift=True, targets=tokens,
                                         hard_weight=0.5)) == 0.0
    assert not math.isnan(float(jxent.linear_cross_entropy(hidden, kernel, targets, **options)))
