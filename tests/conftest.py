"""Strict mode for the whole suite: no silent rank promotion, seeded randomness.

The quick tier, ``pytest -m "not slow"``, leaves out the tests marked
``@pytest.mark.slow`` where they are defined (subprocesses and simulated
meshes, notebooks, trained models, per-configuration sweeps of the fused
engine, numerical gradient checks); ``pytest`` (what CI runs) runs everything.
Measure the tiers with ``pytest -m "not slow" --durations=20``.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator, fresh for every test."""
    return np.random.default_rng(20261129)
