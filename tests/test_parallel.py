"""Vocab- and data-parallel losses on a device mesh.

The multi-device checks live in ``tests/mesh_checks.py`` and run here in
subprocesses started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(the flag must be set before jax is imported), so the rest of the suite keeps
its single CPU device. One subprocess per group; a failing group shows the
script's report (every failing case with its traceback).

The checks in this file run in-process on one device: a mesh of one device
must give the plain results too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jxent

SCRIPT = Path(__file__).with_name("mesh_checks.py")
EXAMPLE = Path(__file__).parents[1] / "examples" / "distributed.py"

# Eight host devices; the two LLVM options only shorten compilation (the
# checks compile ~100 small programs), they do not change the HLO program.
XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["softmax", "data", "linear", "fused", "errors", "topk"])
def test_mesh_checks(group):
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), group],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"mesh checks '{group}' failed:\n{report}"
    assert "all mesh checks passed" in result.stdout, report


@pytest.mark.slow
def test_distributed_example_runs_and_matches_one_device():
    """examples/distributed.py sets its own 8 devices and exits 1 on any mismatch."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all paths equal the single-device loss and gradients" in result.stdout
    assert "all-gather" not in result.stdout


@pytest.mark.slow
def test_mesh_checks_refuse_to_run_on_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "errors"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "needs 8 devices, found 1" in result.stdout


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
