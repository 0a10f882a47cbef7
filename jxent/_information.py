"""Information theory on probability vectors and on logits.

Every function is elementwise along a distribution ``axis`` (default ``-1``)
and sums over it; all other axes are batch axes. Conventions shared by all:

* ``0 · log 0 = 0`` and ``0 · log q = 0`` for any ``q`` (also ``q = 0``);
  ``p · log 0 = -inf`` for ``p > 0``, so cross-entropy and KL are ``+inf``
  where ``q = 0 < p`` -- the math, not a clipped number.
* Inputs are used as given: **not renormalised and not clipped**
  (``scipy.stats.entropy`` renormalises; jxent does not).
* ``where`` (boolean, broadcast against ``p``) drops entries from the sum
  over ``axis``, like numpy's ``where=``; masked entries may hold anything,
  NaN and inf included, without touching values or gradients.
* ``base=None`` gives nats, ``base=2`` bits, any other ``b > 0, b != 1``
  divides by ``ln b``.
* Gradients are finite wherever the value is finite. At an exact ``p = 0``
  the derivative of ``-p log p`` (one-sided ``+inf``) is taken as 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from ._checks import (
    as_float_array,
    check_axis,
    check_broadcastable,
    check_probabilities,
    check_where,
    float_dtype,
    floating_array,
)
from ._numerics import nonnegative
from ._options import check_base
from ._reduce import to_base
from ._rows import entropy_parts, kl_row

__all__ = [
    "information_content",
    "entropy",
    "cross_entropy",
    "kl_divergence",
    "js_divergence",
    "entropy_from_logits",
    "kl_divergence_from_logits",
]


def _xlogy(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x · log y`` with ``0 · log y = 0`` and gradients that never turn NaN.

    The double ``where``: ``y`` is replaced by 1 wherever ``x == 0`` and
    ``log y`` is not finite, so neither branch can produce ``0 · inf``. Where
    ``x == 0 < y < inf`` the product is kept, so ``∂/∂x = log y`` there (the
    gradient of the linear ``x · log q`` in ``x``); with ``y = x`` that case
    never arises, and ``∂(x log x)/∂x`` at 0 is taken as 0.
    """
    use_log = (x != 0) | ((y > 0) & (y < jnp.inf))
    safe_y = jnp.where(use_log, y, 1)
    return jnp.where(use_log, x * jnp.log(safe_y), 0)


def _prepare(arrays: dict, where, axis: int, *, logits: bool = False, fills=(0.0, 1.0)):
    """``(arrays, axis, mask)``: every array check of a function on distributions, once.

    ``arrays`` (``{name: array}``, one or two) become float arrays of one
    common dtype and (broadcast) shape with at least one axis; ``axis`` is
    normalised and ``where`` checked against that shape. Logits must be
    floating and come back with the mask (their softmax drops entries).
    Probabilities come back with dropped entries replaced by ``fills``
    before any arithmetic (the double ``where``, so they may hold anything)
    and only then are they checked to lie in ``[0, 1]`` (eager calls only).
    """
    names = tuple(arrays)
    xs = [jnp.asarray(a) for a in arrays.values()]
    if logits:
        xs = [floating_array(x, n, "a floating-point array of logits")
              for x, n in zip(xs, names, strict=True)]
    dtype = float_dtype(*(x.dtype for x in xs))
    xs = [as_float_array(x, n, dtype) for x, n in zip(xs, names, strict=True)]
    shape = xs[0].shape
    if len(xs) == 2:
        shape = check_broadcastable(xs[0].shape, xs[1].shape, *names)
        xs = [jnp.broadcast_to(x, shape) for x in xs]
    if len(shape) == 0:
        scalars = " and ".join(names) + (" are scalars" if len(xs) == 2 else " is a scalar")
        raise ValueError(f"{scalars}; a distribution needs at least one axis (the class axis)")
    axis = check_axis(axis, len(shape), arg=names[0])
    mask = check_where(where, shape, "where", names[0])
    if not logits:
        if mask is not None:
            xs = [jnp.where(mask, x, fill) for x, fill in zip(xs, fills, strict=False)]
        for x, name in zip(xs, names, strict=True):
            check_probabilities(x, name)
    return xs, axis, mask


