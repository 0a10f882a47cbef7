"""``softmax_cross_entropy``: equivalences, gradients, hostile input and validation.

PyTorch parity (every option against ``torch.nn.functional.cross_entropy``)
lives in ``tests/parity``; here the references are the loss's own identities
(integer = one-hot, masked = sliced, ``axis=1`` = ``moveaxis``, vmap =
batching), the plain formulas written out, the analytic gradient and float64
NumPy. Every computation runs under ``jax.jit``; each test compiles one
function that returns everything it compares (compiling, not computing, is
what tiny tests spend their time on).
"""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jxent

N, C = 6, 5


def loss_fn(**options):
    """``softmax_cross_entropy`` with static options bound (not jitted: used inside jit)."""
    return functools.partial(jxent.softmax_cross_entropy, **options)


def value_and_grad_sum(f):
    """``x -> (f(x), ∇_x Σ f(x))``: value and gradient of a loss of any reduction."""

    def run(x, *args, **kwargs):
        value, vjp = jax.vjp(lambda x: f(x, *args, **kwargs), x)
        return value, vjp(jnp.ones_like(value))[0]

    return run


def lse_np(x, axis: int = -1) -> np.ndarray:
    """float64 logsumexp."""
    x = np.asarray(x, np.float64)
    top = x.max(axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.exp(x - top).sum(axis))


def nll_np(logits, targets) -> np.ndarray:
    """float64 ``-log softmax(logits)[target]`` per row (classes last)."""
    x = np.asarray(logits, np.float64)
    return lse_np(x) - np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]


def draw(rng, shape=(N, C), ignored=0.0, scale=2.0):
    """Float32 logits, int32 targets (a fraction set to -100) and weights in [0.2, 2]."""
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    targets = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
    targets = np.where(rng.random(shape[:-1]) < ignored, -100, targets).astype(np.int32)
    weights = rng.uniform(0.2, 2.0, shape[-1]).astype(np.float32)
    return logits, targets, weights


def close(a, b, tol=1e-6):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


RICH = {"label_smoothing": 0.1, "z_loss": 1e-2, "logit_softcap": 3.0}


# --------------------------------------------------------------------------------------
# Equivalences


@pytest.mark.slow
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_integer_targets_equal_one_hot(rng, label_smoothing, weighted):
    """Integer targets and their one-hot probabilities give the same losses and gradients.

    Per position (``"none"``, ``"sum"``) they agree with and without class
    weights. PyTorch's weighted ``"mean"`` divides integer targets by
    ``Σ w_t`` but probability targets by the count, so there the means agree
    after multiplying by the two denominators, and not before.
    """
    logits, targets, weights = draw(rng, ignored=0.3)
    targets[0] = 1  # at least one counted position
    counted = targets != -100
    one_hot = np.eye(C, dtype=np.float32)[np.where(counted, targets, 0)]
    w = weights if weighted else None
    opts = {"label_smoothing": label_smoothing, "z_loss": 1e-3, "class_weights": w}

    @jax.jit
    def outputs(x):
        out = {}
        for reduction in ("none", "sum", "mean"):
            f = value_and_grad_sum(loss_fn(reduction=reduction, **opts))
            out[reduction, "int"] = f(x, targets)
            out[reduction, "prob"] = f(x, one_hot, where=counted)
        return out

    out = outputs(logits)
    close(out["none", "int"], out["none", "prob"])
    close(out["sum", "int"], out["sum", "prob"])
    assert np.all(np.asarray(out["none", "int"][0])[~counted] == 0)
    mean_int, mean_prob = out["mean", "int"][0], out["mean", "prob"][0]
    if weighted:
        sum_w_t = weights[targets[counted]].sum()
        close(mean_int * sum_w_t, mean_prob * counted.sum())
        assert not np.isclose(mean_int, mean_prob, rtol=1e-3)
    else:
        close(out["mean", "int"], out["mean", "prob"])


@pytest.mark.slow
@pytest.mark.parametrize("probability", [False, True])
def test_masked_equals_sliced(rng, probability):
    """``where`` drops whole positions: the same as never passing them, value and gradient."""
    logits, targets, weights = draw(rng, (12, C))
    mask = rng.random(12) < 0.6
    mask[:2] = [True, False]
    if probability:
        targets = rng.dirichlet(np.ones(C), 12).astype(np.float32)

    @jax.jit
    def outputs(x):
        out = {}
        for reduction in ("mean", "sum", "none"):
            f = value_and_grad_sum(loss_fn(reduction=reduction, class_weights=weights, **RICH))
            out[reduction] = f(x, targets, where=mask), f(x[mask], targets[mask])
        return out

    for reduction, ((masked, g_masked), (sliced, g_sliced)) in outputs(logits).items():
        g_masked = np.asarray(g_masked)
        if reduction == "none":
            close(np.asarray(masked)[mask], sliced)
            assert np.all(np.asarray(masked)[~mask] == 0)
        else:
            close(masked, sliced)
        close(g_masked[mask], g_sliced)
        assert np.all(g_masked[~mask] == 0)


