"""Every function under plain ``jit`` on arrays placed with ``NamedSharding``.

The user writes single-device code and only places the arrays: ``hidden [B, T,
D]`` and the tokens over a ``data`` axis, ``kernel [D, V]`` (and ``bias``,
class weights) over a ``model`` axis, or both, on meshes with Auto and with
Explicit axes, of 8 devices (2 × 4, and a 1-D data mesh) and 4 (2 × 2). For
each layout every function -- fused (``LinearLogits``) and dense
(``h @ k + b``) -- gives the value and gradients of one device to 1e-5, its
gradients come back with the inputs' shardings, and the compiled program
(read with :func:`jxent._testing.collectives`) holds no all-gather and no
all-to-all: each device computes its own positions and classes, with
per-token all-reduces, the ``[N, D]`` hidden-state gradient summed over the
vocabulary devices, and one all-reduce of the kernel's (and bias's) gradient
over the data devices, outside every loop.

One program per (mesh, layout, fused or dense) is compiled once per session
and shared by its items: one item per function for values and shardings, one
per program for the collectives. The 8 simulated devices come from
``tests/conftest.py``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent import LinearLogits
from jxent._testing import collectives, dense_logits

TOL = 1e-5
B, T, D, V, CHUNK = 8, 6, 8, 32, 8


def inputs():
    rng = np.random.default_rng(17)
    x = {
        "hidden": rng.standard_normal((B, T, D)).astype(np.float32),
        "kernel": (rng.standard_normal((D, V)) * 0.4).astype(np.float32),
        "bias": rng.standard_normal(V).astype(np.float32),
        "teacher_kernel": (rng.standard_normal((D, V)) * 0.4).astype(np.float32),
        "class_weights": rng.uniform(0.5, 2.0, V).astype(np.float32),
        "tokens": rng.integers(0, V, (B, T)).astype(np.int32),
        "where": rng.random((B, T)) > 0.2,
        "advantage": rng.standard_normal((B, T - 1)).astype(np.float32),
        "ct": rng.standard_normal((B, T)).astype(np.float32),
    }
    x["tokens"][1, 3] = -100  # ignored
    x["hidden"][2, 4] = np.nan  # a row no target counts: never reaches a value or gradient
    x["where"][2, 3] = False  # (position 4 predicts token 5 with shift=True; 4 scores 4 without)
    x["where"][2, 5] = False
    x["tokens"][2, 4] = -100
    return x


def _ppo(stats, advantage):
    ratio = jnp.exp(stats.log_prob + 2.0)
    return -jnp.minimum(ratio * advantage, jnp.clip(ratio, 0.8, 1.2) * advantage)


def calls(fused: bool):
    """``name -> f(logits_of, x)``; ``logits_of(kernel)`` gives the (student or teacher) logits."""
    opts = dict(class_weights=None, label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0)

    def ce(reduction):
        def f(logits_of, x):
            o = dict(opts, class_weights=x["class_weights"])
            return jxent.softmax_cross_entropy(
                logits_of(x["kernel"]), x["tokens"], where=x["where"], reduction=reduction, **o
            )
        return f

    def seq(normalize):
        return lambda logits_of, x: jxent.sequence_nll(
            logits_of(x["kernel"]), x["tokens"], shift=True, where=x["where"],
            normalize=normalize, label_smoothing=0.1,
        )

    out = {f"softmax_cross_entropy {r}": ce(r) for r in ("mean", "sum", "none")}
    out |= {f"sequence_nll {n}": seq(n) for n in ("tokens", "sequences", "none")}
    out["nll_stats"] = lambda logits_of, x: tuple(jxent.nll_stats(
        logits_of(x["kernel"]), x["tokens"], shift=True, where=x["where"], z_loss=1e-3,
    ))
    out["token_stats T=0.7"] = lambda logits_of, x: tuple(jxent.token_stats(
        logits_of(x["kernel"]), x["tokens"], shift=True, where=x["where"], temperature=0.7,
    ))[:3]
    out["token_objective"] = lambda logits_of, x: jxent.token_objective(
        logits_of(x["kernel"]), x["tokens"], _ppo, shift=True, args=(x["advantage"],),
        where=x["where"],
    )
    for reduction in ("mean", "none"):
        out[f"distillation_loss jsd {reduction}"] = (
            lambda logits_of, x, reduction=reduction: jxent.distillation_loss(
                logits_of(x["kernel"]), logits_of(x["teacher_kernel"]), shift=True,
                divergence="jsd", beta=0.3, temperature=2.0, targets=x["tokens"],
                hard_weight=0.3, where=x["where"], reduction=reduction,
            )
        )
    if fused:
        out["linear_cross_entropy mean"] = lambda logits_of, x: jxent.linear_cross_entropy(
            x["hidden"], x["kernel"], x["tokens"], bias=x["bias"], where=x["where"],
            chunk_size=CHUNK, **dict(opts, class_weights=x["class_weights"]),
        )
    return out


def program(fused: bool):
    """One jitted function: every call's value, and its gradient for hidden, kernel and bias."""
    fns = calls(fused)

    def scalar(out, ct):
        # A value per call; per-position outputs weighted by a fixed cotangent.
        leaves = jax.tree.leaves(out)
        total = 0.0
        for leaf in leaves:
            if leaf.ndim == 0:
                total = total + leaf
            else:
                total = total + jnp.sum(jnp.where(jnp.isfinite(leaf), leaf, 0)
                                        * ct[..., : leaf.shape[-1]])
        return total

    def run(x):
        def logits_of(h, b):
            if fused:
                return lambda k: LinearLogits(h, k, b, chunk_size=CHUNK)
            return lambda k: dense_logits(h, k, b)

        out = {}
        for name, f in fns.items():
            def value(h, k, b, f=f):
                y = dict(x, hidden=h, kernel=k, bias=b)
                return scalar(f(logits_of(h, b), y), x["ct"])
            out[name] = jax.value_and_grad(value, argnums=(0, 1, 2))(
                x["hidden"], x["kernel"], x["bias"]
            )
        return out

    return jax.jit(run)


