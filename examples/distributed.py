"""Vocab- and data-parallel cross-entropy on a 2 × 4 (data × model) device mesh.

Eight CPU devices stand in for accelerators. The batch is split over the
``data`` axis (2 ways) and the vocabulary over the ``model`` axis (4 ways):
the kernel ``[D, V]`` of the language-model head, and so the logits, are
never held whole by any device. Six ways to compute the same global token
mean, each checked against one device (value and gradients, to 1e-5):

1.-4. Plain ``jit`` of single-device code on ``NamedSharding``-placed arrays,
   with dense logits ``hidden @ kernel`` or the fused ``LinearLogits(hidden,
   kernel)``, on a mesh with Auto axes and on one with Explicit axes: jxent
   runs each device on its own positions and classes.
5. ``shard_map`` + ``vocab_axis_name``: each device computes ``nll_stats`` on
   its ``[B/2, T, V/4]`` block of logits; the vocabulary shards combine inside
   the loss (``pmax``/``psum`` of per-token vectors) and a ``psum`` of the
   ``NLLStats`` over ``data`` gives the exact global mean.
6. The same with the fused ``linear_cross_entropy``.
7.-8. Sequence (context) parallelism: plain ``jit`` of the fused loss with the
   sequence axis split (``hidden``, ``tokens`` and ``mask`` placed along ``T``
   over a ``seq`` axis, the vocabulary over ``model``), Auto and Explicit
   axes: the shifted targets cross the shard borders as one collective-permute
   of a ``[B, 1]`` column each.

For each, the collectives in the compiled program are listed: all-reduces of
per-token vectors and of gradients, never an all-gather of the kernel, of the
hidden states or of the logits. Run:  python examples/distributed.py  (a few
seconds).
"""

import os

# Eight host devices; this must be set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402
from jxent._testing import collectives, summary  # noqa: E402

B, T, D, V = 8, 16, 32, 256  # batch over `data`, vocabulary over `model`


def make_batch(seed: int = 0):
    """A seeded batch: hidden states, an LM head, tokens, and padding (sequence i has T - i)."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    kernel = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.arange(T)[None, :] < (T - np.arange(B))[:, None]  # padded sequences
    return hidden, kernel, tokens, mask


def one_device(hidden, kernel, tokens, mask):
    """The reference: single-device code, global token mean over the whole batch."""
    return jxent.sequence_nll(hidden @ kernel, tokens, where=mask, shift=True)


def one_device_fused(hidden, kernel, tokens, mask):
    """The same loss through LinearLogits: the logits are never formed."""
    return jxent.sequence_nll(jxent.LinearLogits(hidden, kernel), tokens, where=mask, shift=True)


def vocab_parallel_stats(hidden, kernel, tokens, mask):
    """Per device: logits [B/2, T, V/4]; NLLStats psummed over `data`."""
    stats = jxent.nll_stats(
        hidden @ kernel, tokens, where=mask, vocab_axis_name="model", shift=True
    )
    return jax.lax.psum(stats, "data").mean()  # sums, then one division: exact


def vocab_parallel_fused(hidden, kernel, tokens, mask):
    """Per device: the fused loss over this device's kernel shard [D, V/4]."""
    hidden, tokens, mask = hidden[:, :-1], tokens[:, 1:], mask[:, 1:]  # causal shift
    total = jxent.linear_cross_entropy(
        hidden, kernel, tokens, where=mask, reduction="sum", vocab_axis_name="model"
    )
    count = jnp.sum(mask, dtype=total.dtype)  # no ignore_index tokens in this batch
    return jax.lax.psum(total, "data") / jax.lax.psum(count, "data")


SPECS = (P("data"), P(None, "model"), P("data"), P("data"))  # hidden, kernel, tokens, mask
SEQUENCE_SPECS = (P(None, "seq"), P(None, "model"), P(None, "seq"), P(None, "seq"))


def main() -> int:
    hidden, kernel, tokens, mask = make_batch()
    grad = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))
    want_value, want_grads = grad(one_device)(hidden, kernel, tokens, mask)

    # jax.make_mesh gives Explicit axes: inputs are placed before shard_map.
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    auto_mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    seq_mesh = jax.make_mesh((2, 4), ("seq", "model"))
    auto_seq_mesh = jax.make_mesh((2, 4), ("seq", "model"), axis_types=(AxisType.Auto,) * 2)

    def place(on, arrays):
        specs = SEQUENCE_SPECS if "seq" in on.axis_names else SPECS
        return [jax.device_put(a, NamedSharding(on, s)) for a, s in zip(arrays, specs, strict=True)]

    paths = {
        "plain jit, dense logits (Auto axes)": (one_device, auto_mesh),
        "plain jit, dense logits (Explicit axes)": (one_device, mesh),
        "plain jit, LinearLogits (Auto axes)": (one_device_fused, auto_mesh),
        "plain jit, LinearLogits (Explicit axes)": (one_device_fused, mesh),
        "shard_map + vocab_axis_name, nll_stats": (
            jax.shard_map(vocab_parallel_stats, mesh=mesh, in_specs=SPECS, out_specs=P()),
            mesh,
        ),
        "shard_map + vocab_axis_name, linear_cross_entropy": (
            jax.shard_map(vocab_parallel_fused, mesh=mesh, in_specs=SPECS, out_specs=P()),
            mesh,
        ),
        "plain jit, LinearLogits, sequence split (Auto axes)": (one_device_fused, auto_seq_mesh),
        "plain jit, LinearLogits, sequence split (Explicit axes)": (one_device_fused, seq_mesh),
    }
    print(f"one device: loss {float(want_value):.6f} nats/token")
    ok = True
    for name, (loss, on) in paths.items():
        args = place(on, (hidden, kernel, tokens, mask))
        with jax.set_mesh(on):
            compiled = grad(loss).lower(*args).compile()
            value, grads = compiled(*args)
        error = max(
            float(jnp.max(jnp.abs(np.asarray(g) - np.asarray(w))))
            for g, w in zip(grads, want_grads, strict=True)
        )
        close = abs(float(value) - float(want_value)) <= 1e-5 and error <= 1e-5
        ok &= close
        print(
            f"\n{name}: loss {float(value):.6f}, max |grad error| {error:.1e}"
            f"{'' if close else '  <-- MISMATCH'}"
        )
        print(f"  kernel shard per device: {args[1].addressable_shards[0].data.shape}")
        print(f"  collectives: {summary(collectives(compiled.as_text()))}")
    if not ok:
        print("\nFAILED: a mesh path differs from the single-device result")
        return 1
    print("\nall paths equal the single-device loss and gradients (to 1e-5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
