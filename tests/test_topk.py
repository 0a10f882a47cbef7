"""Stored teachers (``TopK``), ``class_log_probs`` and ``divergence="tvd"``.

References: NumPy float64 implementations of the formulas of DESIGN's "Stored
teachers and chosen classes": the k + 1 buckets of ``topk_mode="tail"`` (the
student's rest summed over the classes not stored), the renormalised k
classes of ``"renormalize"``, each divergence and its derivative with respect
to the bucket probabilities, chained through the softmax by hand for the
student's gradient. Few compiles: options that may be traced (temperature,
beta) are arguments of one jitted function, and the modes and divergences
are computed together.
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jxent
from jxent import LinearLogits, TopK

MODES = ("tail", "renormalize")
DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
N, V, K = 6, 12, 4


def close(a, b, tol=2e-5):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- references


def lse(z):
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))[..., 0]


def divergence_and_slope(t, s, divergence, beta):
    """``D(t, s)`` over buckets and ``∂D/∂s`` in float64, with 0 · log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if divergence == "kl":
            return np.sum(np.where(t > 0, t * np.log(t / s), 0)), np.where(t > 0, -t / s, 0)
        if divergence == "reverse_kl":
            value = np.sum(np.where(s > 0, s * np.log(s / t), 0))
            return value, np.where(s > 0, np.log(s / t) + 1, 0)
        if divergence == "tvd":
            return 0.5 * np.sum(np.abs(t - s)), 0.5 * np.sign(s - t)
        m = beta * t + (1 - beta) * s
        value = beta * np.sum(np.where(t > 0, t * np.log(t / m), 0)) + (1 - beta) * np.sum(
            np.where(s > 0, s * np.log(s / m), 0)
        )
        return value, np.where(s > 0, (1 - beta) * np.log(s / m), 0)


def topk_np(x, ids, lp, mode, divergence, beta=0.5, temperature=1.0):
    """Per position (rows of ``x [N, V]``): the loss and its gradient with respect to ``x``."""
    x, lp = np.asarray(x, np.float64), np.asarray(lp, np.float64)
    n, v = x.shape
    loss, grad = np.zeros(n), np.zeros((n, v))
    for r in range(n):
        z = x[r] / temperature
        p = np.exp(z - lse(z))
        stored = lp[r] != -np.inf
        cls = np.asarray(ids[r])[stored]
        if mode == "tail":
            t, s = np.exp(lp[r][stored]), p[cls]
            bucket = np.full(v, len(cls))  # the rest bucket, unless stored
            bucket[cls] = np.arange(len(cls))
            if len(cls) < v:  # t_rest = 1 − Σ t_i, s_rest = the mass of the others
                t = np.append(t, max(0.0, 1 - t.sum()))
                s = np.append(s, p[bucket == len(cls)].sum())
            loss[r], g = divergence_and_slope(t, s, divergence, beta)
            g = np.append(g, 0.0)  # (an empty rest bucket: no class points at it)
            grad[r] = p * (g[bucket] - np.sum(g[: len(s)] * s)) / temperature
        elif len(cls):
            t = np.exp(lp[r][stored] / temperature - lse(lp[r][stored] / temperature))
            s = np.exp(z[cls] - lse(z[cls]))
            loss[r], g = divergence_and_slope(t, s, divergence, beta)
            grad[r, cls] = s * (g - np.sum(g * s)) / temperature
    return loss, grad


def dense_divergence_np(student, teacher, divergence, beta=0.5, temperature=1.0):
    """The dense teacher's divergence per row (the k = V case of the buckets)."""
    s = np.exp(student / temperature - lse(student / temperature)[..., None])
    t = np.exp(teacher / temperature - lse(teacher / temperature)[..., None])
    rows = zip(t, s, strict=True)
    return np.array([divergence_and_slope(a, b, divergence, beta)[0] for a, b in rows])


def class_log_probs_np(x, ids, temperature=1.0):
    z = np.asarray(x, np.float64) / temperature
    with np.errstate(invalid="ignore"):
        log_p = z - lse(z)[..., None]
    return np.take_along_axis(log_p, ids, -1)


