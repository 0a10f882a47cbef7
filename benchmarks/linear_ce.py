"""Fused linear cross-entropy against the materialised logits and PyTorch, on CPU.

For each size ``(N, D, V)`` (float32, plain mean loss, all targets counted),
one forward + backward pass (value, ∂/∂hidden and ∂/∂kernel) of:

* ``jxent fused``: ``jxent.linear_cross_entropy(hidden, kernel, targets)``
  (default chunk size);
* ``jxent materialised``: ``jxent.softmax_cross_entropy(hidden @ kernel, targets)``;
* ``torch options=None``: ``torch.nn.functional.linear_cross_entropy`` on its
  reference path (the full logits);
* ``torch chunked``: the same with ``options=torch.nn.LinearCrossEntropyOptions()``.

All four run in one process, alternating within every round (the order
rotates from round to round), so that a slower or busier moment of a shared
machine hits every implementation alike; the ratios are the medians of the
per-round ratios. Memory: ``temp`` is XLA's compiled temporary allocation
(``memory_analysis().temp_size_in_bytes``: what the program needs beyond its
arguments and outputs); ``peak`` is the rise of the process's resident memory
during one pass (``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
minus ``VmRSS`` before, freed heap memory handed back to the OS first), which
includes the outputs (the gradients). The
four losses are checked to agree before anything is timed.

    python benchmarks/linear_ce.py            # the table of docs/performance.md (needs ~14 GB free)
    python benchmarks/linear_ce.py --quick    # smaller sizes, a minute or two
    python benchmarks/linear_ce.py --sizes 4096,512,32768   # one of its sizes
    python benchmarks/linear_ce.py --sizes 4096,512,32768 --no-bf16

After the float32 table, the bf16 table (``--no-bf16`` skips it): the two
materialised programs (float32 logits, and bf16 logits ``h @ k`` as a model
computes them) and the three gradient policies of ``LinearLogits(...,
precision=...)`` at 16 and 64 chunks, on tokamax's failing case (N, D, V =
1024, 256, 119548), each with the dtypes of its products as lowered for CPU
and for a GPU, its error against a float64 reference (as XLA:CPU computes,
and with bf16 rounding honoured as on a GPU or TPU: a child process with
``XLA_FLAGS=--xla_allow_excess_precision=false``), its time and its compiled
memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _report import add_argument, alternating_rounds, report

import jxent
from jxent._testing import lowered, product_dtypes

SIZES = [(4096, 512, 32768), (8192, 1024, 131072)]
QUICK_SIZES = [(2048, 256, 16384), (2048, 512, 32768)]
NAMES = ["jxent fused", "jxent materialised", "torch options=None", "torch chunked"]


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process, MiB (Linux)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS, so that the next peak starts from live data."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def jax_case(loss, hidden, kernel, targets):
    """A compiled value-and-grad step: (run, temp bytes)."""
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = step.lower(hidden, kernel, targets).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes

    def run():
        out = compiled(hidden, kernel, targets)
        jax.block_until_ready(out)
        return float(out[0])

    return run, temp


def torch_case(options, hidden, kernel, targets):
    """Forward + backward of torch's linear_cross_entropy (weight as [V, D])."""
    h = torch.from_numpy(np.array(hidden)).requires_grad_(True)
    w = torch.from_numpy(np.array(kernel).T.copy()).requires_grad_(True)
    t = torch.from_numpy(np.array(targets, np.int64))

    def run():
        h.grad = w.grad = None
        loss = torch.nn.functional.linear_cross_entropy(h, w, t, options=options)
        loss.backward()
        value = float(loss.detach())
        h.grad = w.grad = None
        return value

    return run, None


