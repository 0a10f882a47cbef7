"""``token_stats`` / ``TokenStats`` and ``distillation_loss``.

References: NumPy float64 implementations of the formulas (log-softmax gather,
entropy, logsumexp, argmax; the three divergences and the hard term), float64
central differences of those references for the student gradient,
``sequence_nll`` for sequence scoring, and TRL's ``generalized_jsd_loss``
written out in PyTorch. Every computation runs under ``jax.jit``.
"""

from __future__ import annotations

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jxent

B, T, V = 2, 5, 7


def close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- references


def log_softmax_np(x) -> np.ndarray:
    """float64 log-softmax over the last axis; −inf logits stay −inf (all −inf rows: NaN)."""
    x = np.asarray(x, np.float64)
    top = x.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def kl_np(p, log_p, log_q) -> np.ndarray:
    """Σ p (log p − log q) with 0 · anything = 0."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def token_stats_np(logits, tokens, where, *, shift, temperature):
    logits = np.asarray(logits, np.float64)
    if shift:
        logits, tokens, where = logits[..., :-1, :], tokens[..., 1:], where[..., 1:]
    z = logits / temperature
    log_p = log_softmax_np(z)
    p = np.exp(log_p)
    log_prob = np.take_along_axis(log_p, tokens[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore"):
        entropy = -np.where(p > 0, p * log_p, 0.0).sum(-1)
    top = z.max(-1)
    logsumexp = top + np.log(np.exp(z - top[..., None]).sum(-1))
    token_logit = np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    is_argmax = token_logit == logits.max(-1)
    zero = lambda v: np.where(where, v, 0)
    return zero(log_prob), zero(entropy), zero(logsumexp), where & is_argmax


def divergence_np(student, teacher, divergence, beta, temperature):
    log_s = log_softmax_np(np.asarray(student, np.float64) / temperature)
    log_t = log_softmax_np(np.asarray(teacher, np.float64) / temperature)
    s, t = np.exp(log_s), np.exp(log_t)
    if divergence == "kl":
        return kl_np(t, log_t, log_s)
    if divergence == "reverse_kl":
        return kl_np(s, log_s, log_t)
    with np.errstate(divide="ignore"):
        log_m = np.log(beta * t + (1 - beta) * s)
    return beta * kl_np(t, log_t, log_m) + (1 - beta) * kl_np(s, log_s, log_m)


def distillation_np(
    student,
    teacher,
    *,
    divergence="kl",
    beta=0.5,
    temperature=1.0,
    where=None,
    reduction="mean",
    targets=None,
    hard_weight=0.0,
    ignore_index=-100,
):
    """The DESIGN formula, position by position, in float64."""
    positions = np.shape(student)[:-1]
    counted = np.ones(positions, bool) if where is None else np.asarray(where).copy()
    per = divergence_np(student, teacher, divergence, beta, temperature)
    if targets is not None:
        counted &= targets != ignore_index
        safe = np.where(counted, targets, 0)
        ce = -np.take_along_axis(log_softmax_np(student), safe[..., None], -1)[..., 0]
        per = hard_weight * ce + (1 - hard_weight) * per
    per = np.where(counted, per, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / max(counted.sum(), 1)


def numeric_grad(f, x, h=1e-6) -> np.ndarray:
    """Central differences of a float64 scalar function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def draw(rng, shape=(B, T), vocab=V, scale=2.0):
    logits = (scale * rng.standard_normal(shape + (vocab,))).astype(np.float32)
    tokens = rng.integers(0, vocab, shape).astype(np.int32)
    where = rng.random(shape) < 0.75
    return logits, tokens, where


# --------------------------------------------------------------------------- token_stats