def information_content(
    p: Float[ArrayLike, "*shape"], *, base: float | None = None
) -> Float[Array, "*shape"]:
    """Information content (surprisal) ``I(p) = -log p``, elementwise.

    Args:
      p: probabilities, any shape; integers are accepted.
      base: ``None`` for nats, ``2`` for bits, or any ``b > 0, b != 1``.

    Returns:
      ``-log p`` with the shape of ``p``; ``+inf`` where ``p = 0``.

    Examples:
      >>> import jxent
      >>> float(jxent.information_content(0.5, base=2))  # a fair coin flip
      1.0
      >>> round(float(jxent.information_content(0.8)), 3)
      0.223
    """
    log_base = check_base(base)
    p = as_float_array(p, "p")
    check_probabilities(p, "p")
    return to_base(-jnp.log(p), log_base)


def entropy(
    p: Float[ArrayLike, "*batch classes"],
    *,
    axis: int = -1,
    where: Bool[ArrayLike, "*batch classes"] | None = None,
    base: float | None = None,
) -> Float[Array, " *batch"]:
    """Shannon entropy ``H(p) = -Σ_c p_c log p_c`` along ``axis``.

    Args:
      p: probabilities ``[..., C, ...]``, summing to 1 along ``axis`` (not
        checked, not renormalised).
      axis: the distribution axis.
      where: optional boolean mask broadcast against ``p``; False entries are
        left out of the sum.
      base: ``None`` for nats, ``2`` for bits.

    Returns:
      ``p``'s shape without ``axis``. ``0 log 0 = 0``, so a certain outcome
      has entropy exactly 0; ``0 <= H(p) <= log C``.

    Examples:
      >>> import jxent
      >>> float(jxent.entropy([0.5, 0.5], base=2))
      1.0
      >>> float(jxent.entropy([1.0, 0.0]))
      0.0
    """
    log_base = check_base(base)
    (p,), axis, _ = _prepare({"p": p}, where, axis)
    return to_base(nonnegative(-jnp.sum(_xlogy(p, p), axis=axis)), log_base)


def cross_entropy(
    p: Float[ArrayLike, "*batch classes"],
    q: Float[ArrayLike, "*batch classes"],
    *,
    axis: int = -1,
    where: Bool[ArrayLike, "*batch classes"] | None = None,
    base: float | None = None,
) -> Float[Array, " *batch"]:
    """Cross-entropy ``H(p, q) = -Σ_c p_c log q_c`` of model ``q`` under data ``p``.

    ``H(p, q) = H(p) + KL(p‖q) >= H(p)``: the expected code length when
    events drawn from ``p`` are coded with a code built for ``q``.

    Args:
      p: the true (data) distribution ``[..., C, ...]``.
      q: the model distribution, broadcastable with ``p``.
      axis: the distribution axis.
      where: optional boolean mask broadcast against ``p``; False entries are
        left out of the sum.
      base: ``None`` for nats, ``2`` for bits.

    Returns:
      The broadcast shape without ``axis``. Terms with ``p = 0`` are 0;
      ``+inf`` where ``q = 0 < p``.

    Examples:
      >>> import jxent
      >>> round(float(jxent.cross_entropy([0.0, 1.0], [0.5, 0.5])), 3)
      0.693
    """
    log_base = check_base(base)
    (p, q), axis, _ = _prepare({"p": p, "q": q}, where, axis)
    return to_base(-jnp.sum(_xlogy(p, q), axis=axis), log_base)


