"""``sequence_nll``, ``nll_stats`` / ``NLLStats`` and ``perplexity``.

References: a hand-written loop over positions, float64 NumPy for the
normalisations, ``softmax_cross_entropy`` on explicitly shifted slices for the
options, and the whole batch for micro-batch accumulation. Every computation
runs under ``jax.jit``, one compiled function per test.
"""

from __future__ import annotations

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent

B, T, V = 3, 6, 7


def close(a, b, tol=1e-6):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


def log_softmax_np(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def draw(rng, shape=(B, T), vocab=V, pad=0.2):
    """Logits ``shape + (vocab,)``, tokens (some -100) and a random loss mask."""
    logits = (2.0 * rng.standard_normal(shape + (vocab,))).astype(np.float32)
    tokens = rng.integers(0, vocab, shape).astype(np.int32)
    tokens = np.where(rng.random(shape) < pad, -100, tokens).astype(np.int32)
    where = rng.random(shape) < 0.8
    return logits, tokens, where


def loop_reference(logits, tokens, where, *, shift=True, ignore_index=-100):
    """Per-target NLL and counted flags, position by position, with plain Python loops."""
    logits, tokens, where = np.asarray(logits), np.asarray(tokens), np.asarray(where)
    batch, length = tokens.shape
    offset = 1 if shift else 0
    nll = np.zeros((batch, length - offset))
    counted = np.zeros((batch, length - offset), bool)
    for b in range(batch):
        for t in range(length - offset):
            target = tokens[b, t + offset]  # logits at t predict the token at t + offset
            if where[b, t + offset] and target != ignore_index:
                nll[b, t] = -log_softmax_np(logits[b, t])[target]
                counted[b, t] = True
    return nll, counted


def test_shift_matches_a_loop_over_positions(rng):
    """``logits[:, t]`` predicts ``tokens[:, t + 1]``; the mask moves with the targets."""
    logits, tokens, where = draw(rng)

    @jax.jit
    def outputs(x):
        return {
            n: jxent.sequence_nll(x, tokens, where=where, normalize=n, shift=True)
            for n in ("none", "sum", "tokens")
        }

    out = outputs(logits)
    nll, counted = loop_reference(logits, tokens, where)
    assert out["none"].shape == (B, T - 1)
    close(out["none"], np.where(counted, nll, 0), 1e-5)
    close(out["sum"], nll[counted].sum(), 1e-5)
    close(out["tokens"], nll[counted].mean(), 1e-6)
    # The loop without the shift is a different number: the test sees the alignment.
    unshifted, counted0 = loop_reference(logits, tokens, where, shift=False)
    assert not np.isclose(out["sum"], unshifted[counted0].sum(), rtol=1e-3)


def test_shift_false_is_aligned(rng):
    """Teacher forcing: logits and tokens already aligned, as ``softmax_cross_entropy``."""
    logits, tokens, where = draw(rng)

    @jax.jit
    def outputs(x):
        return {
            "aligned": jxent.sequence_nll(x, tokens, shift=False, where=where, normalize="none"),
            "sce": jxent.softmax_cross_entropy(x, tokens, where=where, reduction="none"),
            "shifted": jxent.sequence_nll(x, tokens, where=where, normalize="none", shift=True),
            "by_hand": jxent.sequence_nll(
                x[:, :-1], tokens[:, 1:], shift=False, where=where[:, 1:], normalize="none"
            ),
        }

    out = outputs(logits)
    assert out["aligned"].shape == (B, T)
    close(out["aligned"], out["sce"])
    nll, counted = loop_reference(logits, tokens, where, shift=False)
    close(out["aligned"], np.where(counted, nll, 0), 1e-5)
    close(out["shifted"], out["by_hand"])


def test_tokens_and_sequences_normalisation_on_uneven_masks(rng):
    """``"tokens"``: the global token mean; ``"sequences"``: the mean of per-sequence means.

    Sequences with nothing counted are left out of the ``"sequences"`` mean.
    """
    logits, tokens, _ = draw(rng, shape=(4, 8), pad=0.0)
    lengths = np.array([8, 3, 1, 6])  # sequence 2 has no target after the shift
    where = np.arange(8)[None, :] < lengths[:, None]
    weights = rng.uniform(0.5, 2.0, V).astype(np.float32)

    @jax.jit
    def outputs(x):
        return {
            (n, w is None): jxent.sequence_nll(
                x, tokens, where=where, normalize=n, class_weights=w, shift=True
            )
            for n in ("tokens", "sequences")
            for w in (None, weights)
        }

    out = outputs(logits)
    nll, counted = loop_reference(logits, tokens, where)
    assert counted.sum(-1).tolist() == [7, 2, 0, 5]
    for weighted in (False, True):
        w_t = weights[tokens[:, 1:]] if weighted else np.ones_like(nll)
        w_t = np.where(counted, w_t, 0)
        token_mean = (w_t * nll).sum() / w_t.sum()
        has = counted.any(-1)
        per_sequence = (w_t * nll).sum(-1)[has] / w_t.sum(-1)[has]
        close(out["tokens", not weighted], token_mean, 1e-6)
        close(out["sequences", not weighted], per_sequence.mean(), 1e-6)
        assert not np.isclose(token_mean, per_sequence.mean(), rtol=1e-3)


def test_sum_is_the_negative_log_likelihood(rng):
    """``normalize="sum"`` = −Σ log p(target) over counted targets = ``nll_stats(...).total``."""
    logits, tokens, where = draw(rng, shape=(2, 3, T))

    @jax.jit
    def outputs(x):
        return (
            jxent.sequence_nll(x, tokens, where=where, normalize="sum", shift=True),
            jxent.nll_stats(x, tokens, where=where, shift=True),
        )

    total, stats = outputs(logits)
    log_p = log_softmax_np(logits[..., :-1, :])
    targets = tokens[..., 1:]
    counted = where[..., 1:] & (targets != -100)
    picked = np.take_along_axis(log_p, np.where(counted, targets, 0)[..., None], -1)[..., 0]
    close(total, -picked[counted].sum(), 1e-5)
    close(stats.total, total)
    assert stats.count == counted.sum()


@pytest.mark.parametrize("shift", [True, False])
def test_none_keeps_leading_axes_and_zeros_what_is_not_counted(rng, shift):
    """``normalize="none"``: ``[..., T - 1]`` with the shift, ``[..., T]`` without; vmap agrees."""
    logits, tokens, where = draw(rng, shape=(2, 3, T))

    @jax.jit
    def outputs(x):
        f = lambda x, t, w: jxent.sequence_nll(x, t, shift=shift, where=w, normalize="none")
        return f(x, tokens, where), jax.vmap(f)(x, tokens, where)

    per_token, vmapped = outputs(logits)
    assert per_token.shape == (2, 3, T - 1 if shift else T)
    nll, counted = loop_reference(
        logits.reshape(6, T, V), tokens.reshape(6, T), where.reshape(6, T), shift=shift
    )
    close(per_token, np.where(counted, nll, 0).reshape(per_token.shape), 1e-5)
    close(vmapped, per_token)


def test_where_is_shifted_with_the_targets(rng):
    """With the shift, ``where[:, 0]`` marks no target; ``where[:, t]`` masks ``tokens[:, t]``."""
    logits, tokens, _ = draw(rng, pad=0.0)
    all_on = np.ones((B, T), bool)
    first_off = all_on.copy()
    first_off[:, 0] = False
    third_off = all_on.copy()
    third_off[:, 3] = False
    tokens_third_ignored = tokens.copy()
    tokens_third_ignored[:, 3] = -100

    @jax.jit
    def outputs(x):
        f = lambda t, w: jxent.sequence_nll(x, t, where=w, normalize="none", shift=True)
        return (
            f(tokens, all_on),
            f(tokens, first_off),
            f(tokens, third_off),
            f(tokens_third_ignored, None),
        )

    full, first, third, ignored = outputs(logits)
    close(first, full)  # position 0 is never a target
    close(third, ignored)
    assert np.all(np.asarray(third)[:, 2] == 0) and np.all(np.asarray(full)[:, 2] > 0)


def test_ignore_index_custom_and_none(rng):
    """A pad id as ``ignore_index`` equals ``where=tokens != pad``; ``None`` counts everything."""
    logits, tokens, _ = draw(rng, pad=0.0)
    tokens[:, -2:] = 0  # right padding with pad id 0

    @jax.jit
    def outputs(x):
        return (
            jxent.sequence_nll(x, tokens, ignore_index=0, shift=True),
            jxent.sequence_nll(x, tokens, ignore_index=None, where=tokens != 0, shift=True),
            jxent.sequence_nll(x, tokens, ignore_index=None, shift=True),
        )

    ignoring, masked, everything = outputs(logits)
    close(ignoring, masked)
    nll, _ = loop_reference(logits, tokens, np.ones_like(tokens, bool), ignore_index=None)
    close(everything, nll.mean(), 1e-6)


@pytest.mark.slow
def test_loss_options_are_those_of_softmax_cross_entropy(rng):
    """label_smoothing, z_loss, logit_softcap, class_weights: per token as in the core loss."""
    logits, tokens, where = draw(rng)
    weights = rng.uniform(0.5, 2.0, V).astype(np.float32)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 3.0, "class_weights": weights}

    @jax.jit
    def outputs(x):
        target_mask = where[:, 1:]
        return {
            n: (
                jxent.sequence_nll(x, tokens, where=where, normalize=n, **opts, shift=True),
                jxent.softmax_cross_entropy(
                    x[:, :-1], tokens[:, 1:], where=target_mask, reduction=r, **opts
                ),
            )
            for n, r in [("tokens", "mean"), ("sum", "sum"), ("none", "none")]
        }

    for ours, reference in outputs(logits).values():
        close(ours, reference)


