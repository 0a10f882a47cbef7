"""The fused engine's loops over chunks of positions, and their ``custom_vjp``s.

For each chunk of ``C`` positions the logits of every member are formed as a
``[C, V]`` product with float32 accumulation (:mod:`._chunk`) and the dense
per-position core turns them into outputs. Two modes:

* ``"sum"`` (losses reduced over positions, ``nll_stats``, ``token_objective``):
  the sums are linear in the per-position outputs, so a differentiated call
  computes the gradients in the forward pass (three products per chunk for
  one linear member) and the backward pass scales them by the cotangent;
* ``"positions"`` (per-position outputs): their cotangents arrive only in the
  backward pass, which forms each chunk's logits again (four products per
  chunk in all). A :class:`~._chunk.Rule` core saves a few ``[N]`` vectors in
  the forward pass and forms the logits' gradient from them in one
  elementwise pass.

A call that is not differentiated runs the forward loop alone: one product
per chunk and linear member. Memory is a chunk's ``[C, V]`` logits (one array
per member) and their gradient, plus the gradients themselves; nothing of size
``N × V``. Three details keep the temporaries small and flat in ``N``: the
last chunk is moved back to end at ``N`` instead of padding (no copy of
``hidden``), outputs are written in place into the loop's carries, and
``h_c.T @ g`` is formed and added a block of classes at a time.

Why token chunks rather than vocabulary blocks with an online log-sum-exp:
on CPU the loss is bound by its products, so three products per chunk beat
the four a recomputing vocabulary-blocked backward needs, and token chunks
run the dense core as it is, where vocabulary blocks would need every option
rewritten as an online reduction. ``python benchmarks/products.py`` times the
products alone; ``benchmarks/linear_ce.py`` and ``token_level.py`` the whole.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ._chunk import Plan, Rule, chunk_step, float_leaves, grad_init, is_linear, pullback_step
from ._chunk import write as write_rows
from ._mesh import cotangent_like, loop

# The default chunk: at most this many logits (128 MiB in float32) and this
# fraction of the positions, but at least this many positions.
_CHUNK_ELEMENTS = 1 << 25
_MIN_CHUNKS = 32
_CPU_CHUNK = 256  # on CPU the fraction of the positions gives way up to this many
_MIN_CHUNK = 192


def default_chunk_size(num_tokens: int, num_classes: int, backend: str | None = None) -> int:
    """Positions per chunk when ``chunk_size=None`` (the one statement of the rule).

    On CPU: ``min(2**25 / V, max(N / 32, 256))``, but at least 192 (and at
    most ``N``), rounded down to a multiple of 8; ``V`` counts the classes of
    every member chunked together. The first bound caps the chunk's logits at
    128 MiB; the second keeps the temporaries near 1/32 of what the
    materialised logits and their gradient would take, or at 256 positions
    for smaller ``N``, where the products run faster than at 192; the floor
    keeps the products efficient at the largest vocabularies. On an
    accelerator (GPU, TPU) the chunk takes the whole 128 MiB budget,
    ``2**25 / V`` rows: chunks of a few hundred rows leave the device idle
    between small products. Measure another chunk with
    ``python benchmarks/token_level.py --chunk-size C`` or
    ``python benchmarks/linear_ce.py``.
    """
    cap = _CHUNK_ELEMENTS // max(num_classes, 1)
    if (backend or jax.default_backend()) == "cpu":
        cap = min(cap, max(num_tokens // _MIN_CHUNKS, _CPU_CHUNK))
    chunk = max(_MIN_CHUNK, cap // 8 * 8)
    return max(1, min(chunk, num_tokens))


def _num_chunks(plan: Plan) -> int:
    return -(-plan.positions // plan.chunk) if plan.positions else 0


def _output_init(plan: Plan, members, rows, counted, arrays, *, saved: bool = False):
    """Zero ``[N]`` carries shaped like the core's per-position outputs (and saved vectors)."""
    shapes = jax.eval_shape(lambda: chunk_step(plan, 0, members, rows, counted, arrays)[2:])
    n = plan.positions
    out = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype), shapes)
    return out if saved else out[0]


def forward(plan: Plan, members, rows, counted, arrays, *, saved: bool = False):
    """Per-position outputs (with ``saved``: and a :class:`Rule`'s saved vectors), forward only."""

    def body(i, out):
        start, fresh, *values = chunk_step(plan, i, members, rows, counted, arrays)
        values = tuple(values) if saved else values[0]
        return jax.tree.map(lambda o, v: write_rows(o, v, start, fresh), out, values)

    init = _output_init(plan, members, rows, counted, arrays, saved=saved)
    return loop(_num_chunks(plan), body, init)


def forward_backward(plan: Plan, members, rows, counted, arrays, ct):
    """Per-position outputs and the gradients of ``Σ ct · outputs``, one chunk at a time."""

    def body(i, carry):
        out, grads = carry
        start, fresh, outputs, grads = chunk_step(
            plan, i, members, rows, counted, arrays, ct, grads
        )
        out = jax.tree.map(lambda o, v: write_rows(o, v, start, fresh), out, outputs)
        return out, grads

    init = (
        _output_init(plan, members, rows, counted, arrays),
        grad_init(plan, members),
    )
    return loop(_num_chunks(plan), body, init)