@pytest.mark.slow
@pytest.mark.parametrize("shift", [True, False])
def test_token_stats_match_numpy_with_temperature_mask_and_shift(rng, shift):
    logits, tokens, where = draw(rng)
    tokens[0, 1] = int(np.argmax(logits[0, 1 - shift]))  # at least one argmax hit
    where[0, 1] = True
    stats = jax.jit(
        lambda x, y, w, temp: jxent.token_stats(x, y, shift=shift, where=w, temperature=temp)
    )
    static = {
        temp: jax.jit(
            lambda x, y, w, temp=temp: jxent.token_stats(
                x, y, shift=shift, where=w, temperature=temp
            )
        )
        for temp in (0.5, 1.0, 2.0)
    }
    for temp in (0.5, 1.0, 2.0):
        expected = token_stats_np(logits, tokens, where, shift=shift, temperature=temp)
        for got in (static[temp](logits, tokens, where), stats(logits, tokens, where, temp)):
            assert isinstance(got, jxent.TokenStats)
            close(got.log_prob, expected[0])
            close(got.entropy, expected[1])
            close(got.logsumexp, expected[2])
            np.testing.assert_array_equal(got.is_argmax, expected[3])
            assert got.is_argmax.dtype == jnp.bool_
    assert expected[3].any()


@pytest.mark.slow
def test_sum_of_log_probs_is_minus_the_sequence_nll(rng):
    logits, tokens, where = draw(rng)
    for shift in (True, False):

        @jax.jit
        def both(x, y, w, shift=shift):
            stats = jxent.token_stats(x, y, shift=shift, where=w)
            nll = jxent.sequence_nll(x, y, shift=shift, where=w, normalize="sum")
            return jnp.sum(stats.log_prob), nll

        total, nll = both(logits, tokens, where)
        close(total, -nll)


def test_is_argmax_counts_every_tied_class():
    logits = np.array([[[1.0, 3.0, 3.0, -1.0]] * 4], np.float32)
    tokens = np.array([[0, 1, 2, 3]], np.int32)
    got = jax.jit(lambda x, y: jxent.token_stats(x, y, shift=False))(logits, tokens)
    np.testing.assert_array_equal(got.is_argmax, [[False, True, True, False]])


def test_argmax_is_the_smallest_tied_id_dense_and_fused():
    """Ties go to the smallest class id (jnp.argmax's rule), dense and fused; 0 if not counted."""
    kernel = np.array([[1, 3, 3, -1, 3], [2, 0, 2, 2, 1]], np.float32)  # exact products
    hidden = np.array([[[1, 0], [0, 1], [1, 1], [-1, 0]]], np.float32)
    tokens = np.array([[1, 0, 2, 3]], np.int32)
    where = np.array([[True, True, True, False]])

    @jax.jit
    def both(h, k):
        return [jxent.token_stats(x, tokens, shift=False, where=where).argmax
                for x in (h @ k, jxent.LinearLogits(h, k, chunk_size=3))]

    dense, fused = both(hidden, kernel)
    np.testing.assert_array_equal(dense, [[1, 0, 2, 0]])
    np.testing.assert_array_equal(fused, dense)
    assert dense.dtype == jnp.int32


def test_entropy_is_never_negative_but_keeps_its_gradient():
    """A near-one-hot distribution: rounding would give H slightly below 0."""
    logits = np.zeros((64, 50), np.float32)
    logits[:, 0] = np.linspace(15.0, 40.0, 64, dtype=np.float32)
    tokens = np.zeros(64, np.int32)
    entropy = lambda x: jxent.token_stats(x, tokens, shift=False).entropy
    h, grad = jax.jit(lambda x: (entropy(x), jax.grad(lambda x: jnp.sum(entropy(x)))(x)))(logits)
    assert np.all(np.asarray(h) >= 0)
    close(h, token_stats_np(logits, tokens, np.ones(64, bool), shift=False, temperature=1)[1])
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


@pytest.mark.slow
def test_masked_positions_are_zero_with_zero_gradient_even_for_nan_and_inf(rng):
    logits, tokens, where = draw(rng)
    where[:, 2] = False
    logits[0, 2, :] = np.nan
    logits[1, 2, 1] = np.inf
    logits[1, 2, 3] = -np.inf

    def objective(x):
        s = jxent.token_stats(x, tokens, shift=False, where=where, temperature=0.7)
        return jnp.sum(s.log_prob) + jnp.sum(s.entropy) + 0.5 * jnp.sum(s.logsumexp), s

    (value, stats), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(logits)
    assert np.isfinite(value)
    for field in stats[:3]:
        assert np.all(np.asarray(field)[:, 2] == 0) and np.all(np.isfinite(field))
    assert not np.asarray(stats.is_argmax)[:, 2].any()
    assert np.all(np.asarray(grad)[:, 2] == 0) and np.all(np.isfinite(grad))
    # Unmasked positions are unaffected by the garbage next door.
    clean = np.where(where[..., None], logits, 0.0)
    close(stats, jax.jit(lambda x: objective(x)[1])(clean))


