"""jxent on JAX's multi-process runtime: ``examples/multiprocess.py`` with real OS processes.

The example launches 2 processes × 4 CPU devices joined by
``jax.distributed.initialize`` (gloo collectives, a coordinator on a free
localhost port) and compares every mesh result with one device, to 1e-5
relative. Each run here starts the launcher in its own process group, so a
timeout kills and reaps the launcher and every process it started, and each
test checks that none is left behind.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test here starts processes or trains models

EXAMPLE = Path(__file__).parents[1] / "examples" / "multiprocess.py"
# Faster compilation of the same programs (the LLVM passes only; the HLO is the same).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run(*args: str, timeout: float = 90) -> tuple[int, str, float]:
    """``(exit code, output, seconds)`` of the example; every process is reaped, even on timeout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--timeout", str(timeout - 10), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the launcher and its children
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the example hung for {timeout} s; killed it:\n{out}")
    finally:
        left = alive(proc.pid)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind by the launcher:\n{out}"
    return proc.returncode, out, time.monotonic() - start


def alive(group: int) -> bool:
    """Whether any process of the group is still running (zombies excepted), after a moment."""
    for _ in range(20):
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def test_two_processes_match_one_device():
    code, out, _ = run()
    assert code == 0, out
    assert "2 processes × 4 CPU devices, mesh {'data': 2, 'vocab': 4}" in out, out
    assert "all checks equal one device to 1e-05 on 2 processes" in out, out
    assert "FAIL" not in out, out
    # The vocab-parallel loss moves [tokens] vectors and gradients, never the kernel or logits.
    assert "collectives: 1× all-reduce" in out and "all-gather" not in out, out
    for name in (
        "data-parallel nll_stats + psum",
        "vocab-parallel linear_cross_entropy",
        "vocab-parallel sequence_nll",
        "plain jit, LinearLogits on sharded arrays",  # Auto and Explicit axes, no shard_map
        "Flax NNX + optax training step",
    ):
        assert f"ok   {name}:" in out, out
    for name in ("token_stats", "distillation_loss"):  # run wherever jxent has them
        assert f"ok   vocab-parallel {name}:" in out or f"jxent.{name} is not in" in out, out


def test_a_dead_process_is_named_and_the_others_stopped():
    code, out, seconds = run("--crash-process", "1", timeout=60)
    assert code != 0, out
    assert "process 1 died (killed by SIGKILL) before the run finished; stopping [0]" in out, out
    assert "all checks equal" not in out, out
    assert seconds < 50, f"took {seconds:.0f} s to notice:\n{out}"


def test_mismatched_local_devices_are_refused():
    code, out, _ = run("--local-devices", "4,2", timeout=60)
    assert code != 0, out
    assert "processes have different numbers of local devices (process 0: 4, process 1: 2)" in out
    assert "ok   " not in out, out


def test_uneven_vocabulary_gets_shard_maps_error():
    """The same error as in one process (``tests/test_mesh.py``'s ``errors`` check)."""
    code, out, _ = run("--vocab", "30", timeout=60)
    assert code != 0, out
    assert (
        "FAIL vocab-parallel linear_cross_entropy: ValueError: shard_map applied to the function"
        in out
    ), out
    assert (
        "maps array axis 1 (of size 30) to mesh axis 'vocab' (of size 4), "
        "but 4 does not evenly divide 30" in out
    ), out


def test_the_comparison_can_fail():
    """The error measure sees a 2e-5 relative difference in any leaf (here on one device)."""
    spec = importlib.util.spec_from_file_location("multiprocess_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclass looks itself up there
    spec.loader.exec_module(example)

    rt = object.__new__(example.Runtime)
    rt.jax = jax
    want = (np.float32(3.0), np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    got = jax.tree.map(jnp.asarray, want)
    assert rt.error(got, want) == 0.0
    worse = (got[0], got[1].at[2, 1].add(2e-5))
    assert rt.error(worse, want) > example.TOL
