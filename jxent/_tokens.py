"""Token-level information for post-training: log-probs, entropy, log-normaliser, argmax.

Each quantity is a per-position *core* on logits with the class axis last
(``[..., V]``, or one shard of the vocabulary with a ``ClassOps`` that
combines shards), wrapped by a public function that validates everything
once (distillation, built the same way, is in ``jxent._distillation``). The
cores take validated inputs only, so the fused engine
(``LinearLogits``) calls the same cores on chunks ``[C, V]`` of logits:
``token_stats`` per position (with a one-pass pullback, a ``Rule``), and
``token_objective``, the sum of a per-token function of the statistics, as
a sum whose gradient the engine forms in the forward pass.

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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import (
    class_ids,
    float_dtype,
    float_logits,
    parse_temperature,
)
from ._chunked import Rule, chunked, split_traced
from ._classes import ClassOps
from ._linear import LinearLogits
from ._reduce import nonnegative
from ._sequence import REQUIRED, _aligned

__all__ = ["token_objective", "token_stats", "TokenStats"]

class TokenStats(NamedTuple):
    """Per-position token statistics (a pytree); 0 / False where not counted.

    Attributes:
      log_prob: ``log softmax(z)[token]``, ``z = logits / temperature``.
      entropy: ``H(softmax(z)) = −Σ_c p_c log p_c``.
      logsumexp: ``log Σ_c exp z_c``.
      is_argmax: the token's logit equals the maximum (ties count).
    """

    log_prob: Float[Array, " *positions"]
    entropy: Float[Array, " *positions"]
    logsumexp: Float[Array, " *positions"]
    is_argmax: Bool[Array, " *positions"]


def _is_one(value: Any) -> bool:
    return isinstance(value, float) and value == 1.0


def _shifted(logits, keep, temperature, ops: ClassOps, dtype):
    """``(x, d, top, raw_top)`` for ``[..., V]`` logits.

    ``x`` the logits in ``dtype``; ``raw_top`` the per-position max of the raw
    logits (keepdims, no gradient, combined across shards); ``top`` the same,
    0 where not kept or not finite; ``d = (x − top) / T``, 0 where not kept.
    The max reads the raw logits (no masked copy); the ``where`` feeding ``d``
    fuses into its consumers.
    """
    x = logits.astype(dtype)
    raw_top = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    if ops.axis_name is not None:
        raw_top = jax.lax.pmax(raw_top, ops.axis_name)
    top = jnp.where(keep & jnp.isfinite(raw_top), raw_top, 0)
    d = jnp.where(keep, x, 0) - top
    if not _is_one(temperature):
        d = d / jnp.asarray(temperature, dtype)
    return x, d, top, raw_top


def _scaled(value, temperature, dtype):
    return value if _is_one(temperature) else value / jnp.asarray(temperature, dtype)


def token_stats_core(logits, tokens, counted, temperature, ops: ClassOps) -> TokenStats:
    """:class:`TokenStats` per position from validated inputs (no checks here).

    Args:
      logits: ``[..., V_local]``, the class axis last (any float dtype).
      tokens: ``[...]`` int32 global ids from :func:`class_ids`: in ``[0, V)``
        where counted (``V`` means out of range and gives NaN ``log_prob``).
      counted: ``[...]`` bool.
      temperature: a Python float > 0 or a traced scalar.
      ops: ``ClassOps(axis=logits.ndim - 1, axis_name, num_local=V_local)``.
    """
    return _token_stats_saved(logits, tokens, counted, temperature, ops)[0]


def _token_stats_saved(logits, tokens, counted, temperature, ops: ClassOps):
    """:func:`token_stats_core`'s outputs and ``(top, log S, Σ p·d)`` per position.

    The three vectors are what :func:`_token_stats_pullback` needs to form the
    logits' gradient without another reduction over classes.
    """
    dtype = float_dtype(logits.dtype)
    keep = counted[..., None]
    x, d, top, raw_top = _shifted(logits, keep, temperature, ops, dtype)
    e = jnp.exp(d)
    total = ops.sum(e)
    log_total = jnp.log(total)
    # Σ_c p_c d_c with 0 · (−inf) = 0 for −inf logits, gated on exactly that case.
    finite_d = jnp.where(d == -jnp.inf, 0, d)
    mean_d = ops.sum(e * finite_d) / total
    x_t = ops.take(x, tokens, fill=jnp.nan)
    top = top[..., 0]
    log_prob = _scaled(jnp.where(counted, x_t, 0) - top, temperature, dtype) - log_total
    entropy = nonnegative(log_total - mean_d)
    logsumexp = _scaled(top, temperature, dtype) + log_total
    stats = TokenStats(
        log_prob=jnp.where(counted, log_prob, 0),
        entropy=jnp.where(counted, entropy, 0),
        logsumexp=jnp.where(counted, logsumexp, 0),
        is_argmax=counted & (x_t == raw_top[..., 0]),
    )
    return stats, (top, log_total, mean_d)


def _checked(logits, tokens, where, shift, vocab_axis_name, function: str):
    """Validated, aligned ``(logits, index, counted, ops)`` for ``token_stats``/``token_objective``.

    ``logits`` stays a :class:`LinearLogits` (positions sliced for ``shift``)
    or becomes a float array; ``index`` and ``counted`` are from
    :func:`class_ids`.
    """
    if not isinstance(logits, LinearLogits):
        logits = float_logits(logits, "logits")
    logits, tokens, where = _aligned(logits, tokens, where, shift, function)
    ops = ClassOps(logits.ndim - 1, vocab_axis_name, logits.shape[-1])
    index, counted = class_ids(tokens, where, logits.shape[:-1], ops, name="tokens")
    return logits, index, counted, ops


def token_stats(
    logits: Float[ArrayLike, "*batch T V"],
    tokens: Int[ArrayLike, "*batch T"],
    *,
    shift: bool = REQUIRED,
    where: Bool[ArrayLike, "*batch T"] | None = None,
    temperature: float = 1.0,
    vocab_axis_name: str | None = None,
) -> TokenStats:
    """Log-probability, entropy, log-normaliser and argmax of each token, per position.

    With ``z = logits / temperature`` and ``p = softmax(z)`` over the last axis:

        ``log_prob = log p[token] = z_token − logsumexp(z)``,
        ``entropy = H(p) = −Σ_c p_c log p_c``, ``logsumexp = log Σ_c exp z_c``,
        ``is_argmax = (logits[token] == max_c logits_c)`` (every tied class counts).

    For policy gradients and reference-model KL penalties (``log_prob`` of the
    sampled tokens), entropy bonuses and monitoring, token accuracy, and
    sequence scoring: the log-likelihood of a sequence is ``Σ log_prob`` over
    its counted positions (``−sequence_nll(..., normalize="sum")`` at
    temperature 1). ``log_prob``, ``entropy`` and ``logsumexp`` are
    differentiable, in forward mode too; ``is_argmax`` is a bool.

    Args:
      logits: ``[..., T, V]``, any float dtype (bf16/f16 computed in float32).
      tokens: ``[..., T]`` integer token ids (any integer dtype).
      shift: required, no default. ``True`` for causal LM logits:
        ``logits[..., :-1, :]`` score ``tokens[..., 1:]`` and ``where`` is
        shifted with the tokens; ``False`` when logits and tokens are aligned.
      where: ``[..., T]`` boolean, aligned with ``tokens``; False = not counted.
      temperature: ``T > 0``, a Python float or a traced scalar (e.g. the
        sampling temperature of an RL rollout).
      vocab_axis_name: inside ``shard_map``, the mesh axis along which the
        vocabulary (last axis of ``logits``) is sharded; tokens hold global
        ids and shards exchange only per-position vectors.

    Returns:
      :class:`TokenStats` of ``[..., T − 1]`` arrays with ``shift=True``,
      ``[..., T]`` without; float32 (float64 under ``jax_enable_x64`` for
      float64 logits).

    Conventions: positions not counted are 0 (False) in every field, with zero
    gradient even when their logits are NaN or ±inf. A ``−inf`` logit at a
    counted position is a class of probability zero: values and gradients stay
    finite unless the token itself has probability zero (then
    ``log_prob = −inf``). Rounding never makes ``entropy`` negative. Token ids
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
    """
    temperature = parse_temperature(temperature)
    logits, index, counted, ops = _checked(
        logits, tokens, where, shift, vocab_axis_name, "token_stats"
    )
    positions = logits.shape[:-1]
    if not isinstance(logits, LinearLogits):
        return token_stats_core(logits, index, counted, temperature, ops)
    static, traced = split_traced(temperature=temperature)
    n = math.prod(positions)
    out = chunked(
        _token_stats_chunk,
        (logits,),
        index.reshape(n),
        counted.reshape(n),
        consts=traced,
        mode="positions",
        options=dict(static, vocab_axis_name=vocab_axis_name),
    )
    return jax.tree.map(lambda x: x.reshape(positions), out)


def token_objective(
    logits: Float[ArrayLike, "*batch T V"],
    tokens: Int[ArrayLike, "*batch T"],
    fn: Callable[..., Array],
    *,
    shift: bool = REQUIRED,
    args: tuple = (),
    where: Bool[ArrayLike, "*batch T"] | None = None,
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
      args: a tuple of ``[..., T]`` arrays aligned with ``tokens`` (shifted
        with them when ``shift=True``), passed to ``fn`` as constants: no
        gradient flows to them (``stop_gradient``), as for advantages.
      where: ``[..., T]`` boolean, aligned with ``tokens``; False = not counted.
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
    if not callable(fn):
        raise TypeError(f"fn must be a function of (stats, *args), got {type(fn).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of [..., T] arrays, got {type(args).__name__}")
    temperature = parse_temperature(temperature)
    full = jnp.shape(tokens)
    args = tuple(jax.lax.stop_gradient(jnp.asarray(a)) for a in args)
    for k, a in enumerate(args):
        if a.shape != full:
            raise ValueError(
                f"args[{k}] has shape {a.shape} but tokens has shape {full}; each "
                "of args holds one value per token position [..., T]"
            )
    logits, index, counted, ops = _checked(
        logits, tokens, where, shift, vocab_axis_name, "token_objective"
    )
    if shift:
        args = tuple(a[..., 1:] for a in args)
    positions = logits.shape[:-1]
    dtype = float_dtype(logits.dtype)
    _check_objective(fn, positions, dtype, args)
    if not isinstance(logits, LinearLogits):
        stats = token_stats_core(logits, index, counted, temperature, ops)
        return jnp.sum(_objective_values(fn, stats, args, counted, dtype))
    static, traced = split_traced(temperature=temperature)
    n = math.prod(positions)
    total, _ = chunked(
        _objective_chunk,
        (logits,),
        (index.reshape(n), tuple(a.reshape(n) for a in args)),
        counted.reshape(n),
        consts=traced,
        mode="sum",
        options=dict(static, fn=fn, vocab_axis_name=vocab_axis_name),
    )
    return total


def _check_objective(fn, positions, dtype, args) -> None:
    """``fn`` must return one float per position: checked on shapes, nothing is run."""
    vector = jax.ShapeDtypeStruct(positions, dtype)
    stats = TokenStats(vector, vector, vector, jax.ShapeDtypeStruct(positions, jnp.bool_))
    out = jax.eval_shape(fn, stats, *args)
    shape, out_dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != tuple(positions) or not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(
            f"fn(stats, *args) must return a float array of the positions' shape "
            f"{tuple(positions)} (one value per position), got "
            f"{out if shape is None else f'shape {shape}, dtype {out_dtype}'}"
        )


def _objective_values(fn, stats, args, counted, dtype):
    return jnp.where(counted, fn(stats, *args).astype(dtype), 0)


# --------------------------------------------------------------------------- fused


def _token_stats_forward(logits, tokens, counted, traced, *, vocab_axis_name, **static):
    """The fused path's per-chunk function: :func:`token_stats_core` on ``[C, V]`` logits."""
    (x,) = logits
    ops = ClassOps(1, vocab_axis_name, x.shape[1])
    return _token_stats_saved(x, tokens, counted, {**static, **traced}["temperature"], ops)