def measure(size, rounds: int):
    n, d, v = size
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((n, d), np.float32))
    kernel = jnp.asarray(rng.standard_normal((d, v), np.float32) / np.sqrt(d))
    targets = jnp.asarray(rng.integers(0, v, n, dtype=np.int32))

    cases = {
        "jxent fused": jax_case(jxent.linear_cross_entropy, hidden, kernel, targets),
        "jxent materialised": jax_case(
            lambda h, k, t: jxent.softmax_cross_entropy(h @ k, t), hidden, kernel, targets
        ),
        "torch options=None": torch_case(None, hidden, kernel, targets),
        "torch chunked": torch_case(torch.nn.LinearCrossEntropyOptions(), hidden, kernel, targets),
    }
    # Warm-up, correctness and peak memory: one pass each, alone.
    values, peak = {}, {}
    for name, (run, _) in cases.items():
        values[name] = run()
        release_free_memory()
        before, _ = rss_mib()
        peak[name] = None
        if reset_peak():
            run()
            peak[name] = rss_mib()[1] - before
        release_free_memory()
    spread = max(values.values()) - min(values.values())
    assert spread <= 1e-4 * abs(values["jxent materialised"]), values

    times = alternating_rounds({name: case[0] for name, case in cases.items()}, rounds,
                               quiet=True)
    return {
        name: {
            "time": statistics.median(times[name]),
            "vs_materialised": statistics.median(
                a / b for a, b in zip(times[name], times["jxent materialised"], strict=True)
            ),
            "vs_torch_chunked": statistics.median(
                a / b for a, b in zip(times[name], times["torch chunked"], strict=True)
            ),
            "temp": None if cases[name][1] is None else cases[name][1] / 2**20,
            "peak": peak[name],
        }
        for name in cases
    }


PRECISION_SIZE = (1024, 256, 119548)  # tokamax's failing bf16 case: V a multiple of no block


def large_logit_batch(n, d, v, seed=0):
    """bf16 inputs whose kernel gradient cancels: a large shared hidden component, model targets."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(d)
    hidden = jnp.asarray(30.0 * direction + rng.standard_normal((n, d)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((d, v)) / np.sqrt(d), jnp.bfloat16)
    logits = np.asarray(jnp.dot(hidden, kernel, preferred_element_type=jnp.float32), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
    targets = np.minimum((cdf < rng.random(n)[:, None]).sum(-1), v - 1).astype(np.int32)
    return hidden, kernel, jnp.asarray(targets)


def precision_candidates(n, targets) -> dict:
    """The bf16 table's programs: the two materialised ones and each policy at 16 and 64 chunks."""
    out = {
        ("materialised, float32 logits", "—"): lambda h, k: jxent.softmax_cross_entropy(
            jnp.dot(h, k, preferred_element_type=jnp.float32), targets, reduction="sum"),
        ("materialised, bf16 logits (h @ k)", "—"): lambda h, k: jxent.softmax_cross_entropy(
            h @ k, targets, reduction="sum"),
    }
    for policy in ("accurate", "balanced", "compact"):
        for chunks in (16, 64):
            out[(f"fused {policy}", chunks)] = (
                lambda h, k, p=policy, c=n // chunks: jxent.linear_cross_entropy(
                    h, k, targets, reduction="sum", chunk_size=c, precision=p))
    return out


def gradient_products(loss, hidden, kernel, platform: str) -> str:
    """The dtypes of the products of ``grad(loss)`` as lowered for ``platform``."""
    text = lowered(jax.grad(loss, (0, 1)), hidden, kernel, platforms=(platform,))
    return ", ".join(product_dtypes(text))


