"""The chunked engine behind every fused function: ``hidden @ kernel + bias`` one chunk at a time.

:class:`LinearLogits` stands for the logits ``hidden @ kernel + bias`` without
computing them. Every token-level function that accepts it
(``softmax_cross_entropy``, ``sequence_nll``, ``nll_stats``, ``token_stats``,
``token_objective``, ``distillation_loss``) runs its own dense per-position
core on chunks of positions through :func:`chunked`, so no option is derived
twice:

* for each chunk of ``C`` positions, the logits of every ``LinearLogits``
  (student and teacher are chunked together) are formed as a ``[C, V]``
  product with float32 accumulation, and the dense core turns them into
  per-position outputs; ``jax.vjp`` of the core gives ``∂/∂logits``, and
  three products turn that into ``∂/∂hidden`` rows, ``∂/∂kernel`` (added in
  place a block of classes at a time) and ``∂/∂bias``;
* ``mode="sum"`` (reductions ``"mean"``/``"sum"``, ``nll_stats``,
  ``token_objective``) returns the sums over positions, which are linear in
  the per-position outputs: a differentiated call computes the gradients in
  the forward pass (three products per chunk for one ``LinearLogits``) and
  the backward pass scales them by the cotangent;
* ``mode="positions"`` (``reduction="none"``, ``token_stats``, per-sequence
  normalisation) returns per-position outputs, whose cotangents only the
  backward pass knows: that pass recomputes each chunk's logits (four
  products per chunk in all). A core given as a :class:`Rule`
  (``token_stats``) saves a few ``[N]`` vectors in the forward pass and forms
  the logits' gradient from them in one elementwise pass, without redoing
  the forward pass's reductions (and one ``[C, V]`` temporary fewer);
* a call that is not differentiated runs the forward loop alone: one product
  per chunk and ``LinearLogits``.

Memory: a chunk's ``[C, V]`` logits (one array per ``LinearLogits``) and
their gradient, plus the gradients themselves; nothing of size ``N × V``.

Why token chunks (measured on the project's shared 2-core x86 CPU, float32,
forward + backward, ``N, D, V = 4096, 512, 32768``): materialised
``softmax_cross_entropy(h @ kernel)`` 4.02 s; token chunks (``C = 256`` /
``512``) 3.83 s / 3.93 s; vocabulary blocks with an online log-sum-exp and a
recomputing backward pass (four products) 4.72 s (blocks of 1024 classes),
4.23 s (4096). One ``[N, D] @ [D, V]`` product alone takes 0.65 s: on CPU the
loss is bound by its products, so three beat four, and token chunks run the
dense core as it is, where vocabulary blocks would need every option
rewritten as an online reduction.

The default chunk (:func:`default_chunk_size`) is ``min(2**25 / V, max(N /
32, 256))`` positions, at least 192, where ``V`` counts the classes of every
``LinearLogits`` chunked together: at most 128 MiB of float32 logits (unless
the floor needs more), and temporaries about ``1/32`` of the materialised
ones once ``N ≥ 8192``. Below a few hundred positions each chunk's products
run slower, since every chunk streams the kernel twice and its gradient once:
fused
cross-entropy, time ÷ materialised, at ``N, D, V = 4096, 512, 32768``: ``C =
128``: 1.02, 192: 0.92, 256: 0.90, 512: 0.87; at ``2048, 1024, 131072``:
128: 1.19, 192: 1.07, 256: 0.96 (0.1's measurements); the gradient of
``token_stats`` (workload (a) of ``benchmarks/token_level.py``, whose
``--chunk-size`` option sets ``C``) is likewise faster at 256 than at 192.
The compiled memory figures of the fused functions are printed by
``benchmarks/linear_ce.py`` and ``benchmarks/token_level.py``.

Three details keep the temporaries small and flat in ``N``: the last chunk is
moved back to end at ``N`` instead of padding (no copy of ``hidden``),
outputs are written in place into the loop's carries, and ``h_c.T @ g`` is
formed and added a block of classes at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from ._chunk import (
    Plan,
    Rule,
    chunk_step,
    float_leaves,
    grad_init,
    pullback_step,
    write,
)
from ._mesh import cotangent_like, loop

__all__ = ["Rule", "chunked", "default_chunk_size", "split_traced"]

# The default chunk: at most this many logits (128 MiB in float32) and this
# fraction of the positions, but at least this many positions.
_CHUNK_ELEMENTS = 1 << 25
_MIN_CHUNKS = 32
_CPU_CHUNK = 256  # on CPU the fraction of the positions gives way up to this many
_MIN_CHUNK = 192


def default_chunk_size(num_tokens: int, num_classes: int, backend: str | None = None) -> int:
    """Positions per chunk when ``chunk_size=None``.

    On CPU: ``min(2**25 / V, max(N / 32, 256))``, but at least 192 (and at
    most ``N``), rounded down to a multiple of 8. The first bound caps the
    chunk's logits at 128 MiB; the second keeps the temporaries near 1/32 of
    what the materialised logits and their gradient would take, or at 256
    positions for smaller ``N``, where the products run faster than at 192
    (``benchmarks/token_level.py --chunk-size``); the floor keeps the products
    efficient at the largest vocabularies. On an accelerator (GPU, TPU) the chunk takes the
    whole 128 MiB budget, ``2**25 / V`` rows: there, chunks of a few hundred
    rows leave the device idle between small products (measured on an H200
    by ``benchmarks/token_level.py``: 192-row chunks ran 1.7-3.3x slower
    than the materialised path at ``N, D, V = 4096, 512, 32768``).
    """
    cap = _CHUNK_ELEMENTS // max(num_classes, 1)
    if (backend or jax.default_backend()) == "cpu":
        cap = min(cap, max(num_tokens // _MIN_CHUNKS, _CPU_CHUNK))
    chunk = max(_MIN_CHUNK, cap // 8 * 8)
    return max(1, min(chunk, num_tokens))


def _output_init(plan: Plan, linears, rows, counted, consts, *, saved: bool = False):
    """Zero ``[N]`` carries shaped like the core's per-position outputs (and saved vectors)."""
    shapes = jax.eval_shape(lambda: chunk_step(plan, 0, linears, rows, counted, consts)[2:])
    n = plan.positions
    out = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype), shapes)
    return out if saved else out[0]