def draw(rng, n=N, v=V, k=K, pad=True):
    """Student logits ``[n, v]`` and the teacher's top-k ``(ids, log_probs)``, some padded."""
    student = (1.5 * rng.standard_normal((n, v))).astype(np.float32)
    teacher = 2.0 * rng.standard_normal((n, v))
    log_t = teacher - lse(teacher)[:, None]
    ids = np.argsort(-log_t, -1)[:, :k].astype(np.int32)
    lp = np.take_along_axis(log_t, ids, -1).astype(np.float32)
    if pad:
        lp[1, -1] = -np.inf  # one padded entry (its id is anything)
        lp[2, 1:] = -np.inf
        ids[2, 2] = 10**6
        lp[3] = -np.inf  # nothing stored
    return student, ids, lp, teacher


@partial(jax.jit, static_argnames=("modes", "divergences"))
def every_mode(x, ids, lp, temperature, beta, modes=MODES, divergences=DIVERGENCES):
    """``{(mode, divergence): (per position, ∂Σ/∂x)}``: one compile for every case."""
    out = {}
    for mode in modes:
        for divergence in divergences:
            f = lambda x, m=mode, d=divergence: jxent.distillation_loss(
                x, TopK(ids, lp), shift=False, divergence=d, beta=beta,
                temperature=temperature, topk_mode=m, reduction="none",
            )
            value, pull = jax.vjp(f, x)
            out[mode, divergence] = value, pull(jnp.ones_like(value))[0]
    return out


# --------------------------------------------------------------------------- TopK


def test_tail_kl_matches_the_float64_reference(rng):
    student, ids, lp, _ = draw(rng)
    f = jax.jit(jax.value_and_grad(lambda x: jxent.distillation_loss(
        x, TopK(ids, lp), shift=False, reduction="sum")))
    value, grad = f(student)
    loss, expected = topk_np(student, ids, lp, "tail", "kl")
    close(value, loss.sum())
    close(grad, expected)


@pytest.mark.slow
def test_every_mode_and_divergence_matches_the_float64_reference(rng):
    student, ids, lp, _ = draw(rng)
    for temperature, beta in ((1.0, 0.5), (0.7, 0.2), (2.0, 0.9)):
        got = every_mode(student, ids, lp, temperature, beta)
        for (mode, divergence), (value, grad) in got.items():
            loss, expected = topk_np(student, ids, lp, mode, divergence, beta, temperature)
            try:
                close(value, loss)
                close(grad, expected)
            except AssertionError as e:
                raise AssertionError(f"{mode} {divergence} T={temperature}: {e}") from None
            assert np.all(np.asarray(value) >= 0)
            assert abs(value[3]) < 1e-6  # nothing stored: 0 in both modes


@pytest.mark.slow
def test_reductions_masks_shift_segments_and_the_hard_term(rng):
    """``mean``/``sum`` from the per-position reference; ``shift``, ``segment_ids`` move masks."""
    b, t = 2, 5
    student, ids, lp, _ = draw(rng, n=b * t)
    targets = rng.integers(0, V, (b, t)).astype(np.int32)
    targets[0, 3] = -100
    where = rng.random((b, t)) < 0.8
    segments = np.array([[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]], np.int32)
    x, i3, l3 = student.reshape(b, t, V), ids.reshape(b, t, K), lp.reshape(b, t, K)

    @jax.jit
    def run(x, alpha):
        out = {}
        for reduction in ("mean", "sum", "none"):
            f = lambda x, r=reduction: jxent.distillation_loss(
                x, TopK(i3, l3), shift=True, where=where, targets=targets, hard_weight=alpha,
                segment_ids=segments, divergence="jsd", topk_mode="renormalize", reduction=r)
            out[reduction] = jax.value_and_grad(lambda x, f=f: jnp.sum(f(x)))(x)
        return out

    got = run(x, 0.3)
    # position (r, s) is counted when it predicts targets[r, s + 1] inside its document
    counted = np.zeros((b, t), bool)
    same_document = segments[:, 1:] == segments[:, :-1]
    counted[:, :-1] = where[:, 1:] & (targets[:, 1:] != -100) & same_document
    soft, g_soft = topk_np(student, ids, lp, "renormalize", "jsd")
    z = student.astype(np.float64)
    log_p = z - lse(z)[:, None]
    nxt = np.zeros((b, t), np.int64)
    nxt[:, :-1] = np.where(counted[:, :-1], targets[:, 1:], 0)
    ce = -np.take_along_axis(log_p, nxt.reshape(-1, 1), -1)[:, 0]
    g_ce = np.exp(log_p) - np.eye(V)[nxt.reshape(-1)]
    c = counted.reshape(-1)
    per = np.where(c, 0.3 * ce + 0.7 * soft, 0)
    grad = np.where(c[:, None], 0.3 * g_ce + 0.7 * g_soft, 0).reshape(b, t, V)
    close(got["none"][0], per.reshape(b, t)[:, :-1].sum())
    close(got["sum"], (per.sum(), grad))
    close(got["mean"], (per.sum() / c.sum(), grad / c.sum()))


