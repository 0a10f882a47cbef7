"""Fused token-level quantities (token_stats, token_objective, distillation_loss) vs materialised.

Run:  python benchmarks/token_level.py [--repeats 5] [--quick]

Four workloads, float32, on jax's default device, with ``logits = hidden @ kernel``
of ``N`` positions, ``D`` features and ``V`` classes (``N, D, V = 4096, 512,
32768`` by default):

* (a) ``token_stats`` with the gradient: the value and the gradient (for
  ``hidden`` and ``kernel``) of ``Σ a·log_prob + c·entropy``, ``a`` and ``c``
  fixed random ``[N]`` vectors (a policy-gradient loss with an entropy bonus);
* (b) ``token_stats`` forward only, ``log_prob`` and ``entropy`` (a frozen
  reference model: nothing is differentiated);
* (c) ``distillation_loss(student, teacher, divergence="kl", reduction="mean")``,
  the teacher with its own ``hidden``/``kernel``, value and gradient for the
  student's ``hidden`` and ``kernel``;
* (d) (a)'s objective and gradient through ``token_objective(logits, tokens,
  lambda s, a, c: a·s.log_prob + c·s.entropy, args=(a, c))``: knowing the
  function of the statistics, the fused engine forms the gradient in the
  forward pass (three products per chunk, where (a)'s per-position outputs
  need four: their cotangents arrive only in the backward pass).

Each is run as ``fused`` (``jxent.LinearLogits(hidden, kernel)`` passed as the
logits, default chunk size), ``materialised`` (the same jxent function on
``hidden @ kernel``) and, for reference, ``torch`` (PyTorch eager on the
materialised logits: ``log_softmax`` + ``gather`` + entropy, with
``backward()`` for (a) and (d); ``kl_div(log_softmax(student), log_softmax(teacher),
log_target=True, reduction="batchmean")`` with ``backward()`` for (c)), on CPU,
or on CUDA when jax's default device is a GPU and ``torch.cuda.is_available()``
(skipped otherwise). All candidates run in one process, alternating within
every round, the order rotating from round to round, so that a busier moment
of a shared machine hits them alike; the ratios are medians of the per-round
paired ratios. Values are checked to agree before anything is timed.

Memory: ``temp`` is XLA's compiled temporary allocation
(``memory_analysis().temp_size_in_bytes``: what the program needs beyond its
arguments and outputs), from programs lowered on ``jax.ShapeDtypeStruct``
inputs (compiled, never run), at ``N, D, V = 8192, 512, 65536`` for fused and
materialised, and for fused at ``4N`` and ``16N`` positions: the fused
temporaries are one chunk of logits, not ``N × V``.

    python benchmarks/token_level.py            # the README table (~10 min on 2 CPU cores)
    python benchmarks/token_level.py --quick    # tiny sizes, a smoke run
    python benchmarks/token_level.py --sizes 8192,1024,131072 --memory-sizes 8192,1024,131072
    python benchmarks/token_level.py --chunk-size 192 --no-memory   # another chunk size
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _report import add_argument, alternating_rounds, log, report

import jxent

SIZES = (4096, 512, 32768)
MEMORY_SIZES = (8192, 512, 65536)
QUICK_SIZES = (512, 64, 2048)
QUICK_MEMORY_SIZES = (1024, 64, 4096)
WORKLOADS = {
    "a": "token_stats + grad of Σ a·log_prob + c·entropy",
    "b": "token_stats forward (log_prob, entropy)",
    "c": "distillation_loss kl mean + student grad",
    "d": "token_objective of (a)'s objective + grad",
}
KINDS = ("fused", "materialised", "torch")


# --- the jax programs -------------------------------------------------------------------

CHUNK_SIZE = None  # --chunk-size: positions per chunk of the fused programs (None: default)


def fused_logits(hidden, kernel):
    return jxent.LinearLogits(hidden, kernel, chunk_size=CHUNK_SIZE)


def stats_objective(fused: bool):
    """``Σ a·log_prob + c·entropy`` of ``token_stats`` on fused or materialised logits."""

    def objective(hidden, kernel, tokens, a, c):
        logits = fused_logits(hidden, kernel) if fused else hidden @ kernel
        stats = jxent.token_stats(logits, tokens, shift=False)
        return jnp.sum(a * stats.log_prob + c * stats.entropy)

    return jax.value_and_grad(objective, argnums=(0, 1))


def objective_sum(fused: bool):
    """(a)'s objective as ``token_objective``: the fused gradient is formed in the forward pass."""

    def objective(hidden, kernel, tokens, a, c):
        logits = fused_logits(hidden, kernel) if fused else hidden @ kernel
        fn = lambda stats, a, c: a * stats.log_prob + c * stats.entropy
        return jxent.token_objective(logits, tokens, fn, shift=False, args=(a, c))

    return jax.value_and_grad(objective, argnums=(0, 1))


