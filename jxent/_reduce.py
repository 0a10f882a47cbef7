"""Reductions: the last of the four steps, and the one place a mean is formed.

Every loss in jxent produces per-position ``loss`` (0 at positions that are
not counted) and ``weight`` (the position's share of the denominator: 1, the
target class's weight, the token's weight, 0 where not counted), or, from
the fused engine's sum mode, their sums. Every reduction and normalisation is
defined from these two, here and only here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count``, and 0 (with zero gradient) where ``count == 0``.

    PyTorch returns NaN for a mean over nothing; jxent returns 0 so that a
    fully padded batch is a no-op instead of poisoning the parameters.
    """
    nonzero = count != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, count, 1), 0)


def to_base(value: jax.Array, log_base: float | None) -> jax.Array:
    """``value`` in nats converted to the base whose log is ``log_base`` (None: nats)."""
    return value if log_base is None else value / log_base


def needs_sums(how: str) -> bool:
    """Whether ``how`` needs only the sums of ``loss`` and ``weight`` (the engine's sum mode)."""
    return how in ("mean", "tokens", "sum")


def reduce(loss: jax.Array, weight: jax.Array, how: str, segments=None) -> jax.Array:
    """Reduce per-position (or, when :func:`needs_sums`, already summed) losses and weights.

    ``how``: ``"mean"``/``"tokens"`` = Σ loss / Σ weight (the global mean),
    ``"sum"`` = Σ loss, ``"none"`` = ``loss``, ``"sequences"`` = each
    sequence's mean over its last axis, then the mean over the sequences with
    a nonzero weight; with ``segments`` (``[..., T]`` integer ids) each
    sequence × segment pair is a document, and the mean is over documents.
    """
    if how == "none":
        return loss
    if how == "sequences":
        return _mean_of_groups(loss, weight, segments)
    total, count = (loss, weight) if loss.ndim == 0 else (jnp.sum(loss), jnp.sum(weight))
    return total if how == "sum" else safe_divide(total, count)


def _mean_of_groups(loss, weight, segments):
    """The mean over groups (rows, or rows × segment ids) of each group's weighted mean."""
    if segments is None:
        totals, counts = jnp.sum(loss, axis=-1), jnp.sum(weight, axis=-1)
    else:
        totals, counts = _document_sums(loss, weight, segments)
    means = safe_divide(totals, counts)
    has_tokens = (counts != 0).astype(means.dtype)
    return safe_divide(jnp.sum(means), jnp.sum(has_tokens))


def _document_sums(loss, weight, segments):
    """Σ loss and Σ weight per (row, segment id): one group per id present in a row.

    The ids of each row are sorted, runs of equal ids numbered, and each
    position's loss added into its row's slot for that number: ``O(T log T)``
    per row, whatever values the ids take.
    """
    t = segments.shape[-1]
    rows = segments.reshape(-1, t)
    order = jnp.argsort(rows, axis=-1, stable=True)
    ordered = jnp.take_along_axis(rows, order, axis=-1)
    starts = jnp.concatenate(
        [jnp.zeros((rows.shape[0], 1), jnp.int32),
         (ordered[:, 1:] != ordered[:, :-1]).astype(jnp.int32)], axis=-1
    )
    group_sorted = jnp.cumsum(starts, axis=-1)
    group = jnp.zeros_like(group_sorted).at[
        jnp.arange(rows.shape[0])[:, None], order
    ].set(group_sorted)
    slot = (jnp.arange(rows.shape[0])[:, None] * t + group).reshape(-1)
    size = rows.shape[0] * t
    totals = jax.ops.segment_sum(loss.reshape(-1), slot, num_segments=size)
    counts = jax.ops.segment_sum(weight.reshape(-1), slot, num_segments=size)
    return totals, counts
