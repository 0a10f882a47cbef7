"""Strict mode for the whole suite: no silent rank promotion, seeded randomness.

The quick tier, ``pytest -m "not slow"`` (about a minute on 2 cores), leaves
out the tests marked ``@pytest.mark.slow`` where they are defined (any test
over about a second: subprocesses and simulated meshes, notebooks, trained
models, sweeps of the fused engine, numerical gradient checks) and the
doctests; ``pytest`` (what CI runs) runs everything. Measure the tiers with
``pytest -m "not slow" --durations=20``.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


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