@pytest.mark.slow
def test_ignore_index_equals_where(rng):
    """``ignore_index`` is turned into a mask: a custom value equals the same ``where``."""
    logits, targets, weights = draw(rng, (10, C))
    targets[[1, 4, 7]] = 3
    opts = {"class_weights": weights, "label_smoothing": 0.2}

    @jax.jit
    def outputs(x):
        return (
            value_and_grad_sum(loss_fn(ignore_index=3, **opts))(x, targets),
            value_and_grad_sum(loss_fn(ignore_index=None, **opts))(x, targets, where=targets != 3),
            loss_fn(**opts)(x, targets),  # default -100: class 3 is an ordinary class
        )

    ignoring, masked, default = outputs(logits)
    close(ignoring, masked)
    assert not np.isclose(ignoring[0], default)


@pytest.mark.slow
@pytest.mark.parametrize("axis", [0, 1, -2])
def test_class_axis_equals_moveaxis(rng, axis):
    """A class axis anywhere equals moving it last (PyTorch's ``[N, C, d]`` is ``axis=1``)."""
    shape = [3, 4, 2]
    shape.insert(axis % 4, C)
    logits = rng.standard_normal(shape).astype(np.float32)
    last = np.moveaxis(logits, axis, -1)
    y_last = rng.dirichlet(np.ones(C), last.shape[:-1]).astype(np.float32)
    cases = {
        "int": (rng.integers(0, C, last.shape[:-1]).astype(np.int32),) * 2,
        "prob": (np.moveaxis(y_last, -1, axis), y_last),
    }
    weights = rng.uniform(0.5, 2.0, C).astype(np.float32)
    opts = {"class_weights": weights, "reduction": "none", **RICH}
    cot = rng.standard_normal(last.shape[:-1]).astype(np.float32)

    @jax.jit
    def outputs(x, x_last):
        out = {}
        for kind, (t, t_last) in cases.items():
            moved = lambda x: loss_fn(axis=axis, **opts)(x, t)  # noqa: B023
            plain = lambda x: loss_fn(**opts)(x, t_last)  # noqa: B023
            out[kind] = (
                (moved(x), jax.grad(lambda x: jnp.vdot(moved(x), cot))(x)),  # noqa: B023
                (plain(x_last), jax.grad(lambda x: jnp.vdot(plain(x), cot))(x_last)),  # noqa: B023
            )
        return out

    for (v_moved, g_moved), (v_plain, g_plain) in outputs(logits, last).values():
        close(v_moved, v_plain)
        close(g_moved, np.moveaxis(np.asarray(g_plain), -1, axis))


@pytest.mark.slow
def test_vmap_equals_batching(rng):
    """vmap over a leading axis equals the batched call per position, and per-row means."""
    logits, targets, weights = draw(rng, (3, 4, C), ignored=0.25)
    targets[:, 0] = 0
    mask = rng.random((3, 4)) < 0.8
    mask[:, 0] = True
    opts = {"class_weights": weights, **RICH}

    @jax.jit
    def outputs(x):
        none = loss_fn(reduction="none", **opts)
        mean = loss_fn(**opts)
        per_row = lambda x: jax.vmap(lambda x, t, m: mean(x, t, where=m))(x, targets, mask)
        return {
            "none": (
                jax.vmap(lambda x, t, m: none(x, t, where=m))(x, targets, mask),
                none(x, targets, where=mask),
            ),
            "mean": (
                value_and_grad_sum(per_row)(x),
                [value_and_grad_sum(mean)(x[b], targets[b], where=mask[b]) for b in range(3)],
            ),
        }

    out = outputs(logits)
    close(*out["none"])
    (v_vmap, g_vmap), rows = out["mean"]
    close(v_vmap, np.stack([v for v, _ in rows]))
    close(g_vmap, np.stack([g for _, g in rows]))


# --------------------------------------------------------------------------------------
# Plain formulas and gradients