@pytest.mark.slow
def test_minus_inf_logits_at_counted_positions_are_zero_probability_classes(rng):
    logits, tokens, _ = draw(rng, shape=(4,))
    logits[:, [1, 4]] = -np.inf
    tokens = np.array([0, 2, 3, 6], np.int32)

    def objective(x):
        s = jxent.token_stats(x, tokens, shift=False, temperature=1.5)
        return jnp.sum(s.log_prob) + jnp.sum(s.entropy) + jnp.sum(s.logsumexp), s

    (value, stats), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[:, [1, 4]] == 0)
    # Same as the logits without those classes.
    kept = [0, 2, 3, 5, 6]
    sliced = jxent.token_stats(
        logits[:, kept], np.array([0, 1, 2, 4], np.int32), shift=False, temperature=1.5
    )
    close(stats[:4], sliced[:4])
    np.testing.assert_array_equal(stats.argmax, np.asarray(kept)[sliced.argmax])  # ids move
    # A token at a −inf logit has probability zero: log_prob = −inf.
    bad = jax.jit(lambda x: jxent.token_stats(x, np.array([1, 0, 0, 0]), shift=False))(logits)
    assert bad.log_prob[0] == -np.inf and np.isfinite(bad.entropy[0])


@pytest.mark.slow
def test_check_grads_forward_and_reverse(rng):
    logits, tokens, where = draw(rng, shape=(2, 3), vocab=4, scale=1.0)
    logits = logits.astype(np.float64)

    with jax.enable_x64(True):

        def fields(x, temp):
            s = jxent.token_stats(x, tokens, shift=True, where=where, temperature=temp)
            return s.log_prob, s.entropy, s.logsumexp

        check_grads(jax.jit(fields), (logits, 1.3), order=1, modes=("fwd", "rev"))


@pytest.mark.slow
def test_forward_mode_matches_reverse_mode(rng):
    logits, tokens, where = draw(rng)
    tangent = rng.standard_normal(logits.shape).astype(np.float32)

    def f(x):
        s = jxent.token_stats(x, tokens, shift=True, where=where, temperature=0.8)
        return jnp.sum(s.log_prob) - 0.3 * jnp.sum(s.entropy) + jnp.sum(s.logsumexp)

    _, jvp = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(logits, tangent)
    grad = jax.jit(jax.grad(f))(logits)
    close(jvp, jnp.vdot(grad, tangent), tol=1e-4)


@pytest.mark.slow
def test_vmap_equals_batched(rng):
    logits, tokens, where = draw(rng)
    f = lambda x, y, w: jxent.token_stats(x, y, shift=True, where=w, temperature=2.0)
    close(jax.jit(jax.vmap(f))(logits, tokens, where), jax.jit(f)(logits, tokens, where))


def test_bf16_logits_are_computed_in_float32(rng):
    logits, tokens, where = draw(rng)
    low = logits.astype(jnp.bfloat16)
    f = jax.jit(lambda x: jxent.token_stats(x, tokens, shift=False, where=where))
    got = f(low)
    assert got.log_prob.dtype == jnp.float32
    close(got, f(np.asarray(low, np.float32)))


@pytest.mark.slow
def test_out_of_range_tokens_raise_eagerly_and_are_nan_under_jit(rng):
    logits, tokens, where = draw(rng)
    tokens[1, 3] = V
    where[1, 3] = True
    with pytest.raises(ValueError, match=r"tokens must be class indices in \[0, 7\).*\(1, 3\)"):
        jxent.token_stats(logits, tokens, shift=False, where=where)
    got = jax.jit(lambda x, y: jxent.token_stats(x, y, shift=False, where=where))(logits, tokens)
    assert np.isnan(got.log_prob[1, 3]) and not got.is_argmax[1, 3]
    assert np.all(np.isfinite(np.delete(np.asarray(got.log_prob).ravel(), 1 * T + 3)))
    where[1, 3] = False  # not counted: no error, 0
    assert jxent.token_stats(logits, tokens, shift=False, where=where).log_prob[1, 3] == 0


