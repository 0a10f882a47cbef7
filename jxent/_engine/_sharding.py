"""Sharded arrays under plain ``jit``: which devices hold which positions and classes.

A user who places arrays with ``NamedSharding`` and calls a jxent function
under ``jax.jit`` writes single-device code; the engine reads the layout of
the logits (dense ``[*P, V]``, or ``LinearLogits``' ``hidden [*P, D]`` and
``kernel [D, V]``) and runs each device on its own positions and classes,
with the collectives of the ``shard_map`` + ``vocab_axis_name`` path:
per-token ``pmax``/``psum`` over the vocabulary axes, and one ``psum`` of
the sums (and of the kernel's gradient) over the position axes.

* **Explicit** mesh axes (the layout is part of each array's type, known at
  trace time): the call is wrapped in ``jax.shard_map`` over the arrays'
  mesh (:func:`run_explicit`), dense and fused alike; autodiff through
  ``shard_map`` gives every gradient in its input's layout.
* **Auto** mesh axes (the layout is known only to the compiler): the fused
  loops become ``custom_partitioning`` ops whose rule sees the operands'
  shardings (``jxent._engine._partition``). Dense logits need nothing: XLA
  partitions their elementwise passes and reductions by itself.

A layout that cannot be split evenly (positions or classes not divisible by
the devices along an axis) is gathered along that axis instead.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def names(entry) -> tuple[str, ...]:
    """The mesh axis names of one entry of a ``PartitionSpec``."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def axis_name(axes: tuple[str, ...]):
    """``axes`` as a collective's axis name: None, one name, or a tuple of names."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _mesh(x):
    sharding = getattr(jax.typeof(x), "sharding", None)
    return getattr(sharding, "mesh", None)


def mesh_of(arrays):
    """``(kind, mesh)`` of the arrays' types: kind ``"manual"`` (inside ``shard_map``),
    ``"explicit"``, ``"auto"`` or ``"none"`` (no mesh, or a mesh of one device)."""
    kind, found = "none", None
    for x in jax.tree.leaves(arrays):
        mesh = _mesh(x)
        if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) <= 1:
            continue
        types = set(mesh.axis_types)
        if AxisType.Manual in types:
            return "manual", mesh
        if AxisType.Explicit in types:
            kind, found = "explicit", mesh
        elif kind == "none":
            kind, found = "auto", mesh
    return kind, found


def mesh_kind(arrays) -> str:
    return mesh_of(arrays)[0]


def _spec(x) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


class Layout(NamedTuple):
    """Which mesh axes split the positions (per position axis) and the vocabulary."""

    mesh: Any
    position_specs: tuple  # one PartitionSpec entry per position axis
    vocab: tuple[str, ...]

    @property
    def position_axes(self) -> tuple[str, ...]:
        return tuple(a for entry in self.position_specs for a in names(entry))


def fit(mesh, positions: tuple, vocab: tuple[str, ...], shape, num_classes: int) -> Layout:
    """A :class:`Layout` that splits evenly: axes that do not divide their dimension are dropped.

    ``positions`` holds the spec entries of the position axes of ``shape``;
    the vocabulary keeps its axes not already used by the positions.
    """
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    entries = []
    used = set()
    for entry, size in zip(positions, shape, strict=True):
        axes = tuple(a for a in names(entry) if a not in used)
        if size % math.prod(sizes[a] for a in axes):
            axes = ()
        used.update(axes)
        entries.append(axis_name(axes))
    vocab = tuple(a for a in vocab if a not in used)
    if num_classes % math.prod(sizes[a] for a in vocab):
        vocab = ()
    return Layout(mesh, tuple(entries), vocab)


def explicit_layout(logits: tuple, fused: tuple, positions_shape, axis: int, mesh) -> Layout:
    """The layout of a call's logits from their types (Explicit axes).

    The first member decides: a ``LinearLogits`` (``fused``) by its ``hidden``
    (positions) and ``kernel`` (vocabulary), dense logits by their own spec,
    the class axis ``axis`` being the vocabulary's.
    """
    first = logits[0]
    if fused[0]:
        positions = _spec(first.hidden)[:-1]
        vocab = names(_spec(first.kernel)[1])
        num_classes = first.kernel.shape[1]
    else:
        spec = _spec(first)
        axis = axis % first.ndim
        positions = spec[:axis] + spec[axis + 1 :]
        vocab = names(spec[axis])
        num_classes = first.shape[axis]
    return fit(mesh, positions, vocab, positions_shape, num_classes)


def _member_spec(x, linear: bool, layout: Layout, axis: int):
    vocab = axis_name(layout.vocab)
    if linear:
        bias = None if x.bias is None else P(vocab)
        children = (P(*layout.position_specs, None), P(None, vocab), bias)
        return type(x).tree_unflatten(x.tree_flatten()[1], children)
    entries = list(layout.position_specs)
    entries.insert(axis % x.ndim, vocab)
    return P(*entries)


def _row_spec(x, layout: Layout, dense: dict):
    if x.shape in dense:
        return dense[x.shape]
    return P(*layout.position_specs, *((None,) * (x.ndim - len(layout.position_specs))))


def _reshard(tree, specs, mesh):
    def place(x, spec):
        if x is None or _spec(x) == tuple(spec) + (None,) * (x.ndim - len(spec)):
            return x
        return jax.sharding.reshard(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree, specs, is_leaf=lambda s: isinstance(s, P))


def run_explicit(local, core, logits, rows, counted, *, mode, options, trainable, axis, fused):
    """``local`` (the engine's dispatch) on each device's block, inside ``jax.shard_map``.

    ``axis`` is the class axis of dense members (negative or not); ``fused``
    says which members are ``LinearLogits``.
    """
    mesh = mesh_of((logits, rows, counted))[1]
    layout = explicit_layout(logits, fused, counted.shape, axis, mesh)
    arrays = {k: v for k, v in options.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in options.items() if k not in arrays}
    first = logits[0]
    num_classes = first.shape[-1] if fused[0] else first.shape[axis]
    vocab = axis_name(layout.vocab)

    member_specs = tuple(
        _member_spec(x, lin, layout, axis) for x, lin in zip(logits, fused, strict=True)
    )
    dense = {tuple(x.shape): s for x, s, lin in zip(logits, member_specs, fused, strict=True)
             if not lin}
    row_specs = jax.tree.map(lambda x: _row_spec(x, layout, dense), rows)
    array_specs = {
        k: P(vocab) if v.ndim == 1 and v.shape[0] == num_classes else P()
        for k, v in arrays.items()
    }
    in_specs = (member_specs, row_specs, P(*layout.position_specs), array_specs)
    args = _reshard((logits, rows, counted, arrays), in_specs, layout.mesh)
    reduce_over = axis_name(layout.position_axes)

    def per_device(logits, rows, counted, arrays):
        opts = dict(static, **arrays, vocab_axis_name=vocab)
        out = local(core, logits, rows, counted, mode=mode, options=opts, trainable=trainable)
        if mode == "sum" and reduce_over is not None:
            out = jax.lax.psum(out, reduce_over)
        return out

    out_specs = P() if mode == "sum" else P(*layout.position_specs)
    return jax.shard_map(
        per_device, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs
    )(*args)


def shift_left(x, k: int, fill):
    """``x[..., t + k]`` at ``t`` and ``fill`` at the last ``k`` positions, in ``x``'s layout.

    Where the last axis is split over Explicit mesh axes (sequence
    parallelism), each device takes its right neighbour's first ``k``
    columns by one collective-permute: nothing is gathered. Elsewhere (one
    device, Auto axes: XLA partitions the slice itself, also by a
    collective-permute) it is a slice and a pad.
    """
    if k == 0:
        return x
    mesh = _explicit_mesh(x)
    if mesh is None:
        return _pad_shift(x, k, fill)
    spec = _spec(x)
    axes = names(spec[-1])
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    shards = math.prod(sizes[a] for a in axes)
    block = x.shape[-1] // shards
    if shards == 1 or k > block:
        return _pad_shift(whole_last_axis(x), k, fill)
    axis = axis_name(axes)

    def per_device(b):
        # Device i sends its first k columns to device i - 1; the last gets none.
        right = jax.lax.ppermute(b[..., :k], axis, [(i, i - 1) for i in range(1, shards)])
        out = jnp.concatenate([b[..., k:], right], axis=-1)
        tail = (jax.lax.axis_index(axis) == shards - 1) & (jnp.arange(block) >= block - k)
        return jnp.where(tail, jnp.asarray(fill, x.dtype), out)

    return jax.shard_map(per_device, mesh=mesh, in_specs=P(*spec), out_specs=P(*spec))(x)


def _pad_shift(x, k: int, fill):
    pad = [(0, 0)] * (x.ndim - 1) + [(0, min(k, x.shape[-1]))]
    return jnp.pad(x[..., k:], pad, constant_values=fill)


def whole_last_axis(x):
    """``x`` with its last axis on every device where Explicit mesh axes split it (else as is).

    For outputs trimmed to ``T − k`` positions, which a split axis cannot hold
    evenly: a ``[..., T]`` vector of per-position values is gathered, never
    logits or hidden states.
    """
    mesh = _explicit_mesh(x)
    if mesh is None or _spec(x)[-1] is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P(*_spec(x)[:-1], None)))


def _explicit_mesh(x):
    """The mesh of ``x``'s type when it has Explicit axes (None for a scalar, or no such mesh)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if x.ndim == 0 or mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return None
    return mesh
