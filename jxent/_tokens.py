"""Token-level information for post-training: log-probs, entropy, log-normaliser, argmax.

Each quantity is a per-position *core* on logits with the class axis last
(``[..., V]``, or one shard of the vocabulary with a ``ClassOps`` that
combines shards), run by the engine (``jxent._engine.run``) on dense logits
or on chunks ``[C, V]`` of ``LinearLogits``: ``token_stats`` per position
(with a one-pass pullback, a ``Rule``), and ``token_objective``, the sum of a
per-token function of the statistics, whose gradient the fused engine forms
in the forward pass. Distillation, built the same way, is in
``jxent._distillation``.

Numerics: every quantity stays relative to the per-position maximum ``top``
(no gradient). With ``d = (x − top) / T`` and ``S = Σ_c exp d_c``:
``log p_t = d_t − log S``, ``H = log S − Σ_c exp(d_c) d_c / S`` and
``logsumexp = top / T + log S``; nothing large is added and then subtracted.
A ``−inf`` logit is a class of probability zero: its ``0 · (−inf)`` is gated on
exactly ``d = −inf`` (never on ``p == 0``, which would drop gradients).
Positions that are not counted are zeroed before any arithmetic (the double
``where``), so NaN or inf there reach neither values nor gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import float_dtype
from ._engine import Rule, run
from ._numerics import nonnegative
from ._options import REQUIRED, token_options
from ._positions import objective_rows, token_targets
from ._rows import centred_logits, entropy_parts, scaled
from ._vocab import ClassOps

__all__ = ["token_objective", "token_stats", "TokenStats"]


class TokenStats(NamedTuple):
    """Per-position token statistics (a pytree); 0 / False where not counted.

    Attributes:
      log_prob: ``log softmax(z)[token]``, ``z = logits / temperature``.
      entropy: ``H(softmax(z)) = −Σ_c p_c log p_c``.
      logsumexp: ``log Σ_c exp z_c``.
      is_argmax: the token's logit equals the maximum (ties count).
      argmax: int32, the predicted class: the smallest id among the classes
        whose logit is the maximum (``jnp.argmax``'s rule, on one device, fused
        and across vocab shards alike).
    """

    log_prob: Float[Array, " *positions"]
    entropy: Float[Array, " *positions"]
    logsumexp: Float[Array, " *positions"]
    is_argmax: Bool[Array, " *positions"]
    argmax: Int[Array, " *positions"]


# --------------------------------------------------------------------------- cores


def _stats_and_saved(logits, tokens, counted, temperature, ops: ClassOps):
    """:class:`TokenStats` per position and ``(top, log S, Σ p·d)``, from validated inputs.

    ``tokens`` are int32 global ids in ``[0, V)`` where counted (``V`` means
    out of range and gives NaN ``log_prob``). The three vectors are what
    :func:`_stats_pullback` needs to form the logits' gradient without
    another reduction over classes.
    """
    dtype = float_dtype(logits.dtype)
    keep = counted[..., None]
    x, d, top, raw_top = centred_logits(logits, keep, temperature, ops, dtype)
    e = jnp.exp(d)
    log_total, mean_d = entropy_parts(e, ops.sum(e), d, ops.sum)
    x_t = ops.take(x, tokens, fill=jnp.nan)
    top = top[..., 0]
    log_prob = scaled(jnp.where(counted, x_t, 0) - top, temperature, dtype) - log_total
    entropy = nonnegative(log_total - mean_d)
    logsumexp = scaled(top, temperature, dtype) + log_total
    stats = TokenStats(
        log_prob=jnp.where(counted, log_prob, 0),
        entropy=jnp.where(counted, entropy, 0),
        logsumexp=jnp.where(counted, logsumexp, 0),
        is_argmax=counted & (x_t == raw_top[..., 0]),
        argmax=jnp.where(counted, ops.first(x == raw_top), 0),
    )
    return stats, (top, log_total, mean_d)


def _stats_forward(logits, tokens, counted, *, temperature, vocab_axis_name):
    (x,) = logits
    ops = ClassOps(x.ndim - 1, vocab_axis_name, x.shape[-1])
    return _stats_and_saved(x, tokens, counted, temperature, ops)


def _stats_pullback(logits, tokens, counted, saved, cts, *, temperature, vocab_axis_name):
    """``∂/∂logits`` of ``Σ a·log_prob + c·entropy + b·logsumexp`` in one elementwise pass.

    With ``d = (x − top) / T``, ``log p = d − log S`` and ``Σ p·d`` saved by the
    forward pass: ``∂log p_t/∂x_j = (δ_jt − p_j) / T``, ``∂logsumexp/∂x_j = p_j / T``
    and ``∂H/∂x_j = −p_j (d_j − Σ p·d) / T`` (``log p_j + H = d_j − Σ p·d``), the
    same expressions the dense core's autodiff forms, without its reductions.
    """
    (x,) = logits
    ops = ClassOps(x.ndim - 1, vocab_axis_name, x.shape[-1])
    dtype = float_dtype(x.dtype)
    top, log_total, mean_d = (v[..., None] for v in saved)
    a, c, b = (ct.astype(dtype)[..., None] for ct in cts)  # log_prob, entropy, logsumexp
    keep = counted[..., None]
    d = scaled(jnp.where(keep, x.astype(dtype), 0) - top, temperature, dtype)
    p = jnp.exp(d - log_total)
    spread = jnp.where(d == -jnp.inf, 0, d - mean_d)
    classes = jnp.arange(x.shape[-1]).reshape((1,) * (x.ndim - 1) + (-1,))
    hit = classes + ops.offset() == tokens[..., None]
    g = jnp.where(hit, a, 0) - p * (a - b + c * spread)
    return (jnp.where(keep, scaled(g, temperature, dtype), 0),)


_stats_core = Rule(_stats_forward, _stats_pullback)


def _objective_core(logits, rows, counted, *, fn, temperature, vocab_axis_name):
    """:func:`token_objective`'s per-position values, and no auxiliary sums (``mode="sum"``)."""
    tokens, args = rows
    stats = _stats_core(logits, tokens, counted, temperature=temperature,
                        vocab_axis_name=vocab_axis_name)
    dtype = float_dtype(logits[0].dtype)
    return jnp.where(counted, fn(stats, *args).astype(dtype), 0), ()


