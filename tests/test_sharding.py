"""Every function under plain ``jit`` on arrays placed with ``NamedSharding``.

The checks live in ``tests/sharding_checks.py`` and run here in subprocesses
with 8 simulated CPU devices (the flag must be set before jax is imported):
fused and dense, data / vocabulary / data + vocabulary layouts, Auto and
Explicit mesh axes, 8 and 4 devices; values and gradients equal one device,
gradients come back in the inputs' shardings, and the compiled programs
gather nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sharding_checks.py")
# Eight host devices; the two LLVM options only shorten compilation.
XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["auto", "explicit", "four", "transforms"])
def test_sharding_checks(group):
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), group], env=env, capture_output=True, text=True,
        timeout=900,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"sharding checks '{group}' failed:\n{report}"
    assert "all sharding checks passed" in result.stdout, report


@pytest.mark.slow
def test_checks_refuse_to_run_on_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "needs 8 devices" in result.stdout
