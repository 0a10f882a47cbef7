"""The checks of ``tests/test_multiprocess.py``: jxent across real OS processes against one device.

``examples/multiprocess.py`` shows the setup a user copies; this harness proves
the cross-process path. It launches ``--num-processes`` Python processes, each
with ``--local-devices`` CPU devices, joined by ``jax.distributed.initialize``
through a coordinator on ``localhost`` (a free port) with gloo collectives, on
one ``data × vocab`` mesh over all of them. With the default 2 × 4 the mesh is
interleaved: each row of the ``vocab`` axis and each column of the ``data``
axis holds devices of different processes, so every collective crosses a
process boundary (when the vocab axis is smaller than the process count, the
devices are grouped by process instead). Every process builds only its own
blocks with ``jax.make_array_from_callback``: each sequence and each kernel
column is drawn from its own seed.

The checks, each compared with the same computation in one process on one
device (``jax.local_devices()[0]``, plain ``jit``, the whole batch from the
same seeds), values and gradients to 1e-5 relative in float32 (the largest
error over every process's shards, divided by the largest magnitude of the
reference):

* data-parallel ``nll_stats`` whose ``psum`` over ``data`` is the exact global
  token mean;
* vocab-parallel ``linear_cross_entropy``, value and gradients for hidden,
  kernel and bias, with the collectives of its compiled per-device program;
* vocab-parallel ``sequence_nll``, ``token_stats`` and ``distillation_loss`` per
  position, with their vector-Jacobian products;
* plain ``jit`` of single-device code, ``sequence_nll`` on ``LinearLogits``,
  with the arrays placed over ``data × vocab`` on Auto and on Explicit mesh
  axes: no ``shard_map``, no axis names, and no all-gather in the program;
* a jitted Flax NNX + optax training step, three steps on data-sharded batches.

One line per check (``ok``/``FAIL``) and a non-zero exit on any mismatch.
Faults end the run with a message, never a hang: the launcher relays the
processes' output, and when one dies it names it and stops (kills and reaps)
the others; processes with different numbers of local devices refuse to
start; a vocabulary that does not divide over the vocab axis gets
``shard_map``'s error, as in one process. The options that make them:
``--crash-process I`` (process I kills itself after the first check),
``--local-devices 4,2`` (one count per process), ``--vocab 30``; ``--only NAME``
runs only the checks whose name contains NAME.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

TOL = 1e-5  # relative, float32
SEED = 0
B, T, D = 8, 16, 32  # batch over `data`; the vocabulary (--vocab) over `vocab`


# ----------------------------------------------------------------------------- launcher


def free_port() -> int:
    """A port nobody listens on now (bound to 0, so the OS picks it)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        return f"died (killed by {signal.Signals(-code).name}) before the run finished"
    return f"exited with code {code}"


def relay(i: int, stream, chatter: bool = False) -> None:
    """Copy a child's output, process 0's as is, the others' prefixed with their id.

    ``chatter``: the stream is the child's stderr, where gloo's connection lines go
    (dropped). It is read apart from stdout, so they never share a line with ours.
    """
    prefix = "" if i == 0 else f"[process {i}] "
    for line in stream:
        if not (chatter and ("[Gloo]" in line or "connected peer ranks" in line)):
            print(prefix + line, end="", flush=True)


