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
``hidden``), each chunk's outputs are stacked by the loop (``lax.scan``), and
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

from .._checks import float_dtype
from ._chunk import (
    BACKWARD,
    FORWARD,
    FORWARD_SAVED,
    SUMS,
    SUMS_GRADS,
    Plan,
    Work,
    chunk_step,
    float_leaves,
    grad_init,
    is_linear,
    outer_block,
)
from ._mesh import carry_init, cotangent_like

# The backends' rules. CPU: at most this many logits per chunk (128 MiB in
# float32) and this fraction of the positions, but at least this many positions.
_CHUNK_ELEMENTS = 1 << 25
_MIN_CHUNKS = 16
_CPU_CHUNK = 512  # on CPU the fraction of the positions gives way up to this many
_MIN_CHUNK = 192
# GPU and TPU: at most this many logits per chunk (2 GiB in float32), in whole
# tiles of this many rows, at least one tile.
_ACCELERATOR_ELEMENTS = 1 << 29
_ACCELERATOR_TILE = 256
# The platforms a program may be lowered for; any other takes the accelerator rules.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def default_chunk_size(num_tokens: int, num_classes: int, backend: str | None = None) -> int:
    """Positions per chunk when ``chunk_size=None`` (the one statement of the rule).

    ``backend`` is the platform the program is lowered for (``"cpu"``,
    ``"cuda"``, ``"rocm"``, ``"tpu"``); the engine asks for each platform of a
    lowering (:func:`work`), ``None`` means the host's default backend.

    On CPU: ``min(2**25 / V, max(N / 16, 512))``, but at least 192 (and at
    most ``N``), rounded down to a multiple of 8; ``V`` counts the classes of
    every member chunked together. The first bound caps the chunk's logits at
    128 MiB; the second keeps the temporaries near 1/16 of what the
    materialised logits and their gradient would take, or at 512 positions
    for smaller ``N``; the floor keeps the products efficient at the largest
    vocabularies. Measured (``python benchmarks/token_level.py --chunk-size
    C`` at N, D, V = 4096, 512, 32768 on 2 AMD EPYC cores): 512 rows against
    the 256 of jxent 0.4, fused ÷ materialised 0.96 against 1.06 for
    ``token_stats`` with its gradient, 0.81 against 0.89 for
    ``token_objective``, the forward alone unchanged; the temporaries double
    (96 → 192 MiB, against 2 GiB materialised).

    On GPU and TPU: ``2**29 / V`` rows (2 GiB of float32 logits), rounded
    down to a multiple of 256, at least 256 (and at most ``N``): 4096 rows at
    ``V = 131072`` or 128256, 16384 at ``V = 32768``. The arithmetic: every
    chunk reads and writes the float32 kernel-gradient carry ``[D, V]``
    (``d_kernel += hᵀ · g``), ``8·D·V`` bytes, ``N / C`` times a step, while
    the step's three products are ``6·N·D·V`` FLOP; on a device of ``F``
    FLOP/s and ``B`` bytes/s the carry's time over the products' is
    ``4·F / (3·B·C)``, whatever ``N``, ``D`` and ``V``. An H100 SXM (989
    bf16 TFLOP/s dense, 3.35 TB/s) gives ``393 / C``: at ``C = 256`` (the
    0.4 rule, ``2**25 / V`` at ``V = 131072``) the carry outlasts the
    products 1.5 times over (64 chunks at ``N, D, V = 16384, 4096, 131072``:
    256 GiB of carry traffic a step), at ``C = 4096`` it is under 10 % (4
    chunks, 16 GiB). The price is memory: a chunk holds its logits and their
    gradient, about ``10·C·V`` bytes with the bf16 copy of the gradient (5
    GiB at ``C·V = 2**29``), next to ``8·N·V`` and more for the materialised
    logits. Levanter's token tiles measured fastest at 8,192–16,384 rows on
    an H100 (with vocabulary blocks bounding each tile's memory). Not
    measured on a GPU since jxent 0.2.0: ``python benchmarks/accelerator.py``
    measures it where one is at hand.

    Measure another chunk with ``python benchmarks/token_level.py --chunk-size
    C`` or ``python benchmarks/linear_ce.py``.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        rows = _ACCELERATOR_ELEMENTS // max(num_classes, 1) // _ACCELERATOR_TILE
        return max(1, min(max(rows, 1) * _ACCELERATOR_TILE, num_tokens))
    cap = min(_CHUNK_ELEMENTS // max(num_classes, 1), max(num_tokens // _MIN_CHUNKS, _CPU_CHUNK))
    chunk = max(_MIN_CHUNK, cap // 8 * 8)
    return max(1, min(chunk, num_tokens))


def default_precision(backend: str | None = None) -> str:
    """``LinearLogits``' gradient policy when ``precision=None``, per platform.

    ``"accurate"`` on CPU, ``"balanced"`` on GPU and TPU (the policies are
    described at :class:`jxent.LinearLogits`; ``docs/precision.md`` has the
    table). With bf16/f16 inputs, ``"balanced"`` gives every product the
    inputs' dtype with float32 accumulation, as the materialised program's
    bf16 products have, and sums the kernel's gradient across chunks in
    float32. ``"accurate"`` keeps the logits' gradient float32 in its two
    products, widening the kernel (a float32 copy of it, or of its tile, in
    every chunk): on CPU that is exact float32 and measured as fast (XLA:CPU
    computes bf16 products in float32 anyway); on a GPU it is a float32
    product, TF32 at half the bf16 rate or slower; on a TPU, at the default
    matmul precision, one bf16 pass: the copies cost and buy nothing unless
    ``jax.default_matmul_precision("highest")`` asks for float32 products.
    """
    return "accurate" if (backend or jax.default_backend()) == "cpu" else "balanced"


def _num_chunks(plan: Plan) -> int:
    return -(-plan.num_positions // plan.chunk) if plan.num_positions else 0


def sums(out, axes: int = 1):
    """``(Σ loss, Σ aux)`` over the leading ``axes`` (position) axes of a core's outputs."""
    loss, aux = out
    over = tuple(range(axes))
    return jnp.sum(loss, axis=over), jax.tree.map(lambda a: jnp.sum(a, axis=over), aux)