def test_nll_stats_mean_perplexity_and_bits(rng):
    """``NLLStats``: total and count; mean, perplexity = exp(mean), bits = mean / ln 2."""
    logits, tokens, where = draw(rng)
    weights = rng.uniform(0.5, 2.0, V).astype(np.float32)

    @jax.jit
    def outputs(x):
        stats = jxent.nll_stats(x, tokens, where=where, shift=True)
        weighted = jxent.nll_stats(x, tokens, where=where, class_weights=weights, shift=True)
        return {
            "stats": stats,
            "weighted": weighted,
            "derived": (stats.mean(), stats.perplexity(), stats.bits_per_token()),
            "tokens": jxent.sequence_nll(x, tokens, where=where, shift=True),
            "weighted_tokens": jxent.sequence_nll(
                x, tokens, where=where, class_weights=weights, shift=True
            ),
            "uniform": jxent.nll_stats(
                jnp.zeros_like(x), tokens, where=where, shift=True
            ).perplexity(),
        }

    out = outputs(logits)
    stats = out["stats"]
    assert isinstance(stats, jxent.NLLStats)
    nll, counted = loop_reference(logits, tokens, where)
    close(stats.total, nll[counted].sum(), 1e-5)
    assert stats.count == counted.sum()
    mean = nll[counted].mean()
    close(out["derived"], (mean, math.exp(mean), mean / math.log(2)), 1e-5)
    close(out["derived"][0], out["tokens"])
    w_t = np.where(counted, weights[np.where(counted, tokens[:, 1:], 0)], 0)
    close(out["weighted"].count, w_t.sum(), 1e-6)
    close(out["weighted"].mean(), out["weighted_tokens"])
    close(out["uniform"], V, 1e-5)  # uniform over V tokens: perplexity V