@pytest.mark.slow
def test_every_class_stored_equals_the_dense_teacher_and_k_1(rng):
    """k = V: the tail bucket is empty and every divergence is the dense teacher's."""
    student, ids, lp, teacher = draw(rng, k=V, pad=False)
    got = every_mode(student, ids, lp, 1.3, 0.4, modes=("tail",))
    for divergence in DIVERGENCES:
        # the stored log-probs are the teacher at T as generated: T divides the student only
        s = student.astype(np.float64) / 1.3
        want = dense_divergence_np(s, teacher, divergence, 0.4, 1.0)
        close(got["tail", divergence][0], want)
        close(got["tail", divergence], topk_np(student, ids, lp, "tail", divergence, 0.4, 1.3))
    one = every_mode(student, ids[:, :1], lp[:, :1], 1.0, 0.5, divergences=("kl",))
    for (mode, divergence), value in one.items():
        close(value, topk_np(student, ids[:, :1], lp[:, :1], mode, divergence, 0.5, 1.0))
        if mode == "renormalize":  # one class against one class: nothing to compare
            close(value[0], np.zeros(N))


@pytest.mark.slow
def test_fused_student_equals_dense_and_the_teacher_gets_no_gradient(rng):
    d = 8
    hidden = rng.standard_normal((2, 5, d)).astype(np.float32)
    kernel = rng.standard_normal((d, V)).astype(np.float32)
    bias = rng.standard_normal(V).astype(np.float32)
    _, ids, lp, _ = draw(rng, n=10)
    ids, lp = ids.reshape(2, 5, K), lp.reshape(2, 5, K)
    where = rng.random((2, 5)) < 0.8

    @jax.jit
    def run(h, k, b, lp):
        out = {}
        for mode, reduction in (("tail", "none"), ("renormalize", "mean")):
            for fused in (True, False):
                def f(h, k, b, lp, mode=mode, reduction=reduction, fused=fused):
                    x = LinearLogits(h, k, b, chunk_size=3) if fused else h @ k + b[None, None]
                    loss = jxent.distillation_loss(
                        x, TopK(ids, lp), shift=True, where=where, divergence="kl",
                        temperature=1.5, topk_mode=mode, reduction=reduction)
                    return jnp.sum(loss * jnp.arange(1.0, 1.0 + loss.size).reshape(loss.shape))
                out[mode, reduction, fused] = jax.value_and_grad(f, (0, 1, 2, 3))(h, k, b, lp)
        return out

    out = run(hidden, kernel, bias, lp)
    for mode, reduction in (("tail", "none"), ("renormalize", "mean")):
        close(out[mode, reduction, True], out[mode, reduction, False])
        assert not np.any(out[mode, reduction, True][1][3])  # no gradient to log_probs


