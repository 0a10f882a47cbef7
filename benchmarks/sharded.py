"""Fused vs materialised cross-entropy under plain ``jit`` on 8 simulated CPU devices.

Single-device code on arrays placed with ``NamedSharding`` (the way Flax NNX
and MaxText users shard): ``hidden [N, D]`` and the targets split over a
``data`` axis (data parallelism), the kernel ``[D, V]`` over a ``model`` axis
(vocabulary parallelism), or both; meshes with Auto and with Explicit axes.
For each layout, one value-and-gradient step (∂/∂hidden, ∂/∂kernel) of

* ``fused``: ``jxent.linear_cross_entropy(hidden, kernel, targets)``;
* ``materialised``: ``jxent.softmax_cross_entropy(hidden @ kernel, targets)``,

run alternately in one process (the order rotating every round); the ratio
is the median of the per-round ratios. ``temp`` is the compiled temporary
memory per device (``memory_analysis().temp_size_in_bytes`` of the
partitioned program); ``collectives`` lists what the compiled fused step
communicates. The 8 devices share this machine's cores, so the times are
those of the whole mesh, not of one accelerator; read the ratios.

    python benchmarks/sharded.py                          # N, D, V = 8192, 256, 32768
    python benchmarks/sharded.py --layouts data --rounds 5
    python benchmarks/sharded.py --quick                  # small sizes, a smoke run
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _report import add_argument, alternating_rounds, log, report  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402
from jxent._testing import collectives, summary  # noqa: E402

LAYOUTS = {
    "data": (P("data"), P()),
    "vocab": (P(), P(None, "model")),
    "data+vocab": (P("data"), P(None, "model")),
}


def mesh_for(layout: str, kind) -> jax.sharding.Mesh:
    shape = (8,) if layout == "data" else (1, 8) if layout == "vocab" else (2, 4)
    names = ("data",) if layout == "data" else ("data", "model")
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def measure(size, layout: str, kind, rounds: int):
    n, d, v = size
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((n, d), np.float32)
    kernel = (rng.standard_normal((d, v), np.float32) / np.sqrt(d)).astype(np.float32)
    targets = rng.integers(0, v, n, dtype=np.int32)
    mesh = mesh_for(layout, kind)
    h_spec, k_spec = LAYOUTS[layout]
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(hidden, h_spec), put(kernel, k_spec), put(targets, h_spec))
    losses = {
        "fused": jxent.linear_cross_entropy,
        "materialised": lambda h, k, t: jxent.softmax_cross_entropy(h @ k, t),
    }
    cases, temps, comms, values = {}, {}, {}, {}
    with jax.set_mesh(mesh):
        for name, loss in losses.items():
            log(f"compiling {name}, {layout}, {kind.name}")
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
            temps[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            comms[name] = summary(collectives(compiled.as_text()))
            cases[name] = compiled
            out = compiled(*args)  # warm-up
            jax.block_until_ready(out)
            values[name] = float(out[0])
        assert abs(values["fused"] - values["materialised"]) <= 1e-4 * abs(values["fused"])
        times = alternating_rounds(
            {name: lambda p=p: jax.block_until_ready(p(*args)) for name, p in cases.items()},
            rounds, label=f", {layout}, {kind.name}")
    ratio = statistics.median(a / b for a, b in zip(times["fused"], times["materialised"],
                                                     strict=True))
    return times, ratio, temps, comms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8192,256,32768", help="N,D,V")
    parser.add_argument("--layouts", default="data,vocab,data+vocab")
    parser.add_argument("--kinds", default="Auto,Explicit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="N, D, V = 1024, 64, 4096")
    add_argument(parser)
    args = parser.parse_args()
    size = (1024, 64, 4096) if args.quick else tuple(int(x) for x in args.sizes.split(","))
    kinds = [getattr(AxisType, k) for k in args.kinds.split(",")]
    with report(args.update_docs):
        print(
            f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"shared by 8 simulated devices; jax {jax.__version__}, jxent {jxent.__version__}; "
            f"float32 value and gradient, N, D, V = {size}, median of {args.rounds} "
            "alternating rounds"
        )
        print()
        print("| layout | mesh axes | fused (s) | materialised (s) | fused ÷ materialised "
              "| temp per device, fused (MiB) | materialised (MiB) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        notes = []
        for layout in args.layouts.split(","):
            for kind in kinds:
                times, ratio, temps, comms = measure(size, layout, kind, args.rounds)
                print(
                    f"| {layout} | {kind.name} | {statistics.median(times['fused']):.2f} "
                    f"| {statistics.median(times['materialised']):.2f} | {ratio:.2f} "
                    f"| {temps['fused']:.1f} | {temps['materialised']:.1f} |",
                    flush=True,
                )
                notes.append(f"* {layout}, {kind.name}, fused: {comms['fused']}")
        print()
        print("Collectives of the compiled fused step:")
        print()
        print("\n".join(notes))


if __name__ == "__main__":
    main()