def launch(args: argparse.Namespace) -> int:
    """Start the processes, relay their output, stop them all on the first failure."""
    counts = [int(c) for c in args.local_devices.split(",")]
    if len(counts) == 1:
        counts *= args.num_processes
    if len(counts) != args.num_processes:
        print(f"--local-devices has {len(counts)} counts for {args.num_processes} processes")
        return 2
    address = f"localhost:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # The device count comes from --local-devices; a forced count would override it.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "force_host_platform_device_count" not in f)
    procs = []
    for i, count in enumerate(counts):
        command = [sys.executable, __file__, "--worker", str(i), "--coordinator", address]
        command += ["--num-processes", str(args.num_processes), "--local-devices", str(count)]
        command += ["--vocab", str(args.vocab), "--crash-process", str(args.crash_process)]
        command += ["--only", args.only]
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    relays = [
        threading.Thread(target=relay, args=(i, stream, stream is p.stderr))
        for i, p in enumerate(procs)
        for stream in (p.stdout, p.stderr)
    ]
    for thread in relays:
        thread.start()
    print(
        f"launched {args.num_processes} processes ({args.local_devices} CPU devices each), "
        f"coordinator {address}",
        flush=True,
    )
    deadline = time.monotonic() + args.timeout
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                for thread in relays[2 * i : 2 * i + 2]:
                    thread.join(timeout=5)  # its last words first
                others = [j for j, c in enumerate(codes) if c is None]
                print(f"process {i} {describe_exit(code)}; stopping {others}", flush=True)
                status = code if code > 0 else 1
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                hung = [i for i, c in enumerate(codes) if c is None]
                print(f"timed out after {args.timeout:.0f} s; processes {hung} still running")
                status = 1
                break
            time.sleep(0.05)
    finally:
        stop(procs)
        for thread in relays:
            thread.join(timeout=5)
    return status


def stop(procs: list[subprocess.Popen], grace: float = 2.0) -> None:
    """Let survivors exit on their own for ``grace`` seconds, then kill and reap every one."""
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument(
        "--local-devices", default="4", help="CPU devices per process, or one count per process"
    )
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole run")
    parser.add_argument("--crash-process", type=int, default=-1, help="kill this process mid-run")
    parser.add_argument("--only", default="", help="run the checks whose name contains this")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__" and "--worker" not in sys.argv:
    # The launcher needs no JAX: start the processes before paying for its import.
    sys.exit(launch(parse_args(sys.argv[1:])))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402
from jxent._testing import collectives, summary  # noqa: E402

# ------------------------------------------------------------------------------- worker


def join(args: argparse.Namespace) -> None:
    """Join the global runtime; refuse processes that bring different numbers of devices."""
    # gloo prints its connection lines on the C-level stdout, unsynchronised with
    # Python's, so one could land inside a result line: send the C level's to stderr
    # (the launcher drops them there) and keep stdout for Python's own lines.
    python_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(python_stdout, "w", buffering=1, encoding="utf-8")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", int(args.local_devices))
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.worker,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,  # without the launcher, a dead peer aborts the rest
    )
    counts = Counter(d.process_index for d in jax.devices())
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
        raise SystemExit(
            f"processes have different numbers of local devices ({listing}); every process "
            "must bring the same number (--local-devices) for the mesh to be a grid"
        )


@dataclass
class Source:
    """A global array that can build any block of itself without the rest."""

    shape: tuple[int, ...]
    dtype: type
    block: Callable[[tuple[slice, ...]], np.ndarray]

    def full(self) -> np.ndarray:
        return self.block(tuple(slice(None) for _ in self.shape))


def seeded(tag: int, shape: tuple[int, ...], axis: int, draw, dtype=np.float32) -> Source:
    """Slice ``i`` along ``axis`` is ``draw(rng(SEED, tag, i), shape without axis)``."""

    def block(index: tuple[slice, ...]) -> np.ndarray:
        rest = shape[:axis] + shape[axis + 1 :]
        ids = range(shape[axis])[index[axis]]
        parts = [draw(np.random.default_rng([SEED, tag, i]), rest) for i in ids]
        out = np.stack(parts, axis=axis)
        return out[tuple(slice(None) if a == axis else s for a, s in enumerate(index))]

    return Source(shape, dtype, block)


