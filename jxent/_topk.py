"""Stored teachers: a teacher kept as the log-probabilities of its top-k classes.

:class:`TopK` holds, per position, ``k`` class ids and the teacher's
log-probabilities of them (normalised over its full vocabulary); an entry at
``−inf`` is padding. Its positions step (the checks against the student's
positions, and the gather index) is ``jxent._positions.teacher_rows``;
:func:`topk_core` is the per-position core the engine runs on the student's
logits (dense, or ``[C, V]`` chunks of ``LinearLogits``), with the ids as
per-position rows.

Two ways to compare the student with k stored classes:

* ``"tail"``: both distributions over ``k + 1`` buckets, the stored classes
  and "every other class". The student's rest is the sum of ``exp d`` over
  the classes *not* stored (a scatter of the stored ids into the chunk's
  mask), never ``1 − Σ s_i``, which cancels when the stored classes hold
  nearly all the mass. When every class is stored the rest bucket is empty
  (both sides 0), so ``k = V`` is exactly the dense teacher.
* ``"renormalize"``: both restricted to the stored classes and renormalised:
  a gather of k logits per position and a ``logsumexp`` over them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float, Int

from ._checks import float_dtype, floating_array, integer_ids
from ._numerics import nonnegative
from ._options import is_static, parse_temperature
from ._rows import centred_logits, hard_cross_entropy, scaled
from ._vocab import ClassOps

__all__ = ["TopK", "topk_core", "bucket_divergence"]

@jax.tree_util.register_pytree_node_class
class TopK:
    """A teacher stored offline: the log-probabilities of ``k`` classes per position.

    ``log_probs[..., t, i] = log t(ids[..., t, i])``, the teacher's
    log-probability of class ``ids[..., t, i]`` normalised over its *full*
    vocabulary (typically its top-k, from ``jax.lax.top_k`` of its
    log-softmax, at the sampling temperature). Pass it as the teacher of
    :func:`~jxent.distillation_loss`. An entry whose log-prob is ``−inf`` is
    padding (fewer than ``k`` classes stored), whatever its id. At a counted
    position, finite entries must hold distinct ids in ``[0, V)`` and
    ``Σ exp(log_probs) ≤ 1 + 1e-3``: otherwise ``distillation_loss`` raises
    ``ValueError`` in an eager call and gives NaN under ``jit`` (reported by
    ``jax.experimental.checkify``'s float checks).

    Args:
      ids: ``[..., T, k]`` integer class ids (any integer dtype).
      log_probs: ``[..., T, k]`` floating log-probabilities (any float dtype;
        computed in float32). No gradient flows to them.

    Examples:
      >>> import jax.numpy as jnp, jxent
      >>> teacher = jxent.TopK(jnp.array([[[2, 0]]]), jnp.log(jnp.array([[[0.7, 0.2]]])))
      >>> teacher.k
      2
    """

    def __init__(self, ids: Int[ArrayLike, "*batch k"], log_probs: Float[ArrayLike, "*batch k"]):
        ids = integer_ids(ids, "ids", "TopK")
        log_probs = floating_array(log_probs, "TopK: log_probs", "floating")
        if ids.shape != log_probs.shape or ids.ndim == 0 or ids.shape[-1] == 0:
            raise ValueError(
                f"TopK: ids has shape {ids.shape} and log_probs {log_probs.shape}; both must "
                "be [..., T, k] with the same shape and k >= 1"
            )
        self.ids, self.log_probs = ids, log_probs

    @classmethod
    def from_logits(cls, logits: Float[ArrayLike, "*batch V"], k: int,
                    temperature: float = 1.0) -> TopK:
        """The ``k`` most probable classes of ``softmax(logits / temperature)`` (dense logits).

        ``temperature`` is checked as :func:`~jxent.token_stats` checks it (a
        ``ValueError`` for a concrete value ``<= 0``; NaN log-probs, reported
        by ``checkify``, for a traced one).
        """
        temperature = parse_temperature(temperature)
        z = jnp.asarray(logits, float_dtype(jnp.asarray(logits).dtype)) / temperature
        log_p = jax.lax.stop_gradient(jax.nn.log_softmax(z, axis=-1))
        values, ids = jax.lax.top_k(log_p, k)
        return cls(ids, values)

    def tree_flatten(self):
        return (self.ids, self.log_probs), None

    @classmethod
    def tree_unflatten(cls, static, children):
        # No validation: JAX rebuilds pytrees with placeholders (tracers, None, objects).
        out = object.__new__(cls)
        out.ids, out.log_probs = children
        return out

    @property
    def k(self) -> int:
        """Entries stored per position."""
        return self.ids.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape)

    def __repr__(self) -> str:
        return f"TopK(ids={self.shape} {self.ids.dtype}, log_probs={self.log_probs.dtype})"


# --------------------------------------------------------------------------- divergences


def _log_rest(e, index, stored, ops: ClassOps):
    """``log Σ exp d`` over the classes not stored (``−inf`` when there are none), per position."""
    shape = e.shape
    flat_e = e.reshape(-1, shape[-1])
    local, mine = ops.local(index)
    cols = jnp.where(stored & mine, local, ops.num_local).reshape(-1, index.shape[-1])
    rows = jnp.arange(flat_e.shape[0])[:, None]
    covered = jnp.zeros(flat_e.shape, bool).at[rows, cols].set(True, mode="drop")
    rest = ops.sum(jnp.where(covered.reshape(shape), 0, e))
    some = rest > 0
    return jnp.where(some, jnp.log(jnp.where(some, rest, 1)), -jnp.inf)


def _log_normalise(z, present):
    """``z − logsumexp(z)`` over the last axis; all ``−inf`` where no entry is ``present``."""
    safe = jnp.where(present, z, 0)
    return z - jnp.where(present, jax.nn.logsumexp(safe, axis=-1, keepdims=True), 0)


def bucket_divergence(lt, ls, divergence: str, beta):
    """A divergence between two distributions given by their logs ``[..., m]`` (``−inf``: 0).

    ``lt`` the teacher's (no gradient), ``ls`` the student's. A bucket that is
    0 on both sides adds 0; one the approximating side excludes while the
    other has mass gives ``+inf`` (with a finite gradient).
    """
    t_inf, s_inf = lt == -jnp.inf, ls == -jnp.inf
    pt, ps = jnp.exp(lt), jnp.exp(ls)
    if divergence == "kl":
        return jnp.sum(pt * jnp.where(t_inf, 0, lt - ls), axis=-1)
    if divergence == "reverse_kl":
        gate = s_inf | t_inf
        inf = jnp.any(t_inf & ~s_inf, axis=-1)
        finite = jnp.sum(ps * jnp.where(gate, 0, ls - jnp.where(gate, 0, lt)), axis=-1)
        return jnp.where(inf, jnp.inf, finite)
    if divergence == "tvd":
        diff = pt - ps
        return 0.5 * jnp.sum(diff * jnp.sign(diff), axis=-1)  # (sub)gradient sign(0) = 0
    both = t_inf & s_inf
    log_beta, log_rest = (
        (math.log(beta), math.log1p(-beta)) if isinstance(beta, float)
        else (jnp.log(beta), jnp.log1p(-beta))
    )
    lm = jnp.logaddexp(jnp.where(both, 0, lt + log_beta), jnp.where(both, 0, ls + log_rest))
    kl_t = jnp.sum(pt * jnp.where(t_inf, 0, lt - lm), axis=-1)
    kl_s = jnp.sum(ps * jnp.where(s_inf, 0, ls - lm), axis=-1)
    return beta * kl_t + (1 - beta) * kl_s


def topk_core(logits, rows, counted, *, topk_mode, divergence, beta, temperature, hard_weight,
              vocab_axis_name):
    """``(loss, weight)`` per position of a student against a stored teacher (math only).

    ``rows = (index, log_probs, bad, targets)`` from the positions step
    (``jxent._positions.teacher_rows``); positions outside ``counted`` give 0 with zero
    gradient, ``bad`` ones NaN (made by a ``log``, so ``checkify`` sees it).
    """
    (student,) = logits
    index, log_probs, bad, targets = rows
    ops = ClassOps(student.ndim - 1, vocab_axis_name, student.shape[-1])
    dtype = float_dtype(student.dtype)
    keep = counted[..., None]
    x, d, top, _ = centred_logits(student, keep, temperature, ops, dtype)
    loss = jnp.zeros(counted.shape, dtype)
    if not is_static(hard_weight, 1.0):
        stored = keep & (log_probs != -jnp.inf)
        lt = jnp.where(stored, log_probs.astype(dtype), -jnp.inf)
        d_ids = jnp.where(stored, ops.gather(d, index, fill=jnp.nan), -jnp.inf)
        if topk_mode == "tail":
            e = jnp.exp(d)
            log_total = jnp.log(ops.sum(e))[..., None]
            ls = jnp.concatenate([d_ids, _log_rest(e, index, stored, ops)[..., None]], -1)
            ls = ls - log_total
            # The teacher's rest, 1 − Σ t_i (clamped at 0); none when every class is stored.
            mass = jnp.minimum(jax.nn.logsumexp(lt, axis=-1), 0)
            empty = jnp.sum(stored, axis=-1) == ops.num_classes
            lt_rest = jnp.where(empty, -jnp.inf, jnp.log(-jnp.expm1(mass)))
            lt = jnp.concatenate([lt, lt_rest[..., None]], -1)
        else:
            present = jnp.any(stored, axis=-1, keepdims=True)
            ls = _log_normalise(d_ids, present)
            lt = _log_normalise(scaled(lt, temperature, dtype), present)
        soft = nonnegative(bucket_divergence(lt, ls, divergence, beta))
        loss = soft if targets is None else (1 - hard_weight) * soft
    if targets is not None and not is_static(hard_weight, 0.0):
        hard = hard_cross_entropy(x, d, top, keep, counted, targets, temperature, ops)
        loss = loss + hard_weight * hard
    poison = jnp.log(jnp.where(bad, -1.0, 1.0)).astype(dtype)  # NaN at bad positions
    return jnp.where(counted, loss, 0) + poison, counted.astype(dtype)