def test_perplexity_and_empty_stats():
    mean_nll = np.array([0.0, math.log(2.0), math.log(50.0)], np.float32)
    close(jax.jit(jxent.perplexity)(mean_nll), np.array([1.0, 2.0, 50.0], np.float32), 1e-5)
    empty = jxent.NLLStats(total=jnp.float32(0.0), count=jnp.float32(0.0))
    values = jax.jit(lambda s: (s.mean(), s.perplexity(), s.bits_per_token()))(empty)
    assert values == (0.0, 1.0, 0.0)


@pytest.mark.slow
def test_all_masked_and_masked_nonfinite_logits(rng):
    """Nothing counted: 0 for every normalisation with zero gradient; NaN/inf padding is inert."""
    logits, tokens, _ = draw(rng, pad=0.0)
    nothing = np.zeros((B, T), bool)
    where = np.ones((B, T), bool)
    where[1, 3:] = False  # padding: targets 3.. of sequence 1, so logits 2.. are unused
    poisoned = logits.copy()
    poisoned[1, 2:-1] = np.nan
    poisoned[1, -1] = np.inf  # the last position predicts nothing under the shift anyway
    poisoned[2, -1] = -np.inf

    def total(x, mask, normalize):
        loss = jxent.sequence_nll(
            x, tokens, where=mask, normalize=normalize, z_loss=1e-3, shift=True
        )
        return jnp.sum(loss)

    @jax.jit
    def outputs(x, mask):
        normalizations = ("tokens", "sequences", "sum", "none")
        return {n: jax.value_and_grad(total)(x, mask, n) for n in normalizations}

    for value, grad in outputs(logits, nothing).values():
        assert value == 0 and np.all(np.asarray(grad) == 0)
    for (value, grad), (clean, clean_grad) in zip(
        outputs(poisoned, where).values(), outputs(logits, where).values(), strict=True
    ):
        assert np.isfinite(value)
        close(value, clean)
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad))
        assert np.all(grad[1, 2:] == 0) and np.all(grad[:, -1] == 0)
        close(grad, clean_grad)