def test_token_stats_errors(rng):
    logits, tokens, _ = draw(rng)
    with pytest.raises(TypeError, match=r"pass shift=True for causal LM logits.*shift=False"):
        jxent.token_stats(logits, tokens)
    with pytest.raises(TypeError, match=r"tokens.*astype\(jnp.int32\)"):
        jxent.token_stats(logits, tokens.astype(np.float32), shift=True)
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 4\)"):
        jxent.token_stats(logits, tokens[:, :4], shift=True)
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0, got 0"):
        jxent.token_stats(logits, tokens, shift=True, temperature=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0, got -1.0"):
        jxent.token_stats(logits, tokens, shift=True, temperature=-1.0)
    with pytest.raises(TypeError, match=r"logits must be a floating-point array"):
        jxent.token_stats(tokens[..., None], tokens, shift=False)
    with pytest.raises(ValueError, match=r"where has shape \(2, 4\)"):
        jxent.token_stats(logits, tokens, shift=True, where=np.ones((2, 4), bool))


# --------------------------------------------------------------------------- token_objective


def _clipped(log_prob, entropy, advantage, old, xp=jnp):
    ratio = xp.exp(log_prob - old)
    clipped = xp.minimum(ratio * advantage, xp.clip(ratio, 0.8, 1.2) * advantage)
    return -clipped - 0.01 * entropy


@pytest.mark.slow
@pytest.mark.parametrize("shift", [True, False])
def test_token_objective_matches_numpy_and_the_explicit_sum(rng, shift):
    logits, tokens, where = draw(rng)
    advantage = rng.standard_normal((B, T)).astype(np.float32)
    old = (-2 + rng.standard_normal((B, T))).astype(np.float32)
    fn = lambda s, a, o: _clipped(s.log_prob, s.entropy, a, o)
    cut = (lambda a: a[..., 1:]) if shift else (lambda a: a)
    # One program: the temperature is traced.
    run = jax.jit(lambda x, a, o, t: jxent.token_objective(
        x, tokens, fn, shift=shift, args=(a, o), where=where, temperature=t))
    for temp in (0.5, 1.0, 2.0):
        got = run(logits, cut(advantage), cut(old), temp)
        log_prob, entropy, _, _ = token_stats_np(
            logits, tokens, where, shift=shift, temperature=temp
        )
        per = _clipped(log_prob, entropy, cut(advantage), cut(old), xp=np)
        close(got, np.where(cut(where), per, 0).sum())

    def explicit(x):
        s = jxent.token_stats(x, tokens, shift=shift, where=where, temperature=0.7)
        return jnp.sum(jnp.where(cut(where), fn(s, cut(advantage), cut(old)), 0))

    objective = lambda x: jxent.token_objective(
        x, tokens, fn, shift=shift, args=(cut(advantage), cut(old)), where=where,
        temperature=0.7,
    )
    close(*jax.jit(lambda x: (jax.value_and_grad(objective)(x),
                              jax.value_and_grad(explicit)(x)))(logits))


@pytest.mark.slow
def test_token_objective_masks_args_and_gradients(rng):
    logits, tokens, where = draw(rng)
    where[:, 2] = False
    logits[0, 2, :] = np.nan
    logits[1, 2, 1] = np.inf
    advantage = rng.standard_normal((B, T)).astype(np.float32)

    def objective(x, a):
        fn = lambda s, a: -a * s.log_prob + 0.1 * s.logsumexp
        return jxent.token_objective(x, tokens, fn, shift=False, args=(a,), where=where)

    value, (g_logits, g_advantage) = jax.jit(jax.value_and_grad(objective, (0, 1)))(
        logits, advantage
    )
    assert np.isfinite(value) and np.all(np.isfinite(g_logits))
    assert not np.any(np.asarray(g_logits)[:, 2])
    assert not np.any(g_advantage)  # args are constants, like advantages
    # forward mode and check_grads (the dense path is plain autodiff)
    clean = np.where(where[..., None], logits, 0.0).astype(np.float64)
    with jax.enable_x64(True):
        f = lambda x: objective(x, advantage.astype(np.float64))
        check_grads(jax.jit(f), (clean,), order=1, modes=("fwd", "rev"))


def test_token_objective_errors():
    logits, tokens = np.zeros((2, 5, 7), np.float32), np.zeros((2, 5), np.int32)
    fn = lambda s: -s.log_prob
    with pytest.raises(TypeError, match="fn must be a function"):
        jxent.token_objective(logits, tokens, 3.0, shift=True)
    with pytest.raises(TypeError, match="args must be a tuple"):
        jxent.token_objective(logits, tokens, fn, shift=True, args=np.zeros((2, 5)))
    # args are aligned with the predicted positions [2, 4]: the tokens' [2, 5] is refused.
    with pytest.raises(ValueError, match=re.escape("args[0] has shape (2, 5)") + ".*"
                       + re.escape("pass args[0][..., 1:]")):
        jxent.token_objective(
            logits, tokens, lambda s, a: a, shift=True, args=(np.zeros((2, 5)),)
        )
    with pytest.raises(ValueError, match=re.escape("args[0] has shape (2,)") + ".*"
                       + re.escape("a[:, None] for one value per sequence")):
        jxent.token_objective(
            logits, tokens, lambda s, a: a, shift=True, args=(np.zeros(2),)
        )
    with pytest.raises(ValueError, match=re.escape("one value per position), got shape ()")):
        jxent.token_objective(logits, tokens, lambda s: jnp.sum(s.log_prob), shift=True)
    with pytest.raises(ValueError, match="got shape \\(2, 4\\), dtype bool"):
        jxent.token_objective(logits, tokens, lambda s: s.is_argmax, shift=True)
    with pytest.raises(TypeError, match="shift"):
        jxent.token_objective(logits, tokens, fn)


# --------------------------------------------------------------------------- distillation


def draw_pair(rng, shape=(B, T), vocab=V):
    student = (1.5 * rng.standard_normal(shape + (vocab,))).astype(np.float32)
    teacher = (2.0 * rng.standard_normal(shape + (vocab,))).astype(np.float32)
    where = rng.random(shape) < 0.75
    targets = rng.integers(0, vocab, shape).astype(np.int32)
    targets = np.where(rng.random(shape) < 0.2, -100, targets).astype(np.int32)
    return student, teacher, where, targets


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_divergences_match_numpy(rng, divergence, temperature):
    student, teacher, where, _ = draw_pair(rng)
    for beta in (0.1, 0.5, 0.9) if divergence == "jsd" else (0.5,):
        f = jax.jit(
            lambda s, t, w, beta=beta: jxent.distillation_loss(
                s,
                t, shift=False,
                divergence=divergence,
                beta=beta,
                temperature=temperature,
                where=w,
                reduction="none",
            )
        )
        expected = distillation_np(
            student,
            teacher,
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            where=where,
            reduction="none",
        )
        got = f(student, teacher, where)
        close(got, expected)
        assert np.all(np.asarray(got) >= 0)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_hard_weight_targets_masks_and_reductions_match_numpy(rng, reduction, divergence):
    student, teacher, where, targets = draw_pair(rng)
    kw = dict(divergence=divergence, beta=0.3, temperature=2.0, reduction=reduction)
    assert (targets == -100).any() and (where & (targets != -100)).any()

    @jax.jit
    def f(s, t, w, y, alpha):
        return jxent.distillation_loss(
            s, t, shift=False, where=w, targets=y, hard_weight=alpha, **kw,
        )

    for alpha in (0.0, 0.4, 1.0):
        expected = distillation_np(
            student, teacher, where=where, targets=targets, hard_weight=alpha, **kw
        )
        close(f(student, teacher, where, targets, alpha), expected)  # traced hard_weight
    static = jxent.distillation_loss(
        student, teacher, shift=False, where=where, targets=targets, hard_weight=0.4, **kw
    )
    close(
        static,
        distillation_np(student, teacher, where=where, targets=targets, hard_weight=0.4, **kw),
    )


def test_ignore_index_drops_the_position_from_both_terms_and_the_denominator(rng):
    student, teacher, _, targets = draw_pair(rng)
    targets[0, 0] = 3
    dropped = targets.copy()
    dropped[0, 0] = -100
    f = jax.jit(
        lambda y, w: jxent.distillation_loss(
            student, teacher, shift=False, targets=y, where=w, hard_weight=0.5, divergence="jsd"
        )
    )
    mask = np.ones((B, T), bool)
    mask[0, 0] = False
    close(f(dropped, np.ones((B, T), bool)), f(targets, mask))


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_student_gradient_matches_float64_finite_differences(rng, divergence):
    student, teacher, where, targets = draw_pair(rng, shape=(3,), vocab=5)
    kw = dict(
        divergence=divergence,
        beta=0.7,
        temperature=1.5,
        where=where,
        targets=targets,
        hard_weight=0.25,
    )
    grad = jax.jit(
        jax.grad(lambda s: jxent.distillation_loss(s, teacher, shift=False, **kw)))(student,
    )
    expected = numeric_grad(lambda s: distillation_np(s, teacher, **kw), student)
    close(grad, expected, tol=2e-5)


@pytest.mark.slow
def test_distillation_check_grads_forward_and_reverse(rng):
    student, teacher, where, targets = draw_pair(rng, shape=(3,), vocab=4)
    with jax.enable_x64(True):
        student, teacher = student.astype(np.float64), teacher.astype(np.float64)

        def f(s, temp):
            return [
                jxent.distillation_loss(
                    s,
                    teacher, shift=False,
                    divergence=d,
                    beta=0.4,
                    temperature=temp,
                    where=where,
                    targets=targets,
                    hard_weight=0.3,
                    reduction="none",
                )
                for d in ("kl", "reverse_kl", "jsd")
            ]

        check_grads(jax.jit(f), (student, 0.8), order=1, modes=("fwd", "rev"))


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_equals_trls_generalized_jsd_loss(rng, beta):
    """TRL (``GKDTrainer.generalized_jsd_loss``, 0 < β < 1), written out in PyTorch.

    TRL mixes ``m = β·t + (1 − β)·s`` (``log(1 − β)`` on the student, ``log β``
    on the teacher) and returns ``β·KL(t‖m) + (1 − β)·KL(s‖m)``:
    ``F.kl_div(input, target, log_target=True)`` is ``KL(target‖input)``. This is
    DESIGN's convention: β is the teacher's weight. ``"batchmean"`` with labels
    is the mean over positions whose label is not −100: jxent's ``"mean"``.
    """
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    student, teacher, _, labels = draw_pair(rng)
    temperature = 1.7

    s = torch.tensor(student, dtype=torch.float64) / temperature
    t = torch.tensor(teacher, dtype=torch.float64) / temperature
    student_log_probs = F.log_softmax(s, dim=-1)
    teacher_log_probs = F.log_softmax(t, dim=-1)
    b = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - b), teacher_log_probs + torch.log(b)]),
        dim=0,
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = b * kl_teacher + (1 - b) * kl_student
    mask = torch.tensor(labels) != -100
    trl = (jsd[mask].sum() / mask.sum()).item()

    got = jax.jit(
        lambda s, t, w: jxent.distillation_loss(
            s, t, shift=False, divergence="jsd", beta=beta, temperature=temperature, where=w
        )
    )(student, teacher, labels != -100)
    close(got, trl)


