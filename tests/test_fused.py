"""``LinearLogits``: every token-level function, fused, equals the same function on the logits.

The shared harness, :func:`jxent._testing.fused_and_dense`: for a call
``f(logits)`` it compares the value and the vector-Jacobian product (a
seeded, non-uniform cotangent for every floating output)
with respect to ``hidden``, ``kernel`` and ``bias`` of ``f(LinearLogits(h, K, b))``
and of ``f(h @ K + b)``, to 1e-5 relative in float32. Chunks of 4 positions
over 13 or 14 positions exercise the shifted last chunk. Each group of cases
compiles one program.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent import LinearLogits
from jxent._testing import cotangent as _cotangent
from jxent._testing import dense_logits
from jxent._testing import fused_and_dense as _fused_and_dense

B, T, D, V = 2, 7, 6, 11
CHUNK = 4
TOL = 1e-5


def draw(rng, *, dtype=np.float32, scale=1.0):
    hidden = rng.standard_normal((B, T, D)).astype(dtype)
    kernel = (scale * rng.standard_normal((D, V)) / 2).astype(dtype)
    bias = rng.standard_normal(V).astype(dtype)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    tokens[0, 2] = -100
    where = rng.random((B, T)) < 0.8
    weights = rng.uniform(0.2, 2.0, V).astype(np.float32)
    return hidden, kernel, bias, tokens, where, weights


dense = dense_logits


def fused_and_dense(calls, hidden, kernel, bias, chunk_size=CHUNK):
    """``{name: (fused, dense)}``: the shared harness at this file's chunk size."""
    return _fused_and_dense(calls, hidden, kernel, bias, chunk_size=chunk_size)


def assert_fused_equals_dense(results, tol=TOL):
    for name, (fused, dense) in results.items():
        try:
            chex.assert_trees_all_close(fused, dense, rtol=tol, atol=tol)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": 3},
    "smooth+weights": {"label_smoothing": 0.1, "class_weights": True},
    "z+softcap": {"z_loss": 1e-2, "logit_softcap": 2.0},
}


def _opts(options, weights):
    return {k: (weights if k == "class_weights" else v) for k, v in options.items()}


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_cross_entropy(rng, reduction):
    hidden, kernel, bias, tokens, where, weights = draw(rng)
    calls = {
        name: lambda x, o=o: jxent.softmax_cross_entropy(
            x, tokens, where=where, reduction=reduction, **_opts(o, weights)
        )
        for name, o in OPTIONS.items()
    }
    assert_fused_equals_dense(fused_and_dense(calls, hidden, kernel, bias))


@pytest.mark.slow
@pytest.mark.parametrize("shift", [True, False])
def test_sequence_nll_and_nll_stats(rng, shift):
    hidden, kernel, bias, tokens, where, weights = draw(rng)
    calls = {}
    for normalize in ("tokens", "sequences", "sum", "none"):
        for name, o in OPTIONS.items():
            calls[f"{normalize}/{name}"] = lambda x, n=normalize, o=o: jxent.sequence_nll(
                x, tokens, shift=shift, where=where, normalize=n, **_opts(o, weights)
            )
    calls["stats"] = lambda x: tuple(
        jxent.nll_stats(x, tokens, shift=shift, where=where, class_weights=weights)
    )
    assert_fused_equals_dense(fused_and_dense(calls, hidden, kernel, bias))


@pytest.mark.slow
@pytest.mark.parametrize("shift", [True, False])
def test_token_stats(rng, shift):
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    tokens[0, 2] = 0  # token_stats has no ignore_index: -100 would be out of range
    # some tokens are the argmax, so is_argmax is compared on True values too
    tokens[1] = np.argmax(dense(hidden, kernel, bias)[1], -1)
    calls = {
        f"T={t}": lambda x, t=t: jxent.token_stats(
            x, tokens, shift=shift, where=where, temperature=t
        )
        for t in (1.0, 0.7)
    }
    calls["no mask"] = lambda x: jxent.token_stats(x, tokens, shift=shift)
    out = fused_and_dense(calls, hidden, kernel, bias)
    assert_fused_equals_dense(out)
    assert np.asarray(out["no mask"][0][0].is_argmax).any()