def batch_sources(vocab: int) -> dict[str, Source]:
    """Hidden states, logits, tokens, a mask, cotangents (by sequence); kernel, bias (by class).

    Sequence ``b`` counts its first ``T - 2b`` tokens, so the data shards
    hold different numbers of counted tokens, and one token is ``-100``.
    """
    normal = lambda scale: lambda rng, s: (scale * rng.normal(size=s)).astype(np.float32)

    def tokens(rng, s):
        out = rng.integers(0, vocab, s).astype(np.int32)
        out[s[0] // 2] = -100
        return out

    mask = Source(
        (B, T), np.bool_, lambda i: (np.arange(T)[None] < T - 2 * np.arange(B)[:, None])[i]
    )
    return {
        "hidden": seeded(1, (B, T, D), 0, normal(1.0)),
        "logits": seeded(2, (B, T, vocab), 0, normal(3.0)),
        "teacher": seeded(3, (B, T, vocab), 0, normal(2.0)),
        "tokens": seeded(4, (B, T), 0, tokens, np.int32),
        "mask": mask,
        "cotangent": seeded(5, (B, T), 0, normal(1.0)),
        "kernel": seeded(6, (D, vocab), 1, normal(D**-0.5)),
        "bias": seeded(7, (vocab,), 0, lambda rng, s: np.float32(0.1 * rng.normal())),
    }


class Runtime:
    """The global mesh, the reference device, and the two ways to run a computation."""

    def __init__(self, vocab_shards: int):
        devices = jax.devices()
        processes = jax.process_count()
        n = len(devices)
        data = n // vocab_shards
        local = [[d for d in devices if d.process_index == p] for p in range(processes)]
        if vocab_shards % processes == 0:
            # Cell (i, j) belongs to process (i + j) mod P: every row and every
            # column of the grid holds devices of different processes.
            grid = np.empty((data, vocab_shards), dtype=object)
            for i in range(data):
                for j in range(vocab_shards):
                    grid[i, j] = local[(i + j) % processes].pop(0)
            self.layout = "interleaved: every data and vocab group spans processes"
        else:  # devices grouped by process: vocab groups inside a process when they fit
            grid = np.asarray(sum(local, [])).reshape(data, vocab_shards)
            self.layout = "process-major"
        self.mesh = Mesh(grid, ("data", "vocab"))
        self.reference_device = jax.local_devices()[0]

    def on_mesh(self, fn, specs, sources: list[Source], mesh: Mesh | None = None):
        """``jit(fn)`` on arrays of which this process builds only its own blocks.

        ``eval_shape`` first: the shapes meet ``shard_map`` before any data is
        placed, so an uneven split gets the same error as in one process.
        """
        abstract = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in sources]
        jax.eval_shape(fn, *abstract)
        arrays = [self.place(s, spec, mesh) for s, spec in zip(sources, specs, strict=True)]
        compiled = jax.jit(fn).lower(*arrays).compile()
        self.collectives = summary(collectives(compiled.as_text()))
        return compiled(*arrays)

    def place(self, source: Source, spec, mesh: Mesh | None = None) -> jax.Array:
        """The global array; this process builds only the blocks of its own devices."""
        return jax.make_array_from_callback(
            source.shape, NamedSharding(mesh or self.mesh, spec), source.block
        )

    def on_one_device(self, fn, sources: list[Source]):
        """The reference: the whole batch on this process's first device, plain ``jit``."""
        return jax.jit(fn)(*self.on_device(sources))

    def on_device(self, sources: list[Source]) -> list[jax.Array]:
        return [jax.device_put(s.full(), self.reference_device) for s in sources]

    def error(self, got, want) -> float:
        """Largest |got − want| over this process's shards, relative to max |want|, all leaves."""
        worst = 0.0
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            w = np.asarray(w, np.float64)
            scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-30)
            for shard in g.addressable_shards:
                diff = np.abs(np.asarray(shard.data, np.float64) - w[shard.index])
                worst = max(worst, float(np.max(diff, initial=0.0)) / scale)
        return worst


# One function per check: (runtime, sources) -> (got on the mesh, reference, what to print).


