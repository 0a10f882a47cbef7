"""Softmax cross-entropy on logits: ``torch.nn.functional.cross_entropy``, exactly, in JAX.

:func:`cross_entropy_core` is the per-position math of every cross-entropy in
jxent (``softmax_cross_entropy``, ``linear_cross_entropy``, ``sequence_nll``,
``nll_stats``), on dense logits and on chunks of :class:`~jxent.LinearLogits`
alike; :func:`cross_entropy_terms` runs it through the engine.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import float_dtype
from ._engine import run
from ._options import LossOptions, is_static, loss_options
from ._positions import Positions, class_targets
from ._reduce import needs_sums, reduce
from ._rows import log_normaliser
from ._vocab import ClassOps, class_weight_vector, take_weight

__all__ = ["softmax_cross_entropy"]


# Above this |max logit| the class-weighted smoothing sum is shifted by the target
# logit before it is formed (see cross_entropy_core).
_SHIFT_ABOVE = 64.0


def cross_entropy_core(
    logits,
    rows,
    counted,
    *,
    axis: int,
    class_weights,
    label_smoothing,
    z_loss,
    logit_softcap: float | None,
    vocab_axis_name,
):
    """``(loss, weight)`` per position from validated inputs (math only, no checks).

    ``rows`` is ``(targets, weights)``: targets from :class:`~._positions.Positions`
    (an int32 gather index, or probabilities), ``weights`` per-token weights or
    None. ``loss`` is 0 and ``weight`` 0 wherever a position is not counted.

    Numerics: every quantity stays shifted by the per-position maximum
    ``top``: ``−log p_c = (top − x_c) + log Σ exp(x − top)``, as PyTorch and
    optax do. Adding ``top`` back first (``lse − x_c``) cancels digits when
    the logits are large (``1e4``) and close to each other.
    """
    (logits,) = logits
    targets, token_weights = rows
    dtype = float_dtype(logits.dtype)
    x = logits.astype(dtype)
    axis = axis % x.ndim
    ops = ClassOps(axis, vocab_axis_name, logits.shape[axis])

    # Double where: uncounted positions get logits 0 before any arithmetic,
    # so NaN/inf there reach neither the value nor the gradient. Reductions
    # read the raw logits (XLA:CPU would otherwise write a masked copy first)
    # and are sanitised afterwards on [tokens]-sized vectors.
    keep = jnp.expand_dims(counted, axis)
    safe = jnp.where(keep, x, 0)
    if logit_softcap is not None:
        safe = logit_softcap * jnp.tanh(safe / logit_softcap)
        x = safe
    top = ops.max(x, keep)
    # log Σ_c exp(x_c − top), in [0, log C]: everything below stays shifted.
    log_sum = log_normaliser(safe - top, ops.sum)
    centred = _Centred(x, safe, top, log_sum, keep, counted, ops, dtype)
    floating = jnp.issubdtype(targets.dtype, jnp.floating)
    terms = _probability_terms if floating else _index_terms
    loss, weight = terms(centred, targets, class_weights, label_smoothing)
    if not is_static(z_loss, 0.0):
        loss = loss + z_loss * jnp.square(log_sum + jnp.squeeze(top, axis))
    loss = jnp.where(counted, loss, 0)
    if token_weights is not None:
        loss, weight = loss * token_weights, weight * token_weights
    return loss, weight


class _Centred(NamedTuple):
    """One position's logits relative to their maximum, and what the terms read of them."""

    x: jax.Array  # the logits (soft-capped), in ``dtype``
    safe: jax.Array  # the same, 0 where not counted
    top: jax.Array  # the per-position maximum (keepdims, no gradient)
    log_sum: jax.Array  # log Σ_c exp(x_c − top)
    keep: jax.Array
    counted: jax.Array
    ops: ClassOps
    dtype: Any


def _probability_terms(c: _Centred, targets, weights, label_smoothing):
    """``(Σ_c y_c (−log p_c), count)`` for probability targets ``y``."""
    axis, ops = c.ops.axis, c.ops
    y = jnp.where(c.keep, targets.astype(c.dtype), 0)
    if not is_static(label_smoothing, 0.0):
        y = (1.0 - label_smoothing) * y + label_smoothing / ops.num_classes
    if weights is not None:
        y = y * class_weight_vector(weights, c.dtype, axis, c.x.ndim)
    # Σ_c y_c (−log p_c). The one undefined product is 0 · (+inf) (target 0
    # at a −inf logit): it is 0. Gating on exactly that keeps ∂/∂y (and
    # ∂/∂class_weights) = −log p_c wherever −log p_c is finite, y = 0 included.
    neg_log_p = (c.top - c.safe) + jnp.expand_dims(c.log_sum, axis)
    defined = (y != 0) | (c.safe != -jnp.inf)
    terms = jnp.where(defined, y * jnp.where(defined, neg_log_p, 0), 0)
    return ops.sum(terms), c.counted.astype(c.dtype)