# --------------------------------------------------------------------------- public


def token_stats(
    logits: Float[ArrayLike, "*batch T V"],
    tokens: Int[ArrayLike, "*batch T"],
    *,
    shift: bool | int = REQUIRED,
    where: Bool[ArrayLike, "*batch T"] | None = None,
    ignore_index: int | None = -100,
    segment_ids: Int[ArrayLike, "*batch T"] | None = None,
    temperature: float = 1.0,
    vocab_axis_name: str | None = None,
) -> TokenStats:
    """Log-probability, entropy, log-normaliser and argmax of each token, per position.

    With ``z = logits / temperature`` and ``p = softmax(z)`` over the last axis:

        ``log_prob = log p[token] = z_token − logsumexp(z)``,
        ``entropy = H(p) = −Σ_c p_c log p_c``, ``logsumexp = log Σ_c exp z_c``,
        ``is_argmax = (logits[token] == max_c logits_c)`` (every tied class counts),
        ``argmax = min {c : logits_c = max logits}`` (the predicted class, int32).

    For policy gradients and reference-model KL penalties (``log_prob`` of the
    sampled tokens), entropy bonuses and monitoring, token accuracy, and
    sequence scoring: the log-likelihood of a sequence is ``Σ log_prob`` over
    its counted positions (``−sequence_nll(..., normalize="sum")`` at
    temperature 1). ``log_prob``, ``entropy`` and ``logsumexp`` are
    differentiable, in forward mode too; ``is_argmax`` is a bool and
    ``argmax`` the predicted class id (token accuracy and predicted tokens
    without a second pass; ties go to the smallest id, as ``jnp.argmax``, the
    same on one device, fused, and across vocab shards). Values are in nats;
    divide by ``math.log(2)`` for bits.

    Args:
      logits: ``[..., T, V]``, any float dtype (bf16/f16 computed in float32).
      tokens: ``[..., T]`` integer token ids (any integer dtype).
      shift: required, no default. ``True`` (1) for causal LM logits:
        ``logits[..., :-1, :]`` score ``tokens[..., 1:]`` and ``where`` is
        shifted with the tokens; ``False`` (0) when logits and tokens are
        aligned; ``k`` for the ``k``-th next token.
      where: ``[..., T]`` boolean, aligned with ``tokens``; False = not counted.
      ignore_index: tokens equal to it are not counted (default −100, as in
        :func:`sequence_nll`, so the same padded ``tokens`` work; ``None``
        disables it).
      segment_ids: ``[..., T]`` integer document ids of packed rows: position
        ``t`` is counted only when ``segment_ids[t] == segment_ids[t + k]``
        (see :func:`sequence_nll`).
      temperature: ``T > 0``, a Python float or a traced scalar (e.g. the
        sampling temperature of an RL rollout). A concrete ``T <= 0`` (or
        inf, NaN) raises ``ValueError``; a traced one makes every statistic
        NaN, and ``jax.experimental.checkify`` reports it
        (``"temperature must be a finite float > 0, got …"``).
      vocab_axis_name: inside ``shard_map``, the mesh axis along which the
        vocabulary (last axis of ``logits``) is sharded; tokens hold global
        ids and shards exchange only per-position vectors.

    Returns:
      :class:`TokenStats` of ``[..., T − k]`` arrays for a shift of ``k``
      (``[..., T − 1]`` with ``shift=True``, ``[..., T]`` without); float32
      (float64 under ``jax_enable_x64`` for float64 logits).

    Conventions: positions not counted are 0 (False) in every field, with zero
    gradient even when their logits are NaN or ±inf. A ``−inf`` logit at a
    counted position is a class of probability zero: values and gradients stay
    finite unless the token itself has probability zero (then
    ``log_prob = −inf``). Rounding never makes ``entropy`` negative.
    ``argmax`` is ``V`` (no class) at a counted position whose logits hold NaN. Token ids
    outside ``[0, V)`` at counted positions raise ``ValueError`` in an eager
    call; under ``jit`` their ``log_prob`` is NaN (never a wrapped id).

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]]))
      >>> stats = jxent.token_stats(logits, jnp.array([[0, 2]]), shift=False)
      >>> stats.log_prob
      Array([[-0.6931..., -2.3025...]], dtype=float32)
      >>> stats.entropy
      Array([[1.0397..., 0.6390...]], dtype=float32)
      >>> stats.is_argmax
      Array([[ True, False]], dtype=bool)
      >>> stats.argmax
      Array([[0, 0]], dtype=int32)
    """
    options = token_options(
        "token_stats", temperature=temperature, shift=shift, ignore_index=ignore_index
    )
    logits, positions = token_targets(
        logits, tokens, shift=options.shift, where=where, ignore_index=options.ignore_index,
        function="token_stats", vocab_axis_name=vocab_axis_name, segment_ids=segment_ids,
    )
    out = run(
        _stats_core, (logits,), positions.targets, positions.counted, mode="positions",
        options=dict(temperature=options.temperature, vocab_axis_name=vocab_axis_name),
    )
    return positions.trim(out)