@pytest.mark.slow
def test_invalid_stored_teachers_raise_eagerly():
    x = jnp.zeros((2, 5))
    ids = np.array([[0, 1], [2, 3]], np.int32)
    lp = np.log(np.array([[0.5, 0.25], [0.25, 0.25]], np.float32))
    loss = lambda i, p, **kw: jxent.distillation_loss(x, TopK(i, p), shift=False, **kw)
    with pytest.raises(ValueError, match=r"stores the same id twice at position \(1,\)"):
        loss(np.array([[0, 1], [3, 3]]), lp)
    with pytest.raises(ValueError, match=r"has an id outside \[0, 5\) at position \(0,\)"):
        loss(np.array([[5, 1], [2, 3]]), lp)
    with pytest.raises(ValueError, match=r"more than probability 1 \+ 0.001.*1.1"):
        loss(ids, np.log(np.array([[0.6, 0.5], [0.1, 0.1]], np.float32)))
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        jxent.distillation_loss(x, TopK(ids[:1], lp[:1]), shift=False)
    with pytest.raises(ValueError, match=r"topk_mode must be one of 'tail', 'renormalize'"):
        loss(ids, lp, topk_mode="renormalise")
    with pytest.raises(TypeError, match="ids must be integer"):
        TopK(lp, lp)
    with pytest.raises(ValueError, match="same shape"):
        TopK(ids, lp[:, :1])


@pytest.mark.slow
def test_padding_and_positions_not_counted_are_not_checked():
    # padding is not an entry (any id, repeated, out of range); the third position is not counted
    ids = np.array([[0, 9], [0, 0], [3, 3]])
    lp = np.array([[0.0, -np.inf], [-1.0, -np.inf], [-1.0, -1.0]], np.float32)
    assert np.isfinite(jxent.distillation_loss(
        jnp.zeros((3, 5)), TopK(ids, lp), shift=False, where=np.array([True, True, False])))


@pytest.mark.slow
def test_invalid_stored_teachers_are_nan_reported_by_checkify_under_jit():
    x = jnp.zeros((3, 5))
    lp = np.log(np.array([[0.5, 0.25]] * 3, np.float32))

    def loss(ids, lp):
        return jxent.distillation_loss(x, TopK(ids, lp), shift=False, reduction="none")

    checked = jax.jit(checkify.checkify(loss, errors=checkify.float_checks))
    err, value = checked(np.array([[0, 1], [3, 3], [1, 2]], np.int32), lp)
    assert "nan generated" in str(err.get())
    np.testing.assert_array_equal(np.isnan(value), [False, True, False])
    err, value = checked(np.array([[0, 1], [2, 3], [1, 2]], np.int32), lp)
    assert err.get() is None and np.isfinite(value).all()
    value = jax.jit(loss)(np.array([[0, 7], [2, 3], [1, 2]], np.int32), lp)
    np.testing.assert_array_equal(np.isnan(value), [True, False, False])
    over = lp.copy()
    over[1] = [0.0, -1.0]
    np.testing.assert_array_equal(
        np.isnan(jax.jit(loss)(np.array([[0, 1], [2, 3], [1, 2]], np.int32), over)),
        [False, True, False])


# --------------------------------------------------------------------------- tvd


@pytest.mark.slow
def test_tvd_of_dense_and_fused_teachers_matches_numpy(rng):
    d = 8
    hs, ht = (rng.standard_normal((2, 4, d)).astype(np.float32) for _ in range(2))
    ks, kt = (rng.standard_normal((d, V)).astype(np.float32) for _ in range(2))

    @jax.jit
    def run(hs, ks):
        out = {}
        for fused in (True, False):
            def f(hs, ks, fused=fused):
                s, t = (LinearLogits(hs, ks, chunk_size=3), LinearLogits(ht, kt)) if fused else (
                    hs @ ks, ht @ kt)
                return jxent.distillation_loss(s, t, shift=False, divergence="tvd",
                                               temperature=0.8, reduction="none")
            value, pull = jax.vjp(f, hs, ks)
            out[fused] = value, pull(jnp.ones_like(value))
        return out

    out = run(hs, ks)
    close(out[True], out[False])
    s, t = (np.asarray(h, np.float64) @ k for h, k in ((hs, ks), (ht, kt)))
    want = dense_divergence_np(s.reshape(-1, V), t.reshape(-1, V), "tvd", temperature=0.8)
    close(out[True][0], want.reshape(2, 4))
    # the subgradient: ∂/∂s_c = ½ sign(s_c − t_c), through the softmax
    p = np.exp(s / 0.8 - lse(s / 0.8)[..., None])
    q = np.exp(t / 0.8 - lse(t / 0.8)[..., None])
    g = 0.5 * np.sign(p - q)
    d_logits = p * (g - np.sum(g * p, -1, keepdims=True)) / 0.8
    close(out[False][1][0], np.einsum("btv,dv->btd", d_logits, ks))