def _index_terms(c: _Centred, index, weights, label_smoothing):
    """``(w_t · nll, w_t)`` for class ids, label smoothing mixed in."""
    ops, counted, dtype = c.ops, c.counted, c.dtype
    top_vec = jnp.squeeze(c.top, ops.axis)
    # (top − x_t) + log Σ exp(x − top): no cancellation at large logits.
    target_logit = ops.take(c.x, index, fill=jnp.nan)
    nll = jnp.where(counted, top_vec - target_logit, 0) + c.log_sum
    if weights is None:
        loss = nll
        weight = counted.astype(dtype)
    else:
        w_target = take_weight(weights, index, ops, dtype)
        loss = w_target * nll
        weight = jnp.where(counted, w_target, 0)
    if not is_static(label_smoothing, 0.0):
        smooth = _smoothing(c, target_logit, top_vec, weights)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    # An out-of-range target under jit: NaN value (from the gather) and a
    # NaN gradient too, so value_and_grad never trains on a dropped target.
    loss = loss * jnp.where(counted & (index >= ops.num_classes), jnp.nan, 1.0).astype(dtype)
    return loss, weight


def _smoothing(c: _Centred, target_logit, top_vec, weights):
    """``Σ_c w_c (−log p_c) / C`` per position, without cancellation.

    ``Σ_c w_c (−log p_c) = log_sum · W + Σ_c w_c (top − x_c)``, ``W = Σ_c w_c``,
    with ``Σ_c w_c (top − x_c) = W (top − r) − Σ_c w_c (x_c − r)`` for a
    reference ``r = x_t`` (the target logit, gathered before any pass, so the
    sum is one reduction fused with the max's pass over the raw logits;
    shifting by top would cost another pass). Nothing large cancels:
    ``|top − r|`` also appears in the loss as ``w_t (top − x_t)``.
    """
    ops, axis, x = c.ops, c.ops.axis, c.x
    ref = jnp.where(jnp.isfinite(target_logit), target_logit, top_vec)
    ref = jax.lax.stop_gradient(ref)  # r cancels: only its value matters
    if weights is None:
        total_w = float(ops.num_classes)
        gap = total_w * (top_vec - ref) - ops.sum(x - jnp.expand_dims(ref, axis))
    else:
        w = weights.astype(c.dtype)
        total_w = ops.sum_classes(w)
        ref, part = _weighted_logits(x, w, ref, c.counted, top_vec, c.keep, ops, axis)
        gap = total_w * (top_vec - ref) - ops.sum_tokens(part)
    gap = jnp.where(c.counted, gap, 0)
    return (c.log_sum * total_w + gap) / ops.num_classes


def _weighted_logits(x, w, ref, counted, top_vec, keep, ops, axis):
    """``(r, Σ_c w_c (x_c − r))`` on this shard: the class-weighted part of the smoothing sum.

    XLA:CPU reads raw logits fastest in a matrix-vector product, whose
    rounding grows with ``|x|``; logits far from 0 (``|max| > 64``, where the
    reference matters) take the shifted multiply-reduce instead, and the
    others ``r = 0``. An empty batch has no maximum to test, and needs neither.
    """
    if counted.size == 0:
        return ref, jnp.zeros(counted.shape, x.dtype)
    large = jnp.max(jnp.where(counted, jnp.abs(top_vec), 0)) > _SHIFT_ABOVE
    ref = jnp.where(large, ref, 0)
    return ref, ops.dot(x, w, keep, ref, large)


def cross_entropy_terms(logits, positions: Positions, options: LossOptions, vocab_axis_name):
    """The engine step of every cross-entropy: ``(loss, weight)`` per position, or their
    sums when ``options.how`` needs only sums (:func:`~._reduce.needs_sums`)."""
    return run(
        cross_entropy_core,
        (logits,),
        (positions.targets, positions.weights),
        positions.counted,
        mode="sum" if needs_sums(options.how) else "positions",
        options=dict(
            options.core_options(), axis=positions.axis, class_weights=positions.class_weights,
            vocab_axis_name=vocab_axis_name,
        ),
    )