def _forward(plan: Plan, linears, rows, counted, consts, *, saved: bool = False):
    """Per-position outputs (with ``saved``: and a :class:`Rule`'s saved vectors), forward only."""

    def body(i, out):
        start, fresh, *values = chunk_step(plan, i, linears, rows, counted, consts)
        values = tuple(values) if saved else values[0]
        return jax.tree.map(lambda o, v: write(o, v, start, fresh), out, values)

    init = _output_init(plan, linears, rows, counted, consts, saved=saved)
    return loop(_num_chunks(plan), body, init)


def _forward_backward(plan: Plan, linears, rows, counted, consts, ct):
    """Per-position outputs and the gradients of ``Σ ct · outputs``, one chunk at a time."""

    def body(i, carry):
        out, grads = carry
        start, fresh, outputs, grads = chunk_step(
            plan, i, linears, rows, counted, consts, ct, grads
        )
        out = jax.tree.map(lambda o, v: write(o, v, start, fresh), out, outputs)
        return out, grads

    init = (
        _output_init(plan, linears, rows, counted, consts),
        grad_init(linears, plan.trainable),
    )
    return loop(_num_chunks(plan), body, init)


def _backward(plan: Plan, linears, rows, counted, consts, saved, ct):
    """The gradients of ``Σ ct · outputs``: a :class:`Rule`'s pullback, or ``jax.vjp``."""
    if not isinstance(plan.core, Rule):
        return _forward_backward(plan, linears, rows, counted, consts, ct)[1]

    def body(i, grads):
        return pullback_step(plan, i, linears, rows, counted, consts, saved, ct, grads)

    return loop(_num_chunks(plan), body, grad_init(linears, plan.trainable))