@pytest.mark.slow
def test_kl_of_a_distribution_to_itself_is_zero_and_jsd_is_at_most_log_2(rng):
    student, _, _, _ = draw_pair(rng)
    f = jax.jit(
        lambda s, t, d: jxent.distillation_loss(s, t, shift=False, divergence=d, reduction="none"),
        static_argnums=2,
    )
    for divergence in ("kl", "reverse_kl", "jsd"):
        got = f(student, student, divergence)
        assert np.all(np.asarray(got) >= 0)
        close(got, np.zeros((B, T)), tol=1e-6)
    # Disjoint supports: the bound log 2 is reached, not exceeded.
    left = np.where(np.arange(V) < 3, 0.0, -np.inf).astype(np.float32)
    apart = f(np.broadcast_to(left, (B, T, V)), np.broadcast_to(left[::-1], (B, T, V)), "jsd")
    close(apart, np.full((B, T), math.log(2)), tol=1e-6)
    random = f(student, 10 * draw_pair(rng)[1], "jsd")
    assert np.all(np.asarray(random) <= math.log(2))


@pytest.mark.slow
def test_teacher_gets_no_gradient(rng):
    student, teacher, where, targets = draw_pair(rng)

    @jax.jit
    def grads(s, t):
        out = []
        for d in ("kl", "reverse_kl", "jsd"):
            loss = lambda s, t, d=d: jxent.distillation_loss(
                s,
                t, shift=False,
                divergence=d,
                temperature=2.0,
                where=where,
                targets=targets,
                hard_weight=0.2,
            )
            out.append(jax.grad(loss, argnums=(0, 1))(s, t))
        return out

    for g_student, g_teacher in grads(student, teacher):
        assert np.all(np.asarray(g_teacher) == 0)
        assert np.any(np.asarray(g_student) != 0)