def precision_errors(size, timed: bool) -> dict:
    """Per candidate: max abs error, relative error and entries beyond tolerance of ∂/∂kernel."""
    n, d, v = size
    hidden, kernel, targets = large_logit_batch(n, d, v)
    with jax.enable_x64(True):
        exact = jax.jit(jax.grad(
            lambda h, k: jxent.softmax_cross_entropy(h @ k, targets, reduction="sum"), (0, 1)
        ))(np.asarray(hidden, np.float64), np.asarray(kernel, np.float64))
        exact = np.asarray(exact[1])
    out = {}
    for (name, chunks), loss in precision_candidates(n, targets).items():
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(hidden, kernel).compile()
        row = {}
        if timed:
            row["temp"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            row["products"] = {p: gradient_products(loss, hidden, kernel, p)
                               for p in ("cpu", "cuda")}
            jax.block_until_ready(compiled(hidden, kernel))
        start = time.perf_counter()
        grads = jax.block_until_ready(compiled(hidden, kernel))
        row["seconds"] = time.perf_counter() - start
        error = np.abs(np.asarray(grads[1], np.float64) - exact)
        row["max"] = float(error.max())
        row["rel"] = float(np.linalg.norm(error) / np.linalg.norm(exact))
        row["beyond"] = int(np.sum(error > 5e-2 + 5e-2 * np.abs(exact)))
        out[f"{name}|{chunks}"] = row
        release_free_memory()
    return out


STRICT_FLAG = "--xla_allow_excess_precision=false"


def precision_table(size) -> None:
    """bf16 inputs: each program's products, its error against float64, its time and memory.

    The errors twice: as XLA:CPU computes (it may keep float32 where bf16 was
    asked: excess precision), and with every bf16 rounding the program asks
    for honoured (``XLA_FLAGS=--xla_allow_excess_precision=false``, in a
    child process), as a GPU or TPU rounds.
    """
    n, d, v = size
    ours = precision_errors(size, timed=True)
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + STRICT_FLAG))
    child = subprocess.run(
        [sys.executable, __file__, "--precision-errors", ",".join(map(str, size))],
        env=env, capture_output=True, text=True, check=True,
    )
    strict = json.loads(child.stdout.strip().splitlines()[-1])
    print()
    print(f"bf16 hidden and kernel, N, D, V = {n}, {d}, {v} (large logits: hidden = 30·u + "
          "noise, targets drawn from the model), reduction \"sum\"; errors of ∂/∂kernel "
          "against float64 on the same bf16 values, as XLA:CPU computes and with bf16 "
          f"rounding honoured (`XLA_FLAGS={STRICT_FLAG}`: as a GPU or TPU rounds); "
          "products of the gradient program as lowered for cpu and for cuda; one timed run "
          "after a warm-up. Defaults: fused accurate on CPU, fused balanced on GPU/TPU.")
    print()
    print("| gradient | chunks | products, cpu | products, cuda | time (s) | temp (MiB) "
          "| max abs error | ‖error‖ / ‖exact‖ | beyond 5e-2 + 5e-2·abs(exact) "
          "| ‖error‖ / ‖exact‖, bf16 honoured | beyond, bf16 honoured |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in ours.items():
        name, chunks = key.split("|")
        s = strict[key]
        print(f"| {name} | {chunks} | {r['products']['cpu']} | {r['products']['cuda']} "
              f"| {r['seconds']:.2f} | {r['temp']:.0f} | {r['max']:.3g} | {r['rel']:.2e} "
              f"| {r['beyond']} | {s['rel']:.2e} | {s['beyond']} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per size")
    parser.add_argument(
        "--sizes",
        type=lambda text: [tuple(int(x) for x in size.split(",")) for size in text.split(";")],
        default=None,
        help='"N,D,V[;N,D,V...]": these sizes instead of the default ones',
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 precision table")
    parser.add_argument("--precision-errors", default=None, help=argparse.SUPPRESS)
    add_argument(parser)
    args = parser.parse_args()
    if args.precision_errors:  # the child process of precision_table: errors only, as JSON
        size = tuple(int(x) for x in args.precision_errors.split(","))
        print(json.dumps(precision_errors(size, timed=False)))
        return
    with report(args.update_docs):
        sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
        rounds = args.rounds or (5 if args.quick else 3)

        print(
            f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"jax {jax.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); "
            f"float32, forward + backward, median of {rounds} alternating rounds"
        )
        header = (
            f"| {'N, D, V':<20} | {'implementation':<19} | {'time (s)':>8} | "
            f"{'÷ jxent materialised':>20} | {'÷ torch chunked':>15} | "
            f"{'temp (MiB)':>10} | {'peak (MiB)':>10} |"
        )
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        loads = []
        for size in sizes:
            load_before = os.getloadavg()[0]
            results = measure(size, rounds)
            loads.append(
                f"{', '.join(map(str, size))}: {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
            )
            for name in NAMES:
                r = results[name]
                temp = "—" if r["temp"] is None else f"{r['temp']:.0f}"
                peak = "—" if r["peak"] is None else f"{r['peak']:.0f}"
                print(
                    f"| {', '.join(map(str, size)):<20} | {name:<19} | {r['time']:>8.2f} | "
                    f"{r['vs_materialised']:>20.2f} | {r['vs_torch_chunked']:>15.2f} | "
                    f"{temp:>10} | {peak:>10} |",
                    flush=True,
                )
            release_free_memory()
        # This process alone keeps about 2 busy; more means other work shared the CPU.
        print("1-minute load average before -> after each size: " + "; ".join(loads))
        if not args.no_bf16:
            precision_table((256, 64, 11959) if args.quick else PRECISION_SIZE)


if __name__ == "__main__":
    main()
