"""jxent on JAX's multi-process runtime, with real OS processes.

``examples/multiprocess.py`` runs as a user runs it, and prints what
docs/distributed.md quotes. ``tests/_multiprocess_checks.py`` launches 2
processes × 4 CPU devices joined by ``jax.distributed.initialize`` (gloo
collectives, a coordinator on a free localhost port) and compares every mesh
result with one device, to 1e-5 relative; with its fault options, a dead
process is named, mismatched devices are refused and an uneven vocabulary gets
``shard_map``'s error. Each run here starts the launcher in its own process
group, so a timeout kills and reaps the launcher and every process it started,
and each test checks that none is left behind.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _quoted import assert_quoted

pytestmark = pytest.mark.slow  # every test here starts processes or trains models

EXAMPLE = Path(__file__).parents[1] / "examples" / "multiprocess.py"
CHECKS = Path(__file__).parent / "_multiprocess_checks.py"
# Faster compilation of the same programs (the LLVM passes only; the HLO is the same).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run(*args: str, timeout: float = 90) -> tuple[int, str, float]:
    """``(exit code, output, seconds)`` of the checks; every process is reaped, even on timeout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    command = [str(CHECKS), "--timeout", str(timeout - 10), *args]
    code, out, _, seconds = launch(command, env, timeout, stderr=subprocess.STDOUT)
    return code, out, seconds


def launch(command: list[str], env: dict, timeout: float, stderr) -> tuple[int, str, str, float]:
    """``python command`` in its own process group: ``(exit code, stdout, stderr, seconds)``."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,  # its own process group: the launcher and its children
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{command[0]} hung for {timeout} s; killed it:\n{out}\n{err}")
    finally:
        left = alive(proc.pid)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind by the launcher:\n{out}\n{err}"
    return proc.returncode, out, err, time.monotonic() - start


def alive(group: int) -> bool:
    """Whether any process of the group is still running (zombies excepted), after a moment."""
    for _ in range(20):
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def test_the_example_prints_what_the_docs_quote():
    """As a user runs it (no test flags); docs/distributed.md quotes its output."""
    code, out, err, _ = launch([str(EXAMPLE)], dict(os.environ), 120, stderr=subprocess.PIPE)
    assert code == 0, out + err
    assert "[Gloo]" not in out  # gloo's connection lines go to stderr, never inside ours
    assert_quoted("python examples/multiprocess.py", out)


def test_two_processes_match_one_device():
    code, out, _ = run()
    assert code == 0, out
    assert "2 processes × 4 CPU devices, mesh {'data': 2, 'vocab': 4}" in out, out
    assert "all checks equal one device to 1e-05 on 2 processes" in out, out
    assert "FAIL" not in out, out
    # The vocab-parallel loss moves [tokens] vectors and gradients, never the kernel or logits:
    # docs/distributed.md ("What crosses the network per step") explains each of these.
    assert "all-gather" not in out, out
    assert (
        "collectives: 1× all-reduce f32[24,1] (in a loop); 1× all-reduce f32[24] (in a loop); "
        "1× all-reduce f32[24], f32[24] (in a loop); 1× all-reduce f32[32,64], f32[64]; "
        "1× all-reduce f32[64,32]; 1× all-reduce f32[], f32[]; max rel. error" in out
    ), out
    # The exact token mean and the mean of per-shard means, as docs/distributed.md quotes them.
    mean, mean_of_means = map(float, re.search(
        r"token mean (\S+) over 60 tokens \(the mean of per-shard means would be (\S+)\)", out
    ).groups())
    assert (round(mean, 3), round(mean_of_means, 3)) == (9.210, 8.746), out
    for name in (
        "data-parallel nll_stats + psum",
        "vocab-parallel linear_cross_entropy",
        "vocab-parallel sequence_nll",
        "vocab-parallel token_stats",
        "vocab-parallel distillation_loss",
        "plain jit, LinearLogits on sharded arrays",  # Auto and Explicit axes, no shard_map
        "Flax NNX + optax training step",
    ):
        assert f"ok   {name}:" in out, out


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
    code, out, _ = run("--vocab", "30", "--only", "linear_cross_entropy", timeout=60)
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
    spec = importlib.util.spec_from_file_location("_multiprocess_checks", CHECKS)
    checks = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = checks  # its dataclass looks itself up there
    spec.loader.exec_module(checks)

    rt = object.__new__(checks.Runtime)
    want = (np.float32(3.0), np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    got = jax.tree.map(jnp.asarray, want)
    assert rt.error(got, want) == 0.0
    worse = (got[0], got[1].at[2, 1].add(2e-5))
    assert rt.error(worse, want) > checks.TOL