@pytest.mark.slow
def test_a_class_impossible_under_both_contributes_nothing(rng):
    """−inf in both logits at a class: finite, no NaN, and equal to dropping the class."""
    student, teacher, where, targets = draw_pair(rng)
    student[..., 2] = -np.inf
    teacher[..., 2] = -np.inf
    targets = np.where(targets == 2, 0, targets).astype(np.int32)
    kept = [0, 1, 3, 4, 5, 6]
    sliced_targets = np.where(targets > 2, targets - 1, targets).astype(np.int32)

    @jax.jit
    def values_and_grads(s, t, y):
        return [
            jax.value_and_grad(
                lambda s, d=d: jxent.distillation_loss(
                    s,
                    t, shift=False,
                    divergence=d,
                    where=where,
                    targets=y,
                    hard_weight=0.3,
                    temperature=0.5,
                )
            )(s)
            for d in ("kl", "reverse_kl", "jsd")
        ]

    full = values_and_grads(student, teacher, targets)
    sliced = values_and_grads(student[..., kept], teacher[..., kept], sliced_targets)
    for (value, grad), (sliced_value, sliced_grad) in zip(full, sliced, strict=True):
        assert np.isfinite(value) and np.all(np.isfinite(grad))
        assert np.all(np.asarray(grad)[..., 2] == 0)
        close(value, sliced_value)
        close(np.asarray(grad)[..., kept], sliced_grad)