def plain_loss(x, targets, weights, mask, *, label_smoothing, z_loss, logit_softcap):
    """The weighted mean loss written out with plain jax.numpy, for autodiff to differentiate."""
    weights = jnp.asarray(weights)
    if logit_softcap is not None:
        x = logit_softcap * jnp.tanh(x / logit_softcap)
    log_p = jax.nn.log_softmax(x, axis=-1)
    lse = jax.nn.logsumexp(x, axis=-1)
    safe_t = jnp.where(mask, targets, 0)
    w_t = weights[safe_t]
    nll = -jnp.take_along_axis(log_p, safe_t[:, None], axis=-1)[:, 0]
    smooth = -jnp.sum(weights[None, :] * log_p, axis=-1) / x.shape[-1]
    per = (1 - label_smoothing) * w_t * nll + label_smoothing * smooth + z_loss * lse**2
    return jnp.sum(jnp.where(mask, per, 0)) / jnp.sum(jnp.where(mask, w_t, 0))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("z_loss", "logit_softcap", "label_smoothing"),
    [(1e-2, None, 0.0), (0.0, 2.0, 0.0), (1e-3, 3.0, 0.1), (0.5, 1.0, 1.0)],
)
def test_z_loss_and_softcap_equal_plain_formula(rng, z_loss, logit_softcap, label_smoothing):
    """Values and gradients equal autodiff of the formula written out (with weights, mask).

    z-loss: ``z · lse²`` per counted position, not weighted, same denominator
    ``Σ w_t``; soft-cap: ``c · tanh(x / c)`` first, its gradient carrying tanh′.
    """
    logits, targets, weights = draw(rng, scale=4.0, ignored=0.3)
    targets[0] = 2
    mask = targets != -100
    opts = {"z_loss": z_loss, "logit_softcap": logit_softcap, "label_smoothing": label_smoothing}

    @jax.jit
    def outputs(x):
        return (
            jax.value_and_grad(loss_fn(class_weights=weights, **opts))(x, targets),
            jax.value_and_grad(plain_loss)(x, targets, weights, mask, **opts),
            loss_fn(class_weights=weights, label_smoothing=label_smoothing)(x, targets),
        )

    ours, ref, bare = outputs(logits)
    close(ours, ref)
    # The z-loss and the cap really change the loss (the test can tell them apart).
    assert not np.isclose(ours[0], bare, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("probability", [False, True])
def test_gradient_is_weighted_softmax_minus_smoothed_target(rng, weighted, probability):
    """∂ℓ/∂logits = p · Σ_c w_c y'_c − w ⊙ y' per position; unweighted, ``p − y'``.

    ``y'`` is the smoothed target ``(1 − ε) y + ε / C`` (y one-hot for integer
    targets). The mean divides by the value's denominator: ``Σ w_t`` for
    weighted integer targets, the count otherwise.
    """
    logits, targets, weights = draw(rng, ignored=0.0 if probability else 0.3)
    targets[0] = 0
    if probability:
        y = rng.dirichlet(np.ones(C), N).astype(np.float32)
        counted = rng.random(N) < 0.7
        counted[0] = True
        inputs = {"targets": y, "where": counted}
    else:
        counted = targets != -100
        y = np.eye(C)[np.where(counted, targets, 0)]
        inputs = {"targets": targets}
    w = weights if weighted else np.ones(C)
    denominator = weights[targets[counted]].sum() if weighted and not probability else counted.sum()
    p = np.exp(logits - lse_np(logits)[:, None])
    smoothings = (0.0, 0.3, 1.0)

    @jax.jit
    def grads(x):
        out = {}
        for ls in smoothings:
            opts = {"class_weights": weights if weighted else None, "label_smoothing": ls}
            out[ls] = (
                jax.grad(loss_fn(reduction="sum", **opts))(x, **inputs),
                jax.grad(loss_fn(**opts))(x, **inputs),
            )
        return out

    for ls, (grad_sum, grad_mean) in grads(logits).items():
        y_s = (1 - ls) * y + ls / C
        expected = p * (w * y_s).sum(-1, keepdims=True) - w * y_s
        expected = np.where(counted[:, None], expected, 0)
        if not weighted:
            close(expected[counted], (p - y_s)[counted], 1e-5)
        close(grad_sum, expected, 1e-5)
        close(grad_mean, expected / denominator, 1e-5)


@pytest.mark.slow
def test_forward_mode_jvp_jacfwd_hessian(rng):
    """jvp, jacfwd and hessian work (NaN/inf masked rows included) and agree with reverse mode."""
    logits, targets, weights = draw(rng, ignored=0.0)
    targets[1] = -100
    logits[1] = [np.nan, np.inf, -np.inf, 0.0, 1.0]
    tangent = rng.standard_normal(logits.shape).astype(np.float32)
    opts = {"class_weights": weights, **RICH}
    mean = lambda x: loss_fn(**opts)(x, targets)
    none = lambda x: loss_fn(reduction="none", **opts)(x, targets)
    single = lambda x: jxent.softmax_cross_entropy(x, targets[0])

    @jax.jit
    def outputs(x, v):
        return {
            "jvp": jax.jvp(mean, (x,), (v,)),
            "vjp": jax.value_and_grad(mean)(x),
            "jacfwd": jax.jacfwd(none)(x),
            "jacrev": jax.jacrev(none)(x),
            "hessian": jax.hessian(single)(x[0]),
        }

    out = outputs(logits, tangent)
    (value, jvp_out), (value_rev, grad) = out["jvp"], out["vjp"]
    close(value, value_rev)
    assert np.isfinite(jvp_out)
    close(jvp_out, np.vdot(grad, np.where(targets[:, None] == -100, 0, tangent)), 1e-5)
    jac = np.asarray(out["jacfwd"])
    assert np.all(np.isfinite(jac)) and np.all(jac[:, 1] == 0) and np.all(jac[1] == 0)
    close(out["jacfwd"], out["jacrev"], 1e-5)
    # One row's -log p_t has Hessian diag(p) - p pᵀ.
    p = np.exp(logits[0] - lse_np(logits[0]))
    close(out["hessian"], np.diag(p) - np.outer(p, p), 1e-5)


# --------------------------------------------------------------------------------------
# Hostile input


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ignore_index", "where", "probability"])
def test_all_positions_masked_give_zero_and_zero_gradient(rng, how):
    """Nothing counted: loss 0 and gradient 0 (PyTorch's mean gives NaN; documented)."""
    logits, targets, weights = draw(rng)
    if how == "ignore_index":
        inputs = {"targets": np.full(N, -100, np.int32)}
    elif how == "where":
        inputs = {"targets": targets, "where": np.zeros(N, bool)}
    else:
        y = rng.dirichlet(np.ones(C), N).astype(np.float32)
        inputs = {"targets": y, "where": np.zeros(N, bool)}

    @jax.jit
    def outputs(x):
        return {
            (reduction, weighted): value_and_grad_sum(
                loss_fn(reduction=reduction, class_weights=weights if weighted else None, **RICH)
            )(x, **inputs)
            for reduction in ("mean", "sum", "none")
            for weighted in (False, True)
        }

    for value, grad in outputs(logits).values():
        assert np.all(np.asarray(value) == 0)
        assert np.all(np.asarray(grad) == 0)


@pytest.mark.slow
@pytest.mark.parametrize("probability", [False, True])
def test_masked_nonfinite_logits_reach_neither_value_nor_gradient(rng, probability):
    """NaN and ±inf logits at masked positions: finite loss, exactly zero gradient there."""
    logits, targets, weights = draw(rng)
    mask = np.array([True, False, True, False, True, False])
    poisoned = logits.copy()
    poisoned[1] = np.nan
    poisoned[3] = [np.inf, -np.inf, np.nan, 0.0, np.inf]
    poisoned[5] = -np.inf
    if probability:
        targets = rng.dirichlet(np.ones(C), N).astype(np.float32)
        inputs = {"targets": targets, "where": mask}
    else:
        targets = np.where(mask, targets, -100).astype(np.int32)
        inputs = {"targets": targets}

    @jax.jit
    def outputs(x):
        return {
            reduction: value_and_grad_sum(
                loss_fn(reduction=reduction, class_weights=weights, **RICH)
            )(x, **inputs)
            for reduction in ("mean", "sum", "none")
        }

    for (value, grad), (clean_value, clean_grad) in zip(
        outputs(poisoned).values(), outputs(logits).values(), strict=True
    ):
        assert np.all(np.isfinite(value))
        close(value, clean_value)
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0)
        close(grad, clean_grad)


