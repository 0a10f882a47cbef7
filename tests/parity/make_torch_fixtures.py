"""Golden PyTorch fixtures for ``jxent.softmax_cross_entropy``.

Run from the repository root with torch 2.13 installed::

    python tests/parity/make_torch_fixtures.py

It writes ``tests/parity/torch_cross_entropy.npz``: seeded cases with their
inputs, options, and what ``torch.nn.functional.cross_entropy`` returns for
them -- the value and the gradient with respect to the logits of ``loss``
(``"mean"``/``"sum"``) or of ``<loss, cotangent>`` (``"none"``, with a seeded
random cotangent). Everything is float32, as users train.

The cases come in groups: a group shares its options and shapes and holds
``STACK`` independently drawn cases stacked along a new leading axis, so the
test compiles once per group (XLA compilation, not arithmetic, is what a
parity test of tiny arrays spends its time on). The groups are a design, not
a sample: every layout (``[N, C]`` with ``axis=-1`` and ``axis=1``,
``[N, C, d1, d2]`` with ``axis=1``, one class, one example, unbatched ``[C]``
logits with a scalar target) meets every reduction with and without class
weights, for integer targets (some ignored) and probability targets (some not
normalised, some with zero entries); label smoothing 0, 0.1 and 1.0 meets
every ``ignore_index`` variant (-100, 3, -1, ``None``) with and without
weights.

The same functions draw the fresh cases of the live differential test in
``test_torch_parity.py``; torch is imported only inside them, so this module
imports (and pytest collects it) where torch is absent.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).with_name("torch_cross_entropy.npz")
SEED = 20261129
STACK = 4  # cases per group of the fixture

LAYOUTS = ("rows", "rows_axis1", "kdim", "single_class", "single_example", "unbatched")
REDUCTIONS = ("mean", "sum", "none")
SMOOTHINGS = (0.0, 0.1, 1.0)
# jxent's ignore_index; torch gets -100 for None, with no target equal to it.
IGNORE_INDICES = (-100, 3, -1, None)
ARRAYS = ("logits", "targets", "class_weights", "cotangent", "value", "grad")


def _shape(layout: str, rng: np.random.Generator) -> tuple[tuple[int, ...], int]:
    """(logits shape, jxent axis) of a layout, sizes drawn small."""
    n = int(rng.integers(2, 9))
    c = int(rng.integers(2, 8))
    if layout == "rows":
        return (n, c), -1
    if layout == "rows_axis1":
        return (n, c), 1
    if layout == "kdim":
        n = int(rng.integers(1, 4))
        return (n, c, int(rng.integers(1, 4)), int(rng.integers(1, 4))), 1
    if layout == "single_class":
        return (n, 1), -1
    if layout == "single_example":
        return (1, c), -1
    if layout == "unbatched":
        return (c,), int(rng.choice([-1, 0]))
    raise ValueError(f"unknown layout {layout!r}")


def _one_case(rng, shape, reduction, weighted, probability, ignore_index) -> dict:
    class_axis = 0 if len(shape) == 1 else 1
    num_classes = shape[class_axis]
    position_shape = shape[:class_axis] + shape[class_axis + 1 :]
    scale = float(rng.choice([1.0, 4.0]))
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    if probability:
        probs = rng.dirichlet(np.ones(num_classes), size=position_shape)
        probs = np.moveaxis(probs, -1, class_axis)
        if num_classes > 2:
            # Some exact zeros, then renormalise: 0 · log p must be 0.
            probs = np.where(rng.random(shape) < 0.3, 0.0, probs)
            probs = probs / np.maximum(probs.sum(class_axis, keepdims=True), 1e-12)
        if rng.random() < 0.25:
            probs = probs * rng.uniform(0.5, 2.0)  # not normalised: torch allows it
        targets = probs.astype(np.float32)
    else:
        targets = np.array(rng.integers(0, num_classes, size=position_shape))
        if ignore_index is not None:
            targets[rng.random(position_shape) < 0.3] = ignore_index
            if targets.size > 1 and not np.any(targets == ignore_index):
                targets.reshape(-1)[rng.integers(targets.size)] = ignore_index
            # Keep one position counted so that torch's mean is not NaN.
            if reduction == "mean" and np.all(targets == ignore_index):
                valid = [c for c in range(num_classes) if c != ignore_index]
                targets.reshape(-1)[0] = rng.choice(valid)
        targets = targets.astype(np.int64)
    weights = rng.uniform(0.2, 2.0, num_classes).astype(np.float32) if weighted else None
    cotangent = (
        rng.standard_normal(position_shape).astype(np.float32)
        if reduction == "none"
        else np.ones((), np.float32)
    )
    return {"logits": logits, "targets": targets, "class_weights": weights, "cotangent": cotangent}


def draw_group(
    rng: np.random.Generator,
    *,
    layout: str,
    reduction: str,
    weighted: bool,
    label_smoothing: float,
    probability: bool,
    ignore_index: int | None,
    stack: int = STACK,
) -> dict:
    """``stack`` cases sharing options and shapes, stacked along a new axis 0.

    Probability targets take ``ignore_index`` -100 (the default) or ``None``
    at random: both mean "no ignoring" there.
    """
    shape, axis = _shape(layout, rng)
    if probability:
        ignore_index = None if rng.random() < 0.5 else -100
    cases = [
        _one_case(rng, shape, reduction, weighted, probability, ignore_index) for _ in range(stack)
    ]
    group = {
        name: None if cases[0][name] is None else np.stack([c[name] for c in cases])
        for name in cases[0]
    }
    group["options"] = {
        "layout": layout,
        "axis": axis,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "ignore_index": ignore_index,
        "probability": probability,
    }
    return group


def unstack(group: dict, i: int) -> dict:
    """Case ``i`` of a group, with the group's options."""
    case = {k: v if k == "options" or v is None else v[i] for k, v in group.items()}
    return case