def kl_divergence(
    p: Float[ArrayLike, "*batch classes"],
    q: Float[ArrayLike, "*batch classes"],
    *,
    axis: int = -1,
    where: Bool[ArrayLike, "*batch classes"] | None = None,
    base: float | None = None,
) -> Float[Array, " *batch"]:
    """Kullback–Leibler divergence ``KL(p‖q) = Σ_c p_c (log p_c − log q_c)``.

    ``p`` comes first, as in the math: the divergence of the model ``q`` from
    the data ``p``. (``optax.losses.kl_divergence(log_predictions, targets)``
    takes the model first; ``scipy.special.rel_entr(p, q)`` sums to this.)
    ``KL >= 0`` (Gibbs), ``KL(p‖p) = 0``, and in general ``KL(p‖q) != KL(q‖p)``.

    Args:
      p: the reference distribution ``[..., C, ...]``.
      q: the approximating distribution, broadcastable with ``p``.
      axis: the distribution axis.
      where: optional boolean mask broadcast against ``p``.
      base: ``None`` for nats, ``2`` for bits.

    Returns:
      The broadcast shape without ``axis``; ``+inf`` where ``q = 0 < p``.

    Examples:
      >>> import jxent
      >>> round(float(jxent.kl_divergence([0.5, 0.5], [0.9, 0.1])), 4)
      0.5108
      >>> round(float(jxent.kl_divergence([0.9, 0.1], [0.5, 0.5])), 4)
      0.3681
    """
    log_base = check_base(base)
    (p, q), axis, _ = _prepare({"p": p, "q": q}, where, axis)
    return to_base(nonnegative(jnp.sum(_xlogy(p, p) - _xlogy(p, q), axis=axis)), log_base)


def js_divergence(
    p: Float[ArrayLike, "*batch classes"],
    q: Float[ArrayLike, "*batch classes"],
    *,
    axis: int = -1,
    where: Bool[ArrayLike, "*batch classes"] | None = None,
    base: float | None = None,
) -> Float[Array, " *batch"]:
    """Jensen–Shannon divergence ``JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m)``, ``m = ½(p + q)``.

    Symmetric, finite even where one distribution has zeros, and
    ``0 <= JS <= log 2`` (1 bit).

    Args:
      p: a distribution ``[..., C, ...]``.
      q: another, broadcastable with ``p``.
      axis: the distribution axis.
      where: optional boolean mask broadcast against ``p``.
      base: ``None`` for nats, ``2`` for bits.

    Returns:
      The broadcast shape without ``axis``.

    Examples:
      >>> import jxent
      >>> float(jxent.js_divergence([1.0, 0.0], [0.0, 1.0], base=2))
      1.0
    """
    log_base = check_base(base)
    (p, q), axis, _ = _prepare({"p": p, "q": q}, where, axis, fills=(0.0, 0.0))
    m = 0.5 * (p + q)
    terms = 0.5 * (_xlogy(p, p) - _xlogy(p, m) + _xlogy(q, q) - _xlogy(q, m))
    return to_base(nonnegative(jnp.sum(terms, axis=axis)), log_base)


class _Centred(NamedTuple):
    """Logits along ``axis`` relative to their maximum, dropped and ``-inf`` entries left out."""

    usable: jax.Array  # kept by ``where`` and not ``-inf``
    safe: jax.Array  # the logits, 0 where not usable
    top: jax.Array  # the maximum of the usable entries (keepdims, no gradient; 0 if none)
    centred: jax.Array  # ``logits − top``, 0 where not usable
    exp: jax.Array  # ``exp(centred)``, 0 where not usable
    total: jax.Array  # ``Σ exp`` along ``axis`` (not keepdims), 1 where nothing is usable


def _centred(logits: jax.Array, mask: jax.Array | None, axis: int) -> _Centred:
    """:class:`_Centred` logits along ``axis`` (for :mod:`jxent._rows`' formulas).

    Dropped entries are replaced before any arithmetic (double ``where``), so
    masked NaN/inf never reach a value or a gradient; NaN in a kept entry propagates.
    """
    usable = logits != -jnp.inf
    if mask is not None:
        usable = usable & mask
    any_usable = jnp.any(usable, axis=axis, keepdims=True)
    safe = jnp.where(usable, logits, 0)
    top = jnp.max(jnp.where(usable, safe, -jnp.inf), axis=axis, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(any_usable, top, 0))
    centred = jnp.where(usable, safe - top, 0)
    exp = jnp.where(usable, jnp.exp(centred), 0)
    total = jnp.where(jnp.squeeze(any_usable, axis), jnp.sum(exp, axis=axis), 1)
    return _Centred(usable, safe, top, centred, exp, total)