@pytest.mark.slow
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_masked_nonfinite_logits_leave_the_class_weight_gradient_finite(rng, label_smoothing):
    """d loss / d class_weights reads the logits: masked NaN/inf must not reach it.

    Label smoothing's Σ_c w_c·x_c is a matrix-vector product whose plain
    autodiff would form Σ_n x_n · 0 = NaN over masked rows.
    """
    logits, targets, weights = draw(rng)
    mask = np.array([True, False, True, False, True, False])
    poisoned = logits.copy()
    poisoned[1] = np.nan
    poisoned[3] = np.inf
    targets = np.where(mask, targets, -100).astype(np.int32)

    @jax.jit
    def weight_grads(x, w):
        fn = functools.partial(
            jxent.softmax_cross_entropy, label_smoothing=label_smoothing, z_loss=1e-3
        )
        full = jax.grad(lambda w: fn(x, targets, class_weights=w))(w)
        sliced = jax.grad(lambda w: fn(x[mask], targets[mask], class_weights=w))(w)
        return full, sliced

    full, sliced = weight_grads(poisoned, weights)
    assert np.all(np.isfinite(np.asarray(full)))
    close(full, sliced)
    # forward mode through the same rule
    _, tangent = jax.jvp(
        lambda w: jxent.softmax_cross_entropy(
            poisoned, targets, class_weights=w, label_smoothing=label_smoothing
        ),
        (weights,),
        (np.ones_like(weights),),
    )
    assert np.isfinite(tangent)


@pytest.mark.slow
def test_neg_inf_logit_is_a_zero_probability_class(rng):
    """A −inf logit whose class has target 0 contributes nothing: as if the class were absent."""
    logits, targets, _ = draw(rng)
    logits[:, 2] = -np.inf
    targets = np.where(targets == 2, 0, targets).astype(np.int32)
    y = rng.dirichlet(np.ones(C), N).astype(np.float32)
    y[:, 2] = 0
    keep = np.array([0, 1, 3, 4])
    pairs = [(targets, np.searchsorted(keep, targets).astype(np.int32)), (y, y[:, keep])]

    @jax.jit
    def outputs(x):
        f = value_and_grad_sum(jxent.softmax_cross_entropy)
        return [(f(x, t), f(x[:, keep], t_kept)) for t, t_kept in pairs]

    for (value, grad), (value_kept, grad_kept) in outputs(logits):
        assert np.isfinite(value)
        close(value, value_kept)
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)) and np.all(grad[:, 2] == 0)
        close(grad[:, keep], grad_kept)


# --------------------------------------------------------------------------------------
# Out-of-range targets