SPECS = {
    "data": {"hidden": P("data"), "tokens": P("data"), "where": P("data"),
             "advantage": P("data"), "ct": P("data")},
    "vocab": {"kernel": P(None, "model"), "teacher_kernel": P(None, "model"),
              "bias": P("model"), "class_weights": P("model")},
}
SPECS["data+vocab"] = SPECS["data"] | SPECS["vocab"]


def place(x, mesh, layout):
    specs = SPECS[layout]
    return {k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P()))) for k, v in x.items()}


def padded(spec, ndim):
    spec = tuple(spec)
    return spec + (None,) * (ndim - len(spec))


# Meshes: (axis type, shape); the 2 × 2 meshes check the fused functions only.
MESHES = [(kind, shape) for kind in ("Auto", "Explicit") for shape in ("2x4", "8", "2x2")]
def _id(program) -> str:
    kind, shape, layout, fused = program
    return f"{kind}-{shape}-{layout}-{'fused' if fused else 'dense'}"


# One program per (mesh, layout, fused or dense); this file runs on one xdist
# worker (--dist loadfile), which compiles each program once.
PROGRAMS = [
    pytest.param(program, id=_id(program))
    for program in (
        (kind, shape, layout, fused)
        for kind, shape in MESHES
        for fused in ((True,) if shape == "2x2" else (True, False))
        for layout in (("data",) if shape == "8" else ("data", "vocab", "data+vocab"))
    )
]


def make_mesh(kind: str, shape: str) -> jax.sharding.Mesh:
    dims = tuple(int(s) for s in shape.split("x"))
    axes = ("data", "model") if len(dims) == 2 else ("data",)
    devices = np.asarray(jax.devices()[: int(np.prod(dims))]).reshape(dims)
    return jax.sharding.Mesh(devices, axes, axis_types=(getattr(AxisType, kind),) * len(dims))


@functools.cache
def reference(fused: bool):
    return program(fused)(jax.device_put(inputs(), jax.devices()[0]))


@functools.cache
def compiled(kind: str, shape: str, layout: str, fused: bool):
    """``(mesh, placed inputs, outputs, compiled HLO text)`` of one program, once a session."""
    mesh = make_mesh(kind, shape)
    placed = place(inputs(), mesh, layout)
    with jax.set_mesh(mesh):
        f = program(fused)
        return mesh, placed, f(placed), f.lower(placed).compile().as_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(calls(True)))
@pytest.mark.parametrize("prog", PROGRAMS)
def test_equals_one_device_with_the_inputs_shardings(prog, name):
    if name not in calls(prog[3]):
        pytest.skip("linear_cross_entropy is fused only")
    _, placed, got, _ = compiled(*prog)
    chex.assert_trees_all_close(got[name], reference(prog[3])[name], rtol=TOL, atol=TOL)
    for g, key in zip(got[name][1], ("hidden", "kernel", "bias"), strict=True):
        assert padded(g.sharding.spec, g.ndim) == padded(placed[key].sharding.spec, g.ndim), (
            key, g.sharding.spec, placed[key].sharding.spec)