def stats_forward(fused: bool):
    """``(log_prob, entropy)`` per position: a frozen reference model's pass."""

    def forward(hidden, kernel, tokens):
        logits = fused_logits(hidden, kernel) if fused else hidden @ kernel
        stats = jxent.token_stats(logits, tokens, shift=False)
        return stats.log_prob, stats.entropy

    return forward


def distillation(fused: bool):
    """Mean forward KL(teacher ‖ student), gradient for the student's hidden and kernel."""

    def loss(hidden, kernel, teacher_hidden, teacher_kernel):
        if fused:
            student = fused_logits(hidden, kernel)
            teacher = fused_logits(teacher_hidden, teacher_kernel)
        else:
            student, teacher = hidden @ kernel, teacher_hidden @ teacher_kernel
        return jxent.distillation_loss(
            student, teacher, shift=False, divergence="kl", reduction="mean"
        )

    return jax.value_and_grad(loss, argnums=(0, 1))


def programs(workload: str, fused: bool):
    programs = {"a": stats_objective, "b": stats_forward, "c": distillation, "d": objective_sum}
    return programs[workload](fused)


def arguments(workload: str, n: int, d: int, v: int, make):
    """The workload's arguments, built by ``make(name, shape, dtype)``."""
    f32, i32 = jnp.float32, jnp.int32
    if workload in ("a", "d"):
        return (
            make("hidden", (n, d), f32),
            make("kernel", (d, v), f32),
            make("tokens", (n,), i32),
            make("a", (n,), f32),
            make("c", (n,), f32),
        )
    if workload == "b":
        return make("hidden", (n, d), f32), make("kernel", (d, v), f32), make("tokens", (n,), i32)
    return (
        make("hidden", (n, d), f32),
        make("kernel", (d, v), f32),
        make("teacher_hidden", (n, d), f32),
        make("teacher_kernel", (d, v), f32),
    )


