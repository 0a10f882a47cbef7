"""jxent.toy: the trained model reaches the count-based MLE of its corpus.

One model of each kind (bigram LM, shift=True; word-aligned translation,
shift=False) is trained once per module and checked against references
computed here, independently of jxent.toy's own count helpers: scipy for
entropies and KL, a plain loop over the corpus's events for the
log-likelihood, a float64 NumPy softmax of the parameters for the model's
probabilities.
"""

import functools
import math
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

import jxent
from jxent import toy

V = len(toy.VOCAB)
VARIANTS = ("lm", "translation")


def _jit(loss_fn, normalize="tokens"):
    return jax.jit(functools.partial(loss_fn, normalize=normalize))


def _setup(variant, seed=0, size=1000):
    """(data, loss_fn, (contexts, targets) events, table shape) of one toy task."""
    if variant == "lm":
        corpus = toy.sample_corpus(seed, num_sentences=size)
        return corpus, toy.lm_loss, toy.lm_events(corpus), (V, V)
    pairs = toy.sample_pairs(seed, num_pairs=size)
    shape = (len(toy.SOURCE_WORDS), len(toy.TARGET_WORDS))
    return pairs, toy.translation_loss, toy.translation_events(pairs), shape


@pytest.fixture(scope="module")
def trained():
    """Each variant trained once, with the step checked never to retrace."""
    out = {}
    for variant in VARIANTS:
        data, loss_fn, events, shape = _setup(variant)
        # chex counts traces per call site; each train() call jits a fresh step
        chex.clear_trace_counter()
        fit = toy.train(
            loss_fn,
            toy.init_params(*shape),
            data,
            steps=toy.DEFAULT_STEPS,
            wrap_step=functools.partial(chex.assert_max_traces, n=1),
        )
        out[variant] = (data, loss_fn, events, shape, fit)
    return out


def _model_probs(params):
    """float64 softmax of the logit table, independently of jxent and toy."""
    logits = np.asarray(params["logits"], dtype=np.float64)
    return scipy.special.softmax(logits, axis=-1)


def _reference_counts(events, shape):
    counts = np.zeros(shape)
    for c, y in zip(*events, strict=True):
        counts[c, y] += 1
    return counts


def _reference_entropy(counts):
    """H(Y | C) = Σ_c (N_c / N) H(p̂(· | c)), via scipy (which normalises the rows)."""
    totals = counts.sum(axis=-1)
    seen = totals > 0
    return float(np.sum(totals[seen] * scipy.stats.entropy(counts[seen], axis=-1)) / totals.sum())


def _reference_kls(counts, q):
    """KL(p̂(· | c) ‖ q(· | c)) for every observed context, via scipy.special.rel_entr."""
    seen = counts.sum(axis=-1) > 0
    p_hat = counts[seen] / counts[seen].sum(axis=-1, keepdims=True)
    return scipy.special.rel_entr(p_hat, q[seen]).sum(axis=-1)


# --------------------------------------------------------------------------- sources


def test_source_tables_are_distributions():
    lm_rows = np.ones(V, dtype=bool)
    lm_rows[[toy.PAD, toy.EOS]] = False  # nothing follows these
    np.testing.assert_allclose(toy.SOURCE_PROBS[lm_rows].sum(axis=-1), 1.0)
    assert not toy.SOURCE_PROBS[~lm_rows].any()
    assert not toy.SOURCE_PROBS[:, [toy.PAD, toy.BOS]].any()
    np.testing.assert_allclose(toy.TRANSLATION_PROBS[1:].sum(axis=-1), 1.0)
    assert not toy.TRANSLATION_PROBS[0].any() and not toy.TRANSLATION_PROBS[:, 0].any()