def _ppo(stats, advantage, old_log_prob):
    """A clipped policy-gradient objective with an entropy bonus and a logsumexp penalty."""
    ratio = jnp.exp(stats.log_prob - old_log_prob)
    clipped = jnp.minimum(ratio * advantage, jnp.clip(ratio, 0.8, 1.2) * advantage)
    return -clipped - 0.01 * stats.entropy + 1e-3 * stats.logsumexp**2


@pytest.mark.slow
@pytest.mark.parametrize("shift", [True, False])
def test_token_objective(rng, shift):
    """Fused (gradient in the forward pass) = dense = the sum of ``fn`` of ``token_stats``."""
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    tokens[0, 2] = 0
    advantage = rng.standard_normal((B, T)).astype(np.float32)
    old = (-2.5 + rng.standard_normal((B, T))).astype(np.float32)
    cut = (lambda a: a[:, 1:]) if shift else (lambda a: a)  # args: the predicted positions
    calls = {}
    for t in (1.0, 0.7):
        calls[f"ppo T={t}"] = lambda x, t=t: jxent.token_objective(
            x, tokens, _ppo, shift=shift, args=(cut(advantage), cut(old)), where=where,
            temperature=t,
        )
    calls["reinforce, no mask"] = lambda x: jxent.token_objective(
        x, tokens, lambda s, a: -a * s.log_prob, shift=shift, args=(cut(advantage),)
    )
    out = fused_and_dense(calls, hidden, kernel, bias)
    assert_fused_equals_dense(out)
    # ... and the dense value and gradients are those of the explicit expression.

    def explicit(h, k, b):
        s = jxent.token_stats(dense(h, k, b), tokens, shift=shift, where=where, temperature=0.7)
        return jnp.sum(jnp.where(cut(where), _ppo(s, cut(advantage), cut(old)), 0))

    value, pull = jax.vjp(explicit, hidden, kernel, bias)
    chex.assert_trees_all_close(
        out["ppo T=0.7"][1], (value, pull(_cotangent(value))), rtol=TOL, atol=TOL
    )


