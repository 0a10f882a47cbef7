"""One chunk of the fused engine: its logits, its core, its gradients.

For chunk ``i`` of ``C`` positions: the ``[C, V]`` logits of every member
(``hidden @ kernel + bias`` of a linear member, with rows not counted zeroed
first; the rows of a dense member), the dense per-position core on them, and,
given cotangents, ``∂/∂logits`` (``jax.vjp`` of the core, or a :class:`Rule`'s
pullback) turned into the rows of ``∂/∂hidden``, ``∂/∂kernel`` (added in
place) and ``∂/∂bias`` by three products.

A member is a :class:`Linear` (``hidden [N, D]``, ``kernel [D, V]``, ``bias
[V] | None``) or a :class:`Dense` (``[N, V]`` logits, a teacher's: never
differentiated).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._checks import float_dtype
from ._mesh import loop, make_varying, varying_axes

# The product added into the kernel's gradient is formed this many elements at a time.
_BLOCK_ELEMENTS = 1 << 22


class Plan(NamedTuple):
    """The static part of one fused call (hashable: a ``nondiff_argnums`` argument).

    ``chunk`` None and a ``precision`` entry None stand for the defaults of
    the platform the program is lowered for: :func:`jxent._engine._loop.work`
    fills them in, and ``blocks``, for each platform before any chunk is formed.
    """

    core: Callable
    options: tuple
    chunk: int | None
    trainable: tuple
    num_positions: int
    ct_scale: float = 1.0  # the share of each output's cotangent this device differentiates
    precision: tuple = ()  # per member: "accurate", "balanced", "compact" or None (LinearLogits)
    blocks: tuple = ()  # per member: the class block of ``hᵀ · g`` (None: one product)
    resolved: bool = False  # chunk, precision and blocks chosen for one platform

    def policy(self, i: int) -> str:
        return (self.precision[i] if i < len(self.precision) else None) or "accurate"


class Work(NamedTuple):
    """What one loop over the chunks computes: the engine's five uses of it are below.

    ``outputs``: the core's per-position outputs, stacked chunk by chunk
    (with ``saved``, a :class:`Rule` core's saved vectors too); ``grads``: the
    gradients of ``Σ ct · outputs`` added up chunk by chunk (without
    ``outputs``, a :class:`Rule` core forms them from its saved vectors);
    ``sums``: the outputs reduced to ``(Σ loss, Σ aux)``, and the gradients
    are those of ``Σ loss``.
    """

    outputs: bool = False
    saved: bool = False
    grads: bool = False
    sums: bool = False


SUMS = Work(outputs=True, sums=True)
SUMS_GRADS = Work(outputs=True, grads=True, sums=True)
FORWARD = Work(outputs=True)
FORWARD_SAVED = Work(outputs=True, saved=True)
BACKWARD = Work(grads=True)


class Rule(NamedTuple):
    """A per-chunk core with a hand-written pullback, for ``mode="positions"``.

    The generic backward pass takes ``jax.vjp`` of the core on each chunk's
    recomputed logits, which redoes every reduction over classes of the
    forward pass. A rule instead saves a few per-position vectors in the
    forward pass (``[N]``-sized, kept as residuals) and forms the logits'
    gradient from them in one elementwise pass.

    Attributes:
      forward: ``forward(logits, rows, counted, **options) -> (outputs, saved)``,
        ``saved`` a pytree of per-position vectors.
      pullback: ``pullback(logits, rows, counted, saved, cts, **options)`` -> a
        tuple of ``∂/∂logits``, one per trainable member; ``cts`` the
        cotangents of the floating outputs, in leaf order.
    """

    forward: Callable
    pullback: Callable

    def __call__(self, *args, **options):
        return self.forward(*args, **options)[0]


class Linear(NamedTuple):
    """A member given as ``LinearLogits``: its logits are formed a chunk at a time."""

    hidden: jax.Array  # [N, D], the positions flattened
    kernel: jax.Array  # [D, V]
    bias: jax.Array | None  # [V]

    @property
    def num_classes(self) -> int:
        return self.kernel.shape[1]

    def map_positions(self, f):
        """The member with ``f`` applied to its per-position array (``hidden``)."""
        return self._replace(hidden=f(self.hidden))

    def rows(self, start, size, mask):
        """``(h, logits)`` of one chunk; rows not counted are zeroed first (NaN-safe)."""
        acc = float_dtype(self.hidden.dtype, self.kernel.dtype)
        h = jnp.where(mask[:, None], rows_of(self.hidden, start, size), 0)
        logits = jnp.dot(h, self.kernel, preferred_element_type=acc)
        if self.bias is not None:
            logits = logits + self.bias.astype(acc)[None, :]
        return h, logits


class Dense(NamedTuple):
    """A member given as materialised logits ``[N, V]`` (never differentiated here)."""

    logits: jax.Array

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]

    def map_positions(self, f):
        """The member with ``f`` applied to its per-position array (the logits)."""
        return Dense(f(self.logits))

    def rows(self, start, size, mask):
        del mask
        return None, rows_of(self.logits, start, size)


def is_linear(member) -> bool:
    return isinstance(member, Linear)


def _chunk_start(plan: Plan, i):
    """The first position of chunk ``i`` and which of its positions are new.

    The last chunk is moved back to end at ``N`` (no padding, no copy of
    ``hidden``); its positions already covered by the previous chunk are
    masked out there, and their outputs kept from the earlier chunk.
    """
    start = jnp.minimum(i * plan.chunk, plan.num_positions - plan.chunk)
    fresh = start + jnp.arange(plan.chunk) >= i * plan.chunk
    return start, fresh


def rows_of(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size)


def write(out, value, start, fresh):
    """``out[start:start + C] = value`` at the ``fresh`` positions."""
    old = jax.lax.dynamic_slice_in_dim(out, start, value.shape[0])
    fresh = jnp.reshape(fresh, fresh.shape + (1,) * (value.ndim - 1))
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(fresh, value, old), start, 0)


def _product(a, b, contract: tuple[int, int], acc):
    """``a · b`` contracted over axes ``contract`` of each, accumulated in ``acc``.

    ``g · kernelᵀ`` contracts the kernel's class axis in place (no transposed
    copy of the kernel); ``hᵀ · g`` takes the chunk's small ``[D, C]``
    transpose, which XLA:CPU multiplies faster than it contracts rows (about
    5 % on the whole step at N, D, V = 4096, 512, 32768).
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=acc)