def entropy_from_logits(
    logits: Float[ArrayLike, "*batch classes"],
    *,
    axis: int = -1,
    where: Bool[ArrayLike, "*batch classes"] | None = None,
    base: float | None = None,
) -> Float[Array, " *batch"]:
    """Entropy of ``softmax(logits)``: ``H = -Σ_c p_c log p_c``, computed in log space.

    ``-inf`` logits are classes of probability zero (they add nothing, and
    their gradient is 0). ``where`` drops entries as if they were not there:
    the softmax runs over the kept entries only, so the result equals the
    entropy of the sliced logits.

    Args:
      logits: unnormalised log-probabilities ``[..., C, ...]``.
      axis: the class axis.
      where: optional boolean mask broadcast against ``logits``.
      base: ``None`` for nats, ``2`` for bits.

    Returns:
      ``logits``' shape without ``axis``; 0 where no class is kept.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> float(jxent.entropy_from_logits(jnp.zeros(4), base=2))
      2.0
      >>> float(jxent.entropy_from_logits(jnp.array([3.0, -jnp.inf])))
      0.0
    """
    log_base = check_base(base)
    (logits,), axis, mask = _prepare({"logits": logits}, where, axis, logits=True)
    c = _centred(logits, mask, axis)
    log_total, mean = entropy_parts(c.exp, c.total, c.centred, lambda v: jnp.sum(v, axis=axis))
    return to_base(nonnegative(log_total - mean), log_base)


def kl_divergence_from_logits(
    p_logits: Float[ArrayLike, "*batch classes"],
    q_logits: Float[ArrayLike, "*batch classes"],
    *,
    axis: int = -1,
    where: Bool[ArrayLike, "*batch classes"] | None = None,
    base: float | None = None,
) -> Float[Array, " *batch"]:
    """``KL(softmax(p_logits) ‖ softmax(q_logits))``, computed in log space.

    ``Σ_c p_c (log p_c − log q_c)`` with both log-softmaxes taken stably: the
    distillation loss (teacher ``p``, student ``q``). ``-inf`` teacher logits
    are zero-probability classes (no contribution), and so are teacher
    classes whose probability underflows to 0 (a ``-1e9`` mask logit): the
    value equals :func:`kl_divergence` on the probabilities, never NaN. A
    ``-inf`` student logit where the teacher has mass gives ``+inf``; the
    gradient there is that of the finite classes (finite, never NaN). ``where`` drops entries from
    both softmaxes, as slicing would.

    Args:
      p_logits: the reference (teacher) logits ``[..., C, ...]``.
      q_logits: the approximating (student) logits, broadcastable with ``p_logits``.
      axis: the class axis.
      where: optional boolean mask broadcast against the logits.
      base: ``None`` for nats, ``2`` for bits.

    Returns:
      The broadcast shape without ``axis``; 0 where no class is kept.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> float(jxent.kl_divergence_from_logits(jnp.zeros(3), jnp.zeros(3)))
      0.0
    """
    log_base = check_base(base)
    (p_logits, q_logits), axis, mask = _prepare(
        {"p_logits": p_logits, "q_logits": q_logits}, where, axis, logits=True
    )
    p, q = _centred(p_logits, mask, axis), _centred(q_logits, mask, axis)
    # A class contributes p_c (log p_c − log q_c) only where p_c > 0 (an
    # underflowed p_c = 0, e.g. at a -1e9 mask logit, is 0 · anything = 0).
    # Where q_c = 0 < p_c the divergence is +inf: that part is a constant
    # added to the finite part, so the value is +inf while the gradient is
    # the finite part's (never NaN: inf − inf would arise in the softmax's
    # Jacobian otherwise). The finite part is jxent._rows.kl_row, the one
    # formula (safe logits are finite everywhere: one where keeps the classes).
    has_mass = p.usable & (p.exp / jnp.expand_dims(p.total, axis) > 0)
    diff = jnp.where(has_mass & q.usable, p.safe - q.safe, 0)
    gap = jnp.squeeze(p.top - q.top, axis)
    finite = kl_row(p.exp, p.total, q.total, diff, gap, lambda v: jnp.sum(v, axis=axis))
    infinite = jnp.any(has_mass & ~q.usable, axis=axis)
    kl = nonnegative(finite) + jnp.where(infinite, jnp.inf, 0.0).astype(finite.dtype)
    return to_base(kl, log_base)
