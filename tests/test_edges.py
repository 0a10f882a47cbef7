"""What a new user hit in 0.3, each pinned by a test that failed on 0.3.

``NLLStats`` arithmetic, ``perplexity`` of stats, ``token_stats`` on padded
tokens, ``token_objective``'s argument alignment, ``distillation_loss``'s
shift, bits, and where bf16 loses precision.
"""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent import LinearLogits

B, T, V, D = 3, 6, 11, 5
TOL = 2e-5


def close(a, b, tol=TOL):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


@pytest.fixture
def batch(rng):
    logits = rng.standard_normal((B, T, V)).astype(np.float32) * 2
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    tokens[0, 4:] = -100  # padding, as sequence_nll takes it
    tokens[2, 1] = -100
    return logits, tokens


# --------------------------------------------------------------------------- NLLStats


@pytest.mark.slow
def test_nll_stats_add_and_sum_combine_the_sums(rng, batch):
    logits, tokens = batch
    a = jxent.nll_stats(logits[:2], tokens[:2], shift=True)
    b = jxent.nll_stats(logits[2:], tokens[2:], shift=True)
    whole = jxent.nll_stats(logits, tokens, shift=True)
    assert isinstance(a + b, jxent.NLLStats)  # 0.3: a 4-tuple
    close(tuple(a + b), tuple(whole))
    close(tuple(sum([a, b])), tuple(whole))
    close(tuple(sum([a])), tuple(a))
    # The pytree forms combine as before.
    close(tuple(jax.tree.map(jnp.add, a, b)), tuple(whole))
    with pytest.raises(TypeError):
        a * 2  # not tuple repetition
    with pytest.raises(TypeError):
        a + (1.0, 2.0)


