"""One formula per quantity: the per-position rows every function on logits shares.

Centred logits (relative to the per-position maximum, no gradient through
it), the log-normaliser, the KL row and the entropy row are written here
once, for the information functions on logits (``jxent._information``, any
class axis) and for the token-level cores (``_tokens``, ``_distillation``,
``_topk``, ``_classes``: the class axis last, local or one shard of the
vocabulary through :class:`~._vocab.ClassOps`). Everything stays shifted: a
quantity of size ``top`` is never added and then subtracted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._vocab import ClassOps


def scaled(value, temperature, dtype):
    """``value / temperature`` (nothing at all for a static temperature of 1)."""
    if isinstance(temperature, float) and temperature == 1.0:
        return value
    return value / jnp.asarray(temperature, dtype)


def centred_logits(logits, keep, temperature, ops: ClassOps, dtype):
    """``(x, d, top, raw_top)`` for logits with the class axis last.

    ``x`` the logits in ``dtype``; ``raw_top`` the per-position max of the raw
    logits (keepdims, no gradient, combined across shards); ``top`` the same,
    0 where not kept or not finite; ``d = (x − top) / T``, 0 where not kept.
    The max reads the raw logits (no masked copy); the ``where`` feeding ``d``
    fuses into its consumers.
    """
    x = logits.astype(dtype)
    raw_top = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    if ops.axis_name is not None:
        raw_top = jax.lax.pmax(raw_top, ops.name)
    top = jnp.where(keep & jnp.isfinite(raw_top), raw_top, 0)
    d = scaled(jnp.where(keep, x, 0) - top, temperature, dtype)
    return x, d, top, raw_top


def hard_cross_entropy(x, d, top, keep, counted, targets, temperature, ops: ClassOps):
    """``−log softmax(x)[target]`` at temperature 1, from :func:`centred_logits`' ``(x, d, top)``.

    Distillation's hard term (Hinton's recipe): ``(top − x_t) + log Σ exp(x − top)``,
    reusing ``d`` when the temperature is a static 1.
    """
    d1 = d if isinstance(temperature, float) and temperature == 1.0 else (
        jnp.where(keep, x, 0) - top)
    x_t = jnp.where(counted, ops.take(x, targets, fill=jnp.nan), 0)
    return (top[..., 0] - x_t) + log_normaliser(d1, ops.sum)


def log_normaliser(d, total):
    """``log Σ_c exp d_c`` of centred logits ``d`` (in ``[0, log V]``): ``logsumexp − top``."""
    return jnp.log(total(jnp.exp(d)))


def kl_row(e_p, sum_p, sum_q, diff, top_gap, total):
    """``KL(p‖q)`` per position from centred quantities, in one pass over the classes.

    ``Σ_c p_c (log p_c − log q_c) = Σ_c e_c δ_c / S_p − [Δtop + log(S_p / S_q)]`` with
    ``e = exp(x_p − top_p)`` (0 where a class is left out), ``S = Σ e`` (in
    ``[1, V]``), ``δ = x_p − x_q`` (0 where a class is left out) and
    ``Δtop = top_p − top_q``, all already divided by any temperature.
    ``total`` sums over the class axis. Each class's ``log p_c − log q_c`` is
    one rounded difference of the logits (where two separately normalised
    logs of size ``log V`` would each be rounded), the normalisers enter as
    one log of their ratio, and the weighted sum does not wait for them
    (``tests/test_kl_precision.py``: at most PyTorch's error, against float64).
    """
    return total(e_p * diff) / sum_p - (top_gap + jnp.log(sum_p / sum_q))


def entropy_parts(e, sum_e, d, total):
    """``(log S, Σ_c p_c d_c)`` per position: the entropy is ``H = log S − Σ_c p_c d_c``.

    ``d`` the centred logits, ``e = exp d`` (0 where a class is left out),
    ``S = Σ e``, ``p = e / S``; ``total`` sums over the class axis. The
    product ``0 · (−inf)`` of a class of probability zero is 0, gated on
    exactly ``d = −inf`` (never on ``e == 0``, which would drop gradients).
    """
    return jnp.log(sum_e), total(e * jnp.where(d == -jnp.inf, 0, d)) / sum_e
