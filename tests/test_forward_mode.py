"""Forward mode through ``LinearLogits``: exact where it runs, refused with a clear error where not.

The fused functions are a ``jax.custom_vjp``: a first-order forward
derivative (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) is refused with a
``TypeError`` that names the limitation and the alternatives. Reverse mode
and every derivative of it (``jax.jvp(jax.grad(f))``, ``jax.hessian``) equal
the materialised computation, in float64, for every token-level function;
self-distillation with one kernel shared by student and teacher included
(the teacher's stop-gradient holds at second order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent

B, T, D, V = 2, 5, 4, 7


def _data():
    k = jax.random.split(jax.random.key(7), 8)
    f64 = jnp.float64
    return {
        "h": jax.random.normal(k[0], (B, T, D), f64),
        "K": jax.random.normal(k[1], (D, V), f64),
        "b": 0.1 * jax.random.normal(k[2], (V,), f64),
        "ht": jax.random.normal(k[3], (B, T, D), f64),
        "tokens": jax.random.randint(k[4], (B, T), 0, V).at[0, 2].set(-100),
        "c": jax.random.normal(k[5], (B, T), f64),
        "ids": jax.random.randint(k[6], (B, T, 3), 0, V),
        "dirs": [jax.random.normal(kk, s, f64) for kk, s in
                 zip(jax.random.split(k[7], 3), ((B, T, D), (D, V), (V,)), strict=True)],
    }


def _objectives(x):
    """name -> f(logits_of), ``logits_of(h)`` the logits of hidden states ``h`` (one head)."""
    tokens, c = x["tokens"], x["c"]

    def token_stats(lg):
        s = jxent.token_stats(lg(x["h"]), tokens, shift=True)
        return jnp.sum(c[:, :-1] * s.log_prob + 0.3 * s.entropy + 0.1 * s.logsumexp)

    def topk_teacher():
        logp = jax.nn.log_softmax(x["ht"] @ x["K"])
        return jxent.TopK(x["ids"][..., :1], jnp.take_along_axis(logp, x["ids"][..., :1], -1))

    return {
        "softmax_cross_entropy": lambda lg: jxent.softmax_cross_entropy(
            lg(x["h"]), tokens, label_smoothing=0.1, z_loss=1e-2),
        "softmax_cross_entropy none": lambda lg: jnp.sum(c * jxent.softmax_cross_entropy(
            lg(x["h"]), tokens, reduction="none")),
        "sequence_nll": lambda lg: jxent.sequence_nll(lg(x["h"]), tokens, shift=True),
        "sequence_nll none": lambda lg: jnp.sum(c[:, :-1] * jxent.sequence_nll(
            lg(x["h"]), tokens, shift=True, normalize="none")),
        "nll_stats": lambda lg: jxent.nll_stats(lg(x["h"]), tokens, shift=True).total,
        "token_stats": token_stats,
        "token_objective": lambda lg: jxent.token_objective(
            lg(x["h"]), tokens, lambda s, a: a * s.log_prob + s.entropy, shift=True,
            args=(c[:, :-1],)),
        "class_log_probs": lambda lg: jnp.sum(
            c[..., None] * jxent.class_log_probs(lg(x["h"]), x["ids"])),
        "distillation kl, shared kernel": lambda lg: jxent.distillation_loss(
            lg(x["h"]), lg(x["ht"]), shift=False),
        "distillation jsd + hard, shared kernel": lambda lg: jxent.distillation_loss(
            lg(x["h"]), lg(x["ht"]), shift=True, divergence="jsd", temperature=2.0,
            targets=tokens, hard_weight=0.5),
        "distillation reverse_kl none, shared kernel": lambda lg: jnp.sum(
            c * jxent.distillation_loss(lg(x["h"]), lg(x["ht"]), shift=False,
                                        divergence="reverse_kl", reduction="none")),
        "distillation from TopK": lambda lg: jxent.distillation_loss(
            lg(x["h"]), topk_teacher(), shift=False),
    }


X: dict = {}
NAMES = list(_objectives(dict.fromkeys(("tokens", "c"))))


def _loss(name, fused):
    """``f(h, K, b)``: the objective on ``LinearLogits`` or on the materialised logits."""

    def f(h, kernel, bias):
        def logits_of(hidden):
            hidden = h if hidden is X["h"] else hidden
            if fused:
                return jxent.LinearLogits(hidden, kernel, bias, chunk_size=4)
            return hidden @ kernel + bias.reshape(1, 1, -1)

        return _objectives(X)[name](logits_of)

    return f


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        X.update(_data())
        yield


QUICK = "sequence_nll"  # the case the quick tier runs


@pytest.mark.parametrize(
    "name", [n if n == QUICK else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]
)
def test_second_order_equals_the_materialised(name):
    primals = (X["h"], X["K"], X["b"])
    tangents = tuple(X["dirs"])
    want = jax.jvp(jax.grad(_loss(name, False), argnums=(0, 1, 2)), primals, tangents)
    got = jax.jvp(jax.grad(_loss(name, True), argnums=(0, 1, 2)), primals, tangents)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sequence_nll", "distillation kl, shared kernel"])
def test_hessian_equals_the_materialised(name):
    args = (X["h"], X["K"], X["b"])
    want = jax.hessian(_loss(name, False), argnums=1)(*args)
    got = jax.jit(jax.hessian(_loss(name, True), argnums=1))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("name", "how"), [
    pytest.param(name, how, id=f"{how}-{name}",
                 marks=() if (name, how) == ("token_stats", "jvp") else pytest.mark.slow)
    for name in ("sequence_nll", "token_stats", "distillation kl, shared kernel")
    for how in ("jvp", "jacfwd")
])
def test_first_order_forward_mode_is_refused_by_name(name, how):
    f = _loss(name, True)
    args = (X["h"], X["K"], X["b"])
    call = {
        "jvp": lambda: jax.jvp(f, args, tuple(X["dirs"])),
        "jacfwd": lambda: jax.jacfwd(f, argnums=1)(*args),
    }[how]
    with pytest.raises(TypeError, match=r"no forward-mode derivative .*jax\.grad.*hidden @ kernel"):
        call()


def test_linearize_is_refused_when_its_function_is_called():
    # jax.linearize traces the reverse pass; the error comes from JAX, when the
    # linear function is evaluated (outside any jxent frame).
    y, f_jvp = jax.linearize(_loss("sequence_nll", True), X["h"], X["K"], X["b"])
    np.testing.assert_allclose(y, _loss("sequence_nll", False)(X["h"], X["K"], X["b"]), rtol=1e-12)
    with pytest.raises(TypeError, match="forward-mode"):
        f_jvp(*X["dirs"])
