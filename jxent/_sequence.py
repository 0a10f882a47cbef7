"""Token-level negative log-likelihood for sequences, and exact accumulation."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import NORMALIZATIONS, as_integer_ids, check_option
from ._linear import LinearLogits
from ._reduce import normalize_sequences, safe_divide
from ._softmax import loss_terms

__all__ = ["sequence_nll", "nll_stats", "NLLStats", "perplexity"]


class NLLStats(NamedTuple):
    """Sums that combine exactly across micro-batches and devices.

    ``total`` is the summed (weighted) negative log-likelihood in nats and
    ``count`` the number of counted tokens (the sum of their class weights when
    ``class_weights`` is given). Being a pytree of two scalars, stats from
    several micro-batches combine with ``jax.tree.map(jnp.add, a, b)`` and
    across devices with ``jax.lax.psum(stats, axis_name)``; ``.mean()`` of the
    combined stats is exactly the global token mean.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> stats = jxent.NLLStats(total=jnp.array(6.0), count=jnp.array(3.0))
      >>> float(stats.mean()), round(float(stats.perplexity()), 4)
      (2.0, 7.3891)
    """

    total: Float[Array, ""]
    count: Float[Array, ""]

    def mean(self) -> Float[Array, ""]:
        """The mean NLL per counted token, ``total / count`` (0 when nothing is counted)."""
        return safe_divide(self.total, self.count)

    def perplexity(self) -> Float[Array, ""]:
        """``exp(mean NLL)``: the effective number of equally likely next tokens."""
        return perplexity(self.mean())

    def bits_per_token(self) -> Float[Array, ""]:
        """The mean NLL in bits, ``mean / ln 2``."""
        return self.mean() / math.log(2.0)


def perplexity(mean_nll: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
    """Perplexity ``exp(mean NLL)`` of a mean negative log-likelihood in nats.

    Examples:
      >>> import jxent
      >>> round(float(jxent.perplexity(0.6931471805599453)), 4)  # a fair coin
      2.0
    """
    return jnp.exp(jnp.asarray(mean_nll))


class _Required:
    """The default of ``shift``: there is none, and leaving it out says what to pass."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def check_shift(shift, function: str) -> bool:
    """``shift`` must be given: a default would silently shift already-sliced logits twice."""
    if shift is REQUIRED:
        raise TypeError(
            f"{function}() needs shift: pass shift=True for causal LM logits (logits[..., t, :] "
            "predicts tokens[..., t + 1]) or shift=False for logits already aligned with "
            "their targets (e.g. after logits[:, :-1] and tokens[:, 1:])"
        )
    if isinstance(shift, jax.core.Tracer):
        raise TypeError(
            f"shift must be a static Python bool, got a traced value: under jax.jit mark it "
            f"static, jax.jit({function}, static_argnames=('shift',)), or pass a Python bool "
            "from a closure"
        )
    if not isinstance(shift, (bool, np.bool_)):
        raise TypeError(f"shift must be True or False, got {shift!r}")
    return bool(shift)


def check_tokens(tokens, function: str) -> jax.Array:
    """Token ids: an integer array (floating ids are a mistake, not probabilities)."""
    tokens = as_integer_ids(tokens, "tokens")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(
            f"{function}: tokens must be integer token ids, got dtype {tokens.dtype} with "
            f"shape {tokens.shape}; convert them with tokens.astype(jnp.int32)"
        )
    return tokens


def _aligned(logits, tokens, where, shift, function: str):
    """Logits, targets and mask aligned position by position."""
    shift = check_shift(shift, function)
    if not isinstance(logits, LinearLogits):
        logits = jnp.asarray(logits)
    tokens = check_tokens(tokens, function)
    if logits.ndim < 2:
        raise ValueError(
            f"logits must have shape [..., T, V] (at least 2 dimensions), got {logits.shape}"
        )
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens has shape {tokens.shape} but logits {logits.shape} expects "
            f"{logits.shape[:-1]} ([..., T] for logits [..., T, V])"
        )
    if where is not None:
        where = jnp.asarray(where)
        if where.shape != tokens.shape:
            raise ValueError(
                f"where has shape {where.shape} but tokens has shape {tokens.shape}; "
                "the loss mask marks token positions [..., T]"
            )
    if shift:
        # T = 1 leaves no target: an empty result (0, zero gradient), as for N = 0.
        if isinstance(logits, LinearLogits):
            logits = logits.positions((Ellipsis, slice(None, -1)))
        else:
            logits = logits[..., :-1, :]
        tokens = tokens[..., 1:]
        if where is not None:
            where = where[..., 1:]
    return logits, tokens, where


def _token_losses(function, logits, tokens, shift, where, *, summed, **options):
    logits, tokens, where = _aligned(logits, tokens, where, shift, function)
    return loss_terms(logits, tokens, summed=summed, axis=-1, where=where, **options)