@pytest.mark.parametrize(
    ("bad", "ignore_index", "dtype"),
    [
        (5, -100, np.int32),
        (9, -100, np.int32),
        (-1, -100, np.int32),
        (-100, None, np.int32),
        (-3, 3, np.int8),
        (255, -100, np.uint8),
    ],
)
def test_out_of_range_targets_raise_on_eager_calls(rng, bad, ignore_index, dtype):
    """An eager call names the bad value, where it is, and the valid range."""
    logits, targets, _ = draw(rng)
    targets = targets.astype(dtype)
    targets[4] = bad
    hint = "" if ignore_index is None else re.escape(f" or ignore_index={ignore_index}")
    message = rf"targets must be class indices in \[0, {C}\){hint}; got {bad} at position \(4,\)"
    with pytest.raises(ValueError, match=message):
        jxent.softmax_cross_entropy(logits, targets, ignore_index=ignore_index)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("num_classes", "bad", "dtype", "ignore_index"),
    [
        (200, -100, np.int32, None),  # must not select class 100 = -100 % 200
        (5, 7, np.int32, -100),
        (5, -2, np.int16, -100),
        (200, 255, np.uint8, -100),  # not 55
        (200, -56, np.int8, None),  # not 144
    ],
)
def test_out_of_range_targets_under_jit_are_nan_never_wrapped(
    rng, num_classes, bad, dtype, ignore_index
):
    """Inside jit the bad position's loss is NaN (so is the mean); the others are untouched."""
    logits, targets, weights = draw(rng, (N, num_classes))
    targets = targets.astype(dtype)
    targets[2] = bad
    others = np.arange(N) != 2
    reference = nll_np(logits[others], targets[others].astype(np.int64))

    @jax.jit
    def outputs(x, t):
        out = {}
        for name, opts in {"plain": {}, "rich": {"class_weights": weights, **RICH}}.items():
            f = loss_fn(ignore_index=ignore_index, **opts)
            out[name] = f(x, t, reduction="none"), f(x, t)
        return out

    out = outputs(logits, targets)
    for per_position, mean in out.values():
        per_position = np.asarray(per_position)
        assert np.isnan(per_position[2]) and np.isnan(mean)
        assert np.all(np.isfinite(per_position[others]))
    close(out["plain"][0][others], reference, 1e-5)


@pytest.mark.slow
def test_checkify_index_checks_find_out_of_range_targets(rng):
    """``checkify`` with ``index_checks`` reports the bad gather; valid and ignored ones pass."""
    logits, targets, weights = draw(rng, (N, 200))
    targets[1] = -100
    good = targets.copy()
    good[1] = 100

    def loss(x, t, ignore_index):
        return jxent.softmax_cross_entropy(
            x, t, class_weights=weights, label_smoothing=0.1, ignore_index=ignore_index
        )

    checked = jax.jit(checkify.checkify(loss, errors=checkify.index_checks), static_argnums=2)
    err, value = checked(logits, targets, None)  # -100 is not ignored: out of range
    assert err.get() is not None and "out-of-bounds" in err.get() and np.isnan(value)
    err, value = checked(logits, good, None)
    assert err.get() is None and np.isfinite(value)
    err, value = checked(logits, targets, -100)  # ignored: no false alarm
    assert err.get() is None and np.isfinite(value)


# --------------------------------------------------------------------------------------
# Validation


@pytest.mark.slow
def test_wrong_shapes_name_both_shapes():
    logits = np.zeros((4, 8, 10), np.float32)
    ints = np.zeros((4, 8), np.int32)
    sce = jxent.softmax_cross_entropy
    both = re.escape("targets has shape (4, 7) but logits (4, 8, 10) with axis=-1 expects (4, 8)")
    with pytest.raises(ValueError, match=both):
        sce(logits, np.zeros((4, 7), np.int32))
    with pytest.raises(ValueError, match=both):
        jax.jit(sce)(logits, np.zeros((4, 7), np.int32))
    with pytest.raises(ValueError, match=re.escape("(4, 8, 9) but probability targets must have")):
        sce(logits, np.zeros((4, 8, 9), np.float32))
    with pytest.raises(ValueError, match=re.escape("the logits' shape (4, 8, 10)")):
        sce(logits, np.zeros((4, 8, 9), np.float32))
    with pytest.raises(
        ValueError, match=re.escape("where has shape (4,) but the targets' positions have shape")
    ):
        sce(logits, ints, where=np.ones(4, bool))
    with pytest.raises(
        ValueError, match=re.escape("class_weights has shape (3,) but logits has 10 classes")
    ):
        sce(logits, ints, class_weights=np.ones(3))
    with pytest.raises(ValueError, match="logits is a scalar"):
        sce(np.float32(1.0), np.int32(0))


def test_probability_targets_reject_an_explicit_ignore_index():
    y = np.full((3, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="ignore_index=0 cannot be used with probability targets"):
        jxent.softmax_cross_entropy(np.zeros((3, 4), np.float32), y, ignore_index=0)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5, float("nan")])
def test_label_smoothing_outside_unit_interval_is_rejected(label_smoothing):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got"):
        jxent.softmax_cross_entropy(
            np.zeros((2, 3)), np.zeros(2, np.int32), label_smoothing=label_smoothing
        )