@pytest.mark.slow
def test_token_objective_masked_nan_rows_vmap_and_bf16(rng):
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    tokens[0, 2] = 0
    advantage = rng.standard_normal((B, T)).astype(np.float32)
    f = lambda x, t, w, a: jxent.token_objective(
        x, t, lambda s, a: -a * s.log_prob - 0.1 * s.entropy, shift=True, args=(a[..., 1:],),
        where=w,
    )
    fused = lambda h, t, w, a, c=CHUNK: f(LinearLogits(h, kernel, bias, chunk_size=c), t, w, a)
    shifted = where.copy()
    shifted[:, 1] = False  # hidden row 0 scores token 1: not counted
    # shift=True: hidden row i scores token i + 1; the last row scores nothing.
    unused = np.ones((B, T), bool)
    unused[:, :-1] = ~shifted[:, 1:]
    nan = np.where(unused[..., None], np.nan, hidden).astype(np.float32)
    value, grad = jax.jit(jax.value_and_grad(fused))(nan, tokens, shifted, advantage)
    clean = np.where(np.isnan(nan), 0, nan)
    dense_f = lambda h: f(dense(h, kernel, bias), tokens, shifted, advantage)
    want = jax.jit(jax.value_and_grad(dense_f))(clean)
    chex.assert_trees_all_close((value, grad), want, rtol=TOL, atol=TOL)
    assert not np.any(np.asarray(grad)[np.isnan(nan)])
    none = jax.jit(jax.value_and_grad(fused))(hidden, tokens, np.zeros_like(where), advantage)
    assert float(none[0]) == 0.0 and not np.any(np.asarray(none[1]))
    mapped = jax.jit(jax.vmap(jax.value_and_grad(fused)))(hidden, tokens, where, advantage)
    each = [
        jax.jit(jax.value_and_grad(fused))(hidden[i], tokens[i], where[i], advantage[i])
        for i in range(B)
    ]
    chex.assert_trees_all_close(
        mapped, jax.tree.map(lambda *x: jnp.stack(x), *each), rtol=TOL, atol=TOL
    )
    g = lambda x: f(x, tokens, where, advantage)
    h16, k16, b16 = (x.astype(jnp.bfloat16) for x in (hidden, kernel, bias))
    assert_fused_equals_dense(fused_and_dense({"bf16": g}, h16, k16, b16), tol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distillation_loss(rng, reduction):
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    rng2 = np.random.default_rng(1)
    t_hidden = rng2.standard_normal((B, T, D + 3)).astype(np.float32)
    t_kernel = rng2.standard_normal((D + 3, V)).astype(np.float32) / 2
    teacher_fused = LinearLogits(t_hidden, t_kernel, chunk_size=CHUNK)
    teacher_dense = dense(t_hidden, t_kernel, np.zeros(V, np.float32))
    cases = {
        "kl": {"divergence": "kl"},
        "reverse_kl/T=2": {"divergence": "reverse_kl", "temperature": 2.0},
        "jsd/0.1": {"divergence": "jsd", "beta": 0.1},
        "jsd/0.9/T=0.5": {"divergence": "jsd", "beta": 0.9, "temperature": 0.5},
        "kl+hard": {"targets": tokens, "hard_weight": 0.3},
        "jsd+hard/T=2": {"divergence": "jsd", "targets": tokens, "hard_weight": 0.5,
                         "temperature": 2.0},
    }
    calls = {}
    for name, o in cases.items():
        for teacher_kind, teacher in (("fused teacher", teacher_fused), ("dense", teacher_dense)):
            def call(x, o=o, teacher=teacher):
                # the materialised side gets the materialised teacher
                t = teacher if isinstance(x, LinearLogits) else teacher_dense
                return jxent.distillation_loss(
                    x, t, shift=False, where=where, reduction=reduction, **o,
                )

            calls[f"{name}/{teacher_kind}"] = call
    assert_fused_equals_dense(fused_and_dense(calls, hidden, kernel, bias))


def test_distillation_teacher_gets_no_gradient(rng):
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    f = lambda th, tk: jxent.distillation_loss(
        LinearLogits(hidden, kernel, bias, chunk_size=CHUNK),
        LinearLogits(th, tk, chunk_size=CHUNK), shift=False, divergence="jsd",
    )
    grads = jax.jit(jax.grad(f, (0, 1)))(hidden, kernel)
    for g in grads:
        assert not np.any(np.asarray(g))
    with pytest.raises(ValueError, match="pass the student as LinearLogits too"):
        jxent.distillation_loss(
            dense(hidden, kernel, bias), LinearLogits(hidden, kernel), shift=False,
        )


@pytest.mark.slow
def test_traced_coefficients_pass_through_the_fused_path(rng):
    """label_smoothing and z_loss as traced scalars (schedules) give the static results."""
    hidden, kernel, bias, tokens, where, _ = draw(rng)

    @jax.jit
    def traced(h, eps, z):
        f = lambda h: jxent.sequence_nll(
            LinearLogits(h, kernel, bias, chunk_size=CHUNK), tokens, shift=True,
            label_smoothing=eps, z_loss=z,
        )
        return jax.value_and_grad(f)(h)

    for eps, z in [(0.0, 0.0), (0.2, 1e-2)]:
        f = lambda h, eps=eps, z=z: jxent.sequence_nll(
            dense(h, kernel, bias), tokens, shift=True, label_smoothing=eps, z_loss=z
        )
        chex.assert_trees_all_close(
            traced(hidden, eps, z), jax.jit(jax.value_and_grad(f))(hidden), rtol=TOL, atol=TOL
        )


def test_all_masked_and_nan_in_masked_rows(rng):
    """Masked rows of ``hidden`` may hold NaN: zero value contribution, zero gradient."""
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    hidden[~where] = np.nan
    none = np.zeros_like(where)

    @jax.jit
    def run(h, k, b):
        out = {}
        for name, mask in (("some", where), ("none", none)):
            f = lambda h, k, b, mask=mask: jxent.sequence_nll(
                LinearLogits(h, k, b, chunk_size=CHUNK), tokens, shift=False, where=mask,
                label_smoothing=0.1,
            )
            out[name] = jax.value_and_grad(f, (0, 1, 2))(h, k, b)
        return out

    out = run(hidden, kernel, bias)
    for value, grads in out.values():
        assert np.isfinite(value)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g)))
    assert float(out["none"][0]) == 0.0
    assert not np.any(np.asarray(out["none"][1][1]))
    assert not np.any(np.asarray(out["some"][1][0])[~where])