# --- the work of each custom_vjp rule, on this device's positions and classes -----------


def _policy(member, policy: str) -> str:
    """``policy``, or ``"accurate"`` where every policy is that one program (float32 inputs)."""
    hidden, kernel, _ = member
    low = jnp.result_type(hidden.dtype, kernel.dtype) != float_dtype(hidden.dtype, kernel.dtype)
    return policy if low else "accurate"


def for_platform(plan: Plan, members, platform: str) -> Plan:
    """``plan`` as lowered for ``platform``: its chunk, precision policies and class blocks."""
    n = plan.num_positions
    classes = sum(m.num_classes for m in members)
    chunk = plan.chunk or default_chunk_size(n, classes, platform)
    chunk = max(1, min(chunk, n))
    precision = tuple(
        _policy(m, p or default_precision(platform)) if is_linear(m) else None
        for m, p in zip(members, plan.precision or (None,) * len(members), strict=True)
    )
    blocks = tuple(
        outer_block(chunk, m.hidden.shape[-1], m.num_classes, platform) if is_linear(m) else None
        for m in members
    )
    return plan._replace(chunk=chunk, precision=precision, blocks=blocks, resolved=True)


def work(kind: Work, plan: Plan, members, rows, counted, arrays, saved=None, ct=None):
    """One loop over the chunks of the positions and classes at hand, doing ``kind``.

    ``SUMS``: ``(Σ loss, Σ aux)``; ``SUMS_GRADS``: those and the gradients of
    ``Σ loss``; ``FORWARD``: per-position outputs; ``FORWARD_SAVED``: those
    and a :class:`Rule`'s saved vectors (None for other cores); ``BACKWARD``:
    the gradients of ``Σ ct · outputs``. Sharded callers combine the devices'
    parts (``jxent._engine._partition``).

    The chunk, the precision policies and the class blocks are chosen for the
    platform the program is lowered for, not the host that traces it: where
    the platforms' choices differ, ``jax.lax.platform_dependent`` carries one
    loop per distinct choice, and lowering keeps the one of each platform
    (a program exported for several platforms carries each one's).
    """
    if not plan.resolved:
        variants = _variants(plan, members)
        if len(variants) > 1:
            return _by_platform(kind, variants, members, rows, counted, arrays, saved, ct)
        plan = next(iter(variants))
    body = partial(chunk_step, plan, kind, members, rows, counted, arrays, saved, ct)
    grads = None
    if kind.grads:  # the only carry: inside shard_map it needs the body's mesh variance
        grads = carry_init(lambda i, g: body(g, i)[0], grad_init(plan, members))
    grads, values = jax.lax.scan(body, grads, jnp.arange(_num_chunks(plan)))
    return _result(kind, plan, values, grads)