def test_micro_batch_accumulation_is_exact(rng):
    """k micro-batches with uneven padding, stats added: the whole batch's loss and gradients.

    The parameters produce the logits (``logits = x @ W + b``). Combining with
    ``jax.tree.map(jnp.add, ...)`` gives the global token mean; so does the
    usual accumulation loop (Σ_k ∇ total_k, divided by the total count at the
    end). The mean of the micro-batch means does not, which the test checks
    too so that it can tell the two apart.
    """
    batch, length, dim = 6, 7, 4
    params = {
        "W": rng.standard_normal((dim, V)).astype(np.float32),
        "b": rng.standard_normal(V).astype(np.float32),
    }
    x = rng.standard_normal((batch, length, dim)).astype(np.float32)
    tokens = rng.integers(0, V, (batch, length)).astype(np.int32)
    lengths = np.array([7, 2, 5, 3, 7, 4])
    where = np.arange(length)[None, :] < lengths[:, None]
    splits = [slice(0, 2), slice(2, 3), slice(3, 6)]
    opts = {"label_smoothing": 0.1}

    def model(p, inputs):
        return inputs @ p["W"] + p["b"][None, None, :]

    def stats(p, s):
        return jxent.nll_stats(model(p, x[s]), tokens[s], where=where[s], **opts, shift=True)

    def whole(p):
        return jxent.sequence_nll(model(p, x), tokens, where=where, **opts, shift=True)

    def combined(p):
        parts = [stats(p, s) for s in splits]
        return jax.tree.map(lambda *leaves: sum(leaves), *parts).mean()

    def pairwise(p):
        a, b, c = (stats(p, s) for s in splits)
        return jax.tree.map(jnp.add, jax.tree.map(jnp.add, a, b), c).mean()

    def accumulated(p):
        """The training loop's way: sum gradients of the totals, divide once."""
        grads = jax.tree.map(jnp.zeros_like, p)
        total = count = 0.0
        for s in splits:
            part = stats(p, s)
            g = jax.grad(lambda p: stats(p, s).total)(p)  # noqa: B023
            grads = jax.tree.map(jnp.add, grads, g)
            total, count = total + part.total, count + part.count
        return total / count, jax.tree.map(lambda g: g / count, grads)

    def mean_of_means(p):
        return sum(stats(p, s).mean() for s in splits) / len(splits)

    @jax.jit
    def outputs(p):
        return {
            "whole": jax.value_and_grad(whole)(p),
            "combined": jax.value_and_grad(combined)(p),
            "pairwise": jax.value_and_grad(pairwise)(p),
            "accumulated": accumulated(p),
            "mean_of_means": mean_of_means(p),
        }

    out = outputs(params)
    for name in ("combined", "pairwise", "accumulated"):
        close(out[name], out["whole"], 1e-6)
    assert not np.isclose(out["mean_of_means"], out["whole"][0], rtol=1e-4)