def test_unknown_reduction_lists_the_valid_values():
    with pytest.raises(
        ValueError, match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'"
    ):
        jxent.softmax_cross_entropy(np.zeros((2, 3)), np.zeros(2, np.int32), reduction="avg")


# --------------------------------------------------------------------------------------
# Precision and dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_give_float32_close_to_float64(rng, dtype):
    """Low-precision logits are computed in float32 and the result is float32.

    Against float64 on the original logits the mean is within 1e-2 (the
    inputs' own rounding); against float64 on the values the low-precision
    logits hold, every position is within 1e-5 (so nothing ran in bf16).
    """
    logits, targets, _ = draw(rng, (64, 11))
    low = jnp.asarray(logits, dtype)

    @jax.jit
    def outputs(x):
        return loss_fn(reduction="none")(x, targets), jxent.softmax_cross_entropy(x, targets)

    per_position, mean = outputs(low)
    assert per_position.dtype == jnp.float32 and mean.dtype == jnp.float32
    np.testing.assert_allclose(mean, nll_np(logits, targets).mean(), atol=1e-2)
    exact = nll_np(np.asarray(low.astype(jnp.float32)), targets)
    np.testing.assert_allclose(per_position, exact, rtol=1e-5, atol=1e-5)


def test_huge_logits_give_correct_finite_values(rng):
    """Logits of magnitude 1e4: logsumexp-based, no overflow, matches float64 NumPy."""
    logits, targets, _ = draw(rng, (32, C), scale=1e4)
    targets[:4] = np.argmax(logits[:4], -1)  # some targets on the maximum: loss ≈ 0
    y = rng.dirichlet(np.ones(C), 32).astype(np.float32)

    @jax.jit
    def outputs(x):
        return (
            value_and_grad_sum(loss_fn(reduction="none"))(x, targets),
            loss_fn(reduction="none")(x, y),
        )

    (value, grad), prob_value = outputs(logits)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, nll_np(logits, targets), rtol=1e-6, atol=1e-3)
    p = np.exp(logits - lse_np(logits)[:, None])
    np.testing.assert_allclose(grad, p - np.eye(C)[targets], atol=1e-6)
    ref = (y * (lse_np(logits)[:, None] - logits.astype(np.float64))).sum(-1)
    np.testing.assert_allclose(prob_value, ref, rtol=1e-5, atol=1e-2)


@pytest.mark.slow
def test_any_integer_target_dtype_is_accepted(rng):
    """int8/uint8/int16/int64/uint32 targets give the int32 result; -100 ignored where it fits."""
    logits, targets, weights = draw(rng)
    dtypes = [np.int8, np.uint8, np.int16, np.int64, np.uint32]

    @jax.jit
    def outputs(x, all_targets):
        f = loss_fn(class_weights=weights, reduction="none")
        return [f(x, t) for t in all_targets]

    expected, *got = outputs(logits, [targets] + [targets.astype(d) for d in dtypes])
    for value in got:
        close(value, expected)
    signed_targets = targets.copy()
    signed_targets[3] = -100
    for d in [np.int8, np.int16, np.int64]:
        value = jax.jit(loss_fn(reduction="none"))(logits, signed_targets.astype(d))
        assert value[3] == 0 and np.all(np.asarray(value)[[0, 1, 2, 4, 5]] > 0)


def test_no_retracing_across_calls_with_the_same_shapes(rng):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(x, t, w):
        return jxent.softmax_cross_entropy(x, t, class_weights=w, label_smoothing=0.1)

    for _ in range(3):
        logits, targets, weights = draw(rng, ignored=0.2)
        loss(logits, targets, weights)
    with pytest.raises(AssertionError, match="is traced > 1 times"):
        loss(*draw(rng, (N + 1, C)))


# --------------------------------------------------------------------------------------
# Hardening (issue 10): gradients with respect to every differentiable input, precision
# next to PyTorch at large logits, errors that blame the right argument.


def test_gradient_with_respect_to_probability_targets_is_minus_log_p():
    """The loss is linear in ``y``: ∂/∂y_c = −(1−ε)·w_c·log p_c, at ``y_c = 0`` too."""
    x = jnp.array([[1.0, 2.0, 0.5]])
    y = jnp.array([[0.0, 1.0, 0.0]])
    log_p = np.asarray(jax.nn.log_softmax(x.astype(jnp.float32)), np.float64)
    grad = jax.jit(jax.grad(lambda y: jxent.softmax_cross_entropy(x, y)))(y)
    close(grad, np.float32([[1.4644, 0.4644, 1.9644]]), 1e-4)
    close(grad, -log_p, 1e-6)
    weights = jnp.array([0.5, 2.0, 0.0])  # a zero weight keeps its derivative too
    eps = 0.2
    f = lambda y: jxent.softmax_cross_entropy(x, y, class_weights=weights, label_smoothing=eps)
    grad = jax.jit(jax.grad(f))(y)
    close(grad, -(1 - eps) * np.asarray(weights) * log_p, 1e-6)
    tangent = jnp.array([[0.3, -1.0, 2.0]])
    _, jvp = jax.jit(lambda y, t: jax.jvp(f, (y,), (t,)))(y, tangent)
    close(jvp, np.sum(-(1 - eps) * np.asarray(weights) * log_p * np.asarray(tangent)), 1e-6)