def data_parallel_nll_stats(rt: Runtime, src: dict):

    def per_device(logits, tokens, mask):
        stats = jxent.nll_stats(logits, tokens, shift=True, where=mask)
        return jax.lax.psum(stats, "data"), jax.lax.pmean(stats.mean(), "data")

    sharded = jax.shard_map(per_device, mesh=rt.mesh, in_specs=P("data"), out_specs=P())

    def on_mesh(logits, tokens, mask):
        loss = lambda x: (lambda s, means: (s.mean(), (s, means)))(*sharded(x, tokens, mask))
        (mean, (stats, means)), grad = jax.value_and_grad(loss, has_aux=True)(logits)
        return (mean, stats.total, stats.count, grad), means

    def reference(logits, tokens, mask):
        loss = lambda x: (lambda s: (s.mean(), s))(
            jxent.nll_stats(x, tokens, shift=True, where=mask)
        )
        (mean, stats), grad = jax.value_and_grad(loss, has_aux=True)(logits)
        return mean, stats.total, stats.count, grad

    args = [src["logits"], src["tokens"], src["mask"]]
    got, mean_of_means = rt.on_mesh(on_mesh, [P("data")] * 3, args)
    want = rt.on_one_device(reference, args)
    note = (
        f"token mean {float(want[0]):.6f} over {int(want[2])} tokens "
        f"(the mean of per-shard means would be {float(mean_of_means.addressable_data(0)):.6f})"
    )
    return got, want, note


def vocab_parallel_linear_cross_entropy(rt: Runtime, src: dict):

    options = dict(label_smoothing=0.1, z_loss=1e-3, chunk_size=24)

    def per_device(hidden, kernel, bias, tokens, mask):
        total = jxent.linear_cross_entropy(
            hidden, kernel, tokens, bias=bias, where=mask, reduction="sum",
            vocab_axis_name="vocab", **options,
        )  # fmt: skip
        count = jnp.sum(mask & (tokens != -100), dtype=total.dtype)
        return jax.lax.psum(total, "data") / jax.lax.psum(count, "data")

    specs = [P("data"), P(None, "vocab"), P("vocab"), P("data"), P("data")]
    sharded = jax.shard_map(per_device, mesh=rt.mesh, in_specs=tuple(specs), out_specs=P())

    def reference(hidden, kernel, bias, tokens, mask):
        return jxent.linear_cross_entropy(hidden, kernel, tokens, bias=bias, where=mask, **options)

    grads = lambda f: jax.value_and_grad(f, (0, 1, 2))
    args = [src[k] for k in ("hidden", "kernel", "bias", "tokens", "mask")]
    got = rt.on_mesh(grads(sharded), specs, args)
    want = rt.on_one_device(grads(reference), args)
    shard = got[1][1].addressable_data(0).shape
    note = f"loss {float(want[0]):.6f}; kernel shard per device {shard}"
    return got, want, f"{note}; collectives: {rt.collectives}"


def per_token_check(rt: Runtime, src: dict, fn, inputs: tuple[str, ...], note: str):
    """``fn(*logits, tokens, mask, axis)`` per position, vocab-sharded, and its VJP."""

    n = len(inputs)
    sharded = jax.shard_map(
        lambda *a: fn(*a, "vocab"),
        mesh=rt.mesh,
        in_specs=(P("data", None, "vocab"),) * n + (P("data"), P("data")),
        out_specs=P("data"),
    )

    def with_vjp(f):
        def run(*a):
            logits, rest, ct = a[:n], a[n:-1], a[-1]
            out, vjp = jax.vjp(lambda *x: f(*x, *rest), *logits)
            cts = jax.tree.map(lambda o: ct[:, : o.shape[1]].astype(o.dtype), out)
            return out, vjp(cts)[0]

        return run

    args = [src[k] for k in inputs] + [src["tokens"], src["mask"], src["cotangent"]]
    specs = [P("data", None, "vocab")] * n + [P("data")] * 3
    got = rt.on_mesh(with_vjp(sharded), specs, args)
    want = rt.on_one_device(with_vjp(lambda *a: fn(*a, None)), args)
    return got, want, note


