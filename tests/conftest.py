"""Strict mode for the whole suite: no silent rank promotion, seeded randomness."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator, fresh for every test."""
    return np.random.default_rng(20261129)
