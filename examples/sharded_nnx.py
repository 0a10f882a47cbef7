"""A Flax NNX language model trained with optax under plain ``jit``, sharded over 8 devices.

Single-device code, sharded arrays: the embedding table ``[V, D]`` and the
unembedding ``[D, V]`` are annotated to split the vocabulary over a
``model`` axis (4 ways), the batch is placed over a ``data`` axis (2 ways),
and the loss is ``jxent.sequence_nll`` of ``LinearLogits(hidden, kernel,
bias)``: no device ever holds the ``[tokens, vocab]`` logits, nor gathers
the hidden states or the kernel. The same steps run on one device, and the
script checks that both give the same losses and parameters (to 1e-5), that
the gradients keep the parameters' shardings, and lists the collectives of
the compiled step. Auto axes (Flax NNX's sharding annotations, MaxText's
rules) and Explicit axes (``jax.make_mesh``'s default) alike.

Run:  python examples/sharded_nnx.py   (about half a minute; exits 1 on a mismatch)
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
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402
from jxent._testing import collectives, summary  # noqa: E402

B, T, D, V, STEPS = 8, 16, 32, 512, 3


class TinyLM(nnx.Module):
    """Embedding, a causal mixing layer (a running mean over the past) and a linear head."""

    def __init__(self, *, rngs: nnx.Rngs, sharded: bool):
        part = nnx.with_partitioning if sharded else (lambda init, _: init)
        self.embed = nnx.Embed(
            V, D, embedding_init=part(nnx.initializers.normal(1.0), ("model", None)), rngs=rngs
        )
        self.mix = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(
            D, V,
            kernel_init=part(nnx.initializers.lecun_normal(), (None, "model")),
            bias_init=part(nnx.initializers.zeros_init(), ("model",)),
            rngs=rngs,
        )

    def __call__(self, tokens):
        table = self.embed.embedding[...]
        # table[tokens], placed like the tokens (Explicit axes need the output's sharding).
        x = table.at[tokens].get(out_sharding=jax.typeof(tokens).sharding)  # [B, T, D]
        past = jnp.cumsum(x, axis=1) / jnp.arange(1, T + 1, dtype=x.dtype)[None, :, None]
        hidden = x + jnp.tanh(self.mix(past))
        return jxent.LinearLogits(hidden, self.head.kernel[...], self.head.bias[...])


def loss_fn(model, tokens, mask):
    return jxent.sequence_nll(model(tokens), tokens, shift=True, where=mask)


@nnx.jit
def train_step(model, optimizer, tokens, mask):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, mask)
    optimizer.update(model, grads)
    return loss, grads


def batch(seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.arange(T)[None, :] < (T - np.arange(B))[:, None]  # padded sequences
    return tokens, mask


def train(mesh=None):
    """``STEPS`` optax steps: one device (``mesh=None``) or the sharded model on ``mesh``."""
    sharded = mesh is not None
    context = jax.set_mesh(mesh) if sharded else _null()
    with context:
        model = TinyLM(rngs=nnx.Rngs(0), sharded=sharded)
        optimizer = nnx.Optimizer(model, optax.sgd(1.0, momentum=0.9), wrt=nnx.Param)
        losses, grads = [], None
        for step in range(STEPS):
            tokens, mask = batch(step)
            if sharded:
                place = NamedSharding(mesh, P("data"))
                tokens, mask = jax.device_put(tokens, place), jax.device_put(mask, place)
            loss, grads = train_step(model, optimizer, tokens, mask)
            losses.append(float(loss))
        hlo = ""
        if sharded:
            hlo = train_step.lower(model, optimizer, tokens, mask).compile().as_text()
    return losses, nnx.state(model, nnx.Param), grads, hlo


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> int:
    want_losses, want_params, _, _ = train()
    print(f"one device:  losses {', '.join(f'{x:.6f}' for x in want_losses)}")
    status = 0
    for kind in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
        losses, params, grads, hlo = train(mesh)
        print(f"{kind.name:>8} 2x4: losses {', '.join(f'{x:.6f}' for x in losses)}")
        pairs = zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True)
        same = np.allclose(losses, want_losses, rtol=1e-5, atol=1e-5) and all(
            np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in pairs
        )
        kernel = grads["head"]["kernel"][...]
        specs = {
            "embedding": tuple(grads["embed"]["embedding"][...].sharding.spec),
            "head kernel": tuple(kernel.sharding.spec),
        }
        found = collectives(hlo)
        gathered = [c for c in found if c.op == "all-gather"]
        print(f"         gradient shardings {specs}; collectives of the step:")
        for line in summary(found).split("; "):
            print(f"           {line}")
        ok = same and not gathered and specs["head kernel"][-1] == "model"
        print(f"         {'same as one device, nothing gathered' if ok else 'MISMATCH'}")
        status |= not ok
    return status


if __name__ == "__main__":
    sys.exit(main())
