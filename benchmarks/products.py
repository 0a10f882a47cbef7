"""The matrix products behind a fused gradient, timed alone: what bounds the fused paths on CPU.

Run:  python benchmarks/products.py [--sizes N,D,V] [--chunk C] [--repeats 5]

A gradient through ``logits = hidden @ kernel`` takes three products of
``N·D·V`` multiply-adds each: the logits ``h @ W``, the hidden gradient
``g @ Wᵀ`` and the kernel gradient ``hᵀ @ g``. The materialised path forms
each once over all ``N`` positions. The fused path forms them a chunk of
``C`` positions at a time, and when its outputs are per position (their
cotangents arrive only in the backward pass) it forms the chunk's logits
twice: four products. This script times each product over all positions
and over chunks (a ``fori_loop`` of ``N / C`` chunk products, each written
into its place), in float32, and prints milliseconds and GFLOP/s: the cost
of the fourth product that ``token_stats``'s fused gradient pays and
``token_objective``'s does not (``benchmarks/token_level.py``, (a) vs (d)).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _report import add_argument, report


def timed(f, *args, repeats: int) -> float:
    """Median seconds of ``f(*args)``, compiled and warmed up first."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def chunked(product, num_chunks: int, chunk: int, out_shape):
    """``product(i)`` for every chunk ``i``, written into rows ``i·C`` of an ``out_shape`` array."""

    def body(i, out):
        return jax.lax.dynamic_update_slice_in_dim(out, product(i), i * chunk, 0)

    return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(out_shape, jnp.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,512,32768", help="N,D,V")
    parser.add_argument("--chunk", type=int, default=256, help="positions per chunk")
    parser.add_argument("--repeats", type=int, default=5)
    add_argument(parser)
    args = parser.parse_args()
    with report(args.update_docs):
        n, d, v = (int(x) for x in args.sizes.split(","))
        c = args.chunk
        k = n // c
        rng = np.random.default_rng(0)
        h = jnp.asarray(rng.standard_normal((n, d), np.float32))
        w = jnp.asarray(rng.standard_normal((d, v), np.float32) / np.sqrt(d))
        g = jnp.asarray(rng.standard_normal((n, v), np.float32) / v)
        rows = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * c, c)

        cases = {
            "logits h @ W": (
                lambda h, w, g: h @ w,
                lambda h, w, g: chunked(lambda i: rows(h, i) @ w, k, c, (n, v)),
            ),
            "hidden grad g @ Wᵀ": (
                lambda h, w, g: g @ w.T,
                lambda h, w, g: chunked(lambda i: rows(g, i) @ w.T, k, c, (n, d)),
            ),
            "kernel grad hᵀ @ g": (
                lambda h, w, g: h.T @ g,
                lambda h, w, g: jax.lax.fori_loop(
                    0, k, lambda i, dw: dw + rows(h, i).T @ rows(g, i), jnp.zeros((d, v))
                ),
            ),
        }
        flops = 2 * n * d * v
        print(f"# float32 products, N, D, V = {n}, {d}, {v}; chunks of {c} positions ({k} chunks)")
        print(f"jax {jax.__version__} ({jax.default_backend()}), median of {args.repeats}\n")
        print("| product | all N positions (ms) | GFLOP/s | in chunks (ms) | GFLOP/s |")
        print("|---|---:|---:|---:|---:|")
        for name, (whole, parts) in cases.items():
            t_whole = timed(whole, h, w, g, repeats=args.repeats)
            t_parts = timed(parts, h, w, g, repeats=args.repeats)
            print(
                f"| {name} | {1e3 * t_whole:.0f} | {flops / t_whole / 1e9:.0f} | "
                f"{1e3 * t_parts:.0f} | {flops / t_parts / 1e9:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