@pytest.mark.slow
def test_traced_temperature_with_a_fused_teacher():
    """A temperature schedule under jit with LinearLogits on both sides (one compile)."""
    h = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8)), jnp.float32)
    f = jax.jit(lambda temp: jxent.distillation_loss(
        LinearLogits(h, k), LinearLogits(h, 2 * k), shift=False, temperature=temp))
    s, t = (np.asarray(h, np.float64) @ np.asarray(k, np.float64) * c for c in (1, 2))
    close(f(2.0), dense_divergence_np(s.reshape(-1, 8), t.reshape(-1, 8), "kl", 0.5, 2.0).mean())


# --------------------------------------------------------------------------- class_log_probs


def test_class_log_probs_matches_numpy_with_its_gradient(rng):
    x = (2 * rng.standard_normal((2, 3, V))).astype(np.float32)
    ids = rng.integers(0, V, (2, 3, 5)).astype(np.int32)
    where = np.array([[True, False, True], [True, True, True]])
    x[0, 1] = np.nan  # not counted
    x[1, 0, ids[1, 0, 0]] = -np.inf  # a class of probability zero

    @jax.jit
    def run(x, temperature):
        f = lambda x: jxent.class_log_probs(x, ids, temperature=temperature, where=where)
        value, pull = jax.vjp(f, x)
        ct = jnp.arange(1.0, 31.0).reshape(value.shape)
        return value, pull(ct)[0], jxent.class_log_probs(x, ids[0, 0], temperature=temperature)

    for temperature in (1.0, 0.6):
        value, grad, shared = run(x, temperature)
        want = np.where(where[..., None], class_log_probs_np(x, ids, temperature), 0)
        close(value, want)
        assert value[1, 0, 0] == -np.inf and np.isfinite(grad).all()
        assert not np.any(grad[0, 1])
        z = x.astype(np.float64) / temperature
        p = np.exp(z - lse(z)[..., None])
        ct = np.arange(1.0, 31.0).reshape(2, 3, 5) * where[..., None]
        g = -p * ct.sum(-1, keepdims=True)  # Σ_i ct_i (onehot(id_i) − p)
        for i in range(5):
            g += np.eye(V)[ids[..., i]] * ct[..., i : i + 1]
        close(np.nan_to_num(grad), np.nan_to_num(g / temperature))
        close(shared[0, 0], class_log_probs_np(x[0, 0], ids[0, 0], temperature))


@pytest.mark.slow
def test_class_log_probs_fused_equals_dense_and_errors(rng):
    d = 8
    hidden = rng.standard_normal((4, 5, d)).astype(np.float32)
    kernel = rng.standard_normal((d, V)).astype(np.float32)
    ids = rng.integers(0, V, (4, 5, 3)).astype(np.int32)

    @jax.jit
    def run(h, k):
        out = {}
        for fused in (True, False):
            f = lambda h, k, fused=fused: jxent.class_log_probs(
                LinearLogits(h, k, chunk_size=6) if fused else h @ k, ids, temperature=1.4)
            value, pull = jax.vjp(f, h, k)
            out[fused] = value, pull(jnp.cos(value))
        return out

    out = run(hidden, kernel)
    close(out[True], out[False])
    with pytest.raises(ValueError, match=r"ids must be class indices in \[0, 12\); got 12"):
        jxent.class_log_probs(hidden @ kernel, np.array([0, 12]))
    with pytest.raises(ValueError, match=r"expected \(4, 5\) \+ \(k,\)"):
        jxent.class_log_probs(hidden @ kernel, ids[:2])
    assert np.isnan(jax.jit(jxent.class_log_probs)(hidden @ kernel, np.array([0, 12]))[0, 0, 1])
