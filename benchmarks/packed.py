"""What ``segment_ids`` costs: packed rows scored with and without document boundaries.

``sequence_nll(..., shift=True, where=mask)`` against the same call with
``segment_ids`` (eight documents a row), value and gradient (∂/∂hidden,
∂/∂kernel), float32, on ``logits = hidden @ kernel`` (dense) and on
``LinearLogits(hidden, kernel)`` (fused). The four candidates run alternately
in one process, the order rotating every round; each ratio is the median of
the per-round ratios of the same path with and without ids. Target: ≤ 1.02.
The compiled programs are compared too: the ids add instructions on ``[B, T]``
arrays and none on ``[·, V]`` ones, so a ratio away from 1 is the machine's noise.

    python benchmarks/packed.py               # B, T, D, V = 8, 512, 512, 32768
    python benchmarks/packed.py --quick
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics

import jax
import numpy as np
from _report import add_argument, alternating_rounds, log, report

import jxent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,512,512,32768", help="B,T,D,V")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B, T, D, V = 4, 128, 64, 4096")
    add_argument(parser)
    args = parser.parse_args()
    b, t, d, v = (4, 128, 64, 4096) if args.quick else map(int, args.sizes.split(","))
    rng = np.random.default_rng(0)
    hidden = jax.numpy.asarray(rng.standard_normal((b, t, d), np.float32))
    kernel = jax.numpy.asarray(rng.standard_normal((d, v), np.float32) / np.sqrt(d))
    tokens = jax.numpy.asarray(rng.integers(0, v, (b, t), dtype=np.int32))
    segments = np.repeat(np.arange(1, 9), -(-t // 8))[None, :t].repeat(b, 0)
    segments = jax.numpy.asarray(segments.astype(np.int32))
    mask = jax.numpy.asarray(rng.random((b, t)) > 0.05)

    def loss(fused, ids):
        def f(h, k):
            logits = jxent.LinearLogits(h, k) if fused else h @ k
            return jxent.sequence_nll(logits, tokens, shift=True, where=mask, segment_ids=ids)
        return jax.jit(jax.value_and_grad(f, (0, 1)))

    def instructions(step):
        """(all instructions, those on [·, V] arrays) of the compiled program."""
        lines = [line for line in step.lower(hidden, kernel).compile().as_text().splitlines()
                 if " = " in line]
        return len(lines), sum(bool(re.search(rf"\[(?:\d+,)+{v}\]", line)) for line in lines)

    cases = {
        (path, ids is not None): loss(path == "fused", ids)
        for path in ("dense", "fused")
        for ids in (None, segments)
    }
    for key, step in cases.items():
        log(f"compiling and warming up {key}")
        jax.block_until_ready(step(hidden, kernel))
    times = alternating_rounds(
        {key: lambda step=step: jax.block_until_ready(step(hidden, kernel))
         for key, step in cases.items()}, args.rounds)
    with report(args.update_docs):
        print(
            f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"jax {jax.__version__}, jxent {jxent.__version__}; float32 value and gradient, "
            f"B, T, D, V = {b}, {t}, {d}, {v}, 8 documents a row; median of {args.rounds} "
            "alternating rounds"
        )
        print()
        print("| path | without ids (ms) | with segment_ids (ms) | with ÷ without |")
        print("|---|---:|---:|---:|")
        for path in ("dense", "fused"):
            without, with_ids = times[(path, False)], times[(path, True)]
            ratio = statistics.median(a / b for a, b in zip(with_ids, without, strict=True))
            print(f"| {path} | {statistics.median(without) * 1e3:.0f} "
                  f"| {statistics.median(with_ids) * 1e3:.0f} | {ratio:.3f} |")
        print()
        print("What the ids add to the compiled program (instructions; those on [·, V] arrays):")
        print()
        for path in ("dense", "fused"):
            (n0, v0), (n1, v1) = (instructions(cases[(path, ids)]) for ids in (False, True))
            print(f"* {path}: {n0} → {n1} instructions; on [·, V] arrays {v0} → {v1}")


if __name__ == "__main__":
    main()