def vocab_parallel_sequence_nll(rt: Runtime, src: dict):

    def fn(logits, tokens, mask, axis):
        return jxent.sequence_nll(
            logits, tokens, shift=True, where=mask, normalize="none", z_loss=1e-3,
            vocab_axis_name=axis,
        )  # fmt: skip

    return per_token_check(rt, src, fn, ("logits",), "per-token NLL and its VJP")


def vocab_parallel_token_stats(rt: Runtime, src: dict):

    def fn(logits, tokens, mask, axis):
        counted = tokens != -100  # token_stats has no ignore_index: masks are the one way
        stats = jxent.token_stats(
            logits, jnp.where(counted, tokens, 0), shift=True, where=mask & counted,
            temperature=0.7, vocab_axis_name=axis,
        )  # fmt: skip
        return stats._replace(is_argmax=jnp.asarray(stats.is_argmax, jnp.float32),
                              argmax=jnp.asarray(stats.argmax, jnp.float32))

    return per_token_check(rt, src, fn, ("logits",), "log_prob, entropy, logsumexp, is_argmax")


def vocab_parallel_distillation_loss(rt: Runtime, src: dict):

    def fn(student, teacher, tokens, mask, axis):
        return jxent.distillation_loss(
            student, jax.lax.stop_gradient(teacher), shift=False, divergence="jsd", beta=0.3,
            temperature=2.0, where=mask, reduction="none", vocab_axis_name=axis,
        )  # fmt: skip

    return per_token_check(rt, src, fn, ("logits", "teacher"), "jsd per position and its VJP")


def plain_jit_fused(rt: Runtime, src: dict):
    """Single-device code on arrays placed over data × vocab: no shard_map, no axis names."""

    options = dict(label_smoothing=0.1, z_loss=1e-3)

    def loss(hidden, kernel, bias, tokens, mask):
        logits = jxent.LinearLogits(hidden, kernel, bias, chunk_size=24)
        return jxent.sequence_nll(logits, tokens, shift=True, where=mask, **options)

    grads = jax.value_and_grad(loss, (0, 1, 2))
    args = [src[k] for k in ("hidden", "kernel", "bias", "tokens", "mask")]
    specs = [P("data"), P(None, "vocab"), P("vocab"), P("data"), P("data")]
    want = rt.on_one_device(grads, args)
    notes = []
    for kind in (AxisType.Auto, AxisType.Explicit):
        mesh = Mesh(rt.mesh.devices, rt.mesh.axis_names, axis_types=(kind, kind))
        with jax.set_mesh(mesh):
            got = rt.on_mesh(grads, specs, args, mesh=mesh)
        if "all-gather" in rt.collectives or rt.error(got, want) > TOL:
            return got, want, f"{kind.name} axes: {rt.collectives}"
        notes.append(f"{kind.name}: {rt.collectives}")
    return got, want, f"loss {float(want[0]):.6f}; collectives, " + "; ".join(notes)


