"""jxent across processes: 2 JAX processes, one mesh, a vocab-parallel loss and a training step.

On a cluster JAX runs one process per host (or per accelerator), joined by
``jax.distributed.initialize``: a mesh spans the devices of every process, each
process holds only its own shards, and the collectives cross process
boundaries. This script does the same on one machine: it starts 2 Python
processes with 4 CPU devices each, joined through a coordinator on localhost
(gloo carries the collectives between processes), and lays one ``data × vocab``
mesh over the 8 devices, a process's devices along ``vocab``: the vocabulary is
split inside a process, the batch across processes, as on a cluster.

Every process runs the same code on the same global arrays, of which it places
only its own blocks (``jax.make_array_from_callback``):

1. the vocab-parallel fused loss in ``shard_map``: ``linear_cross_entropy`` with
   ``vocab_axis_name`` on each device's kernel shard ``[D, V/4]``, and the exact
   global token mean from ``psum``-ed sums and counts;
2. a jitted SGD step of single-device code on the placed arrays: an embedding
   and ``sequence_nll(LinearLogits(hidden, head))`` with the head ``[D, V]``
   split over ``vocab``; no device forms the ``[tokens, V]`` logits.

Run:  python examples/multiprocess.py   (about 10 s on 2 CPU cores).
``tests/test_multiprocess.py`` runs it and compares its output with the one
docs/distributed.md quotes; the checks of every vocab- and data-parallel
function across processes against one device are ``tests/_multiprocess_checks.py``.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

PROCESSES, LOCAL_DEVICES = 2, 4
B, T, D, V = 8, 16, 32, 256  # the batch over `data`, the vocabulary over `vocab`
STEPS, LEARNING_RATE = 3, 0.5


def launch() -> int:
    """Start the processes; if one fails, stop the others and return 1."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port)], env=env)
             for i in range(PROCESSES)]
    try:
        while None in (codes := [p.poll() for p in procs]) and not any(codes):
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()  # a no-op for those that have exited
            p.wait()
    return int(any(codes))


def worker(process_id: int, port: int) -> None:
    # gloo prints its connection lines on the C-level stdout: send them to stderr
    # and keep stdout for Python's own lines.
    stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(stdout, "w", buffering=1, encoding="utf-8")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.distributed.initialize(f"localhost:{port}", num_processes=PROCESSES,
                               process_id=process_id)
    say = print if process_id == 0 else (lambda *_: None)

    local = [[d for d in jax.devices() if d.process_index == p] for p in range(PROCESSES)]
    mesh = Mesh(np.asarray(local), ("data", "vocab"), axis_types=(AxisType.Auto,) * 2)
    say(f"{jax.process_count()} processes × {jax.local_device_count()} CPU devices, "
        f"mesh {dict(mesh.shape)}: `vocab` inside a process, `data` across processes")

    # The same global arrays in every process (one seed); each places only its blocks.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.arange(T)[None, :] < (T - np.arange(B))[:, None]  # sequence b has T - b tokens
    embed = rng.normal(size=(V, D)).astype(np.float32)
    head = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)

    def place(x, *spec):
        sharding = NamedSharding(mesh, P(*spec))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    tokens, mask = place(tokens, "data"), place(mask, "data")
    params = {"embed": place(embed), "head": place(head, None, "vocab")}

    def features(params, tokens):  # [B, T, D]
        return jnp.tanh(params["embed"][tokens])

    # 1. Per device: hidden [B/2, T, D], its kernel shard [D, V/4]; sums, then one division.
    def vocab_parallel_loss(hidden, kernel, tokens, mask):
        total = jxent.linear_cross_entropy(hidden[:, :-1], kernel, tokens[:, 1:],
                                           where=mask[:, 1:], reduction="sum",
                                           vocab_axis_name="vocab")
        count = jnp.sum(mask[:, 1:], dtype=total.dtype)
        return jax.lax.psum(total, "data") / jax.lax.psum(count, "data")

    @jax.jit
    def vocab_parallel(params, tokens, mask):
        specs = (P("data"), P(None, "vocab"), P("data"), P("data"))
        per_device = jax.shard_map(vocab_parallel_loss, mesh=mesh, in_specs=specs, out_specs=P())
        return per_device(features(params, tokens), params["head"], tokens, mask)

    loss = vocab_parallel(params, tokens, mask)
    say(f"vocab-parallel linear_cross_entropy in shard_map: loss {float(loss):.6f}")

    # 2. Single-device code under plain jit; jxent reads the layout from the arrays.
    def loss_fn(params, tokens, mask):
        logits = jxent.LinearLogits(features(params, tokens), params["head"])  # never formed
        return jxent.sequence_nll(logits, tokens, shift=True, where=mask)

    @jax.jit
    def step(params, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss

    losses = []
    for _ in range(STEPS):
        params, loss = step(params, tokens, mask)
        losses.append(f"{float(loss):.6f}")
    shard = params["head"].addressable_shards[0].data.shape
    say(f"{STEPS} SGD steps under plain jit: loss {' → '.join(losses)}; "
        f"head {head.shape} held as {shard} per device")


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.exit(launch())
    worker(int(sys.argv[1]), int(sys.argv[2]))