def outer_block(chunk: int, features: int, classes: int, platform: str) -> int | None:
    """The block of classes in which ``hᵀ · g`` is added into the kernel's gradient.

    One ``[D, V]`` product would need a second ``[D, V]`` buffer before the
    addition. On CPU a loop over blocks of classes (a loop: XLA computes
    unrolled products up front and holds them all) bounds that buffer by the
    smaller of one chunk's logits and ``_BLOCK_ELEMENTS`` (16 MiB in float32),
    which measured as fast as one product there. On GPU/TPU it is one
    product (None): many small products starve the device, and the one
    ``[D, V]`` temporary is small next to what it replaces (``N × V`` logits).
    """
    if platform != "cpu":
        return None
    width = min(classes, max(1, min(classes * chunk, _BLOCK_ELEMENTS) // features))
    return None if width == classes else width


def _accumulate_outer(d_kernel, h, g, acc, width: int | None):
    """``d_kernel + h.T @ g`` for ``h [C, D]`` and ``g [C, V]``, updated in place."""
    if width is None:
        return d_kernel + _product(h.T, g, (1, 0), acc).astype(d_kernel.dtype)
    v = d_kernel.shape[1]
    full = v // width

    def add_block(lo, d_kernel, size):
        part = jax.lax.dynamic_slice_in_dim(d_kernel, lo, size, axis=1)
        g_part = jax.lax.dynamic_slice_in_dim(g, lo, size, axis=1)
        part = part + _product(h.T, g_part, (1, 0), acc).astype(part.dtype)
        return jax.lax.dynamic_update_slice_in_dim(d_kernel, part, lo, axis=1)

    d_kernel = loop(full, lambda j, dk: add_block(j * width, dk, width), d_kernel)
    if full * width < v:
        d_kernel = add_block(full * width, d_kernel, v - full * width)
    return d_kernel


def grad_init(plan: Plan, members):
    """Zero gradients (``d_hidden``, ``d_kernel``, ``d_bias``) for each trainable member.

    The kernel's gradient, summed over chunks, is float32 (float64 under x64),
    or the inputs' dtype under the ``"compact"`` policy.
    """
    out = []
    for i, (member, train) in enumerate(zip(members, plan.trainable, strict=True)):
        if not train:
            out.append(None)
            continue
        hidden, kernel, bias = member
        acc = float_dtype(hidden.dtype, kernel.dtype)
        carry = jnp.result_type(hidden.dtype, kernel.dtype) if plan.policy(i) == "compact" else acc
        out.append(
            (
                jnp.zeros(hidden.shape, acc),
                jnp.zeros(kernel.shape, carry),
                None if bias is None else jnp.zeros(bias.shape, acc),
            )
        )
    return tuple(out)


def float_leaves(tree) -> list[bool]:
    return [jnp.issubdtype(x.dtype, jnp.inexact) for x in jax.tree.leaves(tree)]


def _chunk_inputs(plan: Plan, i, members, rows, counted):
    """Chunk ``i``'s start, fresh and counted positions, ``(h, logits)`` pairs and rows."""
    size = plan.chunk
    start, fresh = _chunk_start(plan, i)
    m = rows_of(counted, start, size) & fresh
    inputs = [member.rows(start, size, m) for member in members]
    rows_c = jax.tree.map(lambda r: rows_of(r, start, size), rows)
    return start, fresh, m, inputs, rows_c


def _add_grads(plan: Plan, inputs, members, d_logits, grads, start, fresh):
    """The gradients of ``hidden`` rows, ``kernel`` and ``bias`` from each ``∂/∂logits``.

    ``g = ∂/∂logits`` is float32. ``"accurate"`` keeps it so, widening the
    (bf16/f16) kernel and hidden rows to float32 for the two products;
    ``"balanced"`` and ``"compact"`` round it to the inputs' dtype, so that
    both products take the inputs' dtype with float32 accumulation and no
    float32 copy of the kernel is made (for float32 inputs every policy is
    the same program).
    """
    d_logits = iter(d_logits)
    new_grads = []
    for i, ((h, _), member, train, g_acc) in enumerate(
        zip(inputs, members, plan.trainable, grads, strict=True)
    ):
        if not train:
            new_grads.append(None)
            continue
        _, kernel, _ = member
        d_hidden, d_kernel, d_bias = g_acc
        acc = d_hidden.dtype
        g_logits = next(d_logits)
        if plan.policy(i) == "accurate":
            g = g_logits.astype(acc)
        else:
            g = g_logits.astype(jnp.result_type(h.dtype, kernel.dtype))
        d_h = _product(g, kernel.astype(g.dtype), (1, 1), acc)
        d_hidden = write(d_hidden, d_h, start, fresh)
        width = plan.blocks[i] if i < len(plan.blocks) else None
        d_kernel = _accumulate_outer(d_kernel, h.astype(g.dtype), g, acc, width)
        if d_bias is not None:
            d_bias = d_bias + jnp.sum(g_logits, axis=0).astype(acc)
        new_grads.append((d_hidden, d_kernel, d_bias))
    return tuple(new_grads)


def _chunk_cts(outputs, ct, start, plan: Plan, summed: bool):
    """The cotangent tree of a chunk's ``outputs``: for the floating leaves the ``[C]``
    slices of ``ct`` (``summed``: ones for the loss, zeros for the auxiliary sums, which
    do not depend on the logits), each in its output's dtype and mesh variance; float0
    zeros elsewhere."""
    leaves, treedef = jax.tree.flatten(outputs)
    floats = float_leaves(outputs)
    if summed:
        ct = [jnp.ones(leaves[0].shape, leaves[0].dtype)] + [
            jnp.zeros(o.shape, o.dtype) for o, f in zip(leaves[1:], floats[1:], strict=True) if f]
    else:
        ct = [rows_of(c, start, plan.chunk) for c in ct]
    scale = (lambda c: c) if plan.ct_scale == 1.0 else (lambda c: c * plan.ct_scale)
    ct = iter(ct)
    cts = [
        make_varying(scale(next(ct).astype(o.dtype)), varying_axes(o))
        if f else jnp.zeros(o.shape, jax.dtypes.float0)
        for o, f in zip(leaves, floats, strict=True)
    ]
    return jax.tree.unflatten(treedef, cts)


def chunk_step(plan: Plan, work: Work, members, rows, counted, arrays, saved, ct, grads, i):
    """Chunk ``i`` of a loop doing ``work`` (a ``lax.scan`` body): ``(grads, values)``.

    ``grads`` (per trainable member ``(d_hidden, d_kernel, d_bias)``, or
    None) get the gradients of ``Σ ct · outputs`` added, ``ct`` a list of
    ``[N]`` cotangents for the core's floating outputs (with ``work.sums``:
    ones for the loss). ``values`` are the chunk's ``(outputs, saved)``
    (``saved`` None but for a :class:`Rule` doing ``FORWARD_SAVED``), or None;
    the loop stacks them. The steps in order: the chunk's logits, the core
    (through ``jax.vjp`` when differentiated), ``∂/∂logits``, the three
    products.
    """
    start, fresh, m, inputs, rows_c = _chunk_inputs(plan, i, members, rows, counted)
    logits = tuple(x for _, x in inputs)
    options = dict(plan.options, **arrays)
    rule = isinstance(plan.core, Rule)
    if rule and not work.outputs:
        d_logits = plan.core.pullback(
            logits, rows_c, m, jax.tree.map(lambda s: rows_of(s, start, plan.chunk), saved),
            [rows_of(c, start, plan.chunk) for c in ct], **options)
        return _add_grads(plan, inputs, members, d_logits, grads, start, fresh), None
    core = partial(plan.core.forward if rule else plan.core, **options)
    if grads is None:
        out = core(logits, rows_c, m)
    else:
        out, pull, *aux = jax.vjp(core, logits, rows_c, m, has_aux=rule)
        d_logits = pull(_chunk_cts(out, ct, start, plan, work.sums))[0]
        d_logits = [d for d, t in zip(d_logits, plan.trainable, strict=True) if t]
        grads = _add_grads(plan, inputs, members, d_logits, grads, start, fresh)
        out = (out, *aux) if rule else out
    if not work.outputs:
        return grads, None
    return grads, (out[0], out[1] if work.saved else None) if rule else (out, None)
