"""``jax.vmap`` over fused calls computes as the batched call (issue 25.1).

Mapped over examples with one shared kernel, every function that takes
``LinearLogits`` runs one chunk loop over all the positions (trip count
``B·T / chunk``) and never forms a per-example kernel gradient ``[B, D, V]``;
values and gradients equal the materialised computation, mapped the same way.
A kernel mapped per example (one head each) and ``vmap`` of ``grad``
(per-example gradients) stay correct at per-example cost. On an 8-device mesh
with the batch sharded (Auto and Explicit axes) the same holds per device.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent._testing import assert_close

B, T, D, V, CHUNK = 4, 8, 16, 32, 8


def _data(batch=B):
    k = jax.random.split(jax.random.key(3), 6)
    return {
        "h": jax.random.normal(k[0], (batch, T, D)),
        "ht": jax.random.normal(k[1], (batch, T, D)),
        "K": jax.random.normal(k[2], (D, V)) / 4,
        "b": jax.random.normal(k[3], (V,)) / 4,
        "t": jax.random.randint(k[4], (batch, T), 0, V).at[0, 3].set(-100),
        "c": jax.random.normal(k[5], (batch, T)),
    }


def _example_losses():
    """name -> loss(logits_of, x) of one example: ``logits_of(h)`` its logits, ``x`` its arrays."""

    def stats(lg, x):
        s = jxent.token_stats(lg(x["h"]), x["t"], shift=True)
        return jnp.sum(x["c"][:-1] * s.log_prob + 0.5 * s.entropy)

    return {
        "softmax_cross_entropy": lambda lg, x: jxent.softmax_cross_entropy(
            lg(x["h"]), x["t"], label_smoothing=0.1),
        "sequence_nll": lambda lg, x: jxent.sequence_nll(lg(x["h"]), x["t"], shift=True),
        "sequence_nll none": lambda lg, x: jnp.sum(x["c"][:-1] * jxent.sequence_nll(
            lg(x["h"]), x["t"], shift=True, normalize="none")),
        "nll_stats": lambda lg, x: jxent.nll_stats(lg(x["h"]), x["t"], shift=True).total,
        "token_stats": stats,
        "token_objective": lambda lg, x: jxent.token_objective(
            lg(x["h"]), x["t"], lambda s: s.log_prob - 0.1 * s.entropy, shift=True),
        "distillation_loss, fused teacher": lambda lg, x: jxent.distillation_loss(
            lg(x["h"]), lg(x["ht"]), shift=True, divergence="jsd"),
    }


NAMES = list(_example_losses())


def _mapped_loss(name, fused):
    """``f(h, K, b)``: Σ over examples of the example loss, ``vmap``ped; kernel and bias shared."""
    loss = _example_losses()[name]

    def f(h, kernel, bias, x):
        def example(h, ht, t, c):
            def logits_of(hidden):
                hidden = h if hidden is ex["h"] else hidden
                if fused:
                    return jxent.LinearLogits(hidden, kernel, bias, chunk_size=CHUNK)
                return hidden @ kernel + bias[None]

            ex = {"h": h, "ht": ht, "t": t, "c": c}
            return loss(logits_of, ex)

        return jnp.sum(jax.vmap(example)(h, x["ht"], x["t"], x["c"]))

    return f


def _trip_counts(hlo: str) -> list[int]:
    return [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)]


@pytest.mark.parametrize("name", [
    n if n in ("sequence_nll", "token_objective") else pytest.param(n, marks=pytest.mark.slow)
    for n in NAMES
])
def test_vmap_is_one_loop_over_all_positions(name):
    x = _data()
    args = (x["h"], x["K"], x["b"])
    grad = jax.jit(jax.value_and_grad(_mapped_loss(name, True), argnums=(0, 1, 2)))
    got = grad(*args, x)
    want = jax.value_and_grad(_mapped_loss(name, False), argnums=(0, 1, 2))(*args, x)
    assert_close(got, want, rtol=2e-5, label=name)
    hlo = grad.lower(*args, x).compile().as_text()
    assert f"f32[{B},{D},{V}]" not in hlo, f"{name}: a per-example kernel gradient"
    assert B * T // CHUNK in _trip_counts(hlo), f"{name}: loops {_trip_counts(hlo)}"


@pytest.mark.slow
def test_nested_vmaps_over_two_axes():
    x = _data()
    h2 = x["h"].reshape(2, B // 2, T, D)
    t2 = x["t"].reshape(2, B // 2, T)

    def f(h, kernel, fused):
        def one(h, t):
            lg = jxent.LinearLogits(h, kernel, chunk_size=CHUNK) if fused else h @ kernel
            return jxent.sequence_nll(lg, t, shift=True)

        return jnp.sum(jax.vmap(jax.vmap(one))(h, t2) ** 2)

    grad = jax.jit(jax.value_and_grad(partial(f, fused=True), argnums=(0, 1)))
    assert_close(grad(h2, x["K"]), jax.value_and_grad(partial(f, fused=False), argnums=(0, 1))(
        h2, x["K"]), rtol=2e-5)
    assert B * T // CHUNK in _trip_counts(grad.lower(h2, x["K"]).compile().as_text())


def test_forward_alone_and_per_position_outputs():
    x = _data()

    def stats(h, t, kernel, fused):
        lg = jxent.LinearLogits(h, kernel, chunk_size=CHUNK) if fused else h @ kernel
        return jxent.token_stats(lg, t, shift=True)

    got = jax.jit(jax.vmap(partial(stats, fused=True), (0, 0, None)))(x["h"], x["t"], x["K"])
    want = jax.vmap(partial(stats, fused=False), (0, 0, None))(x["h"], x["t"], x["K"])
    assert_close(got[:3], want[:3], rtol=2e-5)
    np.testing.assert_array_equal(got.argmax, want.argmax)


@pytest.mark.slow
def test_a_kernel_per_example_and_per_example_gradients_stay_correct():
    x = _data()
    kernels = x["K"][None] * (1 + jnp.arange(B))[:, None, None]

    def loss(h, t, kernel, fused):
        lg = jxent.LinearLogits(h, kernel, chunk_size=CHUNK) if fused else h @ kernel
        return jxent.sequence_nll(lg, t, shift=True)

    heads = lambda fused: jax.grad(lambda h, k: jnp.sum(jax.vmap(partial(loss, fused=fused))(
        h, x["t"], k)), argnums=(0, 1))(x["h"], kernels)
    assert_close(jax.jit(lambda: heads(True))(), heads(False), rtol=2e-5, label="a head each")
    per_example = lambda fused: jax.vmap(jax.grad(partial(loss, fused=fused), argnums=(0, 2)),
                                         (0, 0, None))(x["h"], x["t"], x["K"])
    assert_close(per_example(True), per_example(False), rtol=2e-5, label="vmap of grad")


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_vmap_on_a_mesh_with_the_batch_sharded(axis_type):
    batch = 16  # 2 examples per device
    x = _data(batch)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    place = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
    h, t, kernel = place(x["h"], "data"), place(x["t"], "data"), place(x["K"])

    def f(h, kernel, t, fused):
        def one(h, t):
            lg = jxent.LinearLogits(h, kernel, chunk_size=CHUNK) if fused else h @ kernel
            return jxent.sequence_nll(lg, t, shift=True)

        return jnp.sum(jax.vmap(one)(h, t))

    with jax.set_mesh(mesh):
        grad = jax.jit(jax.value_and_grad(partial(f, fused=True), argnums=(0, 1)))
        got = grad(h, kernel, t)
        hlo = grad.lower(h, kernel, t).compile().as_text()
    want = jax.value_and_grad(partial(f, fused=False), argnums=(0, 1))(x["h"], x["K"], x["t"])
    assert_close(got, want, rtol=2e-5, label=str(axis_type))
    assert got[1][0].sharding.spec[0] == "data", got[1][0].sharding
    per_device = batch // 8
    assert f"f32[{per_device},{D},{V}]" not in hlo, "a per-example kernel gradient"
    assert per_device * T // CHUNK in _trip_counts(hlo), _trip_counts(hlo)
