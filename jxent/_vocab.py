"""Reductions over the vocabulary (the class axis), local or across vocab-sharded devices.

:class:`ClassOps` puts the local and the vocab-sharded (``shard_map`` with
``vocab_axis_name``) forms of every reduction over classes behind one small
interface, so each loss (cross-entropy, token statistics, distillation) is
written once for both: with an axis name, each reduction over classes is
followed by a ``psum``/``pmax`` of a ``[tokens]``-sized result.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["ClassOps", "class_weight_vector", "take_weight"]


class ClassOps(NamedTuple):
    """Reductions over the class axis: local, or across a vocab-sharded mesh axis.

    With ``axis_name`` set (inside ``shard_map``: a mesh axis name, or a tuple
    of them for a vocabulary sharded over several axes), every reduction over
    classes is followed by a ``psum``/``pmax`` of a ``[tokens]``-sized result,
    and ``offset`` is the first global class id held by this shard.
    """

    axis: int
    axis_name: str | tuple[str, ...] | None
    num_local: int

    @property
    def name(self):
        """The mesh axis name(s) for collectives (None: one device)."""
        return self.axis_name

    def psum(self, x):
        """The sum of ``x`` over the vocabulary's devices (``x`` itself on one device)."""
        return x if self.axis_name is None else jax.lax.psum(x, self.axis_name)

    @property
    def shards(self) -> int:
        if self.axis_name is None:
            return 1
        try:
            return jax.lax.axis_size(self.name)
        except NameError:
            raise ValueError(
                f"vocab_axis_name={self.axis_name!r} is not a mesh axis bound here: call "
                "the loss inside jax.shard_map over a mesh with that axis, with the "
                "vocabulary sharded along it"
            ) from None

    @property
    def num_classes(self) -> int:
        return self.num_local * self.shards

    def offset(self):
        if self.axis_name is None:
            return 0
        return jax.lax.axis_index(self.name) * self.num_local

    def sum(self, x):
        return self.psum(jnp.sum(x, axis=self.axis))

    def max(self, x, keep):
        """The per-position max over classes (keepdims, no gradient), 0 where not kept.

        Reads ``x`` as it is, so the reduction needs no masked copy of the
        logits; NaN or inf at uncounted positions is replaced afterwards, on a
        ``[tokens]``-sized vector.
        """
        top = jax.lax.stop_gradient(jnp.max(x, axis=self.axis, keepdims=True))
        if self.axis_name is not None:
            top = jax.lax.pmax(top, self.name)
        return jnp.where(keep & jnp.isfinite(top), top, 0)

    def dot(self, x, w, keep, ref, shifted):
        """``Σ_c w_c (x_c − r)`` over the class axis (see :func:`_class_dot`), this shard's part.

        ``shifted`` (a traced bool) picks the pass: the multiply-reduce of
        ``x − r``, or the matrix-vector product of the raw logits (``r`` must
        then be 0). Combine the shards' parts with :meth:`sum_tokens`.
        """
        return _class_dot(x, w, keep, ref, shifted, self.axis)

    def take(self, x, index, fill):
        """``x[..., index, ...]`` along the class axis for global class ids ``index``.

        ``index == num_classes`` (an out-of-range target) gives ``fill`` and is
        a real out-of-bounds gather, so ``checkify`` index checks report it.
        """
        index = jnp.expand_dims(index, self.axis)
        if self.axis_name is None:
            out = jnp.take_along_axis(x, index, self.axis, mode="fill", fill_value=fill)
            return jnp.squeeze(out, self.axis)
        local, mine = self.local(index)
        out = jnp.take_along_axis(x, local, self.axis)
        return self.owned(jnp.squeeze(out, self.axis), jnp.squeeze(mine, self.axis),
                          jnp.squeeze(index, self.axis), fill)

    def local(self, index):
        """``(local, mine)`` for global class ids: this shard's index (0 where it does not
        hold the class) and whether it does: the sharded gather's one rule."""
        local = index - self.offset()
        mine = (local >= 0) & (local < self.num_local)
        return jnp.where(mine, local, 0), mine

    def owned(self, out, mine, index, fill):
        """Values gathered at :meth:`local` indices, combined across shards (the holder's),
        ``fill`` for an id out of range."""
        out = self.sum_tokens(jnp.where(mine, out, 0))
        return jnp.where(index >= self.num_classes, fill, out)

    def gather(self, x, index, fill):
        """``x`` at ``index [..., k]`` global class ids along the last axis: ``[..., k]``.

        Many classes per position (``take`` reads one). ``index ==
        num_classes`` gives ``fill`` by a real out-of-bounds gather, so
        ``checkify`` index checks report it.
        """
        if self.axis_name is None:
            return jnp.take_along_axis(x, index, -1, mode="fill", fill_value=fill)
        local, mine = self.local(index)
        return self.owned(jnp.take_along_axis(x, local, -1), mine, index, fill)

    def first(self, hit):
        """The smallest global class id where ``hit`` (class axis last) is True, int32.

        ``num_classes`` where it is True nowhere. Across vocab shards the
        smallest id wins (``pmin``), so the rule is the same on one device.
        """
        found = jnp.any(hit, axis=-1)
        index = jnp.argmax(hit, axis=-1).astype(jnp.int32) + self.offset()
        index = jnp.where(found, index, jnp.int32(self.num_classes))
        return index if self.axis_name is None else jax.lax.pmin(index, self.name)

    def sum_classes(self, w):
        """The sum of a ``[classes]`` vector (sharded like the vocabulary)."""
        return self.psum(jnp.sum(w))

    def sum_tokens(self, x):
        """Combine a ``[tokens]`` vector of which each shard holds its own part."""
        return self.psum(x)


