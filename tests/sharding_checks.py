"""Every function under plain ``jit`` on arrays placed with ``NamedSharding``, run as a script.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py [GROUP ...]

``tests/test_sharding.py`` runs each group in a subprocess. The user writes
single-device code and only places the arrays: ``hidden [B, T, D]`` and the
tokens over a ``data`` axis, ``kernel [D, V]`` (and ``bias``, class weights)
over a ``model`` axis, or both, on meshes with Auto and with Explicit axes,
of 8 devices (2 × 4, and a 1-D data mesh) and 4 (2 × 2). For each layout
every function -- fused (``LinearLogits``) and dense (``h @ k + b``) --
gives the value and gradients of one device to 1e-5, its gradients come back
with the inputs' shardings, and the compiled program (read from
``compile().as_text()``) holds no all-gather and no all-to-all: each device
computes its own positions and classes, with per-token all-reduces, the
``[N, D]`` hidden-state gradient summed over the vocabulary devices, and one
all-reduce of the kernel's (and bias's) gradient over the data devices,
outside every loop.

Groups: ``auto``, ``explicit`` (the 8-device meshes), ``four`` (2 × 2, both
axis types, fused functions only), ``transforms`` (eager calls and ``vmap``
on sharded arrays). Exit 1 on any failure, 2 without 8 devices.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
import traceback

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent import LinearLogits

TOL = 1e-5
B, T, D, V, CHUNK = 8, 6, 8, 32, 8
FAILURES: list[str] = []


@contextlib.contextmanager
def case(label: str):
    start = time.perf_counter()
    try:
        yield
        print(f"  ok   {label} ({time.perf_counter() - start:.1f} s)", flush=True)
    except Exception:
        FAILURES.append(f"{label}\n{traceback.format_exc()}")
        print(f"  FAIL {label}", flush=True)


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
            return lambda k: h @ k + b

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


def computations(hlo: str) -> dict[str, list[str]]:
    """The instruction lines of each computation of an HLO module, by name."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
        if head and not line[:1].isspace():
            name = head.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


def loop_bodies(comps: dict[str, list[str]]) -> set[str]:
    """Every computation run by a while loop, directly or through calls it makes."""
    direct = {m for lines in comps.values() for line in lines
              for m in re.findall(r"body=%?([\w.\-]+)", line)}
    bodies, todo = set(), list(direct)
    while todo:
        name = todo.pop()
        if name in bodies:
            continue
        bodies.add(name)
        for line in comps.get(name, ()):
            todo += re.findall(r"(?:to_apply|calls|body|condition|branch_computations)="
                               r"\{?%?([\w.\-]+)", line)
    return bodies


def collectives(hlo: str):
    """``(op, shapes, inside_a_loop)`` for every collective of the compiled program."""
    comps = computations(hlo)
    bodies = loop_bodies(comps)
    found = []
    for name, lines in comps.items():
        for line in lines:
            m = re.search(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|"
                          r"collective-permute)(-start)?\(", line)
            if m:
                shapes = [tuple(int(d) for d in s.split(",") if d)
                          for s in re.findall(r"\[([\d,]*)\]", m.group(1))]
                found.append((m.group(2), shapes, name in bodies))
    return found


