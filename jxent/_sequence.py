"""Token-level negative log-likelihood for sequences, and exact accumulation."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._options import REQUIRED, LossOptions, sequence_options
from ._positions import token_targets
from ._reduce import reduce, safe_divide, to_base
from ._softmax import cross_entropy_terms

__all__ = ["sequence_nll", "nll_stats", "NLLStats", "perplexity"]

_LN2 = math.log(2.0)


class NLLStats(NamedTuple):
    """Sums that combine exactly across micro-batches and devices.

    ``total`` is the summed (weighted) negative log-likelihood in nats and
    ``count`` the number of counted tokens (the sum of their weights when
    ``class_weights`` or ``weights`` is given). ``a + b`` adds both sums (and
    ``sum(list_of_stats)`` works); being a pytree of two scalars, stats also
    combine with ``jax.tree.map(jnp.add, a, b)`` and across devices with
    ``jax.lax.psum(stats, axis_name)``. ``.mean()`` of the combined stats is
    exactly the global token mean.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> a = jxent.NLLStats(total=jnp.array(6.0), count=jnp.array(3.0))
      >>> b = jxent.NLLStats(total=jnp.array(2.0), count=jnp.array(1.0))
      >>> float((a + b).mean()), round(float(a.perplexity()), 4)
      (2.0, 7.3891)
    """

    total: Float[Array, ""]
    count: Float[Array, ""]

    def __add__(self, other: Any) -> NLLStats:
        if not isinstance(other, NLLStats):
            return NotImplemented
        return NLLStats(self.total + other.total, self.count + other.count)

    def __radd__(self, other: Any) -> NLLStats:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self  # sum(list_of_stats) starts from 0
        return NotImplemented

    def __mul__(self, other: Any):
        return NotImplemented  # not tuple repetition

    __rmul__ = __mul__

    def mean(self) -> Float[Array, ""]:
        """The mean NLL per counted token, ``total / count`` (0 when nothing is counted)."""
        return safe_divide(self.total, self.count)

    def perplexity(self) -> Float[Array, ""]:
        """``exp(mean NLL)``: the effective number of equally likely next tokens."""
        return jnp.exp(self.mean())

    def bits_per_token(self) -> Float[Array, ""]:
        """The mean NLL in bits, ``mean / ln 2``."""
        return self.mean() / _LN2

    def bits_per_byte(self, num_bytes) -> Float[Array, ""]:
        """``total / num_bytes / ln 2``: lm-evaluation-harness's ``bits_per_byte``.

        ``num_bytes`` is the UTF-8 byte count of the scored text,
        ``len(text.encode("utf-8"))`` summed over the documents, not a sum over
        per-token decodes (a token that is not a whole character decodes to
        replacement characters and miscounts). The measure does not depend on
        the tokenizer, so models with different vocabularies compare. Requires
        unweighted stats (``count`` the number of tokens): weights change what
        ``total`` sums.
        """
        return jnp.asarray(self.total) / jnp.asarray(num_bytes) / _LN2


def perplexity(mean_nll: Float[ArrayLike, "*shape"] | NLLStats) -> Float[Array, "*shape"]:
    """Perplexity ``exp(mean NLL)`` of a mean negative log-likelihood in nats.

    Given :class:`NLLStats` it is ``stats.perplexity()``; any other tuple is
    refused (it is not a mean NLL).

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> round(float(jxent.perplexity(0.6931471805599453)), 4)  # a fair coin
      2.0
      >>> float(jxent.perplexity(jxent.NLLStats(jnp.array(0.0), jnp.array(4.0))))
      1.0
    """
    if isinstance(mean_nll, NLLStats):
        return mean_nll.perplexity()
    if isinstance(mean_nll, (tuple, list, dict)):
        raise TypeError(
            f"perplexity takes a mean NLL in nats (an array) or NLLStats, got a "
            f"{type(mean_nll).__name__}; for stats of a batch use nll_stats(...).perplexity()"
        )
    return jnp.exp(jnp.asarray(mean_nll))


def _token_losses(function, logits, tokens, options: LossOptions, *, where, segment_ids,
                  weights, class_weights, vocab_axis_name):
    """``sequence_nll``'s and ``nll_stats``' positions and engine steps.

    Returns ``(loss, weight)`` per position, or summed when ``options.how``
    needs only sums, and the positions.
    """
    logits, positions = token_targets(
        logits, tokens, shift=options.shift, where=where, ignore_index=options.ignore_index,
        function=function, vocab_axis_name=vocab_axis_name, segment_ids=segment_ids,
        weights=weights, class_weights=class_weights,
    )
    loss, weight = cross_entropy_terms(logits, positions, options, vocab_axis_name)
    return loss, weight, positions


def nll_stats(
    logits: Float[ArrayLike, "*batch T V"],
    tokens: Int[ArrayLike, "*batch T"],
    *,
    shift: bool | int = REQUIRED,
    where: Bool[ArrayLike, "*batch T"] | None = None,
    segment_ids: Int[ArrayLike, "*batch T"] | None = None,
    weights: Float[ArrayLike, "*batch T"] | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    class_weights: Float[ArrayLike, " V"] | None = None,
    vocab_axis_name: str | None = None,
) -> NLLStats:
    """Summed NLL and token count of a batch, for exact accumulation.

    ``nll_stats(...).mean()`` equals ``sequence_nll(..., normalize="tokens")``;
    the point is that stats from micro-batches (``a + b``,
    ``jax.tree.map(jnp.add, ...)``) or devices (``jax.lax.psum``) add up to the
    stats of the whole batch, so the combined mean -- and its gradient -- is
    that of the whole batch, not a mean of means. Arguments are those of
    :func:`sequence_nll`; with ``weights`` the count is the sum of the
    counted tokens' weights.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.zeros((1, 3, 4))            # uniform over 4 tokens
      >>> stats = jxent.nll_stats(logits, jnp.array([[0, 1, 2]]), shift=True)
      >>> float(stats.count), round(float(stats.perplexity()), 4), float(stats.bits_per_token())
      (2.0, 4.0, 2.0)
    """
    options = sequence_options(
        "nll_stats", shift=shift, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, logit_softcap=logit_softcap,
    )
    total, count, _ = _token_losses(
        "nll_stats", logits, tokens, options, where=where, segment_ids=segment_ids,
        weights=weights, class_weights=class_weights, vocab_axis_name=vocab_axis_name,
    )
    return NLLStats(total=total, count=count)


def sequence_nll(
    logits: Float[ArrayLike, "*batch T V"],
    tokens: Int[ArrayLike, "*batch T"],
    *,
    shift: bool | int = REQUIRED,
    where: Bool[ArrayLike, "*batch T"] | None = None,
    segment_ids: Int[ArrayLike, "*batch T"] | None = None,
    weights: Float[ArrayLike, "*batch T"] | None = None,
    ignore_index: int | None = -100,
    normalize: str = "tokens",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    class_weights: Float[ArrayLike, " V"] | None = None,
    vocab_axis_name: str | None = None,
    base: float | None = None,
) -> Float[Array, "..."]:
    """Token-level negative log-likelihood of sequences, ``−Σ_t log p(x_t | context)``.

    With a shift of ``k`` (``shift=True`` is 1: causal language modelling)
    ``logits[..., t, :]`` predicts ``tokens[..., t + k]``: ``logits[..., :-k, :]``
    are scored against ``tokens[..., k:]`` and ``where`` and ``weights`` move
    with the targets (the logits are never sliced or copied). With
    ``shift=False`` (teacher-forced sequence-to-sequence) logits and tokens
    are already aligned. Each token's loss is that of
    :func:`softmax_cross_entropy` with the same options.

    Packed sequences: with ``segment_ids`` (``[..., T]`` integers, one id per
    document in a row), position ``t`` predicts ``tokens[t + k]`` only when
    ``segment_ids[t] == segment_ids[t + k]``: no position is trained to
    predict the first token of the next document. The ids only mark
    boundaries; padding is still ``where`` or ``ignore_index`` (MaxText's
    convention, id 0 = padding, is ``where=segment_ids != 0``)::

        segment_ids = [[1, 1, 1, 2, 2, 0, 0]]       # two documents, then padding
        sequence_nll(logits, tokens, shift=True, segment_ids=segment_ids,
                     where=segment_ids != 0)        # 3 targets: t=1, 2 in doc 1; t=4 in doc 2

    Args:
      logits: ``[..., T, V]``, or a :class:`jxent.LinearLogits` with hidden
        ``[..., T, D]`` (the fused path: same value and gradients, no
        ``[tokens, V]`` array).
      tokens: ``[..., T]`` integer token ids.
      shift: required, no default: ``True`` (or 1) for causal LM logits,
        ``False`` (0) for logits already aligned with ``tokens`` (e.g. after
        ``logits[:, :-1]`` and ``tokens[:, 1:]``; a default would silently
        shift those twice), or ``k >= 2`` for the ``k``-th next token (the
        heads of multi-token prediction). With ``T <= k`` there is no target:
        the result is empty (0, zero gradient).
      where: ``[..., T]`` boolean loss mask on target positions (padding,
        prompt tokens); False = not counted. Aligned with ``tokens``.
      segment_ids: ``[..., T]`` integer document ids of packed rows (see above).
      weights: ``[..., T]`` float weights ``>= 0`` of the target tokens, aligned
        with ``tokens``: each counted token's loss is multiplied by its weight
        and ``"tokens"`` divides by the sum of the counted weights (as PyTorch
        divides by the targets' class weights). A negative or non-finite
        weight raises ``ValueError`` eagerly; under ``jit`` it makes that
        position's loss (and any sum over it) NaN, and
        ``jax.experimental.checkify`` reports it (``"weights must be finite
        and >= 0, got …"``).
      ignore_index: tokens equal to it are not counted (``None`` disables).
      normalize: ``"tokens"`` -- Σ NLL over all counted tokens of the batch /
        their number (the global token mean); ``"sequences"`` -- each
        sequence's mean over its counted tokens (each document's, with
        ``segment_ids``: every row × id pair with a counted token), then the
        mean over those; ``"sum"`` -- the total NLL, i.e. minus the
        log-likelihood of the data; ``"none"`` -- the per-token losses
        ``[..., T - k]`` (aligned with ``tokens[..., k:]``), 0 where not counted.
      label_smoothing, z_loss, logit_softcap, class_weights, vocab_axis_name:
        as in :func:`softmax_cross_entropy`. With ``class_weights`` the counts
        are sums of the targets' weights.
      base: ``None`` for nats, ``2`` for bits (any ``b > 0, b != 1``), as the
        information functions take it. :class:`NLLStats` converts sums
        instead: ``.bits_per_token()``, ``.bits_per_byte(num_bytes)``.

    Returns:
      A scalar (the per-token array for ``normalize="none"``); 0 when no
      token is counted.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]]))
      >>> tokens = jnp.array([[1, 1, 0]])
      >>> round(float(jxent.sequence_nll(logits, tokens, shift=True, normalize="sum")), 4)
      0.7985
      >>> round(float(jxent.sequence_nll(logits, tokens, shift=True, base=2)), 4)  # bits/token
      0.5760
    """
    options = sequence_options(
        "sequence_nll", shift=shift, normalize=normalize, base=base, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, logit_softcap=logit_softcap,
    )
    loss, weight, positions = _token_losses(
        "sequence_nll", logits, tokens, options, where=where, segment_ids=segment_ids,
        weights=weights, class_weights=class_weights, vocab_axis_name=vocab_axis_name,
    )
    if options.how == "none":
        loss = positions.trim(loss)
    return to_base(reduce(loss, weight, options.how, positions.segments), options.log_base)