def _weighted_sum(x, w, axis: int, matvec: bool = False):
    """``Σ_c x_c w_c`` along ``axis``: a matrix-vector product, or a fused multiply-reduce.

    The product is XLA:CPU's fastest pass over raw logits; an elementwise
    expression of the logits (``x − r``) would be written out first for it,
    and the multiply-reduce reads it without a copy instead.
    """
    if matvec:
        return jax.lax.dot_general(
            x, w, (((axis,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST
        )
    shape = tuple(-1 if d == axis else 1 for d in range(x.ndim))
    return jnp.sum(x * jnp.reshape(w, shape), axis=axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _class_dot(x, w, keep, ref, shifted, axis: int):
    """``Σ_c w_c (x_c − r)`` along ``axis`` in one pass over ``x`` (see :func:`_weighted_sum`):
    the multiply-reduce of ``x − r`` where ``shifted``, else the product of the raw
    logits (``r = 0``), chosen at run time.

    A rule for two reasons. The choice is a ``lax.cond``, and its derivative
    ``∂/∂x_c = w_c`` is the same in both branches: formed outside the cond,
    reverse mode gets it as ``ct · w``, which XLA fuses into the pass that
    forms the rest of the logits' gradient (inside the cond's transpose it
    was a ``[positions, classes]`` array of its own, written and read once
    more). And positions where ``keep`` is False may hold NaN/inf in ``x``:
    the caller discards their values, and the rule keeps them out of the
    derivative with respect to ``w`` (plain autodiff would form
    ``Σ_n x_n · 0 = NaN``); only that tangent reads a masked copy of ``x``,
    made only when ``w`` is differentiated. ``r`` enters without a gradient
    (a reference whose value only matters). It is a ``custom_jvp``, so
    forward mode and higher derivatives keep working.
    """
    return jax.lax.cond(
        shifted,
        lambda: _weighted_sum(x - jnp.expand_dims(ref, axis), w, axis),
        lambda: _weighted_sum(x, w, axis, matvec=True),
    )


def _class_dot_jvp(axis, primals, tangents):
    x, w, keep, ref, shifted = primals
    dx, dw, _, _, _ = tangents
    out = _class_dot(x, w, keep, ref, shifted, axis)
    tangent = jnp.zeros_like(out)
    if not isinstance(dx, SymbolicZero):
        tangent = tangent + _weighted_sum(dx, w, axis)
    if not isinstance(dw, SymbolicZero):
        x = jnp.where(keep, x - jnp.expand_dims(ref, axis), 0)
        tangent = tangent + _weighted_sum(x, dw, axis)
    return out, tangent


_class_dot.defjvp(_class_dot_jvp, symbolic_zeros=True)


def class_weight_vector(class_weights, dtype, axis: int, ndim: int):
    """Class weights shaped to broadcast along the class axis of ``ndim``-d logits."""
    w = class_weights.astype(dtype)
    return jnp.reshape(w, tuple(-1 if d == axis else 1 for d in range(ndim)))


def take_weight(weights, index, ops: ClassOps, dtype):
    """The target class's weight ``w[t]`` (NaN for an out-of-range target)."""
    w = weights.astype(dtype)
    if ops.axis_name is None:
        # Placed like the targets: on a mesh with Explicit axes JAX cannot infer
        # the sharding of a replicated table gathered at sharded indices.
        sharding = jax.typeof(index).sharding
        return w.at[index].get(mode="fill", fill_value=jnp.nan, out_sharding=sharding)
    local, mine = ops.local(index)
    return ops.owned(w[local], mine, index, jnp.nan)