def _num_chunks(plan: Plan) -> int:
    return -(-plan.positions // plan.chunk) if plan.positions else 0


def _cotangents(plan: Plan, linears, grads, scale=None):
    """Cotangents for the ``linears`` argument, in the primals' dtypes and mesh variance."""
    out = []
    for lin, train, g in zip(linears, plan.trainable, grads, strict=True):
        if not train:
            out.append(jax.tree.map(jnp.zeros_like, lin))
            continue
        cts = []
        for primal, grad in zip(lin, g, strict=True):
            if primal is None:
                cts.append(None)
                continue
            if scale is not None:
                grad = scale * grad
            cts.append(cotangent_like(grad, primal).astype(primal.dtype))
        out.append(tuple(cts))
    return tuple(out)


# --- mode "positions": per-position outputs, recomputed in the backward pass ----------


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _positions(plan: Plan, linears, rows, counted, consts):
    return _forward(plan, linears, rows, counted, consts)


def _positions_fwd(plan: Plan, linears, rows, counted, consts):
    if isinstance(plan.core, Rule):
        out, saved = _forward(plan, linears, rows, counted, consts, saved=True)
    else:
        out, saved = _forward(plan, linears, rows, counted, consts), None
    return out, (linears, rows, counted, consts, saved)


def _positions_bwd(plan: Plan, residuals, ct):
    linears, rows, counted, consts, saved = residuals
    float_ct = [c for c, f in zip(jax.tree.leaves(ct), float_leaves(ct), strict=True) if f]
    grads = _backward(plan, linears, rows, counted, consts, saved, float_ct)
    return _cotangents(plan, linears, grads), None, None, None


_positions.defvjp(_positions_fwd, _positions_bwd)


# --- mode "sum": sums over positions, gradients computed in the forward pass ----------


def _sums(out):
    loss, aux = out
    return jnp.sum(loss), jax.tree.map(lambda a: jnp.sum(a, axis=0), aux)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _summed(plan: Plan, linears, rows, counted, consts):
    return _sums(_forward(plan, linears, rows, counted, consts))


def _summed_fwd(plan: Plan, linears, rows, counted, consts):
    loss, aux = jax.eval_shape(lambda: _output_init(plan, linears, rows, counted, consts))
    # The gradient of Σ loss; the auxiliary outputs get a zero cotangent.
    ct = [jnp.ones(loss.shape, loss.dtype)] + [
        jnp.zeros(s.shape, s.dtype)
        for s, f in zip(jax.tree.leaves(aux), float_leaves(aux), strict=True)
        if f
    ]
    out, grads = _forward_backward(plan, linears, rows, counted, consts, ct)
    return _sums(out), (linears, grads)


def _summed_bwd(plan: Plan, residuals, ct):
    linears, grads = residuals
    ct_loss, _ = ct  # the auxiliary sums (counts, weights) do not depend on the logits
    return _cotangents(plan, linears, grads, scale=ct_loss), None, None, None


_summed.defvjp(_summed_fwd, _summed_bwd)


# --- the entry point -----------------------------------------------------------------------


def split_traced(**options):
    """Static options (hashable, for the plan) and traced ones (passed as ``consts``)."""
    static = {k: v for k, v in options.items() if not isinstance(v, jax.Array)}
    traced = {k: v for k, v in options.items() if isinstance(v, jax.Array)}
    return static, traced


def chunked(
    core: Callable,
    logits: tuple,
    rows: Any,
    counted: jax.Array,
    consts: Any = None,
    *,
    mode: str,
    options: dict | None = None,
    trainable: tuple[bool, ...] | None = None,
):
    """Run a dense per-position ``core`` over chunks of positions of fused logits.

    Args:
      core: a module-level function ``core(logits, rows, counted, consts,
        **options)``: ``logits`` a tuple of ``[C, V]`` arrays (one per
        ``LinearLogits``), ``rows`` the pytree of per-position inputs sliced to
        the chunk, ``counted`` ``[C]`` bool (positions outside it must give
        0 with zero gradient), ``consts`` passed through. It returns
        per-position outputs ``[C, ...]``; with ``mode="sum"``, a pair
        ``(loss, aux)`` whose ``aux`` does not depend on the logits.
      logits: the ``LinearLogits`` to chunk together, all with the same
        positions (``hidden.shape[:-1]``), flattened here to ``[N]``.
      rows: a pytree of ``[N, ...]`` arrays (targets, masks, dense teacher
        logits): sliced per chunk, never differentiated.
      counted: ``[N]`` bool; hidden rows not counted are zeroed before the
        products, so NaN/inf there reach neither values nor gradients.
      consts: a pytree passed to every chunk as it is (class weights, traced
        coefficients); no gradient flows to it.
      mode: ``"positions"`` (per-position outputs ``[N, ...]``) or ``"sum"``
        (``(Σ loss, Σ aux)``).
      options: static keyword options of ``core`` (hashable values).
      trainable: per ``LinearLogits``, whether it gets gradients (a teacher
        does not); default all.

    Returns:
      As ``mode`` says.
    """
    n = counted.shape[0]
    if n == 0:
        # Nothing to chunk: the core on the (empty) materialised logits.
        dense = tuple(
            jnp.dot(
                jnp.reshape(lin.hidden, (0, lin.hidden.shape[-1])), lin.kernel,
                preferred_element_type=lin.dtype,
            )
            + (0 if lin.bias is None else lin.bias.astype(lin.dtype))
            for lin in logits
        )
        out = core(dense, rows, counted, consts, **(options or {}))
        return _sums(out) if mode == "sum" else out
    num_classes = sum(lin.kernel.shape[1] for lin in logits)
    sizes = {lin.chunk_size for lin in logits} - {None}
    chunk = min(sizes) if sizes else default_chunk_size(n, num_classes)
    chunk = max(1, min(chunk, n))
    if trainable is None:
        trainable = (True,) * len(logits)
    plan = Plan(core, tuple(sorted((options or {}).items())), chunk, tuple(trainable), n)
    linears = tuple(
        (lin.hidden.reshape(n, lin.hidden.shape[-1]), lin.kernel, lin.bias) for lin in logits
    )
    consts = jax.lax.stop_gradient(consts)
    if mode == "sum":
        return _summed(plan, linears, rows, counted, consts)
    if mode == "positions":
        return _positions(plan, linears, rows, counted, consts)
    raise ValueError(f"mode must be 'sum' or 'positions', got {mode!r}")

