"""Fused vs materialised on an accelerator: the table a user needs, in one run.

On jax's default device, for each size ``(N, D, V)`` and input dtype (bf16,
float32), four compiled programs: the fused
``jxent.linear_cross_entropy(hidden, kernel, targets)`` (default chunk and
``precision``) and the materialised
``jxent.softmax_cross_entropy(hidden @ kernel, targets)`` (logits in the
inputs' dtype, as a model computes them), each forward only and as
``value_and_grad`` over ``hidden`` and ``kernel``. For each: the median time
of alternating rounds, fused ÷ materialised (median of the per-round ratios),
the compiled temporary memory (``memory_analysis().temp_size_in_bytes``) and
the dtypes of every product, read from the *compiled* program (its ``dot``
instructions, cuBLAS/cuDNN GEMM calls and Triton GEMM fusions), so the table
shows what the device ran: ``bf16·bf16→f32`` is a bf16 product with float32
accumulation, ``f32·f32→f32`` a float32 one (TF32 on a GPU at the default
matmul precision). Then, from the programs lowered for ``cuda`` and ``tpu``
(no compilation), each fused program's chunk rows and product dtypes.

    python benchmarks/accelerator.py                      # on a GPU: the docs table, < 8 min
    python benchmarks/accelerator.py --sizes 256,64,1000 --lowered-sizes 256,64,1000 --rounds 1

The second command is the CPU smoke run of the test suite. Without a GPU
(``jax.default_backend() == "cpu"``) the script says so: the default sizes
need an accelerator's memory and time, so the timed table is whatever
``--sizes`` asks for on CPU, labelled as such, while the lowered-program
table is at the GPU sizes (``--lowered-sizes``) all the same.
"""

from __future__ import annotations

import argparse
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _report import add_argument, alternating_rounds, report

import jxent
from jxent._testing import compiled_products, product_dtypes

SIZES = [(16384, 4096, 128256), (32768, 2560, 128256)]
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
# jxent 0.2.0 on an H200, float32 inputs: the last accelerator measurement.
LAST_GPU = ("jxent 0.2.0 on an H200, float32 inputs (TF32 products): "
            "fused value-and-gradient 1.35–1.6× materialised")

lowered_products = product_dtypes


def losses():
    fused = lambda h, k, t: jxent.linear_cross_entropy(h, k, t)
    materialised = lambda h, k, t: jxent.softmax_cross_entropy(h @ k, t)
    return {"fused": fused, "materialised": materialised}


def build(fn, grad: bool, args):
    """A compiled program, its temp MiB and its products' dtypes."""
    if grad:
        fn = jax.value_and_grad(fn, argnums=(0, 1))
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    return compiled, temp, compiled_products(compiled.as_text())


def inputs(size, dtype):
    n, d, v = size
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((n, d), np.float32), dtype)
    kernel = jnp.asarray(rng.standard_normal((d, v), np.float32) / np.sqrt(d), dtype)
    targets = jnp.asarray(rng.integers(0, v, n, dtype=np.int32))
    return hidden, kernel, targets


def measure(size, dtype, grad: bool, rounds: int) -> dict:
    args = inputs(size, dtype)
    programs = {}
    for name, fn in losses().items():
        try:
            programs[name] = build(fn, grad, args)
        except Exception as error:  # out of memory at compile time: reported, not fatal
            programs[name] = (None, None, [type(error).__name__])
    runnable = {}
    for name, (compiled, temp, products) in programs.items():
        if compiled is None:
            continue
        try:
            jax.block_until_ready(compiled(*args))  # warm-up; out of memory is reported
            runnable[name] = compiled
        except Exception as error:
            programs[name] = (None, temp, products + [type(error).__name__])
    times = alternating_rounds(
        {name: lambda p=p: jax.block_until_ready(p(*args)) for name, p in runnable.items()},
        rounds, quiet=True)
    ratio = None
    if len(times) == 2:
        ratio = statistics.median(a / b for a, b in zip(times["fused"], times["materialised"],
                                                        strict=True))
    return {
        name: {
            "ms": statistics.median(times[name]) * 1e3 if name in times else None,
            "temp": programs[name][1],
            "products": programs[name][2],
            "ratio": (ratio if name == "fused" else 1.0) if ratio is not None else None,
        }
        for name in programs
    }


def lowered_table(sizes) -> None:
    """Each fused value-and-grad program as lowered for cuda and tpu: chunk rows, products."""
    print()
    print("The fused value-and-gradient as lowered for each platform (`jax.export`, no "
          "compilation; default chunk and precision):")
    print()
    print("| N, D, V | inputs | platform | chunk rows | chunks | products |")
    print("|---|---|---|---:|---:|---|")
    for size in sizes:
        n, d, v = size
        for label, dtype in DTYPES.items():
            avals = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
                     jax.ShapeDtypeStruct((n,), jnp.int32))
            fn = jax.jit(jax.value_and_grad(losses()["fused"], argnums=(0, 1)))
            for platform in ("cuda", "tpu", "cpu"):
                text = jax.export.export(fn, platforms=(platform,))(*avals).mlir_module()
                rows = sorted({int(m) for m in re.findall(
                    rf"tensor<(\d+)x{d}x\w+>, tensor<{d}x{v}x\w+>\) -> tensor<\d+x{v}x", text)})
                chunks = ", ".join(str(-(-n // r)) for r in rows)
                print(f"| {n}, {d}, {v} | {label} | {platform} | "
                      f"{', '.join(map(str, rows))} | {chunks} | "
                      f"{', '.join(lowered_products(text))} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [tuple(int(x) for x in size.split(",")) for size in text.split(";")],
        default=None,
        help='"N,D,V[;N,D,V...]": these sizes instead of the default ones',
    )
    parser.add_argument(
        "--lowered-sizes",
        type=lambda text: [tuple(int(x) for x in size.split(",")) for size in text.split(";")],
        default=None,
        help='"N,D,V[;...]": the sizes of the lowered-program table (default: the GPU sizes)',
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per program pair")
    add_argument(parser)
    args = parser.parse_args()
    device = jax.devices()[0]
    backend = jax.default_backend()
    sizes = args.sizes or SIZES
    with report(args.update_docs):
        if backend == "cpu":
            print(f"No GPU here: not measured on a GPU since 0.2.0 ({LAST_GPU}). "
                  f"The timed table below is CPU ({device.device_kind}), at the sizes given.")
        else:
            print(f"{backend.upper()}: {device.device_kind}; jax {jax.__version__}, "
                  f"jxent {jxent.__version__}; median of {args.rounds} alternating rounds")
        print()
        print("| N, D, V | inputs | pass | program | ms | fused ÷ materialised | temp (MiB) "
              "| products (compiled) |")
        print("|---|---|---|---|---:|---:|---:|---|")
        for size in sizes:
            for label, dtype in DTYPES.items():
                for grad in (False, True):
                    results = measure(size, dtype, grad, args.rounds)
                    for name, r in results.items():
                        ms = "—" if r["ms"] is None else f"{r['ms']:.1f}"
                        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
                        temp = "—" if r["temp"] is None else f"{r['temp']:.0f}"
                        print(f"| {', '.join(map(str, size))} | {label} | "
                              f"{'value_and_grad' if grad else 'forward'} | {name} | {ms} | "
                              f"{ratio} | {temp} | {', '.join(r['products'])} |", flush=True)
        lowered_table(args.lowered_sizes or SIZES)


if __name__ == "__main__":
    main()
