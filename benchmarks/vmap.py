"""``jax.vmap`` over a fused loss against the same batched call: time and memory.

Run:  python benchmarks/vmap.py [--rounds 7] [--sizes B,T,D,V] [--update-docs]

Hidden states ``[B, T, D]``, tokens ``[B, T]``, one kernel ``[D, V]``
(float32). Each row computes the same number, Σ over examples of
``sequence_nll(·, shift=True)`` (each example's token mean), or
``token_stats`` for the forward rows:

* ``batched``: one call on ``[B, T]`` (``normalize="sequences"`` × B);
* ``vmap``: ``jax.vmap`` of the one-example call, kernel not mapped;
* ``vmap, materialised``: the same on ``hidden @ kernel``.

The gradient rows are ``value_and_grad`` for ``hidden`` and ``kernel``. The
mapped axis joins the positions (``jxent/_engine/_vmap.py``): one chunk loop,
and sums per example from per-position outputs, whose backward pass forms
each chunk's logits again (four products where the batched sum has three).
Ratios are medians of per-round paired ratios against ``batched``
(candidates alternate within each round); ``temp`` is XLA's compiled
temporary allocation (``memory_analysis().temp_size_in_bytes``).
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
from _report import add_argument, alternating_rounds, log, report

import jxent

SIZES = (8, 256, 128, 8192)


def programs(b: int):
    def example(fused):
        def loss(h, t, kernel):
            lg = jxent.LinearLogits(h, kernel) if fused else h @ kernel
            return jxent.sequence_nll(lg, t, shift=True)
        return loss

    def batched(h, kernel, t):
        lg = jxent.LinearLogits(h, kernel)
        return jxent.sequence_nll(lg, t, shift=True, normalize="sequences") * b

    def mapped(fused):
        return lambda h, kernel, t: jnp.sum(jax.vmap(example(fused), (0, 0, None))(h, t, kernel))

    def stats(h, t, kernel, fused=True):
        lg = jxent.LinearLogits(h, kernel) if fused else h @ kernel
        s = jxent.token_stats(lg, t, shift=True)
        return s.log_prob, s.entropy

    grads = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    return {
        "value_and_grad": {
            "batched": grads(batched),
            "vmap": grads(mapped(True)),
            "vmap, materialised": grads(mapped(False)),
        },
        "forward (token_stats)": {
            "batched": jax.jit(lambda h, k, t: stats(h, t, k)),
            "vmap": jax.jit(lambda h, k, t: jax.vmap(stats, (0, 0, None))(h, t, k)),
            "vmap, materialised": jax.jit(lambda h, k, t: jax.vmap(
                lambda h, t, k: stats(h, t, k, False), (0, 0, None))(h, t, k)),
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="B,T,D,V")
    add_argument(parser)
    args = parser.parse_args(argv)
    b, t, d, v = (int(s) for s in args.sizes.split(","))
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (b, t, d))
    kernel = jax.random.normal(k[1], (d, v)) / d**0.5
    tokens = jax.random.randint(k[2], (b, t), 0, v)
    with report(args.update_docs):
        print(f"B, T, D, V = {b}, {t}, {d}, {v}; float32; {jax.devices()[0].device_kind}, "
              f"{args.rounds} rounds\n")
        print("| computation | call | median s | × batched | temp MiB |")
        print("|---|---|---:|---:|---:|")
        for what, calls in programs(b).items():
            log(f"compiling {what}")
            temps = {n: f.lower(h, kernel, tokens).compile().memory_analysis().temp_size_in_bytes
                     for n, f in calls.items()}
            ready = {n: (lambda f=f: jax.block_until_ready(f(h, kernel, tokens)))
                     for n, f in calls.items()}
            for run in ready.values():
                run()
            times = alternating_rounds(ready, args.rounds, label=f" {what}")
            for name in calls:
                ratio = statistics.median(
                    a / base for a, base in zip(times[name], times["batched"], strict=True))
                print(f"| {what} | {name} | {statistics.median(times[name]):.3f} | "
                      f"{ratio:.2f} | {temps[name] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
