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

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import float_dtype
from ._engine import run
from ._numerics import nonnegative
from ._options import REQUIRED, distillation_options, is_static
from ._positions import teacher_rows, token_targets
from ._reduce import needs_sums, reduce
from ._rows import centred_logits, hard_cross_entropy, kl_row, scaled
from ._topk import TopK, topk_core
from ._vocab import ClassOps

__all__ = ["distillation_loss"]


def _divergence(student, teacher, keep, divergence: str, beta, temperature, ops: ClassOps):
    """Per-position divergence between ``s = softmax(ds)`` and ``t = softmax(dt)``.

    ``student`` and ``teacher`` are ``(x, d, top)``: the logits, ``d = (x −
    top) / T`` (0 where not kept) and the per-position maximum ``top``; ``keep``
    the positions counted (elsewhere ``x`` may be anything, NaN included).
    """
    (xs, ds, top_s), (xt, dt, top_t) = student, teacher
    s_inf, t_inf = ds == -jnp.inf, dt == -jnp.inf
    es, et = jnp.exp(ds), jnp.exp(dt)
    sum_s, sum_t = ops.sum(es), ops.sum(et)
    if divergence in ("kl", "reverse_kl"):
        # Σ_c t_c (log t_c − log s_c) = Σ_c t_c (xt_c − xs_c) / T − [(top_t − top_s) / T
        # + log(St / Ss)]: one rounding of each class's logit difference (where 0.3
        # subtracted two separately normalised logs of size log V), and the two
        # normalisers as one log of their ratio (S in [1, V]). One pass over the
        # classes: the weighted sum does not wait for the normalisers.
        # KL(p‖q): p the teacher for "kl", the student for "reverse_kl".
        teacher_first = divergence == "kl"
        (xp, ep, sum_p, top_p, p_inf), (xq, sum_q, top_q) = (
            ((xt, et, sum_t, top_t, t_inf), (xs, sum_s, top_s)) if teacher_first
            else ((xs, es, sum_s, top_s, s_inf), (xt, sum_t, top_t)))
        diff = scaled(jnp.where(keep & ~p_inf, xp - xq, 0), temperature, xs.dtype)
        gap = scaled(top_p - top_q, temperature, xs.dtype)[..., 0]
        return kl_row(ep, sum_p, sum_q, diff, gap, ops.sum)
    if divergence == "tvd":
        # ½ Σ_c |t_c − s_c|, its (sub)gradient sign(s_c − t_c) / 2 with sign(0) = 0.
        gap = et / sum_t[..., None] - es / sum_s[..., None]
        return 0.5 * ops.sum(gap * jnp.sign(gap))
    log_ss, log_st = jnp.log(sum_s), jnp.log(sum_t)
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


def distillation_core(logits, targets, counted, *, divergence, beta, temperature, hard_weight,
                      vocab_axis_name):
    """``(loss, weight)`` per position from validated inputs (math only, no checks).

    Args:
      logits: ``(student, teacher)``, ``[..., V_local]`` with the class axis last;
        the engine gives the teacher no gradient.
      targets: ``None``, or ``[...]`` int32 global ids from :class:`~._positions.Positions`.
      counted: ``[...]`` bool (``where``, ``ignore_index`` and segments applied).
      divergence, beta, temperature, hard_weight: from
        :func:`~._options.distillation_options` (floats, or traced scalars the
        engine passes as arguments).

    Returns:
      ``loss`` (0 where not counted) and ``weight`` (1 where counted, else 0).
    """
    student, teacher = logits
    ops = ClassOps(student.ndim - 1, vocab_axis_name, student.shape[-1])
    dtype = float_dtype(student.dtype, teacher.dtype)
    keep = counted[..., None]
    alpha = hard_weight
    x, ds, top, _ = centred_logits(student, keep, temperature, ops, dtype)
    loss = jnp.zeros(counted.shape, dtype)
    if not is_static(alpha, 1.0):
        xt, dt, top_t, _ = centred_logits(teacher, keep, temperature, ops, dtype)
        soft = nonnegative(_divergence(
            (x, ds, top), (xt, dt, top_t), keep, divergence, beta,
            temperature, ops,
        ))
        loss = soft if targets is None else (1 - alpha) * soft
    if targets is not None and not is_static(alpha, 0.0):
        # Hinton's hard term: cross-entropy of the student at temperature 1.
        hard = hard_cross_entropy(x, ds, top, keep, counted, targets, temperature, ops)
        loss = loss + alpha * hard
    return jnp.where(counted, loss, 0), counted.astype(dtype)