def check_program(label, mesh, layout, fused, x, want):
    placed = place(x, mesh, layout)
    with jax.set_mesh(mesh):
        f = program(fused)
        got = f(placed)
        hlo = f.lower(placed).compile().as_text()
    for name in want:
        with case(f"{label}: {name} equals one device"):
            chex.assert_trees_all_close(got[name], want[name], rtol=TOL, atol=TOL)
        with case(f"{label}: {name} gradients have the inputs' shardings"):
            for g, key in zip(got[name][1], ("hidden", "kernel", "bias"), strict=True):
                assert padded(g.sharding.spec, g.ndim) == padded(
                    placed[key].sharding.spec, g.ndim
                ), (key, g.sharding.spec, placed[key].sharding.spec)
    with case(f"{label}: no all-gather or all-to-all, one kernel-gradient reduction"):
        found = collectives(hlo)
        assert found or mesh.size == 1
        bad = [c for c in found if c[0] not in ("all-reduce",)]
        assert not bad, bad
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
        data = sizes.get("data", 1) if "data" in layout else 1
        n_local, v_local = B * T // data, V // (sizes.get("model", 1) if "vocab" in layout else 1)
        # Beyond per-token vectors: the kernel's and bias's gradients (over the data
        # devices) and the hidden states' gradient (over the vocabulary devices).
        allowed = {(D, v_local), (v_local, D), (v_local,), (n_local, D), (B // data, T, D)}
        for op, shapes, in_loop in found:
            for shape in shapes:
                assert int(np.prod(shape)) <= n_local or shape in allowed, (op, shape)
                # The kernel's gradient is summed once, after the loop over chunks.
                if fused and shape == (D, v_local):
                    assert not in_loop, (op, shape, "inside a loop")


def run_group(group: str, x, want):
    devices = np.asarray(jax.devices())
    meshes = {
        "auto": [("2x4", (2, 4), AxisType.Auto), ("8", (8,), AxisType.Auto)],
        "explicit": [("2x4", (2, 4), AxisType.Explicit), ("8", (8,), AxisType.Explicit)],
        "four": [("2x2", (2, 2), AxisType.Auto), ("2x2", (2, 2), AxisType.Explicit)],
    }[group]
    for name, shape, kind in meshes:
        axes = ("data", "model") if len(shape) == 2 else ("data",)
        mesh = jax.sharding.Mesh(devices[: int(np.prod(shape))].reshape(shape), axes,
                                 axis_types=(kind,) * len(shape))
        layouts = ["data", "vocab", "data+vocab"] if len(shape) == 2 else ["data"]
        for fused in (True, False) if group != "four" else (True,):
            for layout in layouts:
                label = f"{kind.name} {name} mesh, {layout}, {'fused' if fused else 'dense'}"
                with case(f"{label}: compiles and runs"):
                    check_program(label, mesh, layout, fused, x, want[fused])


def transforms(x):
    """Eager calls, ``vmap`` over a replicated leading axis, and a head without bias."""
    devices = np.asarray(jax.devices())
    f = lambda h, k, t, w: jxent.sequence_nll(
        LinearLogits(h, k, chunk_size=CHUNK), t, shift=True, where=w, normalize="sum"
    )
    grad = jax.value_and_grad(f, argnums=(0, 1))
    args = (x["hidden"], x["kernel"], x["tokens"], x["where"])
    want = jax.jit(grad)(*args)
    stack = lambda a: np.stack([a, a])
    want_vmap = jax.jit(jax.vmap(grad, in_axes=(0, None, 0, 0)))(
        stack(args[0]), args[1], stack(args[2]), stack(args[3])
    )
    for kind in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.sharding.Mesh(devices.reshape(2, 4), ("data", "model"), axis_types=(kind,) * 2)
        put = lambda a, *spec, mesh=mesh: jax.device_put(a, NamedSharding(mesh, P(*spec)))
        placed = (put(args[0], "data"), put(args[1], None, "model"), put(args[2], "data"),
                  put(args[3], "data"))
        with jax.set_mesh(mesh):
            with case(f"{kind.name}: eager call, no bias"):
                chex.assert_trees_all_close(grad(*placed), want, rtol=TOL, atol=TOL)
            with case(f"{kind.name}: jit(vmap) over a replicated leading axis"):
                batched = (put(stack(args[0]), None, "data"), placed[1],
                           put(stack(args[2]), None, "data"), put(stack(args[3]), None, "data"))
                got = jax.jit(jax.vmap(grad, in_axes=(0, None, 0, 0)))(*batched)
                chex.assert_trees_all_close(got, want_vmap, rtol=TOL, atol=TOL)


def main(groups):
    if jax.device_count() < 8:
        print("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
        return 2
    x = inputs()
    one = jax.devices()[0]
    want = {fused: program(fused)(jax.device_put(x, one)) for fused in (True, False)}
    for group in groups or ("auto", "explicit", "four", "transforms"):
        print(f"[{group}]", flush=True)
        if group == "transforms":
            transforms(x)
        else:
            run_group(group, x, want)
    if FAILURES:
        print(f"\n{len(FAILURES)} failure(s):")
        for failure in FAILURES:
            print("---", failure)
        return 1
    print("all sharding checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