def test_corpus_is_seeded_and_well_formed():
    a, b, c = toy.sample_corpus(3, 200), toy.sample_corpus(3, 200), toy.sample_corpus(4, 200)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.dtype == np.int32 and a.tokens.shape == (200, 16)
    np.testing.assert_array_equal(a.mask, a.tokens != toy.PAD)
    lengths = a.mask.sum(axis=-1)
    np.testing.assert_array_equal(a.tokens[:, 0], toy.BOS)
    np.testing.assert_array_equal(a.tokens[np.arange(200), lengths - 1], toy.EOS)
    # the mask is a prefix: padding only after <eos>
    np.testing.assert_array_equal(a.mask, np.arange(16) < lengths[:, None])
    # every counted transition is possible under the source
    contexts, targets = toy.lm_events(a)
    assert len(contexts) == lengths.sum() - 200
    assert (toy.SOURCE_PROBS[contexts, targets] > 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler_follows_its_source(variant):
    """Count ratios of a large sample are within 5 binomial standard errors of the source."""
    _, _, events, shape = _setup(variant, seed=11, size=4000)
    source = toy.SOURCE_PROBS if variant == "lm" else toy.TRANSLATION_PROBS
    counts = _reference_counts(events, shape)
    totals = counts.sum(axis=-1, keepdims=True)
    seen = totals[:, 0] > 0
    p_hat = counts[seen] / totals[seen]
    stderr = np.sqrt(source[seen] * (1 - source[seen]) / totals[seen])
    assert (np.abs(p_hat - source[seen]) <= 5 * stderr + 1e-12).all()


def test_pairs_are_seeded_aligned_and_possible():
    a, b = toy.sample_pairs(5, 300), toy.sample_pairs(5, 300)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.mask, a.source != 0)
    np.testing.assert_array_equal(a.mask, a.target != 0)
    assert set(a.mask.sum(axis=-1).tolist()) == {3, 6}
    assert (toy.TRANSLATION_PROBS[a.source[a.mask], a.target[a.mask]] > 0).all()


# --------------------------------------------------------------------------- count helpers


@pytest.mark.parametrize("variant", VARIANTS)
def test_count_helpers_match_references(variant, rng):
    _, _, events, shape = _setup(variant, seed=1, size=300)
    counts = toy.count_table(*events, *shape)
    np.testing.assert_array_equal(counts, _reference_counts(events, shape))
    p_hat = toy.mle(counts)
    seen = counts.sum(axis=-1) > 0
    np.testing.assert_allclose(p_hat[seen].sum(axis=-1), 1.0)
    assert not p_hat[~seen].any()
    np.testing.assert_allclose(
        toy.conditional_entropy(counts), _reference_entropy(counts), rtol=1e-12
    )
    q = scipy.special.softmax(rng.normal(size=shape), axis=-1)
    expected_ll = sum(math.log(q[c, y]) for c, y in zip(*events, strict=True))
    np.testing.assert_allclose(toy.log_likelihood(counts, np.log(q)), expected_ll, rtol=1e-12)
    np.testing.assert_allclose(
        toy.kl_to_mle(counts, np.log(q)), _reference_kls(counts, q).mean(), rtol=1e-12
    )
    # the MLE itself: KL 0, and its log-likelihood is −N·H
    log_mle = np.log(np.where(counts > 0, p_hat, 1.0))
    assert toy.kl_to_mle(counts, log_mle) == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(
        -toy.log_likelihood(counts, log_mle) / counts.sum(), _reference_entropy(counts)
    )


def test_log_likelihood_and_kl_ignore_minus_inf_where_unseen():
    counts = np.array([[2.0, 0.0], [0.0, 0.0]])
    log_q = np.array([[0.0, -np.inf], [-np.inf, 0.0]])
    assert toy.log_likelihood(counts, log_q) == 0.0
    assert toy.kl_to_mle(counts, log_q) == 0.0


