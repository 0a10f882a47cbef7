"""The one reduction path: per-position losses and weights to a scalar.

Every loss in jxent produces two arrays of the targets' shape: ``loss`` (0 at
positions that are not counted) and ``weight`` (the position's share of the
denominator: 1, or the target class's weight, and 0 where not counted). All
reductions and normalisations are defined from these two, here and only here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._checks import NORMALIZATIONS, REDUCTIONS, check_option


def safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count``, and 0 (with zero gradient) where ``count == 0``.

    PyTorch returns NaN for a mean over nothing; jxent returns 0 so that a
    fully padded batch is a no-op instead of poisoning the parameters.
    """
    nonzero = count != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, count, 1), 0)


def reduce_losses(loss: jax.Array, weight: jax.Array, reduction: str) -> jax.Array:
    """``"mean"`` = Σ loss / Σ weight, ``"sum"`` = Σ loss, ``"none"`` = ``loss``."""
    check_option(reduction, "reduction", REDUCTIONS)
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    return safe_divide(total, jnp.sum(weight))


def normalize_sequences(loss: jax.Array, weight: jax.Array, normalize: str) -> jax.Array:
    """Sequence normalisations over ``[..., T]`` per-token losses and weights.

    ``"tokens"``: Σ loss / Σ weight over the whole batch (the global token
    mean). ``"sequences"``: each sequence's own mean over ``T``, then the mean
    over the sequences with at least one counted token. ``"sum"``: Σ loss.
    ``"none"``: the per-token array.
    """
    check_option(normalize, "normalize", NORMALIZATIONS)
    if normalize == "tokens":
        return reduce_losses(loss, weight, "mean")
    if normalize == "sum":
        return reduce_losses(loss, weight, "sum")
    if normalize == "none":
        return loss
    per_sequence_weight = jnp.sum(weight, axis=-1)
    per_sequence = safe_divide(jnp.sum(loss, axis=-1), per_sequence_weight)
    has_tokens = (per_sequence_weight != 0).astype(per_sequence.dtype)
    return safe_divide(jnp.sum(per_sequence), jnp.sum(has_tokens))


@jax.custom_jvp
def nonnegative(x: jax.Array) -> jax.Array:
    """``x`` with negative values and ``-0.0`` replaced by ``+0.0``; the tangent passes through.

    Entropies and divergences are ``>= 0``, but float32 rounding gives
    ``-2e-7`` for near-equal distributions and ``-0.0`` for degenerate ones.
    Only the value is clamped: the derivative is that of the formula (a clamp
    in the gradient would zero it exactly where a divergence is minimised).
    NaN stays NaN. A ``custom_jvp``, so forward and reverse mode both work.
    """
    return jnp.where((x < 0) | (x == 0), jnp.zeros_like(x), x)


@nonnegative.defjvp
def _nonnegative_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return nonnegative(x), dx
