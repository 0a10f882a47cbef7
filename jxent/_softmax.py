"""Softmax cross-entropy on logits: ``torch.nn.functional.cross_entropy``, exactly, in JAX."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import (
    REDUCTIONS,
    as_integer_ids,
    check_axis,
    check_class_weights,
    check_fraction,
    check_loss_mask,
    check_nonnegative_float,
    check_option,
    check_softcap,
    check_targets_in_range,
    float_dtype,
    integer_targets_info,
    is_static_zero,
    static_int,
)
from ._chunked import chunked, split_traced
from ._classes import ClassOps, class_weight_vector, take_weight
from ._linear import LinearLogits
from ._reduce import safe_divide

__all__ = ["softmax_cross_entropy"]


# Above this |max logit| the class-weighted smoothing sum is shifted by the target
# logit before it is formed (see _losses).
_SHIFT_ABOVE = 64.0


def parse_loss_options(
    *,
    ignore_index,
    label_smoothing,
    z_loss,
    logit_softcap,
):
    """Validate the options shared by every cross-entropy (dense and fused), once.

    ``ignore_index`` and ``logit_softcap`` must be static Python values (the
    error for a traced ``ignore_index`` says how to make it static);
    ``label_smoothing`` and ``z_loss`` may also be traced scalars (schedules
    under ``jit``, checked for range when concrete). Python floats stay Python
    floats, so the common path is specialised at trace time.
    """
    return dict(
        ignore_index=static_int(ignore_index, "ignore_index"),
        label_smoothing=check_fraction(label_smoothing, "label_smoothing", traced=True),
        z_loss=check_nonnegative_float(z_loss, "z_loss", traced=True),
        logit_softcap=check_softcap(logit_softcap),
    )


def _check_class_axis(logits, axis: int) -> None:
    if logits.shape[axis] == 0:
        raise ValueError(
            f"logits has shape {logits.shape}: 0 classes along axis={axis}; a distribution "
            "needs at least one class"
        )


def _target_shape_error(targets, logits, axis: int, position_shape) -> Exception:
    """The most useful message for targets whose shape or dtype does not fit the logits."""
    shown_axis = axis - logits.ndim if axis == logits.ndim - 1 else axis
    integer = jnp.issubdtype(targets.dtype, jnp.integer)
    if integer and targets.shape == logits.shape:
        return ValueError(
            f"targets is an integer array ({targets.dtype}) with the logits' shape "
            f"{logits.shape}: probabilities (e.g. one-hot) need a floating dtype "
            f"(targets.astype(jnp.float32)); class ids have shape {position_shape} "
            f"(jnp.argmax(targets, axis={shown_axis}))"
        )
    if integer and logits.ndim >= 3 and axis == logits.ndim - 1:
        torch_positions = logits.shape[:1] + logits.shape[2:]
        if targets.shape == torch_positions:
            return ValueError(
                f"targets has shape {targets.shape} and logits {logits.shape}: this is "
                "PyTorch's [N, C, d1, ...] layout with the classes on axis 1; pass axis=1 "
                f"(with axis=-1 the targets would need shape {position_shape})"
            )
    if not integer and targets.shape == position_shape:
        return TypeError(
            f"targets has floating dtype {targets.dtype} and shape {targets.shape}, the "
            "shape of class ids: class ids must be integers (targets.astype(jnp.int32)); "
            f"probability targets would have the logits' shape {logits.shape}"
        )
    if integer:
        return ValueError(
            f"targets has shape {targets.shape} but logits {logits.shape} with "
            f"axis={shown_axis} expects {position_shape} (integer class indices), or "
            f"{logits.shape} (probabilities, floating dtype)"
        )
    return ValueError(
        f"targets has shape {targets.shape} but probability targets must have "
        f"the logits' shape {logits.shape}; integer class indices would have "
        f"shape {position_shape}"
    )


def per_position_losses(
    logits,
    targets,
    *,
    axis: int = -1,
    where=None,
    ignore_index: int | None = -100,
    class_weights=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap: float | None = None,
    vocab_axis_name: str | None = None,
):
    """The heart of every cross-entropy in jxent: ``(loss, weight)`` per position.

    ``loss`` is 0 and ``weight`` 0 wherever a position is not counted; see
    ``jxent._reduce`` for what is done with them. Validation happens here
    (options through :func:`parse_loss_options`, which the fused path shares).

    Numerics: every quantity stays shifted by the per-position maximum
    ``top``: ``−log p_c = (top − x_c) + log Σ exp(x − top)``, as PyTorch and
    optax do. Adding ``top`` back first (``lse − x_c``) cancels digits when
    the logits are large (``1e4``) and close to each other.
    """
    options = parse_loss_options(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
    )
    logits = jnp.asarray(logits)
    targets = as_integer_ids(targets, "targets")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be a floating-point array, got dtype {logits.dtype}")
    if logits.ndim == 0:
        raise ValueError("logits is a scalar; it needs a class axis")
    axis = check_axis(axis, logits.ndim)
    _check_class_axis(logits, axis)
    return _losses(
        logits, targets, axis=axis, where=where, class_weights=class_weights,
        vocab_axis_name=vocab_axis_name, **options,
    )


def _losses(
    logits,
    targets,
    *,
    axis: int,
    where,
    ignore_index: int | None,
    class_weights,
    label_smoothing,
    z_loss,
    logit_softcap: float | None,
    vocab_axis_name: str | None,
):
    """:func:`per_position_losses` on parsed options (the fused path's per-chunk function)."""
    dtype = float_dtype(logits.dtype)
    x = logits.astype(dtype)
    ops = ClassOps(axis, vocab_axis_name, logits.shape[axis])
    num_classes = ops.num_classes
    position_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    weights = check_class_weights(
        class_weights,
        ops.num_local,
        "this shard of logits" if vocab_axis_name else "logits",
    )
    mask = check_loss_mask(where, position_shape)
    smoothing = not is_static_zero(label_smoothing)

    if jnp.issubdtype(targets.dtype, jnp.integer):
        probability_targets = False
        if targets.shape != position_shape:
            raise _target_shape_error(targets, logits, axis, position_shape)
        index, ignored, in_range = integer_targets_info(targets, num_classes, ignore_index)
        counted = ~ignored if mask is None else mask & ~ignored
        if vocab_axis_name is None:
            check_targets_in_range(targets, counted, in_range, num_classes, ignore_index)
        index = jnp.where(counted, index, 0)
    elif jnp.issubdtype(targets.dtype, jnp.floating):
        probability_targets = True
        if ignore_index not in (None, -100):
            raise ValueError(
                f"ignore_index={ignore_index} cannot be used with probability targets "
                f"(floating dtype {targets.dtype}); use where= to mask positions"
            )
        if targets.shape != logits.shape:
            raise _target_shape_error(targets, logits, axis, position_shape)
        counted = jnp.ones(position_shape, bool) if mask is None else mask
    else:
        raise TypeError(
            f"targets must be integer class indices or floating probabilities, "
            f"got dtype {targets.dtype}"
        )

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
    top_vec = jnp.squeeze(top, axis)
    # log Σ_c exp(x_c − top), in [0, log C]: everything below stays shifted.
    log_sum = jnp.log(ops.sum(jnp.exp(safe - top)))

    if probability_targets:
        y = jnp.where(keep, targets.astype(dtype), 0)
        if smoothing:
            y = (1.0 - label_smoothing) * y + label_smoothing / num_classes
        if weights is not None:
            y = y * class_weight_vector(weights, dtype, axis, x.ndim)
        # Σ_c y_c (−log p_c). The one undefined product is 0 · (+inf) (target 0
        # at a −inf logit): it is 0. Gating on exactly that keeps ∂/∂y (and
        # ∂/∂class_weights) = −log p_c wherever −log p_c is finite, y = 0 included.
        neg_log_p = (top - safe) + jnp.expand_dims(log_sum, axis)
        defined = (y != 0) | (safe != -jnp.inf)
        terms = jnp.where(defined, y * jnp.where(defined, neg_log_p, 0), 0)
        loss = ops.sum(terms)
        weight = counted.astype(dtype)
    else:
        # (top − x_t) + log Σ exp(x − top): no cancellation at large logits.
        target_logit = ops.take(x, index, fill=jnp.nan)
        nll = jnp.where(counted, top_vec - target_logit, 0) + log_sum
        if weights is None:
            loss = nll
            weight = counted.astype(dtype)
        else:
            w_target = take_weight(weights, index, ops, dtype)
            loss = w_target * nll
            weight = jnp.where(counted, w_target, 0)
        if smoothing:
            # Σ_c w_c (−log p_c) = log_sum · W + Σ_c w_c (top − x_c), W = Σ_c w_c,
            # with Σ_c w_c (top − x_c) = W (top − r) − Σ_c w_c (x_c − r) for a
            # reference r = x_t (the target logit, gathered before any pass, so
            # the sum is one reduction fused with the max's pass over the raw
            # logits; shifting by top would cost another pass). Nothing large
            # cancels: |top − r| also appears in the loss as w_t (top − x_t).
            ref = jnp.where(jnp.isfinite(target_logit), target_logit, top_vec)
            ref = jax.lax.stop_gradient(ref)  # r cancels: only its value matters
            if weights is None:
                total_w = float(num_classes)
                gap = total_w * (top_vec - ref) - ops.sum(x - jnp.expand_dims(ref, axis))
            else:
                w = weights.astype(dtype)
                total_w = ops.sum_classes(w)
                # XLA:CPU reads raw logits fastest in a matrix-vector product,
                # whose rounding grows with |x|; logits far from 0 (|max| > 64,
                # where the reference matters) take the shifted multiply-reduce.
                large = jnp.max(jnp.where(counted, jnp.abs(top_vec), 0)) > _SHIFT_ABOVE
                ref = jnp.where(large, ref, 0)
                part = jax.lax.cond(
                    large,
                    lambda: ops.dot(x - jnp.expand_dims(ref, axis), w, keep),
                    lambda: ops.dot(x, w, keep, matvec=True),
                )
                gap = total_w * (top_vec - ref) - ops.sum_tokens(part)
            gap = jnp.where(counted, gap, 0)
            smooth = (log_sum * total_w + gap) / num_classes
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
        # An out-of-range target under jit: NaN value (from the gather) and a
        # NaN gradient too, so value_and_grad never trains on a dropped target.
        loss = loss * jnp.where(counted & ~in_range, jnp.nan, 1.0).astype(dtype)

    if not is_static_zero(z_loss):
        loss = loss + z_loss * jnp.square(log_sum + top_vec)
    loss = jnp.where(counted, loss, 0)
    return loss, weight


def _chunk_losses(logits, targets, counted, consts, **options):
    """The fused path's per-chunk function: the dense core on one chunk of logits."""
    (x,) = logits
    class_weights, traced = consts
    return _losses(x, targets, axis=1, where=counted, class_weights=class_weights, **options,
                   **traced)


def _fused_losses(logits: LinearLogits, targets, *, axis, where, class_weights,
                  vocab_axis_name, summed: bool, **options):
    """:func:`loss_terms` for :class:`LinearLogits`: the dense core over chunks of positions."""
    if axis not in (-1, logits.ndim - 1):
        raise ValueError(
            f"LinearLogits has its classes on the last axis; axis must be -1, got axis={axis}"
        )
    targets = as_integer_ids(targets, "targets")
    positions = logits.shape[:-1]
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(
            f"targets must be integer class ids with LinearLogits, got dtype {targets.dtype}; "
            "probability targets would be the [tokens, vocab] array that LinearLogits avoids"
        )
    if targets.shape != positions:
        raise ValueError(
            f"targets has shape {targets.shape} but LinearLogits with hidden "
            f"{tuple(logits.hidden.shape)} expects {positions} (hidden.shape[:-1])"
        )
    mask = check_loss_mask(where, positions)
    num_local = logits.kernel.shape[1]
    weights = check_class_weights(
        class_weights, num_local, "this shard of kernel" if vocab_axis_name else "kernel"
    )
    num_classes = ClassOps(-1, vocab_axis_name, num_local).num_classes
    _, ignored, in_range = integer_targets_info(targets, num_classes, options["ignore_index"])
    counted = ~ignored if mask is None else mask & ~ignored
    if vocab_axis_name is None:
        check_targets_in_range(targets, counted, in_range, num_classes, options["ignore_index"])
    static, traced = split_traced(**options)
    n = math.prod(positions)
    out = chunked(
        _chunk_losses,
        (logits,),
        targets.reshape(n),
        counted.reshape(n),
        consts=(weights, traced),
        mode="sum" if summed else "positions",
        options=dict(static, vocab_axis_name=vocab_axis_name),
    )
    if summed:
        return out
    loss, weight = out
    return loss.reshape(positions), weight.reshape(positions)


def loss_terms(
    logits,
    targets,
    *,
    summed: bool,
    axis: int = -1,
    where=None,
    ignore_index=-100,
    class_weights=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    vocab_axis_name=None,
):
    """Per-position ``(loss, weight)``, or with ``summed=True`` their sums over positions.

    The one entry point of every cross-entropy: dense logits go through
    :func:`per_position_losses`; :class:`LinearLogits` through the chunked
    engine with the same core (gradient in the forward pass when summed).
    """
    if isinstance(logits, LinearLogits):
        options = parse_loss_options(
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_softcap=logit_softcap,
        )
        return _fused_losses(
            logits, targets, axis=axis, where=where, class_weights=class_weights,
            vocab_axis_name=vocab_axis_name, summed=summed, **options,
        )
    loss, weight = per_position_losses(
        logits,
        targets,
        axis=axis,
        where=where,
        ignore_index=ignore_index,
        class_weights=class_weights,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        vocab_axis_name=vocab_axis_name,
    )
    return (jnp.sum(loss), jnp.sum(weight)) if summed else (loss, weight)


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
        (bf16/f16 are computed in float32).
      targets: integer class ids with the logits' shape without ``axis``
        (any integer dtype), or floating probabilities with the logits' shape.
      axis: the class axis (PyTorch's ``[N, C, d1, ...]`` layout is ``axis=1``).
      where: boolean, the targets' positions; False positions are not counted.
      ignore_index: integer targets equal to it are not counted (``None``
        disables it). Not allowed with probability targets. A static Python
        (or NumPy) int: under ``jit`` close over it or mark it static.
      class_weights: ``[C]`` weight per class (PyTorch's ``weight``).
      label_smoothing: ``ε`` in ``[0, 1]``: a Python float, or a traced scalar
        (a schedule under ``jit``: no recompilation per value; the range is
        checked when the value is concrete).
      z_loss: coefficient of the PaLM auxiliary ``lse²`` term (not weighted by
        ``class_weights``; reduced with the same denominator); a Python float
        or a traced scalar, like ``label_smoothing``.
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
    no digits; label smoothing is computed the same way.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]))
      >>> jxent.softmax_cross_entropy(logits, jnp.array([0, 0]), reduction="none")
      Array([0.6931..., 0.2231...], dtype=float32)
    """
    check_option(reduction, "reduction", REDUCTIONS)
    summed = reduction != "none"
    total, weight = loss_terms(
        logits,
        targets,
        summed=summed,
        axis=axis,
        where=where,
        ignore_index=ignore_index,
        class_weights=class_weights,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        vocab_axis_name=vocab_axis_name,
    )
    if reduction == "mean":
        return safe_divide(total, weight)
    return total
