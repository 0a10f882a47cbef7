"""Vocab- and data-parallel losses on a device mesh: the example, and a mesh of one device.

The multi-device checks inside ``shard_map`` are ``tests/test_mesh.py``; the
plain-``jit`` ones on placed arrays ``tests/test_sharding.py``. Here:
``examples/distributed.py`` run as a user runs it (its own 8 CPU devices)
against one device, with the output docs/distributed.md quotes, and a mesh
of one device, which must give the plain results too.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _quoted import assert_quoted, run
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jxent


@pytest.mark.slow
def test_distributed_example_matches_one_device_and_its_quote():
    """examples/distributed.py exits 1 on any mismatch with one device."""
    out = run("python examples/distributed.py")
    assert "all paths equal the single-device loss and gradients" in out
    assert "all-gather" not in out
    assert_quoted("python examples/distributed.py", out)


@pytest.mark.slow
def test_one_device_mesh_equals_plain_loss(rng):
    """``vocab_axis_name`` over a mesh of one device is the plain loss, value and gradient."""
    logits = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 16, (3, 5)), jnp.int32).at[0, 2].set(-100)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, 16), jnp.float32)
    options = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("model",))

    def on_mesh(x, w):
        return jax.shard_map(
            lambda x, t, w: jxent.nll_stats(
                x, t, class_weights=w, vocab_axis_name="model", **options, shift=True
            ).mean(),
            mesh=mesh,
            in_specs=(P(None, None, "model"), P(), P("model")),
            out_specs=P(),
        )(x, tokens, w)

    def plain(x, w):
        return jxent.sequence_nll(x, tokens, class_weights=w, **options, shift=True)

    got = jax.jit(jax.value_and_grad(on_mesh, (0, 1)))(logits, weights)
    want = jax.jit(jax.value_and_grad(plain, (0, 1)))(logits, weights)
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)


def test_vocab_axis_name_outside_shard_map_is_a_clear_error():
    with pytest.raises(ValueError, match=r"vocab_axis_name='model' is not a mesh axis bound"):
        jxent.softmax_cross_entropy(
            jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), vocab_axis_name="model"
        )