@pytest.mark.slow
def test_tied_embedding_bf16_and_chunk_sizes(rng):
    """``emb.T`` as the kernel; bf16 inputs; chunk sizes that do and don't divide N."""
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    emb = np.ascontiguousarray(kernel.T)
    f = lambda x: jxent.sequence_nll(x, tokens, shift=True, where=where)
    for chunk in (1, 3, 13, 64):
        fused = jax.jit(
            jax.value_and_grad(
                lambda e, c=chunk: f(LinearLogits(hidden, e.T, bias, chunk_size=c))
            )
        )(emb)
        materialised = jax.jit(jax.value_and_grad(lambda e: f(dense(hidden, e.T, bias))))(emb)
        chex.assert_trees_all_close(fused, materialised, rtol=TOL, atol=TOL)
    h16, k16, b16 = (x.astype(jnp.bfloat16) for x in (hidden, kernel, bias))
    got = fused_and_dense({"bf16": f}, h16, k16, b16)
    assert_fused_equals_dense(got, tol=2e-2)
    assert got["bf16"][0][1][0].dtype == jnp.bfloat16  # gradients in the inputs' dtype


@pytest.mark.slow
def test_vmap_equals_batching(rng):
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    f = lambda h, t, w: jxent.sequence_nll(
        LinearLogits(h, kernel, bias, chunk_size=CHUNK), t, shift=True, where=w, normalize="sum"
    )
    mapped = jax.jit(jax.vmap(jax.value_and_grad(f)))(hidden, tokens, where)
    each = [jax.jit(jax.value_and_grad(f))(hidden[i], tokens[i], where[i]) for i in range(B)]
    chex.assert_trees_all_close(
        mapped, jax.tree.map(lambda *x: jnp.stack(x), *each), rtol=TOL, atol=TOL
    )


def test_not_differentiated_call_does_one_product_per_chunk(rng):
    """Forward only: the compiled program holds one dot per LinearLogits (in the loop)."""
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    f = lambda h, k: jxent.sequence_nll(
        LinearLogits(h, k, bias, chunk_size=CHUNK), tokens, shift=True
    )
    hlo = jax.jit(f).lower(hidden, kernel).as_text()
    assert len(re.findall(r"stablehlo.dot_general", hlo)) == 1
    # Differentiated: h @ K, then g @ Kᵀ and hᵀ @ g (in blocks of classes) in the
    # same forward loop; no product has the [N, V] logits' shape.
    hlo_grad = jax.jit(jax.grad(f, (0, 1))).lower(hidden, kernel).as_text()
    dots = re.findall(r"stablehlo.dot_general.*-> tensor<([0-9x]+)xf32>", hlo_grad)
    assert {"4x11", "4x6"} <= set(dots) and len(dots) >= 3, dots
    assert f"{B * (T - 1)}x{V}" not in dots and f"{B}x{T - 1}x{V}" not in dots


def test_linear_logits_errors():
    hidden = np.zeros((2, 5, 8), np.float32)
    kernel = np.zeros((8, 11), np.float32)
    tokens = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match=re.escape("axis must be -1, got axis=1")):
        jxent.softmax_cross_entropy(LinearLogits(hidden, kernel), tokens, axis=1)
    with pytest.raises(TypeError, match="probability targets would be the"):
        jxent.softmax_cross_entropy(LinearLogits(hidden, kernel), np.zeros((2, 5, 11), np.float32))
    with pytest.raises(TypeError, match="chunk_size must be an int or None, got 2.5"):
        LinearLogits(hidden, kernel, chunk_size=2.5)
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int, got 0"):
        LinearLogits(hidden, kernel, chunk_size=0)
    # NumPy integers are Python ints.
    assert LinearLogits(hidden, kernel, chunk_size=np.int64(4)).chunk_size == 4
    with pytest.raises(ValueError, match=re.escape("kernel has shape (7, 11)")):
        LinearLogits(hidden, np.zeros((7, 11), np.float32))


def test_out_of_range_targets_under_jit_have_a_nan_gradient(rng):
    hidden, kernel, bias, tokens, where, _ = draw(rng)
    tokens[1, 4] = V + 3
    grads = jax.jit(
        jax.grad(
            lambda h: jxent.linear_cross_entropy(h, kernel, tokens, bias=bias, chunk_size=CHUNK,
                                                 reduction="sum")
        )
    )(hidden)
    bad = np.isnan(np.asarray(grads)).all(-1)
    want = np.zeros((B, T), bool)
    want[1, 4] = True
    np.testing.assert_array_equal(bad, want)