def torch_reference(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """``F.cross_entropy`` value and the vector-Jacobian product with the cotangent."""
    import torch
    import torch.nn.functional as F

    opts = case["options"]
    logits = torch.tensor(case["logits"], dtype=torch.float32, requires_grad=True)
    targets = torch.from_numpy(np.array(case["targets"]))
    weight = case["class_weights"]
    loss = F.cross_entropy(
        logits,
        targets,
        weight=None if weight is None else torch.from_numpy(np.array(weight)),
        ignore_index=-100 if opts["ignore_index"] is None else opts["ignore_index"],
        reduction=opts["reduction"],
        label_smoothing=opts["label_smoothing"],
    )
    loss.backward(torch.from_numpy(np.array(case["cotangent"])))
    return loss.detach().numpy().astype(np.float32), logits.grad.numpy().astype(np.float32)


def torch_reference_group(group: dict) -> tuple[np.ndarray, np.ndarray]:
    """:func:`torch_reference` of every case of a group, stacked."""
    refs = [torch_reference(unstack(group, i)) for i in range(len(group["logits"]))]
    return np.stack([v for v, _ in refs]), np.stack([g for _, g in refs])


def grid_groups(seed: int) -> list[dict]:
    """The fixture's design: 72 groups of :data:`STACK` cases.

    Each (layout, reduction, weighted) triple -- 36 of them -- gets a group
    with integer targets and a group with probability targets. The integer
    groups walk through the 12 (label_smoothing, ignore_index) pairs so that
    each pair meets both weighted and unweighted, and each ``ignore_index``
    meets every reduction; the probability groups walk through the smoothings
    so that each meets both weighted and unweighted.
    """
    rng = np.random.default_rng(seed)
    groups = []
    grid = itertools.product(LAYOUTS, REDUCTIONS, (False, True))
    for k, (layout, reduction, weighted) in enumerate(grid):
        m = (k // 2) % 12
        common = {"layout": layout, "reduction": reduction, "weighted": weighted}
        groups.append(
            draw_group(
                rng,
                **common,
                label_smoothing=SMOOTHINGS[m // 4],
                probability=False,
                ignore_index=IGNORE_INDICES[m % 4],
            )
        )
        groups.append(
            draw_group(
                rng,
                **common,
                label_smoothing=SMOOTHINGS[k % 3],
                probability=True,
                ignore_index=None,
            )
        )
    return groups


def random_cases(seed: int, count: int) -> list[dict]:
    """Fresh single cases with every option drawn at random (the live differential test)."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        group = draw_group(
            rng,
            layout=str(rng.choice(LAYOUTS)),
            reduction=str(rng.choice(REDUCTIONS)),
            weighted=bool(rng.random() < 0.5),
            label_smoothing=float(rng.choice([0.0, 0.1, 1.0, round(rng.random(), 3)])),
            probability=bool(rng.random() < 0.3),
            ignore_index=IGNORE_INDICES[int(rng.integers(len(IGNORE_INDICES)))],
            stack=1,
        )
        cases.append(unstack(group, 0))
    return cases


def save(groups: list[dict], path: Path = FIXTURE) -> None:
    """One compressed .npz: arrays under ``g{i:03d}_{name}``, options as one JSON string."""
    import torch

    arrays = {}
    for i, group in enumerate(groups):
        for name in ARRAYS:
            if group.get(name) is not None:
                arrays[f"g{i:03d}_{name}"] = np.asarray(group[name])
    meta = {
        "torch_version": torch.__version__,
        "seed": SEED,
        "stack": STACK,
        "options": [group["options"] for group in groups],
    }
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)


def load(path: Path = FIXTURE) -> tuple[dict, list[dict]]:
    """(metadata, groups) of a fixture written by :func:`save`."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        groups = []
        for i, options in enumerate(meta["options"]):
            group = {"options": options}
            for name in ARRAYS:
                key = f"g{i:03d}_{name}"
                group[name] = data[key] if key in data else None
            groups.append(group)
    return meta, groups


def main() -> None:
    groups = grid_groups(SEED)
    for group in groups:
        group["value"], group["grad"] = torch_reference_group(group)
        if not (np.all(np.isfinite(group["value"])) and np.all(np.isfinite(group["grad"]))):
            raise AssertionError(f"torch gave a non-finite reference for {group['options']}")
    save(groups)
    cases = sum(len(g["logits"]) for g in groups)
    size = FIXTURE.stat().st_size
    print(f"wrote {len(groups)} groups, {cases} cases, to {FIXTURE} ({size} bytes)")


if __name__ == "__main__":
    main()
