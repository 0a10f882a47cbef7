"""``softmax_cross_entropy`` against ``torch.nn.functional.cross_entropy``.

Two sources of truth: the committed golden fixture (written by
``make_torch_fixtures.py`` with torch 2.13, so parity is checked where torch is
absent), and torch itself on fresh seeded cases when it is importable. Values
and gradients with respect to the logits, float32, under ``jax.jit``, to 1e-5.

A fixture group is checked in one compiled call, ``jit(vmap(case))``, since
compiling -- not computing -- is what costs time here; the unbatched path
``jit(case)`` is checked on one group per layout and on every live case.
"""

from __future__ import annotations

import collections
import itertools

import jax
import numpy as np
import pytest
from make_torch_fixtures import (
    FIXTURE,
    IGNORE_INDICES,
    LAYOUTS,
    REDUCTIONS,
    SEED,
    SMOOTHINGS,
    grid_groups,
    load,
    random_cases,
    torch_reference,
    torch_reference_group,
    unstack,
)

import jxent

TOL = 1e-5
META, GROUPS = load()


def group_id(group: dict) -> str:
    o = group["options"]
    targets = "prob" if o["probability"] else f"int-ignore{o['ignore_index']}"
    weights = "-weighted" if group["class_weights"] is not None else ""
    return f"{o['layout']}-{o['reduction']}-{targets}-ls{o['label_smoothing']}{weights}"


def value_and_vjp(options: dict):
    """``(logits, targets, class_weights, cotangent) -> (value, vjp)`` for one case."""

    def run(logits, targets, class_weights, cotangent):
        def loss(x):
            return jxent.softmax_cross_entropy(
                x,
                targets,
                axis=options["axis"],
                ignore_index=options["ignore_index"],
                class_weights=class_weights,
                label_smoothing=options["label_smoothing"],
                reduction=options["reduction"],
            )

        value, vjp = jax.vjp(loss, logits)
        return value, vjp(cotangent)[0]

    return run


def jxent_outputs(case: dict, *, stacked: bool):
    """jxent's value and gradient for one case, or for a stacked group (vmapped)."""
    run = value_and_vjp(case["options"])
    if stacked:
        run = jax.vmap(run)
    targets = case["targets"]
    if not case["options"]["probability"]:
        targets = targets.astype(np.int32)  # small values; jax's default integer type
    value, grad = jax.jit(run)(case["logits"], targets, case["class_weights"], case["cotangent"])
    return np.asarray(value), np.asarray(grad)


def assert_matches(jx_value, jx_grad, value, grad) -> None:
    assert jx_value.dtype == np.float32 and jx_value.shape == value.shape
    np.testing.assert_allclose(jx_value, value, rtol=TOL, atol=TOL, err_msg="value")
    assert jx_grad.dtype == np.float32 and jx_grad.shape == grad.shape
    np.testing.assert_allclose(jx_grad, grad, rtol=TOL, atol=TOL, err_msg="gradient")


@pytest.mark.parametrize("group", [
    # The first group in the quick tier, the others in the full one.
    pytest.param(g, id=group_id(g), marks=() if i == 0 else pytest.mark.slow)
    for i, g in enumerate(GROUPS)
])
def test_fixture_group(group):
    assert_matches(*jxent_outputs(group, stacked=True), group["value"], group["grad"])


FIRST_OF_EACH_LAYOUT = [
    next(g for g in GROUPS if g["options"]["layout"] == layout) for layout in LAYOUTS
]


@pytest.mark.slow
@pytest.mark.parametrize("group", FIRST_OF_EACH_LAYOUT, ids=LAYOUTS)
def test_fixture_unbatched_path(group):
    """A case without vmap: its own jitted call."""
    case = unstack(group, 0)
    assert_matches(*jxent_outputs(case, stacked=False), case["value"], case["grad"])


def test_fixture_is_small_and_covers_the_design():
    """The fixture holds what the issue asks for, so losing a case cannot go unnoticed."""
    assert META["torch_version"].startswith("2.13")
    assert FIXTURE.stat().st_size < 1_000_000
    assert sum(len(g["logits"]) for g in GROUPS) >= 200
    seen = collections.Counter()
    for g in GROUPS:
        o = g["options"]
        weighted = g["class_weights"] is not None
        kind = "prob" if o["probability"] else "int"
        seen[(o["layout"], o["reduction"], weighted, kind)] += 1
        seen[(kind, weighted, o["label_smoothing"])] += 1
        if not o["probability"]:
            ignored = o["ignore_index"] is not None and np.any(g["targets"] == o["ignore_index"])
            seen[(o["ignore_index"], weighted, o["label_smoothing"], bool(ignored))] += 1
            seen[(o["ignore_index"], o["reduction"])] += 1
    for layout, reduction, weighted in itertools.product(LAYOUTS, REDUCTIONS, (False, True)):
        for kind in ("int", "prob"):
            assert seen[(layout, reduction, weighted, kind)] == 1
    for kind, weighted, ls in itertools.product(("int", "prob"), (False, True), SMOOTHINGS):
        assert seen[(kind, weighted, ls)] >= 1
    for ignore_index, weighted, ls in itertools.product(IGNORE_INDICES, (False, True), SMOOTHINGS):
        # Ignored targets really present (None: nothing may be ignored).
        key = (ignore_index, weighted, ls, ignore_index is not None)
        assert seen[key] >= 1, key
    for ignore_index, reduction in itertools.product(IGNORE_INDICES, REDUCTIONS):
        assert seen[(ignore_index, reduction)] >= 1
    shapes = {g["options"]["layout"]: g["logits"].shape[1:] for g in GROUPS}
    assert len(shapes["kdim"]) == 4 and shapes["single_class"][1] == 1
    assert shapes["single_example"][0] == 1 and len(shapes["unbatched"]) == 1
    for g in GROUPS:
        if g["options"]["layout"] == "unbatched":  # scalar targets, as torch allows
            assert g["targets"].ndim == (2 if g["options"]["probability"] else 1)


@pytest.mark.slow
def test_fixture_is_what_the_generator_writes():
    """Regenerating with the installed torch reproduces the committed fixture."""
    pytest.importorskip("torch")
    fresh = grid_groups(SEED)
    assert len(fresh) == len(GROUPS)
    for new, old in zip(fresh, GROUPS, strict=True):
        assert new["options"] == old["options"]
        for name in ("logits", "targets", "class_weights", "cotangent"):
            np.testing.assert_array_equal(new[name], old[name])
        value, grad = torch_reference_group(new)
        np.testing.assert_allclose(value, old["value"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grad, old["grad"], rtol=1e-6, atol=1e-6)


LIVE_CASES = random_cases(SEED + 1, 16)


@pytest.mark.slow
@pytest.mark.parametrize("case", LIVE_CASES, ids=[group_id(c) for c in LIVE_CASES])
def test_live_against_torch(case):
    """Fresh seeded cases with random options (any smoothing in [0, 1]), against torch."""
    pytest.importorskip("torch")
    assert_matches(*jxent_outputs(case, stacked=False), *torch_reference(case))