def distillation_loss(
    student_logits: Float[ArrayLike, "*batch V"],
    teacher_logits: Float[ArrayLike, "*batch V"] | TopK,
    *,
    shift: bool | int = REQUIRED,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    where: Bool[ArrayLike, " *batch"] | None = None,
    reduction: str = "mean",
    targets: Int[ArrayLike, " *batch"] | None = None,
    hard_weight: float = 0.0,
    ignore_index: int | None = -100,
    segment_ids: Int[ArrayLike, " *batch"] | None = None,
    vocab_axis_name: str | None = None,
    topk_mode: str = "tail",
) -> Float[Array, "..."]:
    """Divergence of a student's next-token distribution from a teacher's, per position.

    With ``t = softmax(teacher_logits / T)`` and ``s = softmax(student_logits / T)``:

    * ``"kl"``: ``KL(t‖s) = Σ_c t_c (log t_c − log s_c)``, forward KL,
      mean-seeking (the student covers every mode of the teacher);
    * ``"reverse_kl"``: ``KL(s‖t) = Σ_c s_c (log s_c − log t_c)``, mode-seeking;
    * ``"jsd"``: ``β·KL(t‖m) + (1−β)·KL(s‖m)`` with ``m = β·t + (1−β)·s`` and
      ``0 < β < 1``: TRL's ``generalized_jsd_loss`` for those β; ``β = ½`` is
      the Jensen–Shannon divergence, ``≤ log 2``. Its limits are the two KLs,
      scaled: ``β → 0`` tends to ``β·KL(t‖s)`` (``"kl"``, forward) and
      ``β → 1`` to ``(1 − β)·KL(s‖t)`` (``"reverse_kl"``), so TRL's
      ``beta=0`` is ``"kl"`` here and its ``beta=1`` is ``"reverse_kl"``;
    * ``"tvd"``: the total variation ``½ Σ_c |t_c − s_c|`` (Liger's
      ``LigerTVDLoss``), in ``[0, 1]``; its (sub)gradient with respect to
      ``s_c`` is ``½ sign(s_c − t_c)``, with ``sign(0) = 0``.

    Stored teacher: ``teacher_logits`` may be a :class:`~jxent.TopK`, the
    teacher's log-probabilities ``log t_i`` of ``k`` classes per position.
    ``topk_mode="tail"`` compares both distributions over ``k + 1`` buckets,
    the stored classes and "every other class": ``t_i``, ``t_rest = 1 − Σ t_i``
    (clamped at 0), ``s_i = softmax(student / T)[id_i]`` over the full
    vocabulary and ``s_rest`` the student's mass on the classes not stored
    (summed directly, without cancellation). The stored log-probs are the
    teacher at temperature ``T`` as generated: ``T`` divides the student's
    logits only. With every class stored the rest bucket is empty, and the
    value is the dense teacher's. ``topk_mode="renormalize"`` (MaxText,
    tunix) restricts both to the stored classes and renormalises them:
    ``t̃ = softmax(log_probs / T)``, ``s̃ = softmax(student / T)[ids]``
    renormalised. Padding entries (``−inf`` log-prob) belong to neither; a
    position with nothing stored gives 0 in both modes (still counted: mask
    it with ``where`` to leave it out of the mean). With ``t_rest`` rounded to
    0 while the student keeps mass outside the stored classes,
    ``"reverse_kl"`` in tail mode is ``+inf`` (as the math says: store a
    little less than all the mass, or use another divergence).

    With ``targets`` and ``hard_weight = α`` each position's loss is
    ``α·CE(student, target) + (1 − α)·divergence``, where the cross-entropy
    ``−log softmax(student_logits)[target]`` is at temperature 1 (Hinton et
    al.'s recipe). Hinton's recipe also multiplies the soft term by ``T²`` to
    keep its gradient's scale across temperatures; jxent does **not**: multiply
    by ``T**2`` yourself if you want it. The teacher gets no gradient.

    Shift: as in :func:`token_stats`. With a shift of ``k`` the student's and
    the teacher's logits at position ``t`` are compared (both predict the
    ``k``-th next token) for ``t < T − k``; ``where``, ``targets`` and
    ``segment_ids`` are aligned with the tokens and move with them, so the
    hard term scores ``targets[..., t + k]`` and no position is compared
    across a document boundary. ``shift=False`` compares every position.

    Args:
      student_logits: ``[..., V]``, the class axis last (``[..., T, V]`` with a
        shift), or a :class:`~jxent.LinearLogits`.
      teacher_logits: the same shape (any float dtype; computed in float32,
        or float64 under ``jax_enable_x64``), a ``LinearLogits``, or a
        :class:`~jxent.TopK` of ids ``[..., k]`` over the student's positions.
      divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"tvd"``.
      beta: the mixture weight of the teacher for ``"jsd"``, in ``(0, 1)``
        (ignored otherwise); a Python float or a traced scalar.
      temperature: ``T > 0``, dividing both logits (Python float or traced scalar).
      shift: required, no default: ``False`` (0) when each position's
        distributions are compared as they are, ``True`` (1) or ``k`` as in
        :func:`token_stats`.
      where: ``[...]`` boolean, the positions' shape (aligned with the tokens);
        False = not counted.
      reduction: ``"mean"`` (over counted positions; 0 when none),
        ``"sum"`` or ``"none"`` (per position, 0 where not counted).
      targets: ``[...]`` integer ids for the hard term; ids equal to
        ``ignore_index`` drop the whole position from both terms and from the
        mean's denominator.
      hard_weight: ``α`` in ``[0, 1]``; ``α > 0`` needs ``targets`` (a traced
        ``α`` needs them too). A Python float or a traced scalar.
      ignore_index: see ``targets`` (``None`` disables it).
      segment_ids: ``[..., T]`` integer document ids of packed rows (with a
        shift: position ``t`` counts only within its document).
      vocab_axis_name: inside ``shard_map``, the mesh axis along which both
        logits' vocabulary is sharded (targets and a ``TopK``'s ids hold
        global ids).
      topk_mode: ``"tail"`` or ``"renormalize"``, for a ``TopK`` teacher
        (ignored for logits).

    Returns:
      A scalar, or ``[...]`` per position for ``reduction="none"`` (``[..., T − k]``
      with a shift of ``k``).

    Conventions: a class impossible under both distributions (``−inf`` in both
    logits) contributes 0, never NaN; a class the approximating side excludes
    while the other has mass gives ``+inf``, as the math does. Values are never
    negative (rounding below 0 is removed; the gradient is that of the formula).
    Masked positions may hold NaN/inf logits: they reach neither value nor gradient.

    Traced options: ``beta``, ``temperature`` and ``hard_weight`` may be
    traced scalars (a schedule under ``jit``, no recompilation). Out of range
    they cannot raise: the result is NaN, and ``jax.experimental.checkify``
    reports the option by name (``"temperature must be a finite float > 0,
    got -1.0"``).

    Raises:
      ValueError: unknown ``divergence`` or ``reduction``, ``β`` outside
        ``(0, 1)`` for ``"jsd"``, ``T <= 0``, ``hard_weight`` outside
        ``[0, 1]``, ``hard_weight > 0`` without ``targets``,
        mismatched shapes, an unknown ``topk_mode``; a ``TopK`` with an id
        outside ``[0, V)`` or the same id twice among a position's finite
        entries, or ``Σ exp(log_probs) > 1 + 1e-3`` (eager calls; under
        ``jit`` those positions are NaN, which ``checkify`` reports).

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> teacher = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
      >>> student = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5]]))
      >>> jxent.distillation_loss(student, teacher, shift=False, reduction="none")
      Array([0.       , 0.3680...], dtype=float32)
      >>> float(jxent.distillation_loss(student, teacher, shift=False, divergence="jsd"))
      0.0509...

      A stored teacher, its top class only (``t_rest = 0.1``):

      >>> top1 = jxent.TopK(jnp.array([[0], [0]]), jnp.log(jnp.array([[0.5], [0.9]])))
      >>> jxent.distillation_loss(student, top1, shift=False, reduction="none")
      Array([0.       , 0.3680...], dtype=float32)
    """
    options = distillation_options(
        reduction=reduction, shift=shift, divergence=divergence, beta=beta,
        temperature=temperature, hard_weight=hard_weight, topk_mode=topk_mode,
        ignore_index=ignore_index, has_targets=targets is not None,
    )
    student, positions = token_targets(
        student_logits, targets, shift=options.shift, where=where,
        ignore_index=options.ignore_index, function="distillation_loss",
        vocab_axis_name=vocab_axis_name, segment_ids=segment_ids, name="targets",
        logits_name="student_logits", sequence=False,
    )
    teacher = teacher_rows(teacher_logits, student, positions, vocab_axis_name)
    mode = "sum" if needs_sums(options.reduction) else "positions"
    engine_options = dict(options.core_options(), vocab_axis_name=vocab_axis_name)
    if isinstance(teacher_logits, TopK):  # the teacher's ids are per-position rows
        loss, weight = run(
            topk_core, (student,), teacher, positions.counted, mode=mode,
            options=dict(engine_options, topk_mode=options.topk_mode), names=("student",),
        )
    else:
        loss, weight = run(
            distillation_core, (student, teacher), positions.targets, positions.counted, mode=mode,
            options=engine_options, trainable=(True, False), names=("student", "teacher"),
        )
    if options.reduction == "none":
        loss = positions.trim(loss)
    return reduce(loss, weight, options.reduction)
