"""Small numerical primitives shared by the information functions and the token-level cores."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