def softmax_cross_entropy(
    logits: Float[ArrayLike, "*batch classes"],
    targets: Int[ArrayLike, " *batch"] | Float[ArrayLike, "*batch classes"],
    *,
    axis: int = -1,
    where: Bool[ArrayLike, " *batch"] | None = None,
    ignore_index: int | None = -100,
    class_weights: Float[ArrayLike, " classes"] | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    vocab_axis_name: str | None = None,
) -> Float[Array, "..."]:
    """Cross-entropy between targets and ``softmax(logits)``, as PyTorch defines it.

    For integer targets ``t`` and log-probabilities ``log p = log_softmax(logits)``,
    each counted position contributes

        ``ℓ = (1 − ε) · w_t · (−log p_t) + (ε / C) · Σ_c w_c · (−log p_c) + z · lse²``

    (``w`` = ``class_weights``, all 1 when ``None``; ``ε`` = ``label_smoothing``;
    ``C`` classes; ``lse = logsumexp(logits)``; ``z`` = ``z_loss``). For
    probability targets ``y`` (same shape as ``logits``, floating dtype) the
    smoothed target ``y' = (1 − ε) y + ε / C`` gives ``ℓ = −Σ_c w_c y'_c log p_c + z · lse²``.
    The gradient with respect to the logits is ``w · (softmax − smoothed target)``.

    Reductions, as ``torch.nn.functional.cross_entropy``: ``"mean"`` divides
    the sum over counted positions by the sum of the targets' weights ``Σ w_t``
    (the count, without weights; for probability targets always the count);
    ``"sum"``; ``"none"`` returns ``ℓ`` per position (0 where not counted).

    Args:
      logits: ``[..., C, ...]`` unnormalised log-probabilities, any float dtype
        (bf16/f16 are computed in float32: see Precision), or a
        :class:`jxent.LinearLogits`.
      targets: integer class ids with the logits' shape without ``axis``
        (any integer dtype), or floating probabilities with the logits' shape.
      axis: the class axis (PyTorch's ``[N, C, d1, ...]`` layout is ``axis=1``).
      where: boolean, the targets' positions; False positions are not counted.
      ignore_index: integer targets equal to it are not counted (``None``
        disables it). Not allowed with probability targets. A static Python
        (or NumPy) int: under ``jit`` close over it or mark it static.
      class_weights: ``[C]`` weight per class (PyTorch's ``weight``).
      label_smoothing: ``ε`` in ``[0, 1]``: a Python float, or a traced scalar
        (a schedule under ``jit``: no recompilation per value). A concrete
        value outside ``[0, 1]`` raises ``ValueError``; a traced one makes
        the result NaN, and ``jax.experimental.checkify`` reports it
        (``"label_smoothing must be in [0, 1], got …"``).
      z_loss: coefficient ``>= 0`` of the PaLM auxiliary ``lse²`` term (not
        weighted by ``class_weights``; reduced with the same denominator); a
        Python float or a traced scalar, checked like ``label_smoothing``.
      logit_softcap: ``c`` replaces logits with ``c · tanh(logits / c)`` first
        (Gemma 2); its gradient includes ``tanh'``.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      vocab_axis_name: inside ``shard_map``, the mesh axis along which the
        class axis (and ``class_weights`` and probability targets) is sharded;
        targets hold global class ids. Shards exchange only per-position
        vectors (``pmax``/``psum``).

    Returns:
      A scalar, or the per-position losses for ``reduction="none"``, in
      float32 (float64 under ``jax_enable_x64`` for float64 logits).

    Deliberate differences from PyTorch:
      * a mean over zero counted positions is 0 with zero gradient, not NaN;
      * integer targets of any integer dtype are accepted;
      * masked positions may hold NaN/inf logits: they never reach the value or
        the gradient.

    Out-of-range integer targets (other than ``ignore_index``): eager calls
    raise ``ValueError`` (so does an int64 NumPy id that JAX's int32 would
    wrap); under ``jit`` that position's loss is NaN (never a wrapped or
    clipped class), its gradient is NaN too (a ``value_and_grad`` step never
    trains on a silently dropped target), and ``jax.experimental.checkify``
    with ``index_checks`` reports the out-of-bounds gather.

    Fused logits: ``logits`` may be a :class:`jxent.LinearLogits` (integer
    targets, ``axis=-1``): the same value and gradients for its ``hidden``,
    ``kernel`` and ``bias``, without the ``[positions, classes]`` array
    (``class_weights`` and traced coefficients are constants there).

    Precision: ``−log p_t = (max − x_t) + log Σ exp(x − max)`` keeps every
    quantity shifted, as PyTorch and optax do, so large logits (``1e4``) lose
    no digits; label smoothing is computed the same way. Everything is
    computed in float32 (float64 under x64), bf16/f16 logits included, so the
    only precision bf16 costs is the rounding of the logits themselves to 8
    significant bits: about 1e-2 nats per token for logits of order 10
    (``h @ W`` formed in bf16 outside ``jit``; inside ``jit`` XLA may keep the
    product in float32). :class:`~jxent.LinearLogits` forms its logits in
    float32 from bf16 ``hidden`` and ``kernel``, so it does not lose them.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]))
      >>> jxent.softmax_cross_entropy(logits, jnp.array([0, 0]), reduction="none")
      Array([0.6931..., 0.2231...], dtype=float32)
    """
    options = loss_options(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, logit_softcap=logit_softcap,
    )
    logits, positions = class_targets(
        logits, targets, axis=axis, where=where, ignore_index=options.ignore_index,
        class_weights=class_weights, vocab_axis_name=vocab_axis_name,
    )
    loss, weight = cross_entropy_terms(logits, positions, options, vocab_axis_name)
    return reduce(loss, weight, options.how)