@pytest.mark.slow
def test_check_grads_over_logits_and_probability_targets(rng):
    """optax's SoftmaxCrossEntropyTest.test_gradient: check_grads over logits and labels."""
    logits, _, weights = draw(rng)
    y = rng.dirichlet(np.ones(C), N).astype(np.float32)
    y[0] = np.eye(C, dtype=np.float32)[1]  # exact zeros in the targets
    for opts in ({}, {"class_weights": weights, "label_smoothing": 0.1}):
        f = lambda x, y, opts=opts: jxent.softmax_cross_entropy(x, y, **opts)
        jax.test_util.check_grads(jax.jit(f), (logits, y), order=1, modes=("fwd", "rev"), eps=1e-3,
                                  atol=2e-2, rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("probability", [False, True])
def test_zero_class_weights_keep_their_derivative(rng, probability):
    """∂/∂class_weights at an exact 0 weight equals autodiff of the plain formula."""
    logits, targets, weights = draw(rng)
    weights[[0, 3]] = 0.0
    targets[:3] = 0
    y = rng.dirichlet(np.ones(C), N).astype(np.float32) if probability else targets
    eps = 0.1

    def plain(w):
        log_p = jax.nn.log_softmax(logits)
        smooth = (1 - eps) * (jax.nn.one_hot(targets, C) if not probability else y) + eps / C
        per_position = -jnp.sum(w[None, :] * smooth * log_p, -1)
        denominator = N if probability else jnp.sum(w[targets])
        return jnp.sum(per_position) / denominator

    f = lambda w: jxent.softmax_cross_entropy(logits, y, class_weights=w, label_smoothing=eps)
    got, want = jax.jit(lambda w: (jax.grad(f)(w), jax.grad(plain)(w)))(weights)
    close(got, want, 1e-5)
    assert np.all(np.asarray(got)[[0, 3]] != 0)


def _nan_gradient_rows(f, logits):
    grad = jax.jit(jax.grad(lambda x: jnp.sum(f(x))))(logits)
    return np.isnan(np.asarray(grad)).all(axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"class_weights": True, **RICH}])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_targets_under_jit_have_a_nan_gradient(rng, options, reduction):
    """A silently dropped target must not keep training: its gradient row is NaN too."""
    logits, targets, weights = draw(rng, (N, 200))
    targets[2] = 250
    weighted = bool(options.get("class_weights"))
    if weighted:
        options = {**options, "class_weights": weights}
    bad = _nan_gradient_rows(
        lambda x: jxent.softmax_cross_entropy(x, targets, reduction=reduction, **options), logits
    )
    if weighted and reduction == "mean":
        # The bad target's weight w[t] is NaN, and so is the denominator Σ w_t:
        # the value and every gradient row are NaN.
        assert bad.all()
    else:
        np.testing.assert_array_equal(bad, np.arange(N) == 2)


@pytest.mark.slow
def test_int64_targets_beyond_int32_are_refused_not_wrapped():
    """``2**32 + 3`` would become class 3 in JAX's int32: an eager error names it."""
    logits = np.zeros((2, 5), np.float32)
    targets = np.array([2**32 + 3, 1], np.int64)
    with pytest.raises(ValueError, match=re.escape("targets holds 4294967299 at position (0,)")):
        jxent.softmax_cross_entropy(logits, targets)
    with pytest.raises(ValueError, match="would silently wrap to 3"):
        jxent.softmax_cross_entropy(logits, targets, reduction="none")
    ok = jxent.softmax_cross_entropy(logits, np.array([3, 1], np.int64))
    close(ok, np.float32(np.log(5)))


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def test_large_logits_lose_no_digits():
    """(x_t − max) + log Σ exp(x − max), as PyTorch and optax: no cancellation."""
    logits = np.float32([[1e4, 0, -1e4], [-1e4, 1e4, 1e4 - 1]])
    targets = np.int32([1, 2])
    want = np.float64([1e4, np.log1p(np.e)])
    got = np.asarray(jax.jit(loss_fn(reduction="none"))(logits, targets), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [50.0, 1e2, 1e3, 1e4])  # 50: the matvec branch
