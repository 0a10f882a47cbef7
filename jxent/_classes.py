"""Log-probabilities of chosen classes, normalised over the whole vocabulary.

``class_log_probs`` reads ``log softmax(logits / T)`` at ``k`` ids per
position (multiple-choice scoring, verbalisers, yes/no reward reads; Liger's
``selected_token_ids``) without the ``[positions, V]`` log-softmax: its core
is one log-normaliser per position and a gather of ``k`` logits, run by the
engine on dense logits or on ``[C, V]`` chunks of ``LinearLogits``, with the
ids as per-position rows. Numerics as in ``jxent._tokens``: relative to the
per-position maximum, positions not counted zeroed before any arithmetic.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import float_dtype
from ._engine import run
from ._options import token_options
from ._positions import chosen_ids
from ._rows import centred_logits, log_normaliser
from ._vocab import ClassOps

__all__ = ["class_log_probs"]


def _class_core(logits, index, counted, *, temperature, vocab_axis_name):
    """``log softmax(x / T)`` at ``index [..., k]`` (``num_classes``: NaN), 0 where not counted."""
    (x,) = logits
    ops = ClassOps(x.ndim - 1, vocab_axis_name, x.shape[-1])
    dtype = float_dtype(x.dtype)
    keep = counted[..., None]
    _, d, _, _ = centred_logits(x, keep, temperature, ops, dtype)
    log_total = log_normaliser(d, ops.sum)
    out = ops.gather(d, index, fill=jnp.nan) - log_total[..., None]
    return jnp.where(keep, out, 0)


def class_log_probs(
    logits: Float[ArrayLike, "*batch V"],
    ids: Int[ArrayLike, "*batch k"] | Int[ArrayLike, " k"],
    *,
    temperature: float = 1.0,
    where: Bool[ArrayLike, " *batch"] | None = None,
    vocab_axis_name: str | None = None,
) -> Float[Array, "*batch k"]:
    """The log-probabilities of chosen classes, normalised over the whole vocabulary.

    ``out[..., i] = log softmax(logits / T)[ids[..., i]] = z_id − logsumexp(z)``,
    ``z = logits / T``. The student's side of a stored teacher, multiple-choice
    and verbaliser scoring (``ids`` the answer tokens, shared by every
    position), a yes/no reward read. Exact gradients, in forward mode too;
    with :class:`~jxent.LinearLogits` no ``[positions, V]`` array is formed.

    Args:
      logits: ``[..., V]`` (any float dtype; computed in float32, or float64
        under ``jax_enable_x64``), or a :class:`~jxent.LinearLogits`.
      ids: integer global class ids, ``[..., k]`` (``logits.shape[:-1] + (k,)``,
        per position) or ``[k]`` (the same classes at every position).
      temperature: ``T > 0``, a Python float or a traced scalar (an invalid
        traced value gives NaN, reported by ``checkify`` naming it; see
        :func:`token_stats`).
      where: ``logits.shape[:-1]`` boolean; False = not counted (0, zero gradient).
      vocab_axis_name: inside ``shard_map``, the mesh axis along which the
        vocabulary is sharded (``ids`` stay global).

    Returns:
      ``[..., k]`` float32 (float64 for float64 logits under x64).

    Conventions: a ``−inf`` logit is a class of probability zero: its
    log-prob is ``−inf`` and every gradient stays finite. Positions not
    counted may hold NaN/inf logits: they give 0 with zero gradient. Ids
    outside ``[0, V)`` raise ``ValueError`` eagerly; under ``jit`` they give
    NaN (an out-of-bounds gather, which ``checkify`` index checks report).

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
      >>> jxent.class_log_probs(logits, jnp.array([0, 2]))  # "yes", "no" at each position
      Array([[-0.6931..., -1.3862...],
             [-2.3025..., -0.2231...]], dtype=float32)
    """
    options = token_options("class_log_probs", temperature=temperature)
    logits, positions = chosen_ids(logits, ids, where=where, vocab_axis_name=vocab_axis_name)
    return run(
        _class_core, (logits,), positions.targets, positions.counted, mode="positions",
        options=dict(temperature=options.temperature, vocab_axis_name=vocab_axis_name),
    )