def test_bad_shapes_and_options_are_rejected():
    logits = np.zeros((2, 6, 7), np.float32)
    tokens = np.zeros((2, 6), np.int32)
    for f in (jxent.sequence_nll, jxent.nll_stats):
        with pytest.raises(
            ValueError,
            match=re.escape("tokens has shape (2, 5) but logits (2, 6, 7) expects (2, 6)"),
        ):
            f(logits, np.zeros((2, 5), np.int32), shift=True)
        with pytest.raises(
            ValueError, match=re.escape("where has shape (2, 5) but tokens has shape (2, 6)")
        ):
            f(logits, tokens, where=np.ones((2, 5), bool), shift=True)
        with pytest.raises(ValueError, match=re.escape("at least 2 dimensions), got (7,)")):
            f(np.zeros(7, np.float32), np.zeros((), np.int32), shift=True)
    with pytest.raises(
        ValueError,
        match="normalize must be one of 'tokens', 'sequences', 'sum', 'none'; got 'mean'",
    ):
        jxent.sequence_nll(logits, tokens, normalize="mean", shift=True)


# --------------------------------------------------------------------------------------
# Hardening (issue 10)


def test_shift_is_required_and_says_which_to_pass():
    """``sequence_nll(logits[:, :-1], tokens[:, 1:])`` must not silently shift twice."""
    logits = np.zeros((2, 6, 7), np.float32)
    tokens = np.zeros((2, 6), np.int32)
    for f in (jxent.sequence_nll, jxent.nll_stats):
        with pytest.raises(
            TypeError, match=re.escape("needs shift: pass shift=True for causal LM logits")
        ):  # noqa: E501
            f(logits, tokens)
        with pytest.raises(TypeError, match=re.escape("or shift=False for logits already aligned")):
            f(logits[:, :-1], tokens[:, 1:])
        # An int k is the k-th next token (1 is True); anything else is refused.
        for bad in (-1, 1.0, "1"):
            with pytest.raises(TypeError, match=f"shift must be True, False or an int k >= 0, "
                                                f"got {bad!r}"):
                f(logits, tokens, shift=bad)
        with pytest.raises(TypeError, match=re.escape("static_argnames=('shift',)")):
            jax.jit(f)(logits, tokens, shift=True)


def test_float_tokens_are_named_as_tokens_with_the_users_shape():
    logits = np.zeros((2, 4, 7), np.float32)
    for f in (jxent.sequence_nll, jxent.nll_stats):
        with pytest.raises(
            TypeError,
            match=re.escape(
                "tokens must be integer token ids, got dtype float32 with shape (2, 4); "
                "convert them with tokens.astype(jnp.int32)"
            ),
        ):
            f(logits, np.zeros((2, 4), np.float32), shift=True)


@pytest.mark.slow
def test_shift_with_a_single_position_is_empty_not_an_error():
    """T = 1 under ``shift=True`` has no target: 0 and a zero gradient, as for N = 0."""
    logits = np.ones((3, 1, 7), np.float32)
    tokens = np.zeros((3, 1), np.int32)

    @jax.jit
    def run(x):
        out = {
            n: jax.value_and_grad(
                lambda x, n=n: jnp.sum(jxent.sequence_nll(x, tokens, shift=True, normalize=n))
            )(x)
            for n in ("tokens", "sequences", "sum", "none")
        }
        stats = jxent.nll_stats(x, tokens, shift=True)
        return out, stats

    out, stats = run(logits)
    for value, grad in out.values():
        assert float(value) == 0.0 and not np.any(np.asarray(grad))
    assert float(stats.total) == 0.0 and float(stats.count) == 0.0
    assert jxent.sequence_nll(logits, tokens, shift=True, normalize="none").shape == (3, 0)


def test_out_of_range_tokens_under_jit_have_a_nan_gradient(rng):
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5)).astype(np.int32)
    tokens[1, 3] = 9
    grad = jax.jit(jax.grad(lambda x: jxent.sequence_nll(x, tokens, shift=True, normalize="sum")))(
        logits
    )
    bad = np.isnan(np.asarray(grad)).all(-1)
    want = np.zeros((2, 5), bool)
    want[1, 2] = True  # logits[1, 2] predict tokens[1, 3]
    np.testing.assert_array_equal(bad, want)
