"""Tests for the information-theory functions (jxent/_information.py).

References: scipy (``scipy.stats.entropy``, ``scipy.special.rel_entr`` and
``xlogy``, ``scipy.spatial.distance.jensenshannon``) in float64; equivalences
(masked = sliced, ``axis`` = ``moveaxis``, ``vmap`` = batched, bits = nats/ln 2);
hypothesis properties (Gibbs, ``H(p, q) = H(p) + KL(p‖q)``, bounds); gradients
checked against finite differences. Every call goes through ``jax.jit`` except
the eager-only value checks.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import jxent

STATIC = ("axis", "base")
information_content = jax.jit(jxent.information_content, static_argnames="base")
entropy = jax.jit(jxent.entropy, static_argnames=STATIC)
cross_entropy = jax.jit(jxent.cross_entropy, static_argnames=STATIC)
kl_divergence = jax.jit(jxent.kl_divergence, static_argnames=STATIC)
js_divergence = jax.jit(jxent.js_divergence, static_argnames=STATIC)
entropy_from_logits = jax.jit(jxent.entropy_from_logits, static_argnames=STATIC)
kl_divergence_from_logits = jax.jit(jxent.kl_divergence_from_logits, static_argnames=STATIC)

# Every function with a distribution axis, jitted, and how many arrays it takes.
JITTED = {
    "entropy": entropy,
    "cross_entropy": cross_entropy,
    "kl_divergence": kl_divergence,
    "js_divergence": js_divergence,
    "entropy_from_logits": entropy_from_logits,
    "kl_divergence_from_logits": kl_divergence_from_logits,
}
ARITY = {name: 1 if name.startswith("entropy") else 2 for name in JITTED}
PROBABILITY_FUNCTIONS = ["entropy", "cross_entropy", "kl_divergence", "js_divergence"]
LOGIT_FUNCTIONS = ["entropy_from_logits", "kl_divergence_from_logits"]
ALL = PROBABILITY_FUNCTIONS + LOGIT_FUNCTIONS

TOL = {"atol": 1e-6, "rtol": 1e-6}


def simplex(rng, shape, zeros=0.0, floor=0.0):
    """Random float32 distributions along the last axis.

    About a fraction ``zeros`` of the entries are exactly 0 (never a whole
    row); ``floor`` keeps the others away from 0 (interior points).
    """
    x = rng.exponential(size=shape) + floor
    if zeros:
        drop = rng.random(shape) < zeros
        drop[..., 0][drop.all(-1)] = False
        x[drop] = 0.0
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def inputs(name, rng, shape, **kwargs):
    """Arguments for ``name``: distributions for the probability functions, logits otherwise."""
    if name in LOGIT_FUNCTIONS:
        return tuple(rng.normal(size=shape).astype(np.float32) for _ in range(ARITY[name]))
    return tuple(simplex(rng, shape, **kwargs) for _ in range(ARITY[name]))


def f64(x):
    return np.asarray(x, np.float64)


def softmax(logits):
    """float32 probabilities from a float64 softmax (exact zeros for -inf logits)."""
    return scipy.special.softmax(f64(logits), axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------
# Worked examples of the theory, exactly.


def test_fair_coin_carries_one_bit():
    assert float(information_content(0.5, base=2)) == 1.0
    assert float(entropy(jnp.array([0.5, 0.5]), base=2)) == 1.0
    assert float(entropy(jnp.full(4, 0.25), base=2)) == 2.0  # two fair coins


def test_certain_event_carries_zero_bits():
    assert float(information_content(1.0, base=2)) == 0.0
    assert float(information_content(1.0)) == 0.0
    for p in ([1.0, 0.0], [0.0, 1.0], [0.0, 1.0, 0.0]):  # the two-headed coin and friends
        h = entropy(jnp.array(p))
        assert not np.isnan(h)
        assert float(h) == 0.0
        assert float(entropy(jnp.array(p), base=2)) == 0.0


def test_surprisal_in_nats():
    chex.assert_trees_all_close(information_content(0.5), np.float32(0.6931471805599453))
    chex.assert_trees_all_close(information_content(0.8), np.float32(0.2231435513142097))
    chex.assert_trees_all_close(
        information_content(jnp.array([0.5, 0.8])), np.float32([math.log(2), -math.log(0.8)])
    )
    assert float(information_content(0.0)) == math.inf


def test_zero_support_conventions():
    # 0 log 0 = 0 and 0 log q = 0; p log 0 = -inf gives +inf cross-entropy and KL.
    assert float(cross_entropy(jnp.array([0.0, 1.0]), jnp.array([0.0, 1.0]))) == 0.0
    assert float(kl_divergence(jnp.array([0.0, 1.0]), jnp.array([0.0, 1.0]))) == 0.0
    assert float(cross_entropy(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0]))) == math.inf
    assert float(kl_divergence(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0]))) == math.inf
    # Jensen-Shannon stays finite on disjoint supports: exactly one bit.
    assert float(js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), base=2)) == 1.0


def test_kl_is_asymmetric():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    forward, backward = kl_divergence(p, q), kl_divergence(q, p)
    chex.assert_trees_all_close(forward, np.float32(scipy.stats.entropy(p, q)), **TOL)
    chex.assert_trees_all_close(backward, np.float32(scipy.stats.entropy(q, p)), **TOL)
    assert float(forward) > float(backward) + 0.1  # 0.5108 vs 0.3681 nats


# ---------------------------------------------------------------------------
# Agreement with scipy on seeded random distributions with exact zeros.


@pytest.mark.parametrize("base", [None, 2, 10, math.e, 0.5])
def test_entropy_matches_scipy(rng, base):
    p = simplex(rng, (16, 9), zeros=0.3)
    assert (p == 0).any()
    expected = scipy.stats.entropy(f64(p), base=base, axis=-1)
    chex.assert_trees_all_close(entropy(p, base=base), expected.astype(np.float32), **TOL)


def supports(rng, shape):
    """``p`` with zeros and ``q`` that is 0 only where ``p`` is (so KL is finite)."""
    p = simplex(rng, shape, zeros=0.3)
    q = simplex(rng, shape, zeros=0.3)
    q = np.where(p == 0, q, np.maximum(q, 0.05))
    return p, (q / q.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("base", [None, 2, 10])
def test_kl_divergence_matches_scipy(rng, base):
    p, q = supports(rng, (16, 9))
    assert ((p == 0) & (q == 0)).any() and ((p > 0) & (q > 0)).any()
    log_base = 1.0 if base is None else math.log(base)
    by_entropy = scipy.stats.entropy(f64(p), f64(q), base=base, axis=-1)
    by_rel_entr = scipy.special.rel_entr(f64(p), f64(q)).sum(-1) / log_base
    chex.assert_trees_all_close(
        kl_divergence(p, q, base=base), by_entropy.astype(np.float32), **TOL
    )
    chex.assert_trees_all_close(by_entropy, by_rel_entr, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("base", [None, 2])
def test_infinite_kl_and_cross_entropy_where_q_misses_mass(rng, base):
    p = simplex(rng, (32, 6), zeros=0.3)
    q = simplex(rng, (32, 6), zeros=0.3)  # independent zeros: some rows have q = 0 < p
    missing = ((q == 0) & (p > 0)).any(-1)
    assert missing.any() and not missing.all()
    kl = np.asarray(kl_divergence(p, q, base=base))
    ce = np.asarray(cross_entropy(p, q, base=base))
    np.testing.assert_array_equal(np.isinf(kl), missing)
    np.testing.assert_array_equal(np.isinf(ce), missing)
    assert not np.isnan(kl).any() and not np.isnan(ce).any()
    chex.assert_trees_all_close(
        kl, scipy.stats.entropy(f64(p), f64(q), base=base, axis=-1).astype(np.float32), **TOL
    )


@pytest.mark.parametrize("base", [None, 2, 10])
def test_cross_entropy_matches_scipy(rng, base):
    p, q = supports(rng, (16, 9))
    log_base = 1.0 if base is None else math.log(base)
    expected = -scipy.special.xlogy(f64(p), f64(q)).sum(-1) / log_base
    chex.assert_trees_all_close(cross_entropy(p, q, base=base), expected.astype(np.float32), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("base", [None, 2, 10])
def test_js_divergence_matches_scipy(rng, base):
    p = simplex(rng, (16, 9), zeros=0.3)
    q = simplex(rng, (16, 9), zeros=0.3)
    # scipy's jensenshannon is the distance: the square root of the divergence.
    expected = scipy.spatial.distance.jensenshannon(f64(p), f64(q), base=base, axis=-1) ** 2
    chex.assert_trees_all_close(js_divergence(p, q, base=base), expected.astype(np.float32), **TOL)


# ---------------------------------------------------------------------------
# Properties (hypothesis). One jitted function of fixed shapes, traced once.

CLASSES = 6
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


def _normalise(w):
    w = w.copy()
    w[w.sum(-1) == 0, 0] = 1.0
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)


_entry = st.one_of(st.just(0.0), st.floats(1e-3, 1.0))
distributions = hnp.arrays(np.float64, (4, CLASSES), elements=_entry).map(_normalise)
full_support = hnp.arrays(np.float64, (4, CLASSES), elements=st.floats(1e-3, 1.0)).map(_normalise)


@jax.jit
@chex.assert_max_traces(n=1)
def quantities(p, q):
    return {
        "h_p": jxent.entropy(p),
        "h_pq": jxent.cross_entropy(p, q),
        "kl_pq": jxent.kl_divergence(p, q),
        "kl_pp": jxent.kl_divergence(p, p),
        "js_pq": jxent.js_divergence(p, q),
        "js_qp": jxent.js_divergence(q, p),
    }


@pytest.mark.slow
@SETTINGS
@given(p=distributions, q=full_support)
def test_cross_entropy_is_entropy_plus_kl(p, q):
    out = quantities(p, q)
    chex.assert_trees_all_close(out["h_pq"], out["h_p"] + out["kl_pq"], atol=2e-6, rtol=1e-6)
    assert np.all(out["h_pq"] >= out["h_p"] - 2e-6)


@SETTINGS
@given(p=distributions, q=distributions)
def test_gibbs_inequality_and_kl_of_itself(p, q):
    out = quantities(p, q)
    assert np.all(np.asarray(out["kl_pq"]) >= -1e-6)  # +inf where q misses p's mass
    np.testing.assert_array_equal(out["kl_pp"], 0.0)


@SETTINGS
@given(p=distributions)
def test_entropy_bounds(p):
    h = np.asarray(quantities(p, p)["h_p"])
    assert np.all(h >= 0.0)
    assert np.all(h <= math.log(CLASSES) + 1e-6)


@SETTINGS
@given(p=distributions, q=distributions)
def test_js_bounds_and_symmetry(p, q):
    out = quantities(p, q)
    js = np.asarray(out["js_pq"])
    assert np.all(js >= -1e-6)
    assert np.all(js <= math.log(2) + 1e-6)
    chex.assert_trees_all_close(out["js_pq"], out["js_qp"], atol=1e-6)


# ---------------------------------------------------------------------------
# The logit forms.


@pytest.mark.slow
@pytest.mark.parametrize("base", [None, 2])
def test_from_logits_equal_probability_twins(rng, base):
    a = rng.normal(scale=3.0, size=(8, 7)).astype(np.float32)
    b = rng.normal(scale=3.0, size=(8, 7)).astype(np.float32)
    pa, pb = softmax(a), softmax(b)
    chex.assert_trees_all_close(
        entropy_from_logits(a, base=base), entropy(pa, base=base), atol=2e-6, rtol=1e-5
    )
    chex.assert_trees_all_close(
        kl_divergence_from_logits(a, b, base=base),
        kl_divergence(pa, pb, base=base),
        atol=2e-6,
        rtol=1e-5,
    )
    expected = scipy.stats.entropy(scipy.special.softmax(f64(a), -1), base=base, axis=-1)
    chex.assert_trees_all_close(
        entropy_from_logits(a, base=base), expected.astype(np.float32), **TOL
    )


@pytest.mark.slow
def test_minus_inf_logits_are_zero_probability_classes(rng):
    logits = rng.normal(size=(5,)).astype(np.float32)
    with_dead = np.insert(logits, [1, 3], -np.inf)
    chex.assert_trees_all_close(entropy_from_logits(with_dead), entropy_from_logits(logits), **TOL)
    grad = np.asarray(jax.jit(jax.grad(jxent.entropy_from_logits))(with_dead))
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[[1, 4]], 0.0)
    chex.assert_trees_all_close(
        np.delete(grad, [1, 4]),
        jax.jit(jax.grad(jxent.entropy_from_logits))(logits),
        atol=1e-6,
    )


def test_single_finite_logit_has_zero_entropy():
    logits = jnp.array([[-jnp.inf, 2.5, -jnp.inf], [-jnp.inf, -jnp.inf, -jnp.inf]])
    h, grad = jax.jit(jax.value_and_grad(lambda x: jxent.entropy_from_logits(x).sum()))(logits)
    np.testing.assert_array_equal(entropy_from_logits(logits), [0.0, 0.0])
    assert float(h) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.slow
def test_kl_from_logits_with_minus_inf(rng):
    teacher = rng.normal(size=(6,)).astype(np.float32)
    student = rng.normal(size=(6,)).astype(np.float32)
    kl = jax.jit(jax.value_and_grad(jxent.kl_divergence_from_logits, argnums=(0, 1)))

    # A -inf teacher logit is a zero-probability class: the twin on probabilities.
    t = teacher.copy()
    t[2] = -np.inf
    value, grads = kl(t, student)
    chex.assert_trees_all_close(
        value, kl_divergence(softmax(t), softmax(student)), atol=2e-6, rtol=1e-5
    )
    assert all(np.isfinite(g).all() for g in grads)
    assert float(grads[0][2]) == 0.0

    # -inf in both at the same class: the class is simply absent.
    s = student.copy()
    s[2] = -np.inf
    value, grads = kl(t, s)
    chex.assert_trees_all_close(
        value, kl_divergence_from_logits(np.delete(t, 2), np.delete(s, 2)), **TOL
    )
    assert all(np.isfinite(g).all() for g in grads)

    # A -inf student logit where the teacher has mass: KL is +inf.
    s = student.copy()
    s[4] = -np.inf
    assert float(kl_divergence_from_logits(teacher, s)) == math.inf


# ---------------------------------------------------------------------------
# Equivalences.


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_where_equals_slicing(rng, name):
    args = inputs(name, rng, (7, 6), zeros=0.2)
    # Rows 1.. keep 4 entries each, in different places; row 0 keeps nothing.
    mask = np.zeros((7, 6), bool)
    for row in mask[1:]:
        row[rng.permutation(6)[:4]] = True
    # Dropped entries may hold anything: NaN, inf or negative numbers.
    junk = np.array([np.nan, np.inf, -np.inf, -3.0, 7.0], np.float32)
    poisoned = tuple(np.where(mask, a, junk[rng.integers(5, size=a.shape)]) for a in args)
    out = JITTED[name](*poisoned, where=mask)
    sliced = JITTED[name](*(a[1:][mask[1:]].reshape(6, 4) for a in args))
    chex.assert_trees_all_close(out[1:], sliced, atol=2e-6, rtol=1e-5)
    assert float(out[0]) == 0.0  # nothing kept


@pytest.mark.slow
@pytest.mark.parametrize("name", ["js_divergence", "kl_divergence_from_logits"])
def test_where_broadcasts_like_numpy(rng, name):
    args = inputs(name, rng, (4, 6))
    keep = np.array([True, False, True, True, False, True])
    fn = getattr(jxent, name)
    masked, sliced = jax.jit(lambda a: (fn(*a, where=keep), fn(*(x[:, keep] for x in a))))(args)
    chex.assert_trees_all_close(masked, sliced, **TOL)


def test_where_sums_kept_entries_without_renormalising(rng):
    p, q = supports(rng, (3, 8))
    keep = np.array([True, True, False, True, False, True, True, False])
    pk, qk = f64(p)[:, keep], f64(q)[:, keep]
    chex.assert_trees_all_close(
        entropy(p, where=keep), (-scipy.special.xlogy(pk, pk).sum(-1)).astype(np.float32), **TOL
    )
    chex.assert_trees_all_close(
        kl_divergence(p, q, where=keep),
        scipy.special.rel_entr(pk, qk).sum(-1).astype(np.float32),
        **TOL,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_axis_equals_moveaxis(rng, name):
    last = inputs(name, rng, (3, 5, 4))  # distributions along the last axis
    mask = rng.random(last[0].shape) < 0.7
    fn = getattr(jxent, name)

    @jax.jit
    def along_each_axis(last, mask):
        out = {-1: (fn(*last), fn(*last, where=mask))}
        for axis in (0, 1):  # 1 is PyTorch's [N, C, d] layout
            moved = tuple(jnp.moveaxis(x, -1, axis) for x in last)
            moved_mask = jnp.moveaxis(mask, -1, axis)
            out[axis] = (fn(*moved, axis=axis), fn(*moved, axis=axis, where=moved_mask))
        return out

    out = along_each_axis(last, mask)
    chex.assert_trees_all_close(out[0], out[1], out[-1], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_vmap_equals_leading_batch_axes(rng, name):
    args = inputs(name, rng, (2, 3, 5), zeros=0.2)
    mask = rng.random((2, 3, 5)) < 0.8
    fn = getattr(jxent, name)
    per_row = jax.vmap(jax.vmap(lambda a, m: fn(*a, where=m)))
    batched, mapped = jax.jit(lambda a, m: (fn(*a, where=m), per_row(a, m)))(args, mask)
    chex.assert_shape(batched, (2, 3))
    chex.assert_trees_all_close(mapped, batched, **TOL)


@pytest.mark.parametrize("name", ["cross_entropy", "kl_divergence", "js_divergence"])
def test_q_broadcasts_against_p(rng, name):
    p = simplex(rng, (4, 6))
    q = simplex(rng, (6,))
    fn = getattr(jxent, name)
    implicit, explicit = jax.jit(lambda p, q: (fn(p, q), fn(p, jnp.broadcast_to(q, p.shape))))(p, q)
    chex.assert_trees_all_close(implicit, explicit, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_base_divides_by_log_base(rng, name):
    args = inputs(name, rng, (4, 6), zeros=0.2)
    fn = getattr(jxent, name)
    nats, bits, decimal = jax.jit(lambda a: [fn(*a, base=b) for b in (None, 2, 10)])(args)
    chex.assert_trees_all_close(bits, nats / math.log(2), **TOL)
    chex.assert_trees_all_close(decimal, nats / math.log(10), **TOL)


def test_information_content_bits(rng):
    p = simplex(rng, (10,), zeros=0.2)
    chex.assert_trees_all_close(
        information_content(p, base=2), information_content(p) / math.log(2), **TOL
    )
    with np.errstate(divide="ignore"):
        chex.assert_trees_all_close(information_content(p), -np.log(p), **TOL)


# ---------------------------------------------------------------------------
# Gradients.


def _interior(name, rng, shape):
    return inputs(name, rng, shape, floor=0.3)


@jax.jit
def every_function(p, q, a):
    """Six functions at once: one compilation for ``check_grads``."""
    return {
        "information_content": jxent.information_content(p, base=2),
        "entropy": jxent.entropy(p),
        "cross_entropy": jxent.cross_entropy(p, q, axis=0),
        "kl_divergence": jxent.kl_divergence(p, q),
        "js_divergence": jxent.js_divergence(p, q, base=10),
        "entropy_from_logits": jxent.entropy_from_logits(a, axis=0),
    }


@pytest.mark.slow
def test_check_grads_interior(rng):
    p, q = (f64(simplex(rng, (2, 4), floor=0.3)) for _ in range(2))
    a, b = rng.normal(size=(2, 2, 4))
    with jax.enable_x64(True):  # finite differences need float64
        check_grads(jax.jit(every_function), (p, q, a), order=2, modes=("fwd", "rev"))
        # Second order of the distillation KL is slow to compile; its Hessian is
        # checked against the calculus in test_hessians_match_the_calculus.
        check_grads(jax.jit(kl_divergence_from_logits), (a, b), order=1, modes=("fwd", "rev"))


def test_cross_entropy_gradient_in_p_is_minus_log_q(rng):
    # H(p, q) is linear in p, so its gradient is -log q even where p = 0.
    p, q = supports(rng, (3, 7))
    q = np.maximum(q, np.float32(0.01))
    grad_p, grad_q = jax.jit(jax.grad(lambda *a: jxent.cross_entropy(*a).sum(), (0, 1)))(p, q)
    chex.assert_trees_all_close(grad_p, -np.log(q), **TOL)
    chex.assert_trees_all_close(grad_q, -p / q, **TOL)
    with jax.enable_x64(True):
        check_grads(jax.jit(lambda p: cross_entropy(p, f64(q))), (f64(p),), order=1,
                    modes=("fwd", "rev"))


@pytest.mark.slow
@pytest.mark.parametrize("name", PROBABILITY_FUNCTIONS)
def test_no_nan_gradient_at_zeros(rng, name):
    p, q = supports(rng, (6, 5))
    assert (p == 0).any()
    args = (p, q)[: ARITY[name]]
    fn = getattr(jxent, name)
    value, grads = jax.jit(jax.value_and_grad(lambda *a: fn(*a).sum(), range(len(args))))(*args)
    assert np.isfinite(value)
    for g in grads:
        assert np.isfinite(g).all()
    # The derivative of -p log p at p = 0 is taken as 0.
    if name == "entropy":
        np.testing.assert_array_equal(grads[0][p == 0], 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_masked_entries_get_exactly_zero_gradient(rng, name):
    args = supports(rng, (6, 5))[: ARITY[name]] if name in PROBABILITY_FUNCTIONS else None
    args = args or inputs(name, rng, (6, 5))
    mask = rng.random((6, 5)) < 0.6
    junk = np.array([np.nan, np.inf, -np.inf], np.float32)
    poisoned = tuple(np.where(mask, a, junk[rng.integers(3, size=a.shape)]) for a in args)
    fn = getattr(jxent, name)
    value, grads = jax.jit(
        jax.value_and_grad(lambda *a: fn(*a, where=mask).sum(), range(len(args)))
    )(*poisoned)
    assert np.isfinite(value)
    for g in grads:
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_forward_mode(rng, name):
    args = _interior(name, rng, (3,))
    fn = getattr(jxent, name)
    tangents = tuple(rng.normal(size=a.shape).astype(np.float32) for a in args)
    argnums = tuple(range(len(args)))

    @jax.jit
    def derivatives(args, tangents):
        value = fn(*args)
        primal, tangent = jax.jvp(fn, args, tangents)
        jacobian = jax.jacfwd(fn, argnums)(*args)
        return value, primal, tangent, jacobian, jax.hessian(fn, argnums)(*args)

    value, primal, tangent, jacobian, hessian = derivatives(args, tangents)
    chex.assert_trees_all_close(primal, value, **TOL)
    chex.assert_trees_all_close(
        tangent, sum(np.vdot(j, t) for j, t in zip(jacobian, tangents, strict=True)), atol=1e-5
    )
    assert all(np.isfinite(j).all() for j in jacobian)
    for i in argnums:
        for j in argnums:
            assert np.isfinite(hessian[i][j]).all()
            chex.assert_trees_all_close(hessian[i][j], hessian[j][i].T, atol=1e-5)


@pytest.mark.slow
def test_hessians_match_the_calculus(rng):
    p, q = (simplex(rng, (4,), floor=0.3) for _ in range(2))

    @jax.jit
    def second_derivatives(p, q):
        return (
            jax.hessian(jxent.entropy)(p),
            jax.hessian(jxent.cross_entropy, 1)(p, q),
            jax.hessian(jxent.kl_divergence, 1)(p, q),
            jax.jacfwd(jxent.information_content)(p),
            jax.hessian(jxent.kl_divergence_from_logits, 1)(jnp.log(p), jnp.log(q)),
        )

    h_pp, ce_qq, kl_qq, surprisal, distill_qq = second_derivatives(p, q)
    # d²H/dp² = diag(-1/p); d²H(p,q)/dq² = d²KL/dq² = diag(p/q²); dI/dp = diag(-1/p).
    chex.assert_trees_all_close(h_pp, np.diag(-1 / p), atol=1e-5)
    chex.assert_trees_all_close(ce_qq, kl_qq, np.diag(p / q**2), atol=1e-4)
    chex.assert_trees_all_close(surprisal, np.diag(-1 / p), atol=1e-5)
    # KL(p ‖ softmax(z)) has gradient softmax(z) - p and Hessian diag(q) - q qᵀ in z.
    chex.assert_trees_all_close(distill_qq, np.diag(q) - np.outer(q, q), atol=1e-5)


# ---------------------------------------------------------------------------
# Bad input and dtypes.


@pytest.mark.parametrize("name", ["cross_entropy", "kl_divergence", "js_divergence"])
def test_non_broadcastable_shapes_name_both(name):
    with pytest.raises(
        ValueError, match=r"p has shape \(3, 4\) and q has shape \(3, 5\), which do not broadcast"
    ):
        JITTED[name](jnp.ones((3, 4)) / 4, jnp.ones((3, 5)) / 5)


def test_non_broadcastable_logits_name_both():
    with pytest.raises(ValueError, match=r"p_logits has shape \(2, 4\) and q_logits has shape"):
        kl_divergence_from_logits(jnp.zeros((2, 4)), jnp.zeros((3, 4)))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("base", [0, -2.0, 1, 1.0, math.inf])
def test_bad_base(name, base):
    args = inputs(name, np.random.default_rng(0), (2, 3))
    with pytest.raises(ValueError, match=r"base must be None \(nats\), 2 \(bits\) or another"):
        JITTED[name](*args, base=base)
    with pytest.raises(ValueError, match=rf"got {float(base)!r}"):
        jxent.information_content(0.5, base=base)


def test_base_must_be_a_python_number():
    with pytest.raises(TypeError, match="base must be None"):
        jxent.entropy(jnp.array([0.5, 0.5]), base="2")


def test_integer_inputs_are_probabilities():
    assert float(information_content(1)) == 0.0
    one_hot = np.array([[1, 0, 0], [0, 0, 1]], np.int32)
    h = entropy(one_hot)
    assert h.dtype == jnp.float32
    np.testing.assert_array_equal(h, [0.0, 0.0])
    q = np.array([0.25, 0.25, 0.5], np.float32)
    chex.assert_trees_all_close(
        cross_entropy(one_hot, q), cross_entropy(one_hot.astype(np.float32), q), **TOL
    )
    chex.assert_trees_all_close(kl_divergence(one_hot, q), np.float32([math.log(4), math.log(2)]))
    chex.assert_trees_all_close(js_divergence(one_hot, one_hot), np.float32([0.0, 0.0]))
    chex.assert_trees_all_close(
        js_divergence(one_hot, one_hot[::-1]), np.float32([math.log(2)] * 2), **TOL
    )


@pytest.mark.parametrize("name", PROBABILITY_FUNCTIONS)
def test_eager_negative_probabilities_raise(name):
    fn = getattr(jxent, name)
    good = jnp.array([0.5, 0.5])
    bad = jnp.array([1.5, -0.5])
    in_range = re.escape("must hold probabilities in [0, 1], but it contains")
    with pytest.raises(ValueError, match="p " + in_range):
        fn(*(bad, good)[: ARITY[name]])
    if ARITY[name] == 2:
        with pytest.raises(ValueError, match="q " + in_range):
            fn(good, bad)
    with pytest.raises(ValueError, match="p " + in_range):
        jxent.information_content(-0.1)


@pytest.mark.parametrize("value", [1.5, 1.0000001, -0.1])
def test_eager_probabilities_above_one_raise(value):
    """``information_content(1.5)`` was −0.405: above 1 is as wrong as below 0."""
    with pytest.raises(ValueError, match=re.escape("probabilities in [0, 1], but it contains")):
        jxent.information_content(np.float32(value))
    with pytest.raises(ValueError, match=re.escape("p must hold probabilities in [0, 1]")):
        jxent.entropy(np.float32([value, 0.5]))
    assert float(jxent.information_content(1.0)) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", PROBABILITY_FUNCTIONS)
def test_eager_check_ignores_masked_entries(name):
    # Masked entries may hold anything, negative numbers included, eagerly too.
    fn = getattr(jxent, name)
    p = jnp.array([0.5, -jnp.inf, 0.5, -2.0])
    keep = jnp.array([True, False, True, False])
    chex.assert_trees_all_close(
        fn(*(p,) * ARITY[name], where=keep), JITTED[name](*(p[keep],) * ARITY[name]), **TOL
    )


@pytest.mark.parametrize("name", ALL)
def test_where_of_the_wrong_shape_or_dtype(name):
    args = inputs(name, np.random.default_rng(0), (3, 4))
    arg = "logits" if name == "entropy_from_logits" else "p_logits" if "logits" in name else "p"
    with pytest.raises(ValueError, match=rf"where has shape \(5,\), .* {arg} shape \(3, 4\)"):
        JITTED[name](*args, where=np.ones(5, bool))
    with pytest.raises(ValueError, match=r"where has shape \(2, 3, 4\)"):  # no silent broadcast
        JITTED[name](*args, where=np.ones((2, 3, 4), bool))
    with pytest.raises(TypeError, match=r"where must be a boolean array .* got dtype int32"):
        JITTED[name](*args, where=np.ones((3, 4), np.int32))


@pytest.mark.parametrize("name", ALL)
def test_scalar_and_axis_errors(name):
    with pytest.raises(ValueError, match="scalar"):
        JITTED[name](*(jnp.float32(0.5),) * ARITY[name])
    args = inputs(name, np.random.default_rng(0), (3, 4))
    with pytest.raises(ValueError, match=r"axis=2 is out of range .* with 2 dimension"):
        JITTED[name](*args, axis=2)


def test_logits_must_be_floating():
    with pytest.raises(TypeError, match="logits must be a floating-point array of logits"):
        entropy_from_logits(jnp.arange(3))
    with pytest.raises(TypeError, match="q_logits must be a floating-point array"):
        kl_divergence_from_logits(jnp.zeros(3), jnp.arange(3))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_low_precision_is_computed_in_float32(rng, name):
    args = inputs(name, rng, (3, 5), zeros=0.2)
    fn = getattr(jxent, name)

    @jax.jit
    def in_each_dtype(args):
        return {
            dtype: fn(*(a.astype(dtype) for a in args))
            for dtype in ("bfloat16", "float16", "float32")
        } | {"from_bf16": fn(*(a.astype(jnp.bfloat16).astype(jnp.float32) for a in args))}

    out = in_each_dtype(args)
    assert all(v.dtype == jnp.float32 for v in out.values())
    chex.assert_trees_all_close(out["bfloat16"], out["from_bf16"])  # upcast, then computed
    chex.assert_trees_all_close(out["float16"], out["float32"], atol=2e-3, rtol=2e-3)
    assert information_content(jnp.asarray(0.5, jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.slow
def test_float64_is_honoured_under_x64(rng):
    p, q = supports(rng, (5, 7))
    p64, q64 = (f64(x) / f64(x).sum(-1, keepdims=True) for x in (p, q))
    with jax.enable_x64(True):
        h = entropy(p64)
        kl = kl_divergence(p64, q64)
        assert h.dtype == kl.dtype == jnp.float64
        np.testing.assert_allclose(h, scipy.stats.entropy(p64, axis=-1), rtol=1e-12)
        np.testing.assert_allclose(kl, scipy.stats.entropy(p64, q64, axis=-1), rtol=1e-12)
        assert entropy_from_logits(jnp.zeros(3, jnp.float64)).dtype == jnp.float64
        assert information_content(jnp.float64(0.5)).dtype == jnp.float64
        assert entropy(jnp.asarray(p)).dtype == jnp.float32  # float32 stays float32
    assert entropy(p).dtype == jnp.float32


# --------------------------------------------------------------------------------------
# Hardening (issue 10)


def test_degenerate_entropies_are_plus_zero():
    """``entropy([1, 0])`` showed ``-0.``: a certain outcome has entropy +0.0."""
    f = jax.jit(
        lambda p, x: (
            jxent.entropy(p),
            jxent.entropy_from_logits(x),
            jxent.kl_divergence(p, p),
            jxent.js_divergence(p, p),
            jxent.kl_divergence_from_logits(x, x),
        )
    )
    outs = f(jnp.array([1.0, 0.0]), jnp.array([3.0, -jnp.inf]))
    for out in outs:
        assert float(out) == 0.0 and not np.signbit(np.asarray(out)), outs


def test_divergences_are_never_negative_in_float32(rng):
    """Near-equal inputs gave KL ≈ −2e-7 in about half of random float32 trials."""
    p = rng.dirichlet(np.ones(50), 2000).astype(np.float32)
    q = (p * (1 + 1e-7 * rng.standard_normal(p.shape))).astype(np.float32)
    x = rng.standard_normal((2000, 50)).astype(np.float32)
    y = x + np.float32(1e-6) * rng.standard_normal(x.shape).astype(np.float32)
    f = jax.jit(
        lambda p, q, x, y: (
            jxent.kl_divergence(p, q),
            jxent.js_divergence(p, q),
            jxent.kl_divergence_from_logits(x, y),
            jxent.entropy(p),
        )
    )
    for out in f(p, q, x, y):
        assert np.all(np.asarray(out) >= 0) and not np.any(np.signbit(np.asarray(out)))


def test_clamping_keeps_the_gradient_of_the_formula(rng):
    """Only the value is clamped at 0: the derivative at p = q is the formula's."""
    p = jnp.array([0.2, 0.3, 0.5])
    got = jax.jit(jax.grad(jxent.kl_divergence, argnums=(0, 1)))(p, p)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
    close(got[0], np.ones(3))  # ∂/∂p_c = log p_c − log q_c + 1
    close(got[1], -np.ones(3))  # ∂/∂q_c = −p_c / q_c