@pytest.mark.slow
@pytest.mark.parametrize("prog", PROGRAMS)
def test_no_all_gather_and_one_kernel_gradient_reduction(prog):
    kind, shape, layout, fused = prog
    mesh, _, _, hlo = compiled(*prog)
    found = collectives(hlo)
    assert found
    bad = [c for c in found if c.op != "all-reduce"]
    assert not bad, bad
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    data = sizes.get("data", 1) if "data" in layout else 1
    n_local, v_local = B * T // data, V // (sizes.get("model", 1) if "vocab" in layout else 1)
    # Beyond per-token vectors: the kernel's and bias's gradients (over the data
    # devices) and the hidden states' gradient (over the vocabulary devices).
    allowed = {(D, v_local), (v_local, D), (v_local,), (n_local, D), (B // data, T, D)}
    for c in found:
        for s in c.shapes:
            assert int(np.prod(s)) <= n_local or s in allowed, (c.op, s)
            # The kernel's gradient is summed once, after the loop over chunks.
            if fused and s == (D, v_local):
                assert not c.in_loop, (c.op, s, "inside a loop")


def test_quick_fused_loss_on_a_data_by_vocab_mesh():
    """The quick tier's case: fused ``sequence_nll`` on an Auto 2 × 4 mesh equals one device,
    its gradients keep the inputs' shardings, and nothing is all-gathered."""
    x = inputs()
    f = jax.jit(jax.value_and_grad(
        lambda h, k, t, w: jxent.sequence_nll(LinearLogits(h, k, chunk_size=CHUNK), t,
                                              shift=True, where=w),
        argnums=(0, 1)))
    args = (x["hidden"], x["kernel"], x["tokens"], x["where"])
    want = f(*args)
    mesh = make_mesh("Auto", "2x4")
    specs = (P("data"), P(None, "model"), P("data"), P("data"))
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]
    with jax.set_mesh(mesh):
        got = f(*placed)
        hlo = f.lower(*placed).compile().as_text()
    chex.assert_trees_all_close(got, want, rtol=TOL, atol=TOL)
    for g, s in zip(got[1], specs[:2], strict=True):
        assert padded(g.sharding.spec, g.ndim) == padded(s, g.ndim), (g.sharding.spec, s)
    assert {c.op for c in collectives(hlo)} == {"all-reduce"}, collectives(hlo)


def test_the_collectives_reader_sees_an_all_gather():
    """The check above can fail: a program that gathers the kernel shows an all-gather."""
    mesh = make_mesh("Auto", "2x4")
    kernel = jax.device_put(jnp.ones((D, V)), NamedSharding(mesh, P(None, "model")))
    hlo = jax.jit(lambda k: k * 2.0, out_shardings=NamedSharding(mesh, P())).lower(
        kernel).compile().as_text()
    found = collectives(hlo)
    assert [c.op for c in found] == ["all-gather"] and found[0].shapes == ((D, V),), found


@functools.cache
def _transform_reference():
    x = inputs()
    f = lambda h, k, t, w: jxent.sequence_nll(
        LinearLogits(h, k, chunk_size=CHUNK), t, shift=True, where=w, normalize="sum"
    )
    grad = jax.value_and_grad(f, argnums=(0, 1))
    args = (x["hidden"], x["kernel"], x["tokens"], x["where"])
    stack = lambda a: np.stack([a, a])
    want = jax.jit(grad)(*args)
    want_vmap = jax.jit(jax.vmap(grad, in_axes=(0, None, 0, 0)))(
        stack(args[0]), args[1], stack(args[2]), stack(args[3]))
    return grad, args, want, want_vmap


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Auto", "Explicit"])
@pytest.mark.parametrize("transform", ["eager", "vmap"])
def test_eager_and_vmap_on_placed_arrays(kind, transform):
    """Eager calls, and ``jit(vmap)`` over a replicated leading axis, of a head without bias."""
    grad, args, want, want_vmap = _transform_reference()
    mesh = make_mesh(kind, "2x4")
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
    stack = lambda a: np.stack([a, a])
    with jax.set_mesh(mesh):
        if transform == "eager":
            placed = (put(args[0], "data"), put(args[1], None, "model"), put(args[2], "data"),
                      put(args[3], "data"))
            chex.assert_trees_all_close(grad(*placed), want, rtol=TOL, atol=TOL)
        else:
            batched = (put(stack(args[0]), None, "data"), put(args[1], None, "model"),
                       put(stack(args[2]), None, "data"), put(stack(args[3]), None, "data"))
            got = jax.jit(jax.vmap(grad, in_axes=(0, None, 0, 0)))(*batched)
            chex.assert_trees_all_close(got, want_vmap, rtol=TOL, atol=TOL)