def test_masked_nan_logits_reach_neither_value_nor_gradient(rng):
    student, teacher, where, _ = draw_pair(rng)
    where[1, :2] = False
    student[1, 0] = np.nan
    teacher[1, 1] = np.inf
    f = jax.jit(
        jax.value_and_grad(
            lambda s: jxent.distillation_loss(
                s, teacher, shift=False, divergence="jsd", where=where,
            )
        )
    )
    value, grad = f(student)
    assert np.isfinite(value) and np.all(np.asarray(grad)[1, :2] == 0)
    clean_s = np.where(where[..., None], student, 0)
    clean_t = np.where(where[..., None], teacher, 0)
    close(value, distillation_np(clean_s, clean_t, divergence="jsd", where=where))


@pytest.mark.slow
def test_distillation_vmap_forward_mode_and_all_masked(rng):
    student, teacher, where, _ = draw_pair(rng)
    f = lambda s, t, w: jxent.distillation_loss(
        s, t, shift=False, divergence="jsd", where=w, reduction="none",
    )
    close(jax.jit(jax.vmap(f))(student, teacher, where), jax.jit(f)(student, teacher, where))
    tangent = rng.standard_normal(student.shape).astype(np.float32)
    mean = lambda s: jxent.distillation_loss(
        s, teacher, shift=False, divergence="reverse_kl", where=where,
    )
    _, jvp = jax.jit(lambda s, d: jax.jvp(mean, (s,), (d,)))(student, tangent)
    close(jvp, jnp.vdot(jax.jit(jax.grad(mean))(student), tangent), tol=1e-5)
    nothing = np.zeros((B, T), bool)
    value, grad = jax.jit(
        jax.value_and_grad(
            lambda s: jxent.distillation_loss(s, teacher, shift=False, where=nothing),
        )
    )(student)
    assert value == 0 and np.all(np.asarray(grad) == 0)