def token_objective(
    logits: Float[ArrayLike, "*batch T V"],
    tokens: Int[ArrayLike, "*batch T"],
    fn: Callable[..., Array],
    *,
    shift: bool | int = REQUIRED,
    args: tuple = (),
    where: Bool[ArrayLike, "*batch T"] | None = None,
    ignore_index: int | None = -100,
    segment_ids: Int[ArrayLike, "*batch T"] | None = None,
    temperature: float = 1.0,
    vocab_axis_name: str | None = None,
) -> Float[Array, ""]:
    """``Σ fn(token_stats(logits, tokens, ...), *args)`` over the counted positions.

    The per-token objective of policy-gradient training in one call: ``fn``
    maps the :class:`TokenStats` of each position (and that position's
    entries of ``args``: advantages, old log-probs, per-sequence weights) to
    one value, and the result is the sum of those values over the counted
    positions. On dense logits it is exactly that expression. Its point is
    :class:`~jxent.LinearLogits`: because the function of the statistics is
    known, the fused engine computes the gradient while it runs the forward
    pass (three products per chunk, like the fused cross-entropy), where
    ``jnp.sum(fn(token_stats(LinearLogits(...)), ...))`` must recompute each
    chunk's logits in the backward pass (four products per chunk).

    Args:
      logits: ``[..., T, V]`` logits or a :class:`~jxent.LinearLogits`.
      tokens: ``[..., T]`` integer token ids.
      fn: ``fn(stats, *args) -> values``, called on :class:`TokenStats` and
        ``args`` of some positions (a chunk of them when fused), returning a
        float array of those positions' shape. It must act position by
        position (no sums or means across positions inside it): normalise
        with per-position weights in ``args`` instead, e.g. ``1 / length``
        of each sequence for a per-sequence mean.
      shift: required, as in :func:`token_stats`.
      args: a tuple of arrays aligned with the *predicted* positions, the
        shape :func:`token_stats` returns (``[..., T − k]`` for a shift of
        ``k``), each of that rank with size-1 axes broadcasting (``[B, 1]``
        per-sequence advantages, ``[1, T − k]`` a per-position mask) or a
        scalar. An argument of the tokens' unshifted shape ``[..., T]`` with
        ``k > 0`` is an error that says which slice to take. Passed to ``fn``
        as constants: no gradient flows to them (``stop_gradient``).
      where: ``[..., T]`` boolean, aligned with ``tokens``; False = not counted.
      ignore_index, segment_ids: as in :func:`token_stats`.
      temperature: as in :func:`token_stats`.
      vocab_axis_name: as in :func:`token_stats`.

    Returns:
      A scalar: ``Σ fn(stats, *args)`` over the counted positions (float32;
      float64 under ``jax_enable_x64`` for float64 logits). Divide by the
      number of counted positions for a mean.

    Positions not counted add nothing and get zero gradient (their logits may
    be NaN or ±inf), provided ``fn`` and its derivative are finite where the
    statistics are 0 (their value there).

    Examples:
      A REINFORCE loss with an entropy bonus, ``−Σ (A·log_prob + 0.01·H)``:

      >>> import jax.numpy as jnp, jxent
      >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]]))
      >>> tokens, advantages = jnp.array([[0, 2]]), jnp.array([[1.0, -0.5]])
      >>> jxent.token_objective(
      ...     logits, tokens, lambda s, a: -(a * s.log_prob + 0.01 * s.entropy),
      ...     shift=False, args=(advantages,))
      Array(-0.4749..., dtype=float32)
    """
    options = token_options(
        "token_objective", temperature=temperature, shift=shift, fn=fn, ignore_index=ignore_index
    )
    logits, positions = token_targets(
        logits, tokens, shift=options.shift, where=where, ignore_index=options.ignore_index,
        function="token_objective", vocab_axis_name=vocab_axis_name, segment_ids=segment_ids,
    )
    rows = objective_rows(options.fn, args, logits, positions, options.shift, _stats_like)
    total, _ = run(
        _objective_core, (logits,), rows, positions.counted, mode="sum",
        options=dict(fn=options.fn, temperature=options.temperature,
                     vocab_axis_name=vocab_axis_name),
    )
    return total


def _stats_like(shape: tuple, dtype) -> TokenStats:
    """:class:`TokenStats` as ``jax.ShapeDtypeStruct`` s: what ``fn`` is checked on."""
    vector = jax.ShapeDtypeStruct(shape, dtype)
    return TokenStats(vector, vector, vector, jax.ShapeDtypeStruct(shape, jnp.bool_),
                      jax.ShapeDtypeStruct(shape, jnp.int32))