@pytest.mark.slow
def test_kl_from_logits_with_an_impossible_student_class():
    """q = 0 < p: +inf, never NaN, and every gradient finite (a batch mean stays usable)."""
    p_logits = jnp.array([[0.0, -1.0, 1.0], [0.0, -1e9, 1.0], [0.5, 0.0, -2.0]])
    q_logits = jnp.array([[0.0, -jnp.inf, 1.0], [0.0, -jnp.inf, 1.0], [0.0, 0.0, 0.0]])
    f = jxent.kl_divergence_from_logits
    value, grads = jax.jit(
        lambda p, q: (f(p, q), jax.grad(lambda p, q: jnp.sum(f(p, q)[1:]), (0, 1))(p, q))
    )(p_logits, q_logits)
    value = np.asarray(value)
    assert value[0] == np.inf
    # A −1e9 mask logit is a class of probability exactly 0 in float32: the
    # probability form gives 0 for it, and so does the logits form.
    p_probs = jax.nn.softmax(p_logits[1])
    q_probs = jax.nn.softmax(q_logits[1])
    np.testing.assert_allclose(value[1], float(jxent.kl_divergence(p_probs, q_probs)), atol=1e-7)
    assert value[1] == 0.0
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    g_all = jax.jit(jax.grad(lambda p, q: jnp.mean(f(p, q)), (0, 1)))(p_logits, q_logits)
    for g in g_all:
        assert not np.any(np.isnan(np.asarray(g)))
    # The finite rows keep their exact gradient: ∂KL/∂q = q − p.
    np.testing.assert_allclose(
        g_all[1][2], (jax.nn.softmax(q_logits[2]) - jax.nn.softmax(p_logits[2])) / 3, atol=1e-6
    )