def nll_stats(
    logits: Float[ArrayLike, "*batch T V"],
    tokens: Int[ArrayLike, "*batch T"],
    *,
    shift: bool = REQUIRED,
    where: Bool[ArrayLike, "*batch T"] | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    class_weights: Float[ArrayLike, " V"] | None = None,
    vocab_axis_name: str | None = None,
) -> NLLStats:
    """Summed NLL and token count of a batch, for exact accumulation.

    ``nll_stats(...).mean()`` equals ``sequence_nll(..., normalize="tokens")``;
    the point is that stats from micro-batches (``jax.tree.map(jnp.add, ...)``)
    or devices (``jax.lax.psum``) add up to the stats of the whole batch, so
    the combined mean -- and its gradient -- is that of the whole batch, not
    a mean of means. Arguments are those of :func:`sequence_nll`.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.zeros((1, 3, 4))            # uniform over 4 tokens
      >>> stats = jxent.nll_stats(logits, jnp.array([[0, 1, 2]]), shift=True)
      >>> float(stats.count), round(float(stats.perplexity()), 4)
      (2.0, 4.0)
    """
    total, count = _token_losses(
        "nll_stats",
        logits,
        tokens,
        shift,
        where,
        summed=True,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        class_weights=class_weights,
        vocab_axis_name=vocab_axis_name,
    )
    return NLLStats(total=total, count=count)


def sequence_nll(
    logits: Float[ArrayLike, "*batch T V"],
    tokens: Int[ArrayLike, "*batch T"],
    *,
    shift: bool = REQUIRED,
    where: Bool[ArrayLike, "*batch T"] | None = None,
    ignore_index: int | None = -100,
    normalize: str = "tokens",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    class_weights: Float[ArrayLike, " V"] | None = None,
    vocab_axis_name: str | None = None,
) -> Float[Array, "..."]:
    """Token-level negative log-likelihood of sequences, ``−Σ_t log p(x_t | context)``.

    With ``shift=True`` (causal language modelling) ``logits[..., t, :]``
    predicts ``tokens[..., t + 1]``: ``logits[..., :-1, :]`` are scored against
    ``tokens[..., 1:]`` and ``where`` is shifted with the targets. With
    ``shift=False`` (teacher-forced sequence-to-sequence) logits and tokens are
    already aligned. Each token's loss is that of :func:`softmax_cross_entropy`
    with the same options.

    Args:
      logits: ``[..., T, V]``, or a :class:`jxent.LinearLogits` with hidden
        ``[..., T, D]`` (the fused path: same value and gradients, no
        ``[tokens, V]`` array; ``shift=True`` slices the hidden positions).
      tokens: ``[..., T]`` integer token ids.
      shift: required, no default: ``True`` for causal LM logits,
        ``False`` for logits already aligned with ``tokens`` (e.g. after
        ``logits[:, :-1]`` and ``tokens[:, 1:]``; a default would silently
        shift those twice). With ``T = 1`` and ``shift=True`` there is no
        target: the result is empty (0, zero gradient).
      where: ``[..., T]`` boolean loss mask on target positions (padding,
        prompt tokens); False = not counted. Aligned with ``tokens``.
      ignore_index: tokens equal to it are not counted (``None`` disables).
      normalize: ``"tokens"`` -- Σ NLL over all counted tokens of the batch /
        their number (the global token mean); ``"sequences"`` -- each
        sequence's mean over its counted tokens, then the mean over sequences
        with at least one counted token; ``"sum"`` -- the total NLL, i.e.
        minus the log-likelihood of the data; ``"none"`` -- the per-token
        losses ``[..., T - 1]`` with ``shift`` (aligned with ``tokens[..., 1:]``)
        or ``[..., T]`` without, 0 where not counted.
      label_smoothing, z_loss, logit_softcap, class_weights, vocab_axis_name:
        as in :func:`softmax_cross_entropy`. With ``class_weights`` the counts
        are sums of the targets' weights.

    Returns:
      A scalar in nats (the per-token array for ``normalize="none"``); 0 when
      no token is counted.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]]))
      >>> tokens = jnp.array([[1, 1, 0]])
      >>> round(float(jxent.sequence_nll(logits, tokens, shift=True, normalize="sum")), 4)
      0.7985
    """
    check_option(normalize, "normalize", NORMALIZATIONS)
    summed = normalize in ("tokens", "sum")
    loss, weight = _token_losses(
        "sequence_nll",
        logits,
        tokens,
        shift,
        where,
        summed=summed,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        class_weights=class_weights,
        vocab_axis_name=vocab_axis_name,
    )
    if summed:
        return loss if normalize == "sum" else safe_divide(loss, weight)
    return normalize_sequences(loss, weight, normalize)
