"""``jax.vmap`` over a fused call: the mapped axis joins the positions.

The engine's core is per position, so a call mapped over examples is the
same call on one more position axis: ``vmap(f)(hidden [B, T, D], tokens
[B, T])`` with a shared ``kernel`` is ``f`` on ``B·T`` positions, one chunk
loop, and the kernel's gradient summed over the chunks as in a batched call.
Left to JAX's own batching, the loops would carry a kernel gradient per
example (``[B, D, V]``) and run every chunk once per example.

The rule applies where ``vmap`` is the innermost transformation at the call
(``vmap`` alone, ``grad`` of ``vmap``, nested ``vmap``\\ s, each joining its
axis in turn): there, JAX's ``custom_vmap`` hands the rule the mapped arrays
with their axis in front. Per-position outputs come back mapped; sums are
taken per example from per-position outputs, whose gradients the backward
pass forms from each example's cotangent (four products per chunk where an
unmapped sum, differentiated, has three).

Where a derivative is innermost (``vmap`` of ``grad``: per-example
gradients), or the mapped axis runs through the kernel, the bias or a traced
option (one head per example), JAX's batching runs as it is: per-example
results, correct, at per-example cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def innermost_vmap(tree) -> bool:
    """Whether the innermost transformation tracing now is a ``vmap`` mapping a leaf of ``tree``."""
    try:  # JAX's trace state; without it (another JAX), JAX's batching applies.
        from jax._src import core
        from jax._src.interpreters import batching
    except ImportError:  # pragma: no cover
        return False
    trace = getattr(getattr(core, "trace_ctx", None), "trace", None)
    if not isinstance(trace, batching.BatchTrace):
        return False
    return any(
        isinstance(x, batching.BatchTracer) and x._trace is trace
        for x in jax.tree.leaves(tree)
    )


def _one_head(fused, logits, batched_logits, batched_arrays) -> bool:
    """True when the mapped axis runs through positions only (not a kernel, bias or option)."""
    for lin, x, b in zip(fused, logits, batched_logits, strict=True):
        if lin and (b.kernel or (x.bias is not None and b.bias)):
            return False
    return not any(jax.tree.leaves(batched_arrays))


def _with_axis(x, batched: bool, size: int):
    return x if batched else jnp.broadcast_to(x, (size,) + x.shape)


def _positions_with_axis(fused, logits, rows, counted, in_batched, size):
    """Every per-position array with the mapped axis in front (broadcast where not mapped)."""
    b_logits, b_rows, b_counted, _ = in_batched
    out = []
    for lin, x, b in zip(fused, logits, b_logits, strict=True):
        if lin:
            children = (_with_axis(x.hidden, b.hidden, size), x.kernel, x.bias)
            out.append(type(x).tree_unflatten(x.tree_flatten()[1], children))
        else:
            out.append(_with_axis(x, b, size))
    rows = jax.tree.map(lambda r, b: _with_axis(r, b, size), rows, b_rows)
    return tuple(out), rows, _with_axis(counted, b_counted, size)


def mapped(run, dispatch, *, mode: str, fused: tuple, logits, rows, counted, arrays):
    """The fused call under the innermost ``vmap``, with the mapped axis joined to the positions.

    ``run(logits, rows, counted, arrays, mode)`` is the engine's entry (it may
    meet an outer ``vmap`` in turn); ``dispatch(logits, rows, counted,
    arrays)`` the call as it is, for JAX's own batching where the axis cannot
    join the positions; ``fused`` says which members are ``LinearLogits``.
    """

    @jax.custom_batching.custom_vmap
    def call(logits, rows, counted, arrays):
        return dispatch(logits, rows, counted, arrays)

    @call.def_vmap
    def rule(size, in_batched, logits, rows, counted, arrays):
        if not _one_head(fused, logits, in_batched[0], in_batched[3]):
            axes = jax.tree.map(lambda b: 0 if b else None, in_batched)
            out = jax.vmap(dispatch, in_axes=axes, axis_size=size)(logits, rows, counted, arrays)
            return out, jax.tree.map(lambda _: True, out)
        logits, rows, counted = _positions_with_axis(
            fused, logits, rows, counted, in_batched, size)
        out = run(logits, rows, counted, arrays, "positions")
        if mode == "sum":
            # Per example: its positions' outputs summed (the batch axis stays).
            over = tuple(range(1, counted.ndim))
            out = jax.tree.map(lambda x: jnp.sum(x, axis=over), out)
        return out, jax.tree.map(lambda _: True, out)

    return call(logits, rows, counted, arrays)
