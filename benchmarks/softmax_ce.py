"""Forward+backward time of softmax cross-entropy: jxent vs optax vs PyTorch vs a floor.

Run:  python benchmarks/softmax_ce.py [--repeats 15] [--quick]

Every candidate computes the mean loss over N positions of a [N, V] float32
logits array and its gradient with respect to the logits. Candidates are timed
alternately (A B C ... A B C ...), so that drifts in the machine's speed hit
all of them alike, and the ratios are medians of the per-round paired ratios.

The floor is one elementwise read+write pass over the same logits (``x * 2``):
no cross-entropy can be faster than reading its logits and writing a
gradient of the same size.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _report import add_argument, report

import jxent


def _jax_timer(fn, *args):
    def run():
        out = fn(*args)
        jax.block_until_ready(out)

    return run


def make_candidates(n: int, v: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits_np = rng.standard_normal((n, v), dtype=np.float32) * 2
    targets_np = rng.integers(0, v, n).astype(np.int32)
    targets_np[rng.random(n) < 0.1] = -100  # padding for the all-options run
    weights_np = rng.uniform(0.5, 1.5, v).astype(np.float32)
    logits = jnp.asarray(logits_np)
    targets_all = jnp.asarray(np.where(targets_np < 0, 0, targets_np))
    targets_pad = jnp.asarray(targets_np)
    weights = jnp.asarray(weights_np)

    jx_default = jax.jit(jax.value_and_grad(lambda x, t: jxent.softmax_cross_entropy(x, t)))
    jx_options = jax.jit(
        jax.value_and_grad(
            lambda x, t, w: jxent.softmax_cross_entropy(
                x, t, ignore_index=-100, class_weights=w, label_smoothing=0.1
            )
        )
    )
    ox = jax.jit(
        jax.value_and_grad(
            lambda x, t: optax.losses.softmax_cross_entropy_with_integer_labels(x, t).mean()
        )
    )
    floor = jax.jit(lambda x: x * 2.0)

    candidates = {
        "jxent": _jax_timer(jx_default, logits, targets_all),
        "optax": _jax_timer(ox, logits, targets_all),
        "jxent+options": _jax_timer(jx_options, logits, targets_pad, weights),
        "floor (1 r+w pass)": _jax_timer(floor, logits),
    }
    try:
        import torch
        import torch.nn.functional as F

        tx = torch.from_numpy(logits_np.copy())
        tt = torch.from_numpy(targets_np.astype(np.int64))
        tt_all = torch.where(tt < 0, torch.zeros_like(tt), tt)

        def torch_run():
            x = tx.detach().requires_grad_(True)
            loss = F.cross_entropy(x, tt_all)
            loss.backward()

        candidates["torch"] = torch_run
    except ImportError:
        pass
    return candidates


def bench(n: int, v: int, repeats: int):
    candidates = make_candidates(n, v)
    for run in candidates.values():  # compile and warm up
        run()
        run()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    add_argument(parser)
    args = parser.parse_args()
    with report(args.update_docs):
        sizes = [(1024, 8192)] if args.quick else [(8192, 32000), (2048, 131072)]

        machine = platform.processor() or platform.machine()
        print(
            f"# softmax cross-entropy, forward+backward, float32, CPU ({machine}, "
            f"{os.cpu_count()} cores, jax {jax.__version__}, optax {optax.__version__}"
            + (f", torch {__import__('torch').__version__}" if _has_torch() else "")
            + f"); median of {args.repeats} alternating rounds"
        )
        print()
        print("| N × V | candidate | median ms | ratio to optax | ratio to floor |")
        print("|---|---|---:|---:|---:|")
        for n, v in sizes:
            times = bench(n, v, args.repeats)
            for name in times:
                med = statistics.median(times[name]) * 1e3
                print(
                    f"| {n}×{v} | {name} | {med:.1f} | {paired_ratio(times, name, 'optax'):.3f} "
                    f"| {paired_ratio(times, name, 'floor (1 r+w pass)'):.2f} |"
                )
            print(
                f"| {n}×{v} | *jxent+options / jxent* | | "
                f"{paired_ratio(times, 'jxent+options', 'jxent'):.3f} | |"
            )


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