def nnx_optax_training(rt: Runtime, src: dict, steps: int = 3):
    import optax  # imported here: the fault tests end before this check
    from flax import nnx

    vocab = src["kernel"].shape[1]

    class TinyLM(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed = nnx.Embed(vocab, D, rngs=rngs)
            self.mix = nnx.Linear(D, D, rngs=rngs)
            self.head = nnx.Linear(D, vocab, rngs=rngs)

        def __call__(self, tokens):
            return self.head(jax.nn.gelu(self.mix(self.embed(tokens))))

    @nnx.jit
    def step(model, optimizer, tokens, mask):
        def loss_fn(model):
            inputs = jax.numpy.maximum(tokens, 0)  # -100 is a target to ignore, not an input
            return jxent.sequence_nll(model(inputs), tokens, shift=True, where=mask)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def train(place_state, tokens, mask):
        with jax.default_device(rt.reference_device):
            model = TinyLM(nnx.Rngs(SEED))
            # SGD with momentum, linear in the gradients: Adam's g/√v turns entries
            # that are zero up to float32 rounding into ±lr steps (measured: 8.7e-6
            # relative after 3 adamw steps), which says nothing about the mesh.
            optimizer = nnx.Optimizer(model, optax.sgd(0.5, momentum=0.9), wrt=nnx.Param)
        for obj in (model, optimizer):
            nnx.update(obj, place_state(jax.tree.map(np.asarray, nnx.state(obj))))
        losses = [step(model, optimizer, tokens, mask) for _ in range(steps)]
        return losses, nnx.state(model, nnx.Param)

    def replicate(state):
        # make_array_from_callback trusts every process to hand over the same
        # replicated values; a per-process initialisation would mix silently.
        multihost_utils.assert_equal(state, "initial parameters differ across processes")
        everywhere = NamedSharding(rt.mesh, P())
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, everywhere, lambda i: x[i]), state
        )

    batch = [src["tokens"], src["mask"]]
    got = train(replicate, *(rt.place(s, P("data")) for s in batch))
    device = rt.reference_device
    want = train(lambda state: jax.device_put(state, device), *rt.on_device(batch))
    losses = " → ".join(f"{float(v):.4f}" for v in want[0])
    return got, want, f"{steps} SGD-momentum steps, batch over `data`: loss {losses}"


CHECKS = [
    ("data-parallel nll_stats + psum", data_parallel_nll_stats),
    ("vocab-parallel linear_cross_entropy", vocab_parallel_linear_cross_entropy),
    ("vocab-parallel sequence_nll", vocab_parallel_sequence_nll),
    ("vocab-parallel token_stats", vocab_parallel_token_stats),
    ("vocab-parallel distillation_loss", vocab_parallel_distillation_loss),
    ("plain jit, LinearLogits on sharded arrays", plain_jit_fused),
    ("Flax NNX + optax training step", nnx_optax_training),
]


def work(args: argparse.Namespace) -> int:
    join(args)

    me, processes = jax.process_index(), jax.process_count()
    say = (lambda *a: print(*a, flush=True)) if me == 0 else (lambda *a: None)
    rt = Runtime(vocab_shards=int(args.local_devices))
    say(
        f"{processes} processes × {jax.local_device_count()} CPU devices, mesh "
        f"{dict(rt.mesh.shape)} ({rt.layout}); tolerance {TOL:g} relative (float32)"
    )
    src = batch_sources(args.vocab)
    mismatches = 0
    for k, (name, check) in enumerate(c for c in CHECKS if args.only in c[0]):
        if k == 1 and me == args.crash_process:
            os.kill(os.getpid(), signal.SIGKILL)  # --crash-process: die mid-run
        start = time.perf_counter()
        try:
            got, want, note = check(rt, src)
        except Exception as e:
            # Every process meets the same trace-time errors (process 0 prints them
            # whole); anything else ends the run too, and the launcher stops the rest.
            message = str(e) if me == 0 else str(e).strip().splitlines()[0]
            print(f"FAIL {name}: {type(e).__name__}: {message}", flush=True)
            return 1
        errors = multihost_utils.process_allgather(np.float64(rt.error(got, want)))
        worst = float(np.max(errors))
        ok = worst <= TOL
        mismatches += not ok
        say(
            f"{'ok  ' if ok else 'FAIL'} {name}: {note}; max rel. error {worst:.1e} "
            f"over {processes} processes ({time.perf_counter() - start:.1f} s)"
        )
    if mismatches:
        say(f"FAILED: {mismatches} check(s) differ from one device by more than {TOL:g}")
        return 1
    say(f"all checks equal one device to {TOL:g} on {processes} processes")
    return 0


if __name__ == "__main__":
    sys.exit(work(parse_args(sys.argv[1:])))
