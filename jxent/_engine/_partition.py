"""The fused loops on an Auto mesh: ``custom_partitioning`` ops that run per device.

Under ``jit`` with Auto mesh axes the layout of the arrays is known only to
the compiler, so each computation of the fused engine's ``custom_vjp`` rules
(:func:`~._loop.work` of one :class:`~._chunk.Work`: the sums, the sums and
gradients, the per-position outputs, the backward pass) is one
``custom_partitioning`` op. Its rule
(:func:`_partition`) reads the operands' shardings, keeps the positions
split as ``hidden`` is and the classes as ``kernel`` is (the ``[D]`` axis is
gathered, as FSDP gathers it), and runs :func:`~._loop.work` on each
device's block with the collectives of the ``shard_map`` path: per-token
``pmax``/``psum`` over the vocabulary axes inside the cores, then one
``psum`` over the position axes of the sums and of the kernel's and bias's
gradients, and one over the vocabulary axes of the hidden states' gradient.
On one device the op is the plain computation.
"""

from __future__ import annotations

import functools
import math
from functools import partial
from typing import Any, NamedTuple

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ._chunk import Work, is_linear
from ._loop import custom_vjps, work
from ._sharding import axis_name, fit, names


class Op(NamedTuple):
    """The static description of one op: what it computes and the role of each array."""

    kind: Work
    plan: Any
    tree: Any  # the treedef of (members, rows, counted, arrays, saved, ct)
    npos: int  # the position axes (``hidden [*P, D]``, ``counted [*P]``): each may be split
    roles: tuple  # per operand leaf: its factors ("n" positions, "v" classes, "d0" features...)
    results: tuple  # per result leaf, the same
    chunk_sizes: tuple  # the members' chunk_size (None: the default for this device)


def _per_position(x, npos: int) -> tuple:
    return tuple(f"n{j}" for j in range(npos)) + tuple(f"r{j}" for j in range(npos, x.ndim))


def _member_roles(members, npos: int) -> list:
    """Per member, its arrays' factors: ``hidden [*n, d_i]``, ``kernel [d_i, v]``, ``bias [v]``."""
    n = tuple(f"n{j}" for j in range(npos))
    out = []
    for i, m in enumerate(members):
        if is_linear(m):
            out.append((n + (f"d{i}",), (f"d{i}", "v"), None if m.bias is None else ("v",)))
        else:
            out.append((n + ("v",),))
    return out


def _roles(npos, members, rows, counted, arrays, saved, ct) -> tuple:
    num_classes = members[0].num_classes
    out = [r for roles in _member_roles(members, npos) for r in roles if r is not None]
    out += [_per_position(x, npos) for x in jax.tree.leaves(rows)]
    out.append(_per_position(counted, npos))
    out += [
        ("v",) if x.ndim == 1 and x.shape[0] == num_classes else ()
        for x in jax.tree.leaves(arrays)
    ]
    out += [_per_position(x, npos) for x in jax.tree.leaves((saved, ct))]
    return tuple(out)


def _parts(kind: Work, results):
    """``(values, grads)`` of a :func:`~._loop.work` result (None where ``kind`` has none)."""
    if kind.grads:
        return results if kind.outputs else (None, results)
    return results, None


def _result_roles(kind: Work, npos: int, members, results) -> tuple:
    """Sums replicated, per-position outputs split like the positions, gradients like primals."""
    values, grads = _parts(kind, results)
    if kind.sums:
        out = [tuple(f"s{j}" for j in range(s.ndim)) for s in jax.tree.leaves(values)]
    else:
        out = [_per_position(x, npos) for x in jax.tree.leaves(values)]
    for roles, g in zip(_member_roles(members, npos), grads or (), strict=False):
        if g is not None:
            out += [r for r, x in zip(roles, g, strict=True) if x is not None]
    return tuple(out)


def _flat_work(kind: Work, plan, npos: int, members, rows, counted, arrays, saved, ct, lower=None):
    """:func:`~._loop.work` on positions ``[*P]`` flattened, its per-position results unflattened.

    ``lower(plan, members, counted)`` gives the plan of a device's block (and
    ``_combine`` its parts); None runs ``plan`` as it is.
    """
    shape = counted.shape[:npos]
    n = math.prod(shape)
    flat = lambda x: x.reshape((n,) + x.shape[npos:])
    members = tuple(m.map_positions(flat) for m in members)
    rows, counted, saved, ct = jax.tree.map(flat, (rows, counted, saved, ct))
    if lower is not None:
        plan = lower(plan, members, counted)
    out = work(kind, plan, members, rows, counted, arrays, saved, ct)
    per = lambda x: x.reshape(shape + x.shape[1:])
    values, grads = _parts(kind, out)
    if not kind.sums:
        values = jax.tree.map(per, values)
    if grads is not None:
        grads = tuple(None if g is None else (per(g[0]),) + tuple(g[1:]) for g in grads)
    return _joined(kind, values, grads)


def _joined(kind: Work, values, grads):
    """A :func:`~._loop.work` result from ``(values, grads)``: the inverse of :func:`_parts`."""
    if not kind.grads:
        return values
    return (values, grads) if kind.outputs else grads


def _sharding_rule(op: Op, mesh, operand_types, result_types):
    """Shardy's rule: the positions (``n0``, ``n1``...) and ``v`` may be split; nothing else."""
    del mesh, operand_types, result_types
    join = lambda roles: ", ".join(" ".join(r) for r in roles)
    # Every factor but the positions' and the classes', in order of appearance.
    factors = dict.fromkeys(f for r in op.roles + op.results for f in r)
    keep = tuple(f for f in factors if f != "v" and not f.startswith("n"))
    return f"{join(op.roles)} -> {join(op.results)}", {"need_replication_factors": keep}


