"""Strict mode for the whole suite, eight simulated devices, seeded randomness.

Every test process has 8 CPU devices (``--xla_force_host_platform_device_count``),
so the multi-device checks are ordinary tests in the same process as the rest;
a single-device computation runs on the first device as before. Programs are
compiled with LLVM's quick setting (most tests compile more than they compute);
the few that compute a lot use ``jxent._testing.OPTIMIZED``. The flag is
set here, before the backend starts, and taken out of the environment again so
that subprocesses (notebook kernels, examples) start as a user's would.

The quick tier, ``pytest -m "not slow"``, leaves out the tests marked
``@pytest.mark.slow`` where they are defined and the doctests; ``pytest`` runs
everything. Measure with ``pytest --durations=20``.
"""

import os

DEVICES = 8
# Small programs compile faster with LLVM's quick setting (the HLO, and so every
# shape and collective, is the same; a value can differ in its last float32 digit,
# so a program whose printed output is quoted in the docs runs in a subprocess);
# a test that computes more than it compiles asks for full optimisation:
# jax.jit(f, compiler_options=OPTIMIZED).
QUICK_LLVM = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = (
    f"{_flags} --xla_force_host_platform_device_count={DEVICES} {QUICK_LLVM}".strip()
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
assert jax.device_count() == DEVICES, (
    f"the suite needs {DEVICES} CPU devices, found {jax.device_count()}: "
    "was the backend started before tests/conftest.py set XLA_FLAGS?"
)
if _flags:
    os.environ["XLA_FLAGS"] = _flags
else:
    del os.environ["XLA_FLAGS"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The doctests are documentation: checked in the full tier, not the quick one."""
    for item in items:
        if isinstance(item, pytest.DoctestItem):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator, fresh for every test."""
    return np.random.default_rng(20261129)

