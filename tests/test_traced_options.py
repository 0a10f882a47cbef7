"""An invalid option that arrives traced under ``jit``: NaN, and ``checkify`` names it.

Eager calls raise ``ValueError`` for these values (test_softmax, test_tokens
and test_packed pin the messages). A traced value cannot raise, so the result
must be NaN, never a finite number, and ``jax.experimental.checkify`` must
report the option by name; a valid traced value must give the static result.
The invalid and the valid values of a case run through one compiled program
(a traced scalar does not recompile), on dense logits and on
:class:`~jxent.LinearLogits` (the fused engine).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jxent

B, T, D, V = 2, 8, 16, 32
_rng = np.random.default_rng(20261207)
HIDDEN = _rng.standard_normal((B, T, D)).astype(np.float32)
KERNEL = (_rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32)
TEACHER = (2 * _rng.standard_normal((B, T, V))).astype(np.float32)
TOKENS = _rng.integers(0, V, (B, T))
BAD_WEIGHT_AT = (1, 4)  # a token position; with shift=True it is predicted at (1, 3)


def _logits(kind: str, hidden=HIDDEN, kernel=KERNEL):
    return jxent.LinearLogits(hidden, kernel) if kind == "fused" else hidden @ kernel


def _reinforce(stats):
    return -stats.log_prob + 0.1 * stats.entropy


# name -> (call(logits, value), option, invalid values, a valid value)
CASES = {
    "softmax_cross_entropy-label_smoothing": (
        lambda x, v: jxent.softmax_cross_entropy(x, TOKENS, label_smoothing=v),
        "label_smoothing", [-0.1, 1.5, np.nan], 0.1,
    ),
    "softmax_cross_entropy-z_loss": (
        lambda x, v: jxent.softmax_cross_entropy(x, TOKENS, z_loss=v),
        "z_loss", [-1e-3, np.inf, np.nan], 1e-3,
    ),
    "sequence_nll-label_smoothing": (
        lambda x, v: jxent.sequence_nll(x, TOKENS, shift=True, label_smoothing=v),
        "label_smoothing", [2.0], 0.2,
    ),
    "nll_stats-z_loss": (
        lambda x, v: jxent.nll_stats(x, TOKENS, shift=True, z_loss=v).total,
        "z_loss", [-1.0], 1e-2,
    ),
    "distillation_loss-temperature": (
        lambda x, v: jxent.distillation_loss(x, TEACHER, shift=False, temperature=v),
        "temperature", [0.0, -1.0, np.inf, np.nan], 2.0,
    ),
    "distillation_loss-beta": (
        lambda x, v: jxent.distillation_loss(x, TEACHER, shift=False, divergence="jsd", beta=v),
        "beta", [0.0, 1.0, 1.5, np.nan], 0.3,
    ),
    "distillation_loss-hard_weight": (
        lambda x, v: jxent.distillation_loss(
            x, TEACHER, shift=True, targets=TOKENS, hard_weight=v
        ),
        "hard_weight", [-0.5, 1.5, np.nan], 0.25,
    ),
    "distillation_loss-topk-temperature": (
        lambda x, v: jxent.distillation_loss(
            x, jxent.TopK.from_logits(TEACHER, 4), shift=False, temperature=v
        ),
        "temperature", [-1.0], 0.5,
    ),
    "token_stats-temperature": (
        lambda x, v: jxent.token_stats(x, TOKENS, shift=True, temperature=v),
        "temperature", [0.0, -1.0], 0.7,
    ),
    "token_objective-temperature": (
        lambda x, v: jxent.token_objective(x, TOKENS, _reinforce, shift=True, temperature=v),
        "temperature", [-1.0, np.nan], 0.7,
    ),
    "class_log_probs-temperature": (
        lambda x, v: jxent.class_log_probs(x, jnp.array([0, 5]), temperature=v),
        "temperature", [-1.0], 1.5,
    ),
}
FUSED_ONLY = {
    "linear_cross_entropy-label_smoothing": (
        lambda _, v: jxent.linear_cross_entropy(HIDDEN, KERNEL, TOKENS, label_smoothing=v),
        "label_smoothing", [1.5, -0.1], 0.1,
    ),
    "linear_cross_entropy-z_loss": (
        lambda _, v: jxent.linear_cross_entropy(HIDDEN, KERNEL, TOKENS, z_loss=v),
        "z_loss", [-1.0], 1e-3,
    ),
}
DENSE_ONLY = {
    "TopK.from_logits-temperature": (
        lambda x, v: jxent.TopK.from_logits(x, 3, temperature=v).log_probs,
        "temperature", [-1.0, 0.0], 0.8,
    ),
}
# The quick tier runs a fused, a dense and a linear case; the rest are slow.
QUICK = {"fused-token_stats-temperature", "dense-softmax_cross_entropy-label_smoothing",
         "linear_cross_entropy-z_loss", "dense-sequence_nll", "fused-temperature"}


def _param(*values, id):
    return pytest.param(*values, id=id, marks=() if id in QUICK else pytest.mark.slow)


PARAMS = (
    [_param(kind, name, id=f"{kind}-{name}") for name in CASES for kind in ("dense", "fused")]
    + [_param("fused", name, id=name) for name in FUSED_ONLY]
    + [_param("dense", name, id=name) for name in DENSE_ONLY]
)


def _static(call, *args):
    """``call(*args)`` with the option a Python value (the static path), compiled once."""
    return jax.jit(lambda: call(*args))()


def _floats(out) -> np.ndarray:
    """Every floating entry of a result (a scalar, an array or a NamedTuple of them)."""
    leaves = [np.ravel(leaf) for leaf in jax.tree.leaves(out)]
    return np.concatenate([leaf for leaf in leaves if np.issubdtype(leaf.dtype, np.floating)])


@pytest.mark.parametrize(("kind", "name"), PARAMS)
def test_invalid_traced_option_is_nan_and_reported(kind, name):
    call, option, invalid, valid = {**CASES, **FUSED_ONLY, **DENSE_ONLY}[name]
    logits = _logits(kind)
    f = jax.jit(lambda v: call(logits, v))
    for bad in invalid:
        out = _floats(f(bad))
        assert np.isnan(out).all(), f"{option}={bad} traced gave {out}"
    expected = _floats(_static(call, logits, valid))
    np.testing.assert_allclose(_floats(f(valid)), expected, rtol=1e-6, atol=1e-6)
    assert np.isfinite(expected).all()

    checked = checkify.checkify(jax.jit(lambda v: call(logits, v)))
    error, out = checked(invalid[0])
    message = error.get()
    assert message is not None and message.startswith(f"{option} must be "), message
    assert f"got {float(invalid[0])}" in message, message
    assert np.isnan(_floats(out)).all()
    error, out = checked(valid)
    assert error.get() is None
    np.testing.assert_allclose(_floats(out), expected, rtol=1e-6, atol=1e-6)


def test_eager_invalid_options_still_raise():
    """The traced check does not replace the eager one (messages pinned elsewhere)."""
    x = _logits("dense")
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0, got -1.0"):
        jxent.TopK.from_logits(x, 3, temperature=-1.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        jxent.softmax_cross_entropy(x, TOKENS, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0, got -1.0"):
        jxent.sequence_nll(x, TOKENS, shift=True, weights=np.full((B, T), -1.0))


# --------------------------------------------------------------------------- weights

# name -> call(logits, weights): (the per-token losses or None, the reduced values)
WEIGHT_CALLS = {
    "sequence_nll": lambda x, w: (
        jxent.sequence_nll(x, TOKENS, shift=True, weights=w, normalize="none"),
        jxent.sequence_nll(x, TOKENS, shift=True, weights=w),
    ),
    "nll_stats": lambda x, w: (None, jxent.nll_stats(x, TOKENS, shift=True, weights=w)),
}


@pytest.mark.parametrize(("kind", "name"), [
    _param(kind, name, id=f"{kind}-{name}") for name in WEIGHT_CALLS for kind in ("dense", "fused")
])
def test_invalid_traced_weight_poisons_its_position(kind, name):
    call, logits = WEIGHT_CALLS[name], _logits(kind)
    weights = np.linspace(0.5, 2.0, B * T, dtype=np.float32).reshape(B, T)
    f = jax.jit(lambda w: call(logits, w))
    predicted = np.zeros((B, T - 1), bool)  # shift=True: token t is predicted at t - 1
    predicted[BAD_WEIGHT_AT[0], BAD_WEIGHT_AT[1] - 1] = True
    for bad in (-1.0, np.inf, np.nan):
        per_token, reduced = f(_with(weights, bad))
        assert np.isnan(_floats(reduced)).all(), f"weight {bad} traced gave {reduced}"
        if per_token is not None:
            per_token = np.asarray(per_token)
            assert np.isnan(per_token[predicted]).all(), per_token
            assert np.isfinite(per_token[~predicted]).all(), per_token
    expected = _floats(_static(call, logits, weights))  # concrete weights: the eager check
    np.testing.assert_allclose(_floats(f(weights)), expected, rtol=1e-6, atol=1e-6)

    error, _ = checkify.checkify(jax.jit(lambda w: call(logits, w)))(_with(weights, -3.0))
    assert error.get().startswith("weights must be finite and >= 0, got -3.0"), error.get()


def _with(weights, bad):
    out = weights.copy()
    out[BAD_WEIGHT_AT] = bad
    return out


# --------------------------------------------------------------------------- transformations


def test_vmap_over_a_traced_option_poisons_only_the_invalid_entries():
    call = CASES["distillation_loss-temperature"][0]
    values = jnp.array([0.5, -1.0, 2.0, 0.0])
    out = jax.jit(jax.vmap(lambda v: call(_logits("dense"), v)))(values)
    expected = [_static(call, _logits("dense"), 0.5), _static(call, _logits("dense"), 2.0)]
    np.testing.assert_allclose(out[jnp.array([0, 2])], expected, rtol=1e-6, atol=1e-6)
    assert np.isnan(out[jnp.array([1, 3])]).all()
    error, _ = checkify.checkify(jax.jit(jax.vmap(lambda v: call(_logits("dense"), v))))(values)
    # checkify reports one of the invalid entries
    assert error.get().split(" (`check`")[0] in {
        f"temperature must be a finite float > 0, got {v}" for v in (-1.0, 0.0)
    }, error.get()


# name -> (call(logits, v), ∂call/∂v at (logits, v), v); a call linear in its
# coefficient has ∂call/∂v = call(1) − call(0).
GRADIENTS = {
    "label_smoothing": (
        CASES["softmax_cross_entropy-label_smoothing"][0],
        lambda x, v: CASES["softmax_cross_entropy-label_smoothing"][0](x, 1.0)
        - CASES["softmax_cross_entropy-label_smoothing"][0](x, 0.0),
        0.1,
    ),
    "hard_weight": (
        CASES["distillation_loss-hard_weight"][0],
        lambda x, v: CASES["distillation_loss-hard_weight"][0](x, 1.0)
        - CASES["distillation_loss-hard_weight"][0](x, 0.0),
        0.25,
    ),
    # token_objective(x, T) = token_objective(x / T, 1): autodiff of the division.
    "temperature": (
        CASES["token_objective-temperature"][0],
        lambda x, v: jax.grad(lambda t: CASES["token_objective-temperature"][0](x / t, 1.0))(v),
        0.7,
    ),
}


@pytest.mark.parametrize(("kind", "option"), [
    _param(kind, option, id=f"{kind}-{option}")
    for option in GRADIENTS for kind in ("dense", "fused")
])
def test_gradients_of_a_valid_traced_option_are_the_static_ones(kind, option):
    """Arrays' gradients equal the static option's; dense: the option's own is exact too.

    The fused engine treats traced coefficients as constants (no gradient
    flows to them: ``linear_cross_entropy``'s docstring), so there only the
    hidden states' gradient is compared.
    """
    call, d_option, v = GRADIENTS[option]

    def loss(hidden, value):
        return call(_logits(kind, hidden), value)

    g_hidden, g_value = jax.jit(jax.grad(loss, argnums=(0, 1)))(HIDDEN, v)
    expected = jax.jit(jax.grad(lambda hidden: loss(hidden, v)))(HIDDEN)  # static v
    np.testing.assert_allclose(g_hidden, expected, rtol=1e-5, atol=1e-6)
    if kind == "dense":
        reference = jax.jit(lambda x: d_option(x, v))(HIDDEN @ KERNEL)
        np.testing.assert_allclose(g_value, reference, rtol=1e-5, atol=1e-6)