def _token_stats_pullback(
    logits, tokens, counted, traced, saved, cts, *, vocab_axis_name, **static
):
    """``∂/∂logits`` of ``Σ a·log_prob + c·entropy + b·logsumexp`` on one chunk, in one pass.

    With ``d = (x − top) / T``, ``log p = d − log S`` and ``Σ p·d`` saved by the
    forward pass: ``∂log p_t/∂x_j = (δ_jt − p_j) / T``, ``∂logsumexp/∂x_j = p_j / T``
    and ``∂H/∂x_j = −p_j (d_j − Σ p·d) / T`` (``log p_j + H = d_j − Σ p·d``), the
    same expressions the dense core's autodiff forms, without its reductions.
    """
    (x,) = logits
    temperature = {**static, **traced}["temperature"]
    ops = ClassOps(1, vocab_axis_name, x.shape[1])
    dtype = float_dtype(x.dtype)
    top, log_total, mean_d = (v[:, None] for v in saved)
    a, c, b = (ct.astype(dtype)[:, None] for ct in cts)  # log_prob, entropy, logsumexp
    keep = counted[:, None]
    d = _scaled(jnp.where(keep, x.astype(dtype), 0) - top, temperature, dtype)
    p = jnp.exp(d - log_total)
    spread = jnp.where(d == -jnp.inf, 0, d - mean_d)
    hit = jnp.arange(x.shape[1])[None, :] + ops.offset() == tokens[:, None]
    g = jnp.where(hit, a, 0) - p * (a - b + c * spread)
    return (jnp.where(keep, _scaled(g, temperature, dtype), 0),)


_token_stats_chunk = Rule(_token_stats_forward, _token_stats_pullback)


def _objective_chunk(logits, rows, counted, traced, *, fn, vocab_axis_name, **static):
    """:func:`token_objective`'s per-chunk values, and no auxiliary sums (``mode="sum"``)."""
    (x,) = logits
    tokens, args = rows
    ops = ClassOps(1, vocab_axis_name, x.shape[1])
    stats = token_stats_core(x, tokens, counted, {**static, **traced}["temperature"], ops)
    return _objective_values(fn, stats, args, counted, float_dtype(x.dtype)), ()
