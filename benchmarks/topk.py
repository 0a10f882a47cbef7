"""Distillation from a stored top-k teacher (``TopK``): time and memory against the alternatives.

Run:  python benchmarks/topk.py [--repeats 5] [--quick] [--update-docs]

The student is ``hidden @ kernel`` (``N`` positions, ``D`` features, ``V``
classes, float32); the teacher is stored as its top-``k`` log-probabilities
(``ids``, ``log_probs`` of shape ``[N, k]``). Every candidate computes the
mean loss and its gradient for the student's ``hidden`` and ``kernel``:

* ``TopK tail, fused``: ``distillation_loss(LinearLogits(hidden, kernel),
  TopK(ids, log_probs), divergence="kl")`` (the k classes and the tail bucket);
* ``TopK renormalize, fused``: the same with ``topk_mode="renormalize"``;
* ``TopK tail, materialised``: the same on ``hidden @ kernel``;
* ``densified teacher, fused``: what a library without a stored-teacher form
  does: the teacher scattered into ``[N, V]`` logits (``log_probs`` at the
  ids, the tail mass spread evenly over the other classes) and passed as a
  dense teacher beside the fused student;
* ``token_stats, fused``: the baseline of the issue: ``token_stats`` on the
  same ``LinearLogits`` with the gradient of ``Σ log_prob`` (forward and
  backward).

Ratios are medians of per-round paired ratios (candidates alternate within
each round, the order rotating). ``temp`` is XLA's compiled temporary
allocation (``memory_analysis().temp_size_in_bytes``) of each program.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _report import add_argument, alternating_rounds, log, report

import jxent

SIZES = (2048, 256, 32768, 64)
QUICK_SIZES = (256, 32, 2048, 16)


def densified(ids, log_probs, v: int):
    """``[N, V]`` teacher log-probs: the stored ones, and the rest spread over the others."""
    n, k = ids.shape
    rest = jnp.log(jnp.maximum(-jnp.expm1(jax.nn.logsumexp(log_probs, -1)), 1e-30) / (v - k))
    full = jnp.broadcast_to(rest[:, None], (n, v))
    return full.at[jnp.arange(n)[:, None], ids].set(log_probs)


def programs():
    def topk(mode: str, fused: bool):
        def loss(hidden, kernel, ids, log_probs):
            student = jxent.LinearLogits(hidden, kernel) if fused else hidden @ kernel
            return jxent.distillation_loss(
                student, jxent.TopK(ids, log_probs), shift=False, topk_mode=mode
            )
        return loss

    def dense_teacher(hidden, kernel, ids, log_probs):
        teacher = densified(ids, log_probs, kernel.shape[1])
        return jxent.distillation_loss(jxent.LinearLogits(hidden, kernel), teacher, shift=False)

    def stats(hidden, kernel, ids, log_probs):
        tokens = ids[:, 0]
        out = jxent.token_stats(jxent.LinearLogits(hidden, kernel), tokens, shift=False)
        return jnp.sum(out.log_prob) / hidden.shape[0]

    return {
        "TopK tail, fused": topk("tail", True),
        "TopK renormalize, fused": topk("renormalize", True),
        "TopK tail, materialised": topk("tail", False),
        "densified teacher, fused": dense_teacher,
        "token_stats, fused": stats,
    }


def inputs(n: int, d: int, v: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, d), np.float32)
    kernel = (rng.standard_normal((d, v), np.float32) / np.sqrt(d)).astype(np.float32)
    teacher = jax.nn.log_softmax(
        jnp.asarray(hidden) @ jnp.asarray(1.5 * rng.standard_normal((d, v)) / np.sqrt(d),
                                          jnp.float32), -1)
    top = jxent.TopK.from_logits(teacher, k)
    return jnp.asarray(hidden), jnp.asarray(kernel), top.ids, top.log_probs


def measure(size, repeats: int):
    args = inputs(*size)
    compiled, temps, values = {}, {}, {}
    for name, fn in programs().items():
        log(f"compiling {name} at N, D, V, k = {size}")
        program = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
        compiled[name] = program
        temps[name] = program.memory_analysis().temp_size_in_bytes
        values[name] = float(jax.block_until_ready(program(*args))[0])
    a, b = values["TopK tail, fused"], values["TopK tail, materialised"]
    assert abs(a - b) <= 1e-4 * max(abs(a), 1e-6), values
    calls = {name: lambda p=p: jax.block_until_ready(p(*args)) for name, p in compiled.items()}
    return alternating_rounds(calls, repeats), temps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--sizes", default=None, help="N,D,V,k")
    add_argument(parser)
    args = parser.parse_args()
    size = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (
        QUICK_SIZES if args.quick else SIZES)
    with report(args.update_docs):
        times, temps = measure(size, args.repeats)
        base = "token_stats, fused"
        device = jax.devices()[0]
        print(f"N, D, V, k = {size}; float32; {device.platform} ({device.device_kind}), "
              f"jax {jax.__version__}; loss and gradient for hidden and kernel; median of "
              f"{args.repeats} alternating rounds.\n")
        print("| program | time (ms) | ÷ token_stats fused fwd+bwd | temp (MiB) |")
        print("|---|---:|---:|---:|")
        for name, t in times.items():
            ratio = statistics.median(x / y for x, y in zip(t, times[base], strict=True))
            print(f"| {name} | {1e3 * statistics.median(t):.1f} | {ratio:.2f} | "
                  f"{temps[name] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