def test_distillation_errors(rng):
    student, teacher, _, targets = draw_pair(rng)
    with pytest.raises(ValueError, match=r"divergence must be one of 'kl', 'reverse_kl', 'jsd'"):
        jxent.distillation_loss(student, teacher, shift=False, divergence="js")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        jxent.distillation_loss(student, teacher, shift=False, reduction="batchmean")
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"beta must be a float in the open interval \(0, 1\)"):
            jxent.distillation_loss(student, teacher, shift=False, divergence="jsd", beta=beta)
    # beta is unused by "kl"
    jxent.distillation_loss(student, teacher, shift=False, divergence="kl", beta=0.0)
    with pytest.raises(ValueError, match=r"hard_weight=0.5 .* targets is None"):
        jxent.distillation_loss(student, teacher, shift=False, hard_weight=0.5)
    with pytest.raises(ValueError, match=r"hard_weight must be a float in \[0, 1\]"):
        jxent.distillation_loss(student, teacher, shift=False, targets=targets, hard_weight=1.5)
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0"):
        jxent.distillation_loss(student, teacher, shift=False, temperature=0.0)
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(2, 5, 6\) but student"):
        jxent.distillation_loss(student, teacher[..., :6], shift=False)
    with pytest.raises(ValueError, match=r"targets has shape \(2, 4\)"):
        jxent.distillation_loss(
            student, teacher, shift=False, targets=targets[:, :4], hard_weight=0.5,
        )
    with pytest.raises(TypeError, match=r"targets.*astype\(jnp.int32\)"):
        jxent.distillation_loss(
            student, teacher, shift=False, targets=targets * 1.0, hard_weight=0.5,
        )
    bad = targets.copy()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 7\) or "):
        jxent.distillation_loss(student, teacher, shift=False, targets=bad, hard_weight=0.5)
    with pytest.raises(ValueError, match=r"where has shape \(2,\)"):
        jxent.distillation_loss(student, teacher, shift=False, where=np.ones(2, bool))


def test_traced_temperature_and_beta_equal_static(rng):
    student, teacher, where, _ = draw_pair(rng)
    traced = jax.jit(
        lambda s, t, temp, beta: jxent.distillation_loss(
            s, t, shift=False, divergence="jsd", beta=beta, temperature=temp, where=where
        )
    )
    static = jxent.distillation_loss(
        student, teacher, shift=False, divergence="jsd", beta=0.2, temperature=0.6, where=where
    )
    close(traced(student, teacher, 0.6, 0.2), static)


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np, jxent
from jax.sharding import Mesh, PartitionSpec as P

mesh = Mesh(np.asarray(jax.devices()[:4]), ("v",))
rng = np.random.default_rng(7)
x = (2 * rng.standard_normal((2, 5, 12))).astype(np.float32)
teacher = (2 * rng.standard_normal((2, 5, 12))).astype(np.float32)
x[0, 1, 5] = -np.inf
tokens = rng.integers(0, 12, (2, 5)).astype(np.int32)
where = rng.random((2, 5)) < 0.8
targets = np.where(rng.random((2, 5)) < 0.2, -100, tokens).astype(np.int32)
V, R = P(None, None, "v"), P()


def stats(x, name=None):
    s = jxent.token_stats(x, tokens, shift=True, where=where, temperature=1.5,
                          vocab_axis_name=name)
    return s, jnp.sum(s.log_prob) + jnp.sum(s.entropy) + jnp.sum(s.logsumexp)


def distill(x, t, name=None):
    return sum(
        jxent.distillation_loss(x, t, shift=False, divergence=d, beta=0.3, temperature=2.0,
                                where=where, targets=targets, hard_weight=0.4,
                                vocab_axis_name=name)
        for d in ("kl", "reverse_kl", "jsd")
    )


def everything(x, t, name=None):
    values, stats_grad = jax.grad(lambda x: stats(x, name)[::-1], has_aux=True)(x)[::-1]
    return values, stats_grad, jax.value_and_grad(lambda x: distill(x, t, name))(x)


sharded = jax.jit(jax.shard_map(
    lambda x, t: everything(x, t, "v"),
    mesh=mesh, in_specs=(V, V), out_specs=(R, V, (R, V))))
got = jax.tree.leaves(sharded(x, teacher))
want = jax.tree.leaves(jax.jit(everything)(x, teacher))
assert len(got) == len(want) == 8  # TokenStats: 5 fields
for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
print("sharded ok")
"""


@pytest.mark.slow
def test_vocab_sharded_equals_unsharded(capsys):
    """4 of the suite's host devices, the vocabulary sharded: values and gradients equal one."""
    exec(compile(SHARDED, "SHARDED", "exec"), {})
    assert "sharded ok" in capsys.readouterr().out