def _run_flat(op: Op, *leaves):
    """The op on one device: :func:`~._loop.work` on the whole arrays."""
    return _flat_work(op.kind, op.plan, op.npos, *jax.tree.unflatten(op.tree, leaves))


_op = custom_partitioning(_run_flat, static_argnums=(0,))


def _batched(op: Op):
    """The op under ``vmap``: the per-example computation, batched, without partitioning.

    ``custom_partitioning`` has no batching rule; a ``vmap`` over a fused call
    on an Auto mesh runs the loops as XLA partitions them (correct values,
    no per-device split).
    """

    @jax.custom_batching.custom_vmap
    def call(*leaves):
        return _op(op, *leaves)

    @call.def_vmap
    def rule(axis_size, in_batched, *leaves):
        axes = [0 if b else None for b in in_batched]
        out = jax.vmap(partial(_run_flat, op), in_axes=axes, axis_size=axis_size)(*leaves)
        return out, jax.tree.map(lambda _: True, out)

    return call


def _partition(op: Op, mesh, arg_shapes, result_shape):
    """Each device runs :func:`~._loop.work` on its positions and classes, then combines."""
    hidden = next(x for x, r in zip(arg_shapes, op.roles, strict=True)
                  if r[:1] == ("n0",) and r[-1].startswith("d"))
    kernel = next(x for x, r in zip(arg_shapes, op.roles, strict=True) if r[1:] == ("v",))
    spec = lambda x, i: (tuple(x.sharding.spec) + (None,) * x.ndim)[i]
    layout = fit(mesh, tuple(spec(hidden, j) for j in range(op.npos)),
                 names(spec(kernel, 1)), hidden.shape[:op.npos], kernel.shape[1])
    pos_axes, vocab_axes = axis_name(layout.position_axes), axis_name(layout.vocab)
    factor = {f"n{j}": entry for j, entry in enumerate(layout.position_specs)}
    factor["v"] = vocab_axes
    sharding = lambda roles: NamedSharding(mesh, P(*(factor.get(f) for f in roles)))
    arg_shardings = tuple(sharding(r) for r in op.roles)
    result_shardings = jax.tree.unflatten(
        jax.tree.structure(result_shape), [sharding(r) for r in op.results]
    )

    def lower(*leaves):
        local = lambda plan, members, counted: _local_plan(op, counted, vocab_axes)
        out = _flat_work(op.kind, op.plan, op.npos, *jax.tree.unflatten(op.tree, leaves),
                         lower=local)
        return _combine(op.kind, out, pos_axes, vocab_axes)

    return mesh, lower, result_shardings, arg_shardings


def _local_plan(op: Op, counted, vocab_axes):
    """The plan for this device's block: its positions, its chunk, the vocabulary's axes."""
    n = counted.shape[0]
    sizes = set(op.chunk_sizes) - {None}
    # None: the default of the platform lowered for, chosen by work().
    chunk = max(1, min(min(sizes), n)) if sizes else None
    options = dict(op.plan.options, vocab_axis_name=vocab_axes)
    # Outputs are the same on every vocabulary device; outside shard_map the
    # transpose of each psum in a core sums its cotangent over them, so each
    # device differentiates its share (as shard_map does without vma checks).
    share = 1.0 if vocab_axes is None else 1.0 / jax.lax.axis_size(vocab_axes)
    return op.plan._replace(
        num_positions=n, chunk=chunk, options=tuple(sorted(options.items())),
        ct_scale=share,
    )


def _psum(x, axes):
    """``x`` summed over the mesh ``axes`` (None: one device, or an absent gradient)."""
    return x if axes is None or x is None else jax.lax.psum(x, axes)


def _combine_grads(grads, pos_axes, vocab_axes):
    """Each member's ``(d_hidden, d_kernel, d_bias)``: hidden's summed over V, the rest over N."""
    return tuple(
        None if g is None
        else (_psum(g[0], vocab_axes), _psum(g[1], pos_axes), _psum(g[2], pos_axes))
        for g in grads
    )


def _combine(kind: Work, out, pos_axes, vocab_axes):
    """The devices' parts summed: sums and kernel/bias gradients over positions, hidden's over V
    (per-position outputs stay on their devices)."""
    values, grads = _parts(kind, out)
    if kind.sums:
        values = _psum(values, pos_axes)
    if grads is not None:
        grads = _combine_grads(grads, pos_axes, vocab_axes)
    return _joined(kind, values, grads)


_op.def_partition(partition=_partition, sharding_rule=_sharding_rule)


def _call(chunk_sizes, kind, plan, members, rows, counted, arrays, saved=None, ct=None):
    """One op over positions ``counted.shape`` (any number of axes, each of which may be split)."""
    tree_args = (members, rows, counted, arrays, saved, ct)
    leaves, tree = jax.tree.flatten(tree_args)
    npos = counted.ndim
    roles = _roles(npos, *tree_args)
    shapes = jax.eval_shape(lambda: _flat_work(kind, plan, npos, *tree_args))
    op = Op(kind, plan, tree, npos, roles, _result_roles(kind, npos, members, shapes), chunk_sizes)
    return _batched(op)(*leaves)


@functools.cache
def partitioned_vjps(chunk_sizes: tuple):
    """The engine's two ``custom_vjp``s with every computation a partitioned op."""
    return custom_vjps(partial(_call, chunk_sizes))