def temp_bytes(workload: str, fused: bool, size) -> int:
    """Compiled temporary memory of a workload's program, lowered on shapes only."""
    args = arguments(workload, *size, lambda _, shape, dtype: jax.ShapeDtypeStruct(shape, dtype))
    compiled = jax.jit(programs(workload, fused)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def data(n: int, d: int, v: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hidden": rng.standard_normal((n, d), np.float32),
        "kernel": (rng.standard_normal((d, v), np.float32) / np.sqrt(d)).astype(np.float32),
        "teacher_hidden": rng.standard_normal((n, d), np.float32),
        "teacher_kernel": (1.5 * rng.standard_normal((d, v), np.float32) / np.sqrt(d)).astype(
            np.float32
        ),
        "tokens": rng.integers(0, v, n).astype(np.int32),
        "a": rng.standard_normal(n).astype(np.float32),
        "c": (0.01 * rng.standard_normal(n)).astype(np.float32),
    }


def jax_case(workload: str, fused: bool, arrays, size):
    """(run, temp bytes): ``run()`` executes the compiled program and returns its outputs."""
    device = jax.devices()[0]
    args = arguments(workload, *size, lambda name, *_: jax.device_put(arrays[name], device))
    compiled = jax.jit(programs(workload, fused)).lower(*args).compile()

    def run():
        return jax.block_until_ready(compiled(*args))

    return run, compiled.memory_analysis().temp_size_in_bytes


def jax_values(workload: str, out) -> list[float]:
    """Compared across candidates: the value and |gradient| sums, or the outputs' sums."""
    if workload == "b":
        log_prob, entropy = out
        return [float(jnp.sum(log_prob)), float(jnp.sum(entropy))]
    value, (g_hidden, g_kernel) = out
    return [float(value), float(jnp.sum(jnp.abs(g_hidden))), float(jnp.sum(jnp.abs(g_kernel)))]


# --- the PyTorch reference ---------------------------------------------------------------


def torch_case(workload: str, arrays, device: str):
    """``run()`` for PyTorch eager on the materialised logits."""
    import torch
    import torch.nn.functional as F

    def tensor(name, grad=False):
        return torch.from_numpy(arrays[name]).to(device).requires_grad_(grad)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if workload == "b":
        hidden, kernel = tensor("hidden"), tensor("kernel")
        tokens = torch.from_numpy(arrays["tokens"].astype(np.int64)).to(device)

        def run():
            with torch.no_grad():
                log_p = F.log_softmax(hidden @ kernel, dim=-1)
                log_prob = log_p.gather(1, tokens[:, None])[:, 0]
                entropy = -(log_p.exp() * log_p).sum(-1)
            sync()
            return log_prob, entropy

        return run

    if workload in ("a", "d"):
        hidden, kernel = tensor("hidden", True), tensor("kernel", True)
        tokens = torch.from_numpy(arrays["tokens"].astype(np.int64)).to(device)
        a, c = tensor("a"), tensor("c")

        def run():
            hidden.grad = kernel.grad = None
            log_p = F.log_softmax(hidden @ kernel, dim=-1)
            log_prob = log_p.gather(1, tokens[:, None])[:, 0]
            entropy = -(log_p.exp() * log_p).sum(-1)
            value = (a * log_prob + c * entropy).sum()
            value.backward()
            sync()
            out = value.detach(), (hidden.grad, kernel.grad)
            hidden.grad = kernel.grad = None
            return out

        return run

    hidden, kernel = tensor("hidden", True), tensor("kernel", True)
    teacher_hidden, teacher_kernel = tensor("teacher_hidden"), tensor("teacher_kernel")

    def run():
        hidden.grad = kernel.grad = None
        with torch.no_grad():
            teacher = F.log_softmax(teacher_hidden @ teacher_kernel, dim=-1)
        student = F.log_softmax(hidden @ kernel, dim=-1)
        loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        loss.backward()
        sync()
        out = loss.detach(), (hidden.grad, kernel.grad)
        hidden.grad = kernel.grad = None
        return out

    return run


def torch_values(workload: str, out) -> list[float]:
    if workload == "b":
        log_prob, entropy = out
        return [float(log_prob.sum()), float(entropy.sum())]
    value, (g_hidden, g_kernel) = out
    return [float(value), float(g_hidden.abs().sum()), float(g_kernel.abs().sum())]


def torch_device() -> str | None:
    """``"cpu"``/``"cuda"`` to match jax's default backend, or None to skip PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


# --- measuring -----------------------------------------------------------------------------


def close(x: list[float], y: list[float], rtol: float) -> bool:
    return all(abs(p - q) <= rtol * max(abs(p), abs(q), 1e-6) for p, q in zip(x, y, strict=True))


def measure(size, repeats: int, use_torch: str | None):
    arrays = data(*size)
    cases, temps = {}, {}
    for workload in WORKLOADS:
        for kind in KINDS:
            if kind == "torch":
                if use_torch is None:
                    continue
                run = torch_case(workload, arrays, use_torch)
            else:
                log(f"compiling ({workload}) {kind} at N, D, V = {size}")
                run, temps[workload, kind] = jax_case(workload, kind == "fused", arrays, size)
            cases[workload, kind] = run

    # Warm-up and agreement: one pass each, alone.
    for workload in WORKLOADS:
        values = {}
        for kind in KINDS:
            if (workload, kind) not in cases:
                continue
            log(f"warm-up ({workload}) {kind}")
            out = cases[workload, kind]()
            values[kind] = (torch_values if kind == "torch" else jax_values)(workload, out)
            del out
        reference = values["materialised"]
        # On GPUs, float32 products run in TF32 by default (10-bit mantissa):
        # chunked and whole products then round differently by ~1e-3.
        rtol = 1e-4 if jax.default_backend() == "cpu" else 5e-3
        assert close(values["fused"], reference, rtol), (workload, values)
        if "torch" in values:
            assert close(values["torch"], reference, 1e-3), (workload, values)

    return alternating_rounds(cases, repeats), temps


def paired(times, a, b) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def platform_line(use_torch: str | None) -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(
                    line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
                )
        except (OSError, StopIteration):
            pass
        where = f"CPU: {model}, {os.cpu_count()} cores"
    else:
        where = f"{device.platform.upper()}: {device.device_kind} ({len(jax.devices())} devices)"
    line = f"{where}; jax {jax.__version__} ({jax.default_backend()})"
    if use_torch is not None:
        import torch

        threads = f", {torch.get_num_threads()} threads" if use_torch == "cpu" else ""
        line += f", torch {torch.__version__} ({use_torch}{threads})"
    else:
        line += ", torch skipped"
    return line


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f}"


def parse_size(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected N,D,V, got {text!r}")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--sizes", type=parse_size, default=None, help="N,D,V of the time table")
    parser.add_argument(
        "--memory-sizes", type=parse_size, default=None, help="N,D,V of the memory table"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="positions per fused chunk (default: jxent's)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    add_argument(parser)
    args = parser.parse_args()
    with report(args.update_docs):
        size = args.sizes or (QUICK_SIZES if args.quick else SIZES)
        global CHUNK_SIZE
        CHUNK_SIZE = args.chunk_size
        memory_size = args.memory_sizes or (QUICK_MEMORY_SIZES if args.quick else MEMORY_SIZES)
        use_torch = None if args.no_torch else torch_device()

        load_before = os.getloadavg()
        print(f"# token-level quantities, fused vs materialised, float32, N, D, V = {size}")
        print(platform_line(use_torch))
        chunk = "default" if CHUNK_SIZE is None else CHUNK_SIZE
        print(
            f"median of {args.repeats} alternating rounds; times include the gradient where "
            f"stated; fused chunk size: {chunk}"
        )
        print()
        times, temps = measure(size, args.repeats, use_torch)
        print("| workload | candidate | median ms | ÷ materialised | ÷ torch | temp (MiB) |")
        print("|---|---|---:|---:|---:|---:|")
        for workload, title in WORKLOADS.items():
            for kind in KINDS:
                key = (workload, kind)
                if key not in times:
                    continue
                to_torch = (
                    f"{paired(times, key, (workload, 'torch')):.2f}"
                    if (workload, "torch") in times
                    else "—"
                )
                temp = mib(temps[key]) if key in temps else "—"
                print(
                    f"| ({workload}) {title} | {kind} | {statistics.median(times[key]) * 1e3:.0f} "
                    f"| {paired(times, key, (workload, 'materialised')):.3f} "
                    f"| {to_torch} | {temp} |",
                    flush=True,
                )
        load_after = os.getloadavg()
        print()
        print(
            "load average (1, 5, 15 min) before: "
            + ", ".join(f"{x:.2f}" for x in load_before)
            + "; after: "
            + ", ".join(f"{x:.2f}" for x in load_after)
            + f" ({os.cpu_count()} cores; this process alone keeps about 2 busy on CPU)"
        )

        if args.no_memory:
            return
        n, d, v = memory_size
        print()
        print(f"## compiled temp memory (MiB), N, D, V = {memory_size}; fused also at 4N and 16N")
        print()
        print(
            f"| workload | materialised | fused | fused ÷ materialised | fused at {4 * n} "
            f"| fused at {16 * n} |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for workload, title in WORKLOADS.items():
            log(f"memory ({workload}): compiling at {memory_size} and 4N, 16N")
            dense = temp_bytes(workload, False, memory_size)
            fused = [temp_bytes(workload, True, (m * n, d, v)) for m in (1, 4, 16)]
            print(
                f"| ({workload}) {title} | {mib(dense)} | {mib(fused[0])} "
                f"| {fused[0] / dense:.2%} | {mib(fused[1])} | {mib(fused[2])} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