def test_nll_stats_psum_over_devices_is_the_sum():
    stats = jxent.NLLStats(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
    out = jax.vmap(lambda s: jax.lax.psum(s, "i"), axis_name="i")(stats)
    assert isinstance(out, jxent.NLLStats)
    close(tuple(out), (jnp.array([3.0, 3.0]), jnp.array([7.0, 7.0])))


def test_perplexity_of_stats_is_their_perplexity(batch):
    logits, tokens = batch
    stats = jxent.nll_stats(logits, tokens, shift=True)
    close(jxent.perplexity(stats), jnp.exp(stats.total / stats.count))
    close(jxent.perplexity(stats), stats.perplexity())
    with pytest.raises(TypeError, match="perplexity takes a mean NLL in nats"):
        jxent.perplexity((stats.total, stats.count))


def test_bits_per_byte_is_lm_evaluation_harness_formula(batch):
    """lm-eval-harness: ``bits_per_byte = Σ NLL / num_bytes / ln 2`` over the whole text."""
    logits, tokens = batch
    stats = jxent.nll_stats(logits, tokens, shift=True)
    text = "the cat sat on the mat, ĉu la kato?"  # non-ASCII: bytes > characters
    num_bytes = len(text.encode("utf-8"))
    assert num_bytes > len(text)
    want = float(stats.total) / num_bytes / math.log(2)
    assert float(stats.bits_per_byte(num_bytes)) == pytest.approx(want, rel=1e-6)
    assert float(stats.bits_per_token()) == pytest.approx(
        float(stats.total / stats.count) / math.log(2), rel=1e-6
    )


def test_sequence_nll_base_gives_bits(batch):
    logits, tokens = batch
    nats = jxent.sequence_nll(logits, tokens, shift=True)
    close(jxent.sequence_nll(logits, tokens, shift=True, base=2), nats / math.log(2))
    per = jxent.sequence_nll(logits, tokens, shift=True, normalize="none", base=10)
    close(per, jxent.sequence_nll(logits, tokens, shift=True, normalize="none") / math.log(10))
    with pytest.raises(ValueError, match="base must be"):
        jxent.sequence_nll(logits, tokens, shift=True, base=1)


def test_normalize_mean_suggests_tokens(batch):
    logits, tokens = batch
    with pytest.raises(ValueError, match=re.escape("got 'mean'; did you mean 'tokens'?")):
        jxent.sequence_nll(logits, tokens, shift=True, normalize="mean")


# --------------------------------------------------------------------------- ignore_index


@pytest.mark.parametrize("fused", [False, True])
def test_token_stats_and_objective_take_padded_tokens(rng, batch, fused):
    """The padded tokens ``sequence_nll`` takes: 0 at the padding, eagerly and under jit."""
    logits, tokens = batch
    hidden = rng.standard_normal((B, T, D)).astype(np.float32)
    kernel = rng.standard_normal((D, V)).astype(np.float32)
    x = LinearLogits(hidden, kernel, chunk_size=4) if fused else hidden @ kernel
    padded = np.asarray(tokens[:, 1:] == -100)
    for stats in (
        jxent.token_stats(x, tokens, shift=True),
        jax.jit(lambda h, k: jxent.token_stats(
            LinearLogits(h, k, chunk_size=4) if fused else h @ k, tokens, shift=True
        ))(hidden, kernel),
    ):
        for field in stats:
            assert np.all(np.asarray(field)[padded] == 0), field
            assert np.isfinite(np.asarray(field, np.float32)).all()
        assert np.all(np.asarray(stats.log_prob)[~padded] < 0)
    objective = jxent.token_objective(x, tokens, lambda s: s.log_prob, shift=True)
    close(objective, -jxent.sequence_nll(x, tokens, shift=True, normalize="sum"))
    # ignore_index=None makes -100 an out-of-range id again.
    with pytest.raises(ValueError, match=r"tokens must be class indices in \[0, 11\)"):
        jxent.token_stats(x, tokens, shift=True, ignore_index=None)


# --------------------------------------------------------------------------- token_objective args


def test_token_objective_args_are_aligned_with_the_predicted_positions(rng, batch):
    logits, tokens = batch
    tokens = np.where(tokens < 0, 0, tokens)
    stats = jxent.token_stats(logits, tokens, shift=True)  # [B, T - 1]
    per_position = rng.standard_normal((B, T - 1)).astype(np.float32)
    per_sequence = rng.standard_normal((B, 1)).astype(np.float32)
    column = (rng.random((1, T - 1)) > 0.5).astype(np.float32)
    fn = lambda s, a, b, c, d: -(a * b * c * d) * s.log_prob
    got = jxent.token_objective(
        logits, tokens, fn, shift=True, args=(per_position, per_sequence, column, 0.5)
    )
    want = jnp.sum(fn(stats, per_position, per_sequence, column, 0.5))
    close(got, want)
    # Without a shift the tokens' shape is the predicted positions' shape.
    got = jxent.token_objective(logits, tokens, lambda s, a: a * s.entropy, shift=False,
                                args=(rng.standard_normal((B, T)),))
    assert np.isfinite(float(got))
    # The tokens' unshifted shape with a shift would misalign: an error naming the slice.
    with pytest.raises(ValueError, match=re.escape(f"args[0] has shape {(B, T)}")):
        jxent.token_objective(logits, tokens, fn, shift=True,
                              args=(np.zeros((B, T)), per_sequence, column, 0.5))
    with pytest.raises(ValueError, match=re.escape("args[1] has shape (3,)")):
        jxent.token_objective(logits, tokens, fn, shift=True,
                              args=(per_position, np.zeros(B), column, 0.5))


@pytest.mark.slow
def test_token_objective_args_with_shift_two(rng, batch):
    logits, tokens = batch
    tokens = np.where(tokens < 0, 0, tokens)
    a = rng.standard_normal((B, T - 2)).astype(np.float32)
    got = jxent.token_objective(logits, tokens, lambda s, a: a * s.log_prob, shift=2, args=(a,))
    stats = jxent.token_stats(logits[:, :-2], tokens[:, 2:], shift=False)
    close(got, jnp.sum(a * stats.log_prob))


# --------------------------------------------------------------------------- distillation shift


@pytest.mark.slow
@pytest.mark.parametrize("shift", [1, 2])
def test_distillation_shift_equals_slicing_by_hand(rng, shift):
    student = rng.standard_normal((B, T, V)).astype(np.float32)
    teacher = rng.standard_normal((B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    where = rng.random((B, T)) > 0.2
    opts = dict(divergence="jsd", beta=0.3, hard_weight=0.25)
    for reduction in ("mean", "sum", "none"):
        got = jxent.distillation_loss(student, teacher, shift=shift, targets=targets,
                                      where=where, reduction=reduction, **opts)
        want = jxent.distillation_loss(
            student[:, :-shift], teacher[:, :-shift], shift=False, targets=targets[:, shift:],
            where=where[:, shift:], reduction=reduction, **opts,
        )
        close(got, want)
    with pytest.raises(TypeError, match=re.escape("distillation_loss() needs shift")):
        jxent.distillation_loss(student, teacher)


def test_jsd_beta_error_names_the_limits_the_right_way_round():
    s = t = np.zeros((2, 3), np.float32)
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match=re.escape(
            'beta -> 0 tends to beta * "kl", the forward KL(t||s), and beta -> 1 to '
            '(1 - beta) * "reverse_kl"'
        )):
            jxent.distillation_loss(s, t, shift=False, divergence="jsd", beta=beta)


@pytest.mark.slow
def test_jsd_near_its_limits_is_the_scaled_kl(rng):
    """β → 0 gives β·KL(t‖s) ("kl"); β → 1 gives (1 − β)·KL(s‖t) ("reverse_kl")."""
    s = rng.standard_normal((4, 7)).astype(np.float64)
    t = rng.standard_normal((4, 7)).astype(np.float64)
    with jax.enable_x64(True):
        kl = jxent.distillation_loss(s, t, shift=False, divergence="kl")
        reverse = jxent.distillation_loss(s, t, shift=False, divergence="reverse_kl")
        eps = 1e-4
        low = jxent.distillation_loss(s, t, shift=False, divergence="jsd", beta=eps) / eps
        high = jxent.distillation_loss(s, t, shift=False, divergence="jsd", beta=1 - eps) / eps
    assert float(low) == pytest.approx(float(kl), rel=1e-3)
    assert float(high) == pytest.approx(float(reverse), rel=1e-3)
    assert abs(float(kl) - float(reverse)) > 1e-2  # the test can tell the two apart


# --------------------------------------------------------------------------- bf16


@pytest.mark.slow
def test_bf16_precision_is_lost_in_the_logits_not_in_jxent(rng):
    """bf16 logits formed outside jit carry bf16's rounding; LinearLogits keeps float32 logits.

    jxent computes in float32 from whatever logits it gets (equal to the float32
    call on the same rounded values); the fused path forms its logits in float32
    from bf16 ``hidden`` and ``kernel``, so it matches the float32 product of
    those bf16 values to float32 rounding.
    """
    hidden = jnp.asarray(rng.standard_normal((B, T, 64)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((64, V)), jnp.bfloat16)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    exact = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)  # the f32 products
    want = jxent.sequence_nll(exact, tokens, shift=True, normalize="none")
    rounded = hidden @ kernel  # bf16 logits, as an eager bf16 product gives them
    assert rounded.dtype == jnp.bfloat16
    dense = jxent.sequence_nll(rounded, tokens, shift=True, normalize="none")
    close(dense, jxent.sequence_nll(rounded.astype(jnp.float32), tokens, shift=True,
                                    normalize="none"), tol=1e-6)
    assert float(jnp.max(jnp.abs(dense - want))) > 1e-3  # the rounding of the logits
    fused = jxent.sequence_nll(LinearLogits(hidden, kernel), tokens, shift=True,
                               normalize="none")
    close(fused, want, tol=1e-5)
