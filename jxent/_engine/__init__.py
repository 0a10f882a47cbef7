"""The engine: the third of the four steps of each public function, and its one dispatch.

:func:`run` evaluates a per-position *core* (a function of logits with the
class axis last, holding math only) on dense logits, or on
:class:`~jxent.LinearLogits` through the chunked loops of :mod:`._loop`
without ever forming the ``[positions, V]`` logits. It is the one place where
dense and fused are told apart, and where sharding is handled.

Modules, each with one job: :mod:`._loop` (the loops over chunks, their
``custom_vjp``s and the default chunk), :mod:`._chunk` (one chunk's logits,
core and gradients), :mod:`._sharding` (arrays placed on a mesh under plain
``jit``: layouts, and ``shard_map`` for Explicit axes), :mod:`._partition`
(the fused loops as ``custom_partitioning`` ops for Auto axes) and
:mod:`._mesh` (mesh-variance bookkeeping inside ``shard_map``).

Sharding: inside ``shard_map`` (``vocab_axis_name``) the arrays are one
device's block and nothing more is done. Under plain ``jit`` on arrays placed
with ``NamedSharding``, each device computes its own positions and classes:
see :mod:`._sharding`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from .._logits import LinearLogits
from . import _loop
from ._chunk import Dense, Linear, Rule
from ._loop import default_chunk_size, default_precision
from ._partition import partitioned_vjps
from ._sharding import mesh_kind, run_explicit
from ._vmap import innermost_vmap, mapped

__all__ = ["Rule", "default_chunk_size", "default_precision", "run"]


def _split(options: dict):
    """Static options (hashable: part of the plan) and traced ones (arrays: arguments)."""
    static = {k: v for k, v in options.items() if not isinstance(v, jax.Array)}
    arrays = {k: v for k, v in options.items() if isinstance(v, jax.Array)}
    return static, arrays


def run(
    core,
    logits: tuple,
    rows: Any,
    counted: jax.Array,
    *,
    mode: str,
    options: dict,
    trainable: tuple[bool, ...] | None = None,
    names: tuple[str, ...] | None = None,
    join_vmap: bool = True,
):
    """Evaluate ``core`` over the positions of ``logits``: per position, or summed.

    Args:
      core: ``core(logits, rows, counted, **options)``, a module-level
        function (or a :class:`Rule`) of validated inputs: ``logits`` a
        tuple of arrays ``[*P, V]`` with the positions ``P`` of ``counted``
        (``[C, V]`` chunks when fused), ``rows`` and ``counted`` sliced alike.
        Positions outside ``counted`` must give 0 with zero gradient. It
        returns per-position outputs; with ``mode="sum"``, a pair
        ``(loss, aux)`` whose ``aux`` does not depend on the logits.
      logits: the members, each a dense array ``[*P, V]`` or a
        :class:`LinearLogits` whose ``hidden`` has the positions ``P``.
      rows: a pytree of arrays with leading axes ``P`` (targets, weights,
        arguments; None leaves allowed); never differentiated on the fused path.
      counted: bool ``[*P]``.
      mode: ``"positions"`` (outputs ``[*P, ...]``) or ``"sum"``
        (``(Σ loss, Σ aux)`` over the positions).
      options: the core's keyword options. Python values are static; arrays
        (traced coefficients, ``[V]`` class weights) are passed as
        arguments, and on the fused path no gradient flows to them. Dense
        members' class axis is ``options["axis"]`` when the core takes one
        (default -1), the one option the engine reads (to place them).
      trainable: per member, whether it gets gradients (a teacher does not;
        default all).
      names: per member, what errors call it (default ``"logits"``).
      join_vmap: where ``vmap`` is the innermost transformation, join its
        axis to the positions (:mod:`._vmap`); False is the call as it is.

    Returns:
      As ``mode`` says.
    """
    if mode not in ("positions", "sum"):
        raise ValueError(f"mode must be 'positions' or 'sum', got {mode!r}")
    trainable = tuple(trainable or (True,) * len(logits))
    fused = tuple(isinstance(x, LinearLogits) for x in logits)
    _check_members(logits, fused, trainable, names or ("logits",) * len(logits))
    if any(fused) and join_vmap and innermost_vmap((logits, rows, counted)):
        return _mapped(core, logits, rows, counted, mode, options, trainable, names, fused)
    placed = mesh_kind((logits, rows, counted))  # the one sharding decision
    if placed == "explicit":
        return run_explicit(
            _local, core, logits, rows, counted, mode=mode, options=options,
            trainable=trainable, axis=options.get("axis", -1), fused=fused,
        )
    if any(fused):
        return _fused(core, logits, rows, counted, mode, options, trainable, placed == "auto")
    return _local(core, logits, rows, counted, mode=mode, options=options, trainable=trainable)


def _mapped(core, logits, rows, counted, mode, options, trainable, names, fused):
    """:func:`run` under the innermost ``vmap``: its axis joined to the positions."""
    static, arrays = _split(options)

    def call(logits, rows, counted, arrays, mode=mode, join_vmap=True):
        return run(core, logits, rows, counted, mode=mode, options=dict(static, **arrays),
                   trainable=trainable, names=names, join_vmap=join_vmap)

    return mapped(call, partial(call, join_vmap=False), mode=mode, fused=fused, logits=logits,
                  rows=rows, counted=counted, arrays=arrays)


def _check_members(logits, fused, trainable, names) -> None:
    """Beside a ``LinearLogits``, a trained member must be one too (dense members are constants)."""
    for x, lin, train, name in zip(logits, fused, trainable, names, strict=True):
        if any(fused) and train and not lin:
            raise ValueError(
                f"{name} is a dense array of shape {tuple(x.shape)} in a call with LinearLogits: "
                f"the fused path differentiates LinearLogits only; pass the {name} as "
                "LinearLogits too"
            )


def _local(core, logits, rows, counted, *, mode, options, trainable):
    """The dispatch on the arrays at hand (all of them, or one device's block)."""
    if not any(isinstance(x, LinearLogits) for x in logits):
        logits = tuple(
            x if train else jax.lax.stop_gradient(x)
            for x, train in zip(logits, trainable, strict=True)
        )
        out = core(logits, rows, counted, **options)
        return _loop.sums(out, counted.ndim) if mode == "sum" else out
    return _fused(core, logits, rows, counted, mode, options, trainable, auto=False)


def _fused(core, logits, rows, counted, mode, options, trainable, auto):
    """:func:`run` for members that include a :class:`LinearLogits`: chunks of flat positions
    (``auto``: the arrays are placed on an Auto mesh, and each device takes its own)."""
    position_shape = counted.shape
    n = math.prod(position_shape)
    flat = lambda x: x.reshape((n,) + x.shape[len(position_shape):])
    # A member that is not trained (a teacher) is a constant at every order of
    # differentiation: its rule gives it no gradient, and the stop_gradient keeps
    # a derivative of the rules themselves (jvp of grad, hessian) from reaching it
    # through an array it shares with a trained member (one kernel, self-distillation).
    members = tuple(
        Linear(flat(x.hidden), x.kernel, x.bias) if isinstance(x, LinearLogits)
        else Dense(flat(jnp.asarray(x)))
        for x in logits
    )
    members = tuple(
        m if train else jax.lax.stop_gradient(m)
        for m, train in zip(members, trainable, strict=True)
    )
    rows, counted = jax.tree.map(flat, rows), flat(counted)
    static, arrays = _split(options)
    arrays = jax.lax.stop_gradient(arrays)
    if n == 0:
        # Nothing to chunk: the core on the (empty) materialised logits.
        dense = tuple(m.rows(0, 0, counted)[1] for m in members)
        out = core(dense, rows, counted, **options)
        return _loop.sums(out) if mode == "sum" else _unflatten(out, position_shape)
    chunks = [x.chunk_size for x in logits if isinstance(x, LinearLogits)]
    precision = [x.precision if isinstance(x, LinearLogits) else None for x in logits]
    plan = _loop.plan_for(core, members, counted, static, trainable, chunks, precision)
    per_position, summed = _loop.per_position, _loop.summed
    if auto:
        # The positions keep their axes: the partitioned ops split each as it
        # is placed (a sequence axis too) and flatten each device's block.
        per_position, summed = partitioned_vjps(tuple(chunks))
        unflat = partial(_unflatten, position_shape=position_shape)
        members = tuple(m.map_positions(unflat) for m in members)
        rows, counted = unflat((rows, counted))
    try:
        if mode == "sum":
            return summed(plan, members, rows, counted, arrays)
        out = per_position(plan, members, rows, counted, arrays)
        return out if out_positions(out, position_shape) else _unflatten(out, position_shape)
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError(FORWARD_MODE) from None


FORWARD_MODE = (
    "jxent's functions on LinearLogits have no forward-mode derivative (jax.jvp, "
    "jax.jacfwd, jax.linearize): the fused loops are a jax.custom_vjp. Reverse mode "
    "is exact (jax.grad, jax.vjp, jax.jacrev), and so are its derivatives: "
    "jax.hessian(f), jax.jacfwd(jax.grad(f)) and jax.jvp(jax.grad(f), ...) for "
    "Hessian-vector products. For a first-order forward derivative, pass the "
    "materialised logits (hidden @ kernel + bias) instead."
)


def out_positions(out, position_shape) -> bool:
    """Whether per-position outputs already have the positions' axes."""
    return all(x.shape[: len(position_shape)] == position_shape for x in jax.tree.leaves(out))


def _unflatten(out, position_shape):
    return jax.tree.map(lambda x: x.reshape(position_shape + x.shape[1:]), out)
