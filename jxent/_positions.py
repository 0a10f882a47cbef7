"""Preparing the positions: the second of the four steps of each public function.

Here, once per call, targets are lined up with the positions that predict
them: ``shift``, masks (``where``, ``ignore_index``, ``segment_ids``), token
weights, range checks and every shape error. The builders are
:func:`class_targets` (``softmax_cross_entropy``), :func:`token_targets`
(the token functions) and :func:`chosen_ids` (``class_log_probs``), with
two builders of rows that need the positions first: :func:`teacher_rows`
(a distillation teacher, dense or stored) and :func:`objective_rows`
(``token_objective``'s ``args`` and ``fn``). The result is a
:class:`Positions` record whose arrays all have the logits' positions shape
(``logits.shape[:-1]``, or without ``axis``); the cores downstream hold math
only and never check anything. The value checks they share live in
``jxent._checks``.

A shift of ``k`` moves the *targets*, not the logits: position ``t`` is scored
against ``tokens[..., t + k]`` and the last ``k`` positions are not counted.
The logits (dense or :class:`~jxent.LinearLogits`) are never sliced or copied,
and per-position outputs are trimmed to ``[..., T − k]`` at the end.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import (
    as_integer_ids,
    boolean_mask,
    check_axis,
    check_class_range,
    class_index,
    class_weight_array,
    float_dtype,
    float_logits,
    in_class_range,
    integer_ids,
    is_concrete,
    one_value_per_position,
    position_array,
    predicted_args,
    stored_entries,
    target_shape_error,
)
from ._engine._sharding import shift_left, whole_last_axis
from ._logits import LinearLogits
from ._options import nan_if_invalid
from ._topk import TopK
from ._vocab import ClassOps


class Positions(NamedTuple):
    """Targets and masks aligned with the logits' positions ``P`` (no checks left to do).

    Attributes:
      targets: int32 ``[P]``: the class id where counted and in range,
        ``num_classes`` where counted and out of range (the cores give NaN),
        0 elsewhere; or floating probability targets ``[P..., V]``; or int32
        ``[P, k]`` chosen ids (:func:`chosen_ids`); or None.
      counted: bool ``[P]``.
      weights: float ``[P]`` per-token weights, 0 where not counted; or None.
      segments: int ``[P]`` the document id of each predicting position; or None.
      length: per-position outputs keep ``[..., :length]`` of the last
        position axis (``T − k`` for a shift of ``k``); None keeps all.
      axis: the class axis, counted from the end (the same axis in a chunk ``[C, V]``).
      class_weights: ``[V]`` real (this shard's ``[V / k]`` when sharded), or None.
    """

    targets: Any
    counted: jax.Array
    weights: jax.Array | None = None
    segments: jax.Array | None = None
    length: int | None = None
    axis: int = -1
    class_weights: jax.Array | None = None

    def trim(self, out):
        """Per-position outputs (a pytree of ``[P]`` arrays) cut to the predicted positions."""
        if self.length is None:
            return out
        return jax.tree.map(lambda x: whole_last_axis(x)[..., : self.length], out)

    def untrim(self, x: jax.Array) -> jax.Array:
        """An array of the predicted positions ``[..., T − k]`` padded with 0 to ``[..., T]``."""
        full = self.counted.shape[-1]
        if self.length is None or x.shape[-1] == full:
            return x
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, full - x.shape[-1])])


def as_logits(logits: Any, name: str = "logits"):
    """A :class:`LinearLogits` as it is, anything else as a floating array with a class axis."""
    return logits if isinstance(logits, LinearLogits) else float_logits(logits, name)


# --------------------------------------------------------------------------- checks


def position_mask(where: Any, shape: tuple[int, ...], marks: str) -> jax.Array:
    """``where`` checked as a boolean mask of exactly ``shape`` (a loss mask marks whole
    positions); all True when it is None."""
    if where is None:
        return jnp.ones(shape, bool)
    where = boolean_mask(where)
    if where.shape != tuple(shape):
        raise ValueError(f"where has shape {where.shape} but {marks.format(tuple(shape))}")
    return where


def _class_weights(weights: Any, logits, num_local: int, sharded: bool) -> jax.Array | None:
    """``class_weights`` as a ``[V]`` real array (this shard's ``[V / k]`` when sharded)."""
    of = "kernel" if isinstance(logits, LinearLogits) else "logits"
    return class_weight_array(weights, num_local, f"this shard of {of}" if sharded else of)


def _class_index(targets, counted, num_classes: int, ignore_index, check: bool, name: str):
    """``(index, counted)``: ids turned into a gather index, ``ignore_index`` into the mask.

    Comparisons run in the targets' own dtype (no wrap-around of large or
    negative values). Out-of-range counted ids raise ``ValueError`` when
    ``check`` and the values are concrete; otherwise their index is
    ``num_classes`` (one past the end: a gather in ``"fill"`` mode gives NaN
    and ``checkify`` flags it), never a wrapped class.
    """
    info = jnp.iinfo(targets.dtype)
    if ignore_index is not None and info.min <= ignore_index <= info.max:
        counted = counted & (targets != jnp.asarray(ignore_index, targets.dtype))
    in_range = in_class_range(targets, num_classes)
    hint = "" if ignore_index is None else f" or ignore_index={ignore_index}"
    check_class_range(targets, in_range, counted, num_classes, name, check=check, hint=hint)
    return jnp.where(counted, class_index(targets, in_range, num_classes), 0), counted


def _num_classes(num_local: int, vocab_axis_name) -> int:
    return ClassOps(-1, vocab_axis_name, num_local).num_classes


# --------------------------------------------------------------------------- classes


def _linear_targets(logits: LinearLogits, targets, axis) -> None:
    """What :class:`LinearLogits` allows: classes last, integer targets of its positions."""
    if axis not in (-1, logits.ndim - 1):
        raise ValueError(
            f"LinearLogits has its classes on the last axis; axis must be -1, got axis={axis}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(
            f"targets must be integer class ids with LinearLogits, got dtype "
            f"{targets.dtype}; probability targets would be the [tokens, vocab] array "
            "that LinearLogits avoids"
        )
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets has shape {targets.shape} but LinearLogits with hidden "
            f"{tuple(logits.hidden.shape)} expects {logits.shape[:-1]} (hidden.shape[:-1])"
        )


def _class_axis(logits, targets, axis) -> int:
    """The class axis, non-negative, checked against the logits: the one place it is."""
    if isinstance(logits, LinearLogits):
        _linear_targets(logits, targets, axis)
    shape = tuple(logits.shape)
    normal = check_axis(axis, len(shape))
    if shape[normal] == 0:
        raise ValueError(
            f"logits has shape {shape}: 0 classes along axis={axis}; a distribution "
            "needs at least one class"
        )
    return normal


def _probabilities(targets, logits, ignore_index, axis: int, given_axis: int, position_shape):
    """Floating targets checked (the logits' shape, no ``ignore_index``), in the core's dtype."""
    shape = tuple(logits.shape)
    if not jnp.issubdtype(targets.dtype, jnp.floating):
        raise TypeError(
            "targets must be integer class indices or floating probabilities, got dtype "
            f"{targets.dtype}"
        )
    if ignore_index not in (None, -100):
        raise ValueError(
            f"ignore_index={ignore_index} cannot be used with probability targets "
            f"(floating dtype {targets.dtype}); use where= to mask positions"
        )
    if targets.shape != shape:
        raise target_shape_error(targets, shape, axis, given_axis, position_shape)
    return targets.astype(float_dtype(logits.dtype, targets.dtype))


def class_targets(logits, targets, *, axis, where, ignore_index, class_weights, vocab_axis_name):
    """``softmax_cross_entropy``'s positions: ``(logits, Positions)`` for class targets.

    Every array check of the call is here: the logits, the class ``axis``,
    the targets (integer ids give a gather index; floating targets, dense
    logits only, come back as probabilities in the computation's dtype),
    ``where`` and ``class_weights``; ``ignore_index`` (parsed with the
    options) becomes part of the mask.
    """
    logits = as_logits(logits)
    targets = as_integer_ids(targets, "targets")
    shape = tuple(logits.shape)
    normal = _class_axis(logits, targets, axis)
    position_shape = shape[:normal] + shape[normal + 1 :]
    counted = position_mask(
        where, position_shape,
        "the targets' positions have shape {}; a loss mask marks whole positions",
    )
    if jnp.issubdtype(targets.dtype, jnp.integer):
        if targets.shape != position_shape:
            raise target_shape_error(targets, shape, normal, axis, position_shape)
        index, counted = _class_index(
            targets, counted, _num_classes(shape[normal], vocab_axis_name), ignore_index,
            vocab_axis_name is None, "targets",
        )
    else:
        index = _probabilities(targets, logits, ignore_index, normal, axis, position_shape)
    weights = _class_weights(class_weights, logits, shape[normal], vocab_axis_name is not None)
    return logits, Positions(index, counted, axis=normal - len(shape), class_weights=weights)


# --------------------------------------------------------------------------- tokens


def _token_weights(weights, shape, function: str):
    """``weights [..., T]`` checked: finite and ``>= 0`` (NaN under ``jit`` where not)."""
    weights = position_array(weights, shape, "weights", "floating", function)
    if weights is None:
        return None
    requirement = "weights must be finite and >= 0"
    if not is_concrete(weights):  # traced: an invalid weight makes its position's loss NaN
        return nan_if_invalid(weights, jnp.isfinite(weights) & (weights >= 0), requirement)
    w = np.asarray(weights)
    bad = ~(np.isfinite(w) & (w >= 0))
    if bad.any():
        raise ValueError(f"{requirement}, got {float(w[bad][0])}")
    return weights


def _predicting(position_shape, shift: int, where, segment_ids):
    """``(counted, length)`` before the targets: the shift, the checked ``where`` and the
    documents applied."""
    counted, length = jnp.ones(position_shape, bool), None
    if shift:
        length = max(position_shape[-1] - shift, 0)
        counted = jnp.broadcast_to(jnp.arange(position_shape[-1]) < length, position_shape)
    if where is not None:
        counted = counted & shift_left(where, shift, False)
    if segment_ids is not None:
        counted = counted & (shift_left(segment_ids, shift, 0) == segment_ids)
    return counted, length


def token_targets(
    logits,
    tokens,
    *,
    shift: int,
    where,
    ignore_index,
    function: str,
    vocab_axis_name=None,
    segment_ids=None,
    weights=None,
    class_weights=None,
    name: str = "tokens",
    logits_name: str = "logits",
    sequence: bool = True,
):
    """The token functions' positions: ``(logits, Positions)`` for ``logits [..., T, V]``
    scored against ``tokens [..., T]``; every array check of the call is here.

    With a shift of ``k``, position ``t`` predicts ``tokens[..., t + k]`` and
    is counted when ``where`` and ``ignore_index`` count that target and,
    with ``segment_ids``, when ``segment_ids[t] == segment_ids[t + k]`` (no
    position predicts across a document boundary). ``where`` and ``weights``
    are aligned with ``tokens`` and move with them. ``tokens=None``
    (distillation without hard targets) counts every position ``where``
    allows. ``shift`` and ``ignore_index`` come parsed, from the options
    record. ``sequence=False`` accepts logits ``[..., V]`` with any number of
    position axes (none included) when there is no shift.
    """
    logits = as_logits(logits, logits_name)
    shape = tuple(logits.shape)
    if len(shape) < 2 and (sequence or shift):
        raise ValueError(
            f"logits must have shape [..., T, V] (at least 2 dimensions), got {shape}"
        )
    position_shape = shape[:-1]
    if tokens is not None:
        tokens = integer_ids(tokens, name, function, "token ids")
        if tokens.shape != position_shape:
            raise ValueError(
                f"{name} has shape {tokens.shape} but logits {shape} expects {position_shape} "
                "([..., T] for logits [..., T, V])"
            )
    if where is not None:
        where = position_mask(
            where, position_shape,
            "tokens has shape {}; the loss mask marks token positions [..., T]",
        )
    segment_ids = position_array(segment_ids, position_shape, "segment_ids", "integer", function)
    weights = _token_weights(weights, position_shape, function)
    counted, length = _predicting(position_shape, shift, where, segment_ids)
    index = None
    if tokens is not None:
        index, counted = _class_index(
            shift_left(tokens, shift, 0), counted, _num_classes(shape[-1], vocab_axis_name),
            ignore_index, vocab_axis_name is None, name,
        )
    if weights is not None:
        dtype = float_dtype(logits.dtype, weights.dtype)
        weights = jnp.where(counted, shift_left(weights, shift, 0).astype(dtype), 0)
    class_weights = _class_weights(
        class_weights, logits, shape[-1], vocab_axis_name is not None
    )
    return logits, Positions(index, counted, weights, segment_ids, length,
                             class_weights=class_weights)


def chosen_ids(logits, ids, *, where, vocab_axis_name):
    """``class_log_probs``' positions: ``(logits, Positions)`` with ``k`` ids per position.

    ``Positions.targets`` is int32 ``[P, k]``: the ids, broadcast from ``[k]``
    when shared, ``num_classes`` for an id out of range (a ``ValueError`` in an
    eager call on one device; NaN from the fill gather otherwise). Every
    array check of the call is here: the logits, ``ids`` and ``where``.
    """
    logits = as_logits(logits)
    position_shape = tuple(logits.shape[:-1])
    num_classes = _num_classes(logits.shape[-1], vocab_axis_name)
    ids = integer_ids(ids, "ids", "class_log_probs")
    if ids.ndim == 1:
        ids = jnp.broadcast_to(ids, position_shape + ids.shape)
    elif ids.shape[:-1] != position_shape:
        raise ValueError(
            f"ids has shape {ids.shape} but logits have positions {position_shape}; "
            f"expected {position_shape} + (k,) (ids per position) or (k,) (shared)"
        )
    if ids.shape[-1] == 0:
        raise ValueError(f"ids has shape {ids.shape}: k = 0 classes chosen")
    in_range = in_class_range(ids, num_classes)
    check_class_range(ids, in_range, None, num_classes, "ids", check=vocab_axis_name is None,
                      noun="id(s)")
    counted = position_mask(
        where, position_shape,
        "logits have positions {} (logits.shape[:-1]); where marks whole positions",
    )
    return logits, Positions(class_index(ids, in_range, num_classes), counted)


def teacher_rows(teacher, student, positions: Positions, vocab_axis_name):
    """``distillation_loss``'s teacher, checked against the student's positions.

    Dense or fused teacher logits come back as they are, checked (the
    student's shape); a :class:`~jxent.TopK` as the core's rows ``(index,
    log_probs, bad, targets)`` (``_checks.stored_entries``: its ids as a gather
    index, and the counted positions whose entries are invalid).
    """
    position_shape = tuple(student.shape[:-1])
    if isinstance(teacher, TopK):
        if teacher.shape[:-1] != position_shape:
            raise ValueError(
                f"teacher (TopK) has ids of shape {teacher.shape} but the student's logits "
                f"have positions {position_shape}; expected {position_shape + (teacher.k,)} "
                "(aligned with the student's logits, as a dense teacher's would be)"
            )
        index, log_probs, bad = stored_entries(
            teacher.ids, teacher.log_probs, positions.counted,
            _num_classes(student.shape[-1], vocab_axis_name), vocab_axis_name is None,
        )
        return index, log_probs, bad, positions.targets
    teacher = as_logits(teacher, "teacher_logits")
    if tuple(teacher.shape) != tuple(student.shape):
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher.shape)} but student_logits has shape "
            f"{tuple(student.shape)}; both are [..., V] over the same positions and vocabulary"
        )
    return teacher


def objective_rows(fn, args, logits, positions: Positions, shift: int, stats_like):
    """``token_objective``'s rows ``(targets, args)``, ``args`` padded back to ``[..., T]``.

    ``args`` are checked and broadcast to the predicted positions ``[..., T − k]``
    (``_checks.predicted_args``), and ``fn``'s output on them is checked on shapes:
    one float per position. ``stats_like(shape, dtype)`` gives what ``fn`` is
    called on, as shapes.
    """
    shape = tuple(positions.counted.shape)
    predicted = shape[:-1] + (positions.length,) if positions.length is not None else shape
    args = predicted_args(args, shape, predicted, shift)
    one_value_per_position(fn, stats_like(predicted, float_dtype(logits.dtype)), args, predicted)
    return positions.targets, tuple(positions.untrim(a) for a in args)