def _variants(plan: Plan, members) -> dict:
    """``{plan as resolved for a platform: the platforms}``, one entry per distinct choice."""
    variants: dict[Plan, list[str]] = {}
    for platform in PLATFORMS:
        variants.setdefault(for_platform(plan, members, platform), []).append(platform)
    return variants


def _by_platform(kind: Work, variants: dict, *args):
    """:func:`work` with each platform's plan, selected when the program is lowered."""
    branches = {}
    for resolved, platforms in variants.items():
        branches.update(dict.fromkeys(platforms, partial(work, kind, resolved)))
    return jax.lax.platform_dependent(*args, default=branches["cuda"], **branches)


def _result(kind: Work, plan: Plan, values, grads):
    """What :func:`work` returns for ``kind``, from the scan's gradients and stacked values."""
    if kind.sums:
        values = sums(values[0], axes=2)  # stale rows of the last chunk are not counted: 0
    elif values is not None:
        values = jax.tree.map(partial(_unchunk, plan), values if kind.saved else values[0])
    if not kind.grads:
        return values
    return grads if values is None else (values, grads)


def _unchunk(plan: Plan, x):
    """``[chunks, C, ...]`` per-chunk rows as ``[N, ...]``: the last chunk ends at ``N``, so
    its first ``chunks·C − N`` rows repeat positions of the chunk before it."""
    n, c = x.shape[:2]
    extra = n * c - plan.num_positions
    if extra == 0:
        return x.reshape((n * c,) + x.shape[2:])
    head = x[:-1].reshape(((n - 1) * c,) + x.shape[2:])
    return jnp.concatenate([head, x[-1, extra:]], axis=0)


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
        out.append(type(member)(*cts))
    return tuple(out)


def custom_vjps(run):
    """The two ``custom_vjp``s of the engine, over ``run(kind, plan, *arrays)`` (a :class:`Work`).

    ``run`` is :func:`work` on one device (or inside ``shard_map``), or the
    same work partitioned over a mesh. ``per_position``: per-position outputs,
    whose backward pass recomputes each chunk's logits; ``summed``: sums over
    positions, whose gradients are computed in the forward pass.
    """

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def per_position(plan: Plan, members, rows, counted, arrays):
        return run(FORWARD, plan, members, rows, counted, arrays)

    def per_position_fwd(plan, members, rows, counted, arrays):
        out, saved = run(FORWARD_SAVED, plan, members, rows, counted, arrays)
        return out, (members, rows, counted, arrays, saved)

    def per_position_bwd(plan, residuals, ct):
        members, rows, counted, arrays, saved = residuals
        grads = run(BACKWARD, plan, members, rows, counted, arrays, saved, float_cts(ct))
        return cotangents(plan, members, grads), None, None, None

    per_position.defvjp(per_position_fwd, per_position_bwd)

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def summed(plan: Plan, members, rows, counted, arrays):
        return run(SUMS, plan, members, rows, counted, arrays)

    def summed_fwd(plan, members, rows, counted, arrays):
        out, grads = run(SUMS_GRADS, plan, members, rows, counted, arrays)
        return out, (members, grads)

    def summed_bwd(plan, residuals, ct):
        members, grads = residuals
        ct_loss, _ = ct  # the auxiliary sums (counts, weights) do not depend on the logits
        return cotangents(plan, members, grads, scale=ct_loss), None, None, None

    summed.defvjp(summed_fwd, summed_bwd)
    return per_position, summed


per_position, summed = custom_vjps(work)


def plan_for(core, members, counted, options: dict, trainable, chunk_sizes, precision) -> Plan:
    """The :class:`Plan` of a call: the chunk from the members' ``chunk_size``, or None.

    None (the chunk, or a member's ``precision``) is the default of each
    platform the program is lowered for, filled in by :func:`work`.
    """
    n = counted.shape[0]
    sizes = set(chunk_sizes) - {None}
    chunk = max(1, min(min(sizes), n)) if sizes else None
    return Plan(core, tuple(sorted(options.items())), chunk, trainable, n,
                precision=tuple(precision))