def backward(plan: Plan, members, rows, counted, arrays, saved, ct):
    """The gradients of ``Σ ct · outputs``: a :class:`Rule`'s pullback, or ``jax.vjp``."""
    if not isinstance(plan.core, Rule):
        return forward_backward(plan, members, rows, counted, arrays, ct)[1]

    def body(i, grads):
        return pullback_step(plan, i, members, rows, counted, arrays, saved, ct, grads)

    return loop(_num_chunks(plan), body, grad_init(plan, members))


def sums(out, axes: int = 1):
    """``(Σ loss, Σ aux)`` over the leading ``axes`` (position) axes of a core's outputs."""
    loss, aux = out
    over = tuple(range(axes))
    return jnp.sum(loss, axis=over), jax.tree.map(lambda a: jnp.sum(a, axis=over), aux)


# --- the work of each custom_vjp rule, on this device's positions and classes -----------


def total_ct(plan: Plan, members, rows, counted, arrays):
    """The cotangents of ``Σ loss`` and zero for the auxiliary outputs (``mode="sum"``)."""
    loss, aux = jax.eval_shape(lambda: _output_init(plan, members, rows, counted, arrays))
    return [jnp.ones(loss.shape, loss.dtype)] + [
        jnp.zeros(s.shape, s.dtype)
        for s, f in zip(jax.tree.leaves(aux), float_leaves(aux), strict=True)
        if f
    ]


def work(kind: str, plan: Plan, members, rows, counted, arrays, saved=None, ct=None):
    """One rule's computation over the positions and classes at hand.

    ``"sums"``: ``(Σ loss, Σ aux)``; ``"sums_grads"``: those and the gradients
    of ``Σ loss``; ``"forward"``: per-position outputs; ``"forward_saved"``:
    those and a :class:`Rule`'s saved vectors (None for other cores);
    ``"backward"``: the gradients of ``Σ ct · outputs``. Sharded callers
    combine the devices' parts (``jxent._engine._partition``).
    """
    if kind == "sums":
        return sums(forward(plan, members, rows, counted, arrays))
    if kind == "sums_grads":
        ct = total_ct(plan, members, rows, counted, arrays)
        out, grads = forward_backward(plan, members, rows, counted, arrays, ct)
        return sums(out), grads
    if kind == "forward":
        return forward(plan, members, rows, counted, arrays)
    if kind == "forward_saved":
        if isinstance(plan.core, Rule):
            return forward(plan, members, rows, counted, arrays, saved=True)
        return forward(plan, members, rows, counted, arrays), None
    if kind == "backward":
        return backward(plan, members, rows, counted, arrays, saved, ct)
    raise ValueError(f"unknown kind of work {kind!r}")


def float_cts(ct) -> list:
    """The cotangents of the floating outputs, in leaf order."""
    return [c for c, f in zip(jax.tree.leaves(ct), float_leaves(ct), strict=True) if f]


def cotangents(plan: Plan, members, grads, scale=None):
    """Cotangents for the ``members`` argument, in the primals' dtypes and mesh variance."""
    out = []
    for member, train, g in zip(members, plan.trainable, grads, strict=True):
        if not train:
            out.append(jax.tree.map(jnp.zeros_like, member))
            continue
        cts = []
        for primal, grad in zip(member, g, strict=True):
            if primal is None:
                cts.append(None)
                continue
            if scale is not None:
                grad = scale * grad
            cts.append(cotangent_like(grad, primal).astype(primal.dtype))
        out.append(tuple(cts))
    return tuple(out)


def rules(run):
    """The two ``custom_vjp``s of the engine, over ``run(kind, plan, *arrays)``.

    ``run`` is :func:`work` on one device (or inside ``shard_map``), or the
    same work partitioned over a mesh. ``"positions"``: per-position outputs,
    whose backward pass recomputes each chunk's logits; ``"sum"``: sums over
    positions, whose gradients are computed in the forward pass.
    """

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def positions(plan: Plan, members, rows, counted, arrays):
        return run("forward", plan, members, rows, counted, arrays)

    def positions_fwd(plan, members, rows, counted, arrays):
        out, saved = run("forward_saved", plan, members, rows, counted, arrays)
        return out, (members, rows, counted, arrays, saved)

    def positions_bwd(plan, residuals, ct):
        members, rows, counted, arrays, saved = residuals
        grads = run("backward", plan, members, rows, counted, arrays, saved, float_cts(ct))
        return cotangents(plan, members, grads), None, None, None

    positions.defvjp(positions_fwd, positions_bwd)

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def summed(plan: Plan, members, rows, counted, arrays):
        return run("sums", plan, members, rows, counted, arrays)

    def summed_fwd(plan, members, rows, counted, arrays):
        out, grads = run("sums_grads", plan, members, rows, counted, arrays)
        return out, (members, grads)

    def summed_bwd(plan, residuals, ct):
        members, grads = residuals
        ct_loss, _ = ct  # the auxiliary sums (counts, weights) do not depend on the logits
        return cotangents(plan, members, grads, scale=ct_loss), None, None, None

    summed.defvjp(summed_fwd, summed_bwd)
    return positions, summed


positions, summed = rules(work)


def plan_for(core, members, counted, options: dict, trainable, chunk_sizes, precision) -> Plan:
    """The :class:`Plan` of a call: the chunk from the members' ``chunk_size`` or the default."""
    n = counted.shape[0]
    num_classes = sum(m[1].shape[1] if is_linear(m) else m.shape[1] for m in members)
    sizes = set(chunk_sizes) - {None}
    chunk = min(sizes) if sizes else default_chunk_size(n, num_classes)
    return Plan(core, tuple(sorted(options.items())), max(1, min(chunk, n)), trainable, n,
                precision=tuple(precision))