# --------------------------------------------------------------------------- the figures


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_final_loss_reaches_the_empirical_conditional_entropy(trained, variant):
    data, loss_fn, events, shape, fit = trained[variant]
    entropy = _reference_entropy(_reference_counts(events, shape))
    final = float(_jit(loss_fn)(fit.params, data))
    assert abs(final - entropy) <= 1e-3
    # Gibbs: no model, at any step, is below the floor (up to float32 rounding)
    assert final >= entropy - 1e-6
    assert fit.losses.min() >= entropy - 1e-6
    # the first step starts from the uniform model, and the bound is not met at once
    np.testing.assert_allclose(fit.losses[0], math.log(shape[1]), rtol=1e-6)
    assert fit.losses[2] - entropy > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_conditionals_reach_the_count_ratios(trained, variant):
    _, _, events, shape, fit = trained[variant]
    counts = _reference_counts(events, shape)
    kls = _reference_kls(counts, _model_probs(fit.params))
    assert kls.mean() <= 1e-3
    np.testing.assert_allclose(
        toy.kl_to_mle(counts, toy.model_log_probs(fit.params)), kls.mean(), rtol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_summed_nll_is_minus_the_log_likelihood(trained, variant):
    data, loss_fn, events, shape, fit = trained[variant]
    q = _model_probs(fit.params)
    log_likelihood = sum(math.log(q[c, y]) for c, y in zip(*events, strict=True))
    nll_sum = float(_jit(loss_fn, "sum")(fit.params, data))
    np.testing.assert_allclose(nll_sum, -log_likelihood, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_decomposes_into_entropy_plus_weighted_kl(trained, variant):
    """L(q) = H(Y | C) + Σ_c (N_c / N) KL(p̂_c ‖ q_c), before and after training."""
    data, loss_fn, events, shape, fit = trained[variant]
    counts = _reference_counts(events, shape)
    seen = counts.sum(axis=-1) > 0
    weights = counts.sum(axis=-1)[seen] / counts.sum()
    for params in (toy.init_params(*shape), fit.params):
        kls = _reference_kls(counts, _model_probs(params))
        expected = _reference_entropy(counts) + weights @ kls
        np.testing.assert_allclose(float(_jit(loss_fn)(params, data)), expected, rtol=1e-6)
    # the untrained (uniform) model is far from the MLE: the bounds can fail
    assert kls.mean() <= 1e-3 < _reference_kls(counts, _model_probs(toy.init_params(*shape))).mean()


def test_the_mle_fits_its_sample_better_than_the_true_source(trained):
    data, loss_fn, events, shape, fit = trained["lm"]
    source_nll = -np.mean(np.log(toy.SOURCE_PROBS[events[0], events[1]]))
    assert float(_jit(loss_fn)(fit.params, data)) < source_nll


def test_learned_probabilities_are_count_ratios(trained):
    corpus, _, events, _, fit = trained["lm"]
    the, cat = toy.VOCAB.index("the"), toy.VOCAB.index("cat")
    contexts, targets = events
    ratio = np.sum((contexts == the) & (targets == cat)) / np.sum(contexts == the)
    np.testing.assert_allclose(_model_probs(fit.params)[the, cat], ratio, atol=1e-4)


# --------------------------------------------------------------------------- training loop


@pytest.mark.slow
def test_train_step_is_traced_once_and_reports_progress():
    data, loss_fn, _, shape = _setup("translation", size=50)
    seen = []
    chex.clear_trace_counter()
    fit = toy.train(
        loss_fn,
        toy.init_params(*shape),
        data,
        steps=25,
        callback=lambda step, loss: seen.append((step, loss)),
        report_every=10,
        wrap_step=functools.partial(chex.assert_max_traces, n=1),
    )
    assert [step for step, _ in seen] == [10, 20, 25]
    assert fit.losses.shape == (25,) and fit.seconds > 0
    np.testing.assert_allclose([loss for _, loss in seen[:2]], fit.losses[[9, 19]])


def test_retracing_would_be_caught():
    """The trace check is live: a step wrapped with n=1 fails on a second input shape."""
    step = jax.jit(chex.assert_max_traces(lambda x: x + 1, n=1))
    step(jnp.zeros(2))
    with pytest.raises(AssertionError, match="traced"):
        step(jnp.zeros(3))


@pytest.mark.slow
def test_apply_is_a_row_lookup_and_lm_loss_is_sequence_nll(rng):
    params = {"logits": jnp.asarray(rng.normal(size=(V, V)), jnp.float32)}
    corpus = toy.sample_corpus(2, 8)
    logits = toy.apply(params, corpus.tokens)
    chex.assert_shape(logits, (8, 16, V))
    np.testing.assert_array_equal(logits[3, 4], params["logits"][corpus.tokens[3, 4]])
    expected = jax.jit(functools.partial(jxent.sequence_nll, normalize="sum", shift=True))(
        logits, corpus.tokens, where=corpus.mask
    )
    chex.assert_trees_all_close(_jit(toy.lm_loss, "sum")(params, corpus), expected)


@pytest.mark.slow
def test_generate_follows_the_trained_model(trained):
    _, _, events, shape, fit = trained["lm"]
    samples = np.asarray(toy.generate(fit.params, jax.random.key(0), 64))
    assert samples.shape == (64, 16)
    np.testing.assert_array_equal(samples[:, 0], toy.BOS)
    counts = _reference_counts(events, shape)
    for sentence in samples:
        for prev, nxt in zip(sentence[:-1], sentence[1:], strict=True):
            if prev in (toy.EOS, toy.PAD):
                assert nxt == toy.PAD
            else:  # the trained model puts ~0 probability on unseen transitions
                assert counts[prev, nxt] > 0


@pytest.mark.slow
def test_toy_is_reachable_from_import_jxent_and_imported_lazily():
    """``jxent.toy`` works after ``import jxent``, which does not import it (nor optax)."""
    code = (
        "import sys, jxent\n"
        "assert 'jxent.toy' not in sys.modules\n"
        "assert 'optax' not in sys.modules\n"
        "assert 'toy' in dir(jxent)\n"
        "assert jxent.toy.VOCAB[0] == '<pad>', jxent.toy.VOCAB\n"
        "assert jxent.toy is sys.modules['jxent.toy']\n"
        "try:\n"
        "    jxent.not_a_name\n"
        "except AttributeError as error:\n"
        "    assert 'not_a_name' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