@pytest.mark.parametrize("probability", [False, True])
def test_precision_at_large_logits_is_no_worse_than_pytorch(rng, scale, probability):
    """Against float64, jxent's float32 error is at most PyTorch's float32 error (+ slack).

    Close logits (a spread of a few units around ±scale) are where adding
    the max back cancels digits; label smoothing and weights are on.
    """
    torch = _torch_or_none()
    shape = (64, 11)
    centre = scale * rng.choice([-1.0, 1.0], (shape[0], 1))
    logits = (centre + 3 * rng.standard_normal(shape)).astype(np.float32)
    targets = rng.integers(0, shape[1], shape[0]).astype(np.int64)
    weights = rng.uniform(0.2, 2.0, shape[1]).astype(np.float32)
    y = rng.dirichlet(np.ones(shape[1]), shape[0]).astype(np.float32)
    t = y if probability else targets
    eps = 0.1

    x64 = logits.astype(np.float64)
    log_p = x64 - lse_np(x64)[:, None]
    smooth = (1 - eps) * (y if probability else np.eye(shape[1])[targets]) + eps / shape[1]
    want = -(smooth * weights.astype(np.float64) * log_p).sum(-1)

    f = loss_fn(reduction="none", class_weights=weights, label_smoothing=eps)
    got = np.asarray(jax.jit(f)(logits, t), np.float64)
    error = np.abs(got - want) / np.abs(want)
    bound = 2e-6
    if torch is not None:
        ref = torch.nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(t), weight=torch.from_numpy(weights),
            label_smoothing=eps, reduction="none",
        ).numpy().astype(np.float64)
        if not probability:  # torch's per-position "none" with weights: w_t·(1−ε)·nll + ...
            pass
        torch_error = np.abs(ref - want) / np.abs(want)
        bound = max(bound, 1.5 * torch_error.max())
    assert error.max() <= bound, (error.max(), bound)


@pytest.mark.slow
def test_errors_name_the_argument_and_the_fix():
    logits = np.zeros((4, 10), np.float32)
    sce = jxent.softmax_cross_entropy
    with pytest.raises(TypeError, match=re.escape("targets has floating dtype float32 and shape (4,), the shape of class ids: class ids must be integers (targets.astype(jnp.int32))")):  # noqa: E501
        sce(logits, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=re.escape("targets is an integer array (int32) with the logits' shape (4, 10): probabilities (e.g. one-hot) need a floating dtype")):  # noqa: E501
        sce(logits, np.zeros((4, 10), np.int32))
    with pytest.raises(ValueError, match=re.escape("(jnp.argmax(targets, axis=-1))")):
        sce(logits, np.zeros((4, 10), np.int32))
    torch_layout = np.zeros((2, 10, 7), np.float32)  # [N, C, T]
    with pytest.raises(ValueError, match=re.escape("PyTorch's [N, C, d1, ...] layout with the classes on axis 1; pass axis=1")):  # noqa: E501
        sce(torch_layout, np.zeros((2, 7), np.int32))
    close(sce(torch_layout, np.zeros((2, 7), np.int32), axis=1), np.float32(np.log(10)))
    # The axis as the call gave it (0.3 named axis=1 for this axis=-1 call).
    with pytest.raises(ValueError, match=re.escape("0 classes along axis=-1")):
        sce(np.zeros((4, 0), np.float32), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=re.escape("0 classes along axis=1")):
        sce(np.zeros((4, 0, 3), np.float32), np.zeros((4, 3), np.int32), axis=1)


@pytest.mark.slow
def test_traced_ignore_index_says_to_make_it_static():
    logits = np.zeros((4, 10), np.float32)
    targets = np.int32([1, 2, -1, 3])
    with pytest.raises(TypeError, match=re.escape("ignore_index must be a static Python int, got a traced value")):  # noqa: E501
        jax.jit(lambda x, t, i: jxent.softmax_cross_entropy(x, t, ignore_index=i))(
            logits, targets, -1
        )
    with pytest.raises(TypeError, match=re.escape("static_argnames=('ignore_index',)")):
        jax.jit(lambda x, t, i: jxent.softmax_cross_entropy(x, t, ignore_index=i))(
            logits, targets, -1
        )
    # NumPy integer scalars are Python ints here.
    got = jxent.softmax_cross_entropy(logits, targets, ignore_index=np.int64(-1))
    want = jxent.softmax_cross_entropy(logits, targets, ignore_index=-1)
    close(got, want)
    with pytest.raises(TypeError, match="ignore_index must be an int or None, got 1.5"):
        jxent.softmax_cross_entropy(logits, targets, ignore_index=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("probability", [False, True])
def test_traced_label_smoothing_and_z_loss_equal_static_ones_without_recompiling(
    rng, probability
):
    """A schedule passes traced coefficients: same values and gradients, one trace."""
    chex.clear_trace_counter()
    logits, targets, weights = draw(rng, ignored=0.2)
    t = rng.dirichlet(np.ones(C), N).astype(np.float32) if probability else targets

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced(x, eps, z):
        f = lambda x: jxent.softmax_cross_entropy(
            x, t, class_weights=weights, label_smoothing=eps, z_loss=z
        )
        return jax.value_and_grad(f)(x)

    for eps, z in [(0.0, 0.0), (0.1, 1e-3), (0.7, 0.5)]:
        f = lambda x, eps=eps, z=z: jxent.softmax_cross_entropy(
            x, t, class_weights=weights, label_smoothing=eps, z_loss=z
        )
        close(traced(logits, eps, z), jax.jit(jax.value_and_grad(f))(logits), 1e-5)
    with pytest.raises(ValueError, match=re.escape("label_smoothing must be in [0, 1], got")):
        jxent.softmax_cross_entropy(logits, t, label_smoothing=jnp.float32(1.5))
    with pytest.raises(ValueError, match="z_loss must be a finite float >= 0"):
        jxent.softmax_cross_entropy(logits, t, z_loss=np.float32(-1.0))
