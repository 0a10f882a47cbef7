"""Distillation: the divergence of a student's next-token distribution from a teacher's.

The per-position core (:func:`distillation_core`) takes validated logits with
the class axis last, local or one shard of the vocabulary (``ClassOps``), so
the fused engine (``LinearLogits``, student and teacher chunked together)
calls the same core on ``[C, V]`` chunks. Numerics as in ``jxent._tokens``:
everything stays relative to the per-position maximum, ``−inf`` logits are
classes of probability zero gated on exactly that case, and positions not
counted are zeroed before any arithmetic.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import (
    REDUCTIONS,
    _float_option,
    check_loss_mask,
    check_option,
    class_ids,
    float_dtype,
    float_logits,
    parse_temperature,
)
from ._chunked import chunked, split_traced
from ._classes import ClassOps
from ._linear import LinearLogits
from ._reduce import nonnegative, reduce_losses, safe_divide
from ._tokens import _is_one, _shifted

__all__ = ["distillation_loss"]

DIVERGENCES = ("kl", "reverse_kl", "jsd")


class DistillationOptions(NamedTuple):
    """Validated options of :func:`distillation_loss` (see :func:`parse_distillation_options`).

    ``beta``, ``temperature`` and ``hard_weight`` are Python floats, or traced
    scalars (accepted unchecked).
    """

    divergence: str
    beta: Any
    temperature: Any
    hard_weight: Any


# --------------------------------------------------------------------------- validation


def parse_distillation_options(
    divergence: Any, beta: Any, temperature: Any, hard_weight: Any, has_targets: bool
) -> DistillationOptions:
    """Validate the options of :func:`distillation_loss` once, for the dense and fused paths."""
    check_option(divergence, "divergence", DIVERGENCES)
    if divergence == "jsd":
        beta = _float_option(
            beta,
            "beta",
            'a float in the open interval (0, 1) for divergence="jsd" (0 and 1 are '
            'the limits "reverse_kl" and "kl" up to scale; pass those instead)',
            lambda v: 0 < v < 1,
        )
    temperature = parse_temperature(temperature)
    hard_weight = _float_option(
        hard_weight, "hard_weight", "a float in [0, 1]", lambda v: 0 <= v <= 1
    )
    if not has_targets and not (isinstance(hard_weight, float) and hard_weight == 0.0):
        raise ValueError(
            f"hard_weight={hard_weight!r} weights a cross-entropy on targets, but targets is "
            "None; pass targets= (integer token ids of the positions' shape) or hard_weight=0"
        )
    return DistillationOptions(divergence, beta, temperature, hard_weight)


# --------------------------------------------------------------------------- cores


def _divergence(ds, dt, divergence: str, beta, ops: ClassOps):
    """Per-position divergence between ``s = softmax(ds)`` and ``t = softmax(dt)``."""
    s_inf, t_inf = ds == -jnp.inf, dt == -jnp.inf
    es, et = jnp.exp(ds), jnp.exp(dt)
    sum_s, sum_t = ops.sum(es), ops.sum(et)
    log_ss, log_st = jnp.log(sum_s), jnp.log(sum_t)
    if divergence == "kl":  # Σ t (dt − ds) / St + log Ss − log St
        diff = jnp.where(t_inf, 0, dt - ds)
        return ops.sum(et * diff) / sum_t + (log_ss - log_st)
    if divergence == "reverse_kl":  # Σ s (ds − dt) / Ss + log St − log Ss
        diff = jnp.where(s_inf, 0, ds - dt)
        return ops.sum(es * diff) / sum_s + (log_st - log_ss)
    # jsd: β KL(t‖m) + (1 − β) KL(s‖m), log m = logaddexp(log β + log t, log(1−β) + log s)
    log_s, log_t = ds - log_ss[..., None], dt - log_st[..., None]
    both = s_inf & t_inf
    if isinstance(beta, float):
        log_beta, log_rest = math.log(beta), math.log1p(-beta)
    else:
        log_beta, log_rest = jnp.log(beta), jnp.log1p(-beta)
    log_m = jnp.logaddexp(
        jnp.where(both, 0, log_t + log_beta), jnp.where(both, 0, log_s + log_rest)
    )
    kl_t = ops.sum(jnp.exp(log_t) * jnp.where(t_inf, 0, log_t - log_m))
    kl_s = ops.sum(jnp.exp(log_s) * jnp.where(s_inf, 0, log_s - log_m))
    return beta * kl_t + (1 - beta) * kl_s


def distillation_core(
    student, teacher, counted, targets, options: DistillationOptions, ops: ClassOps
):
    """``(loss, weight)`` per position from validated inputs (no checks here).

    Args:
      student, teacher: ``[..., V_local]`` logits, the class axis last.
      counted: ``[...]`` bool (``where`` and ``ignore_index`` already applied).
      targets: ``None``, or ``[...]`` int32 global ids from :func:`class_ids`.
      options: from :func:`parse_distillation_options`.
      ops: ``ClassOps(axis=student.ndim - 1, axis_name, num_local=V_local)``.

    Returns:
      ``loss`` (0 where not counted) and ``weight`` (1 where counted, else 0),
      for ``jxent._reduce.reduce_losses``. The teacher gets no gradient.
    """
    dtype = float_dtype(student.dtype, teacher.dtype)
    keep = counted[..., None]
    temperature, alpha = options.temperature, options.hard_weight
    static_alpha = isinstance(alpha, float)
    x, ds, top, _ = _shifted(student, keep, temperature, ops, dtype)
    loss = jnp.zeros(counted.shape, dtype)
    if not (static_alpha and alpha == 1.0):
        teacher = jax.lax.stop_gradient(teacher)
        _, dt, _, _ = _shifted(teacher, keep, temperature, ops, dtype)
        soft = nonnegative(_divergence(ds, dt, options.divergence, options.beta, ops))
        loss = soft if targets is None else (1 - alpha) * soft
    if targets is not None and not (static_alpha and alpha == 0.0):
        # Hinton's hard term: cross-entropy of the student at temperature 1,
        # (top − x_t) + log Σ exp(x − top).
        d1 = ds if _is_one(temperature) else jnp.where(keep, x, 0) - top
        x_t = jnp.where(counted, ops.take(x, targets, fill=jnp.nan), 0)
        hard = (top[..., 0] - x_t) + jnp.log(ops.sum(jnp.exp(d1)))
        loss = loss + alpha * hard
    return jnp.where(counted, loss, 0), counted.astype(dtype)


# --------------------------------------------------------------------------- public


def distillation_loss(
    student_logits: Float[ArrayLike, "*batch V"],
    teacher_logits: Float[ArrayLike, "*batch V"],
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    where: Bool[ArrayLike, " *batch"] | None = None,
    reduction: str = "mean",
    targets: Int[ArrayLike, " *batch"] | None = None,
    hard_weight: float = 0.0,
    ignore_index: int | None = -100,
    vocab_axis_name: str | None = None,
) -> Float[Array, "..."]:
    """Divergence of a student's next-token distribution from a teacher's, per position.

    With ``t = softmax(teacher_logits / T)`` and ``s = softmax(student_logits / T)``:

    * ``"kl"``: ``KL(t‖s) = Σ_c t_c (log t_c − log s_c)``, forward KL,
      mean-seeking (the student covers every mode of the teacher);
    * ``"reverse_kl"``: ``KL(s‖t) = Σ_c s_c (log s_c − log t_c)``, mode-seeking;
    * ``"jsd"``: ``β·KL(t‖m) + (1−β)·KL(s‖m)`` with ``m = β·t + (1−β)·s`` and
      ``0 < β < 1``: TRL's ``generalized_jsd_loss`` for those β; ``β = ½`` is
      the Jensen–Shannon divergence, ``≤ log 2``.

    With ``targets`` and ``hard_weight = α`` each position's loss is
    ``α·CE(student, target) + (1 − α)·divergence``, where the cross-entropy
    ``−log softmax(student_logits)[target]`` is at temperature 1 (Hinton et
    al.'s recipe). Hinton's recipe also multiplies the soft term by ``T²`` to
    keep its gradient's scale across temperatures; jxent does **not**: multiply
    by ``T**2`` yourself if you want it. The teacher gets no gradient.

    Args:
      student_logits: ``[..., V]``, the class axis last.
      teacher_logits: the same shape (any float dtype; computed in float32,
        or float64 under ``jax_enable_x64``).
      divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: the mixture weight of the teacher for ``"jsd"``, in ``(0, 1)``
        (ignored otherwise).
      temperature: ``T > 0``, dividing both logits (Python float or traced scalar).
      where: ``[...]`` boolean, the positions' shape; False = not counted.
      reduction: ``"mean"`` (over counted positions; 0 when none),
        ``"sum"`` or ``"none"`` (per position, 0 where not counted).
      targets: ``[...]`` integer ids for the hard term; ids equal to
        ``ignore_index`` drop the whole position from both terms and from the
        mean's denominator.
      hard_weight: ``α`` in ``[0, 1]``; ``α > 0`` needs ``targets``.
      ignore_index: see ``targets`` (``None`` disables it).
      vocab_axis_name: inside ``shard_map``, the mesh axis along which both
        logits' vocabulary is sharded (targets hold global ids).

    Returns:
      A scalar, or ``[...]`` per position for ``reduction="none"``.

    Conventions: a class impossible under both distributions (``−inf`` in both
    logits) contributes 0, never NaN; a class the approximating side excludes
    while the other has mass gives ``+inf``, as the math does. Values are never
    negative (rounding below 0 is removed; the gradient is that of the formula).
    Masked positions may hold NaN/inf logits: they reach neither value nor gradient.

    Raises:
      ValueError: unknown ``divergence`` or ``reduction``, ``β`` outside
        ``(0, 1)`` for ``"jsd"``, ``hard_weight > 0`` without ``targets``,
        mismatched shapes.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> teacher = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
      >>> student = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5]]))
      >>> jxent.distillation_loss(student, teacher, reduction="none")
      Array([0.       , 0.3680...], dtype=float32)
      >>> float(jxent.distillation_loss(student, teacher, divergence="jsd"))  # mean
      0.0509...
    """
    check_option(reduction, "reduction", REDUCTIONS)
    options = parse_distillation_options(
        divergence, beta, temperature, hard_weight, has_targets=targets is not None
    )
    fused = (isinstance(student_logits, LinearLogits), isinstance(teacher_logits, LinearLogits))
    if fused == (False, True):
        raise ValueError(
            "teacher_logits is LinearLogits but student_logits is a dense array: the fused "
            "path differentiates LinearLogits only; pass the student as LinearLogits too"
        )
    student = student_logits if fused[0] else float_logits(student_logits, "student_logits")
    teacher = teacher_logits if fused[1] else float_logits(teacher_logits, "teacher_logits")
    if tuple(teacher.shape) != tuple(student.shape):
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher.shape)} but student_logits has shape "
            f"{tuple(student.shape)}; both are [..., V] over the same positions and vocabulary"
        )
    ops = ClassOps(student.ndim - 1, vocab_axis_name, student.shape[-1])
    positions = tuple(student.shape[:-1])
    if targets is None:
        index = None
        counted = check_loss_mask(where, positions)
        counted = jnp.ones(positions, bool) if counted is None else counted
    else:
        index, counted = class_ids(
            targets, where, positions, ops, name="targets", ignore_index=ignore_index
        )
    if not fused[0]:
        loss, weight = distillation_core(student, teacher, counted, index, options, ops)
        return reduce_losses(loss, weight, reduction)

    n = math.prod(positions)
    linears = (student, teacher) if fused[1] else (student,)
    rows = {
        "targets": None if index is None else index.reshape(n),
        "teacher": None if fused[1] else teacher.reshape(n, teacher.shape[-1]),
    }
    static, traced = split_traced(**options._asdict())
    summed = reduction != "none"
    out = chunked(
        _distillation_chunk,
        linears,
        rows,
        counted.reshape(n),
        consts=traced,
        mode="sum" if summed else "positions",
        options=dict(static, vocab_axis_name=vocab_axis_name),
        trainable=(True, False)[: len(linears)],
    )
    loss, weight = out
    if reduction == "none":
        return loss.reshape(positions)
    return loss if reduction == "sum" else safe_divide(loss, weight)


def _distillation_chunk(logits, rows, counted, traced, *, vocab_axis_name, **static):
    """The fused path's per-chunk function: :func:`distillation_core` on ``[C, V]`` logits."""
    student = logits[0]
    teacher = logits[1] if len(logits) == 2 else rows["teacher"]
    ops = ClassOps(1, vocab_axis_name, student.shape[1])
    options = DistillationOptions(**static, **traced)
    return distillation_core(student, teacher, counted, rows["targets"], options, ops)
