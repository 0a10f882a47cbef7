"""Fused linear head and cross-entropy, without the ``[tokens, vocab]`` logits.

The algorithm: token chunks, with the gradient computed in the forward pass.
For each chunk of ``C`` positions, ``logits = h_c @ kernel + bias``
(``[C, V]``, float32 accumulation) go through the shared softmax core
``per_position_losses``, and ``jax.vjp`` of that per-chunk function gives
``∂ℓ/∂logits`` for every option (softcap, label smoothing, class weights,
z-loss, masks, vocab sharding) with no re-derived formula. Three products per
chunk: ``h_c @ kernel``, ``g @ kernel.T`` (rows of ``∂/∂hidden``) and
``h_c.T @ g`` (added in place into ``∂/∂kernel``, a block of classes at a
time). ``"mean"`` and ``"sum"`` are linear in the per-position losses, so the
backward pass only scales the stored gradients by the cotangent; ``"none"``
has a cotangent per position that only the backward pass knows, so that pass
recomputes each chunk's logits (four products). A call that is not
differentiated runs the ``custom_vjp``'s primal function alone: one product
per chunk. Memory: one chunk's ``[C, V]`` logits and their gradient, plus the
gradients themselves; nothing of size ``N × V``.

Why this algorithm (measured on the shared 2-core x86 CPU of the project,
float32, forward + backward, medians of alternating runs, ``N, D, V = 4096,
512, 32768``):

* with other jobs loading the machine: materialised
  ``softmax_cross_entropy(h @ kernel)``: 4.02 s; token chunks
  (this module, ``C = 256`` / ``512``): 3.83 s / 3.93 s; vocabulary blocks
  with an online log-sum-exp and a recomputing backward pass (a prototype for
  the plain loss only; four products): 4.72 s (blocks of 1024 classes),
  4.23 s (4096). One ``[N, D] @ [D, V]`` product alone takes 0.65 s, three
  2.43 s: on CPU the loss is bound by its products, so three beat four, and
  the token chunks can reuse the softmax core as it is, where vocabulary
  blocks would need every option rewritten as an online reduction.
* Chunk size ``C``, time ÷ materialised (quiet machine): at ``N, D, V =
  4096, 512, 32768``, ``C = 128``: 1.02, 192: 0.92, 256: 0.90, 512: 0.87; at
  ``2048, 1024, 131072``, 128: 1.19, 192: 1.07, 256: 0.96. Each chunk
  streams the kernel twice and its gradient once; below ~200 positions that
  traffic, not the arithmetic, sets the pace, and above a few hundred the
  gain is small while the memory grows with ``C``. Hence the default
  (``default_chunk_size``): ``min(2**25 / V, N / 32)``, at least 192: at
  most 128 MiB of float32 logits, and temporaries about ``1/32`` of the
  materialised ones once ``N ≥ 32 · 192`` (4.7 % at ``4096, 512, 32768``).
* Temporary memory of ``jit(value_and_grad)`` (XLA's ``memory_analysis``) at
  ``N, D, V = 8192, 512, 65536``: materialised 4096 MiB, fused 129 MiB (3.1 %),
  and 129 MiB again at ``N = 32768``. Three details keep it small and flat in
  ``N``: the last chunk is moved back to end at ``N`` instead of padding (no
  copy of ``hidden``), outputs are written in place into the loop's carries,
  and ``h_c.T @ g`` is formed and added a block of classes at a time (one
  ``[D, V]`` product would need a ``[D, V]`` temporary).

``benchmarks/linear_ce.py`` compares against PyTorch's
``torch.nn.functional.linear_cross_entropy`` as well.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import (
    REDUCTIONS,
    check_class_weights,
    check_fraction,
    check_loss_mask,
    check_nonnegative_float,
    check_option,
    check_softcap,
    check_targets_in_range,
    float_dtype,
    integer_targets_info,
)
from ._reduce import reduce_losses, safe_divide
from ._softmax import per_position_losses

__all__ = ["linear_cross_entropy"]

# The default chunk: at most this many logits (128 MiB in float32) and this
# fraction of the positions, but at least this many positions.
_CHUNK_ELEMENTS = 1 << 25
_MIN_CHUNKS = 32
_MIN_CHUNK = 192
# The product added into the kernel's gradient is formed this many elements at a time.
_BLOCK_ELEMENTS = 1 << 22


class _Options(NamedTuple):
    """The static options of one call (hashable: a ``nondiff_argnums`` argument)."""

    chunk: int
    reduction: str
    ignore_index: int | None
    label_smoothing: float
    z_loss: float
    logit_softcap: float | None
    vocab_axis_name: str | None


def default_chunk_size(num_tokens: int, num_classes: int) -> int:
    """Positions per chunk when ``chunk_size=None``.

    ``min(2**25 / V, N / 32)``, but at least 192 (and at most ``N``), rounded
    down to a multiple of 8. The first bound caps the chunk's logits at
    128 MiB; the second keeps the temporaries near 1/32 of what the
    materialised logits and their gradient would take; the floor keeps the
    products efficient: each chunk streams the kernel twice and its gradient
    once, and below ~200 positions that traffic, not the arithmetic, sets
    the pace.
    """
    chunk = min(_CHUNK_ELEMENTS // max(num_classes, 1), num_tokens // _MIN_CHUNKS)
    chunk = max(_MIN_CHUNK, chunk // 8 * 8)
    return min(chunk, num_tokens)


# --- shard_map bookkeeping: which mesh axes a value varies along -------------


def _varying_axes(x) -> frozenset:
    """The manual mesh axes along which ``x`` (a value or an aval) varies."""
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    axis_type = getattr(aval, "manual_axis_type", None)
    if axis_type is not None:
        return frozenset(axis_type.varying)
    return frozenset(getattr(aval, "vma", ()))


def _make_varying(x, axes):
    missing = tuple(sorted(frozenset(axes) - _varying_axes(x)))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


def _loop(num: int, body, init):
    """``fori_loop(0, num, body, init)`` whose carries start with the body's mesh variance.

    Inside ``shard_map`` a carry that starts as invariant zeros but is updated
    with shard-dependent values must be marked varying from the start.
    """
    out = jax.eval_shape(lambda carry: body(0, carry), init)
    init = jax.tree.map(lambda z, o: _make_varying(z, _varying_axes(o)), init, out)
    return jax.lax.fori_loop(0, num, body, init)


def _cotangent_like(ct, primal):
    """Give ``primal``'s mesh variance to its cotangent.

    A value invariant along a mesh axis (``hidden`` replicated over the
    vocabulary shards, ``kernel`` over the data shards) was used by every
    shard: its cotangent is the sum of the shards' parts.
    """
    extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
    if extra:
        ct = jax.lax.psum(ct, extra)
    return _make_varying(ct, _varying_axes(primal))


# --- one chunk of positions ---------------------------------------------------


def _chunk_losses(opts: _Options, logits, targets, mask, class_weights):
    """``(loss, weight)`` for one chunk of positions: the shared softmax core."""
    return per_position_losses(
        logits,
        targets,
        where=mask,
        ignore_index=opts.ignore_index,
        class_weights=class_weights,
        label_smoothing=opts.label_smoothing,
        z_loss=opts.z_loss,
        logit_softcap=opts.logit_softcap,
        vocab_axis_name=opts.vocab_axis_name,
    )


def _chunk_starts(n: int, chunk: int):
    """The number of chunks and the first position of chunk ``i``.

    The last chunk is moved back to end at ``n`` (no padding, no copy of
    ``hidden``); its positions already covered by the previous chunk are
    masked out there, and their outputs kept from the earlier chunk.
    """
    num = -(-n // chunk) if n else 0

    def start(i):
        return jnp.minimum(i * chunk, n - chunk)

    return num, start


def _chunk_inputs(opts: _Options, i, hidden, targets, mask):
    """Chunk ``i``: its start, its fresh positions, and ``h, t, m`` (masked rows of ``h`` = 0)."""
    chunk = opts.chunk
    num, start_of = _chunk_starts(hidden.shape[0], chunk)
    start = start_of(i)
    fresh = start + jnp.arange(chunk) >= i * chunk
    m = jax.lax.dynamic_slice_in_dim(mask, start, chunk) & fresh
    h = jax.lax.dynamic_slice_in_dim(hidden, start, chunk)
    # Rows that are not counted may hold anything (padding): zero them so
    # that NaN/inf there reach neither the loss nor ∂/∂kernel.
    h = jnp.where(m[:, None], h, 0)
    t = jax.lax.dynamic_slice_in_dim(targets, start, chunk)
    return start, fresh, h, t, m


def _chunk_logits(h, kernel, bias, acc):
    """``h @ kernel + bias``, accumulated in ``acc`` (float32, or float64 under x64)."""
    logits = jnp.dot(h, kernel, preferred_element_type=acc)
    return logits if bias is None else logits + bias.astype(acc)[None, :]


def _write(out, value, start, fresh):
    """``out[start:start + C] = value`` at the ``fresh`` positions."""
    old = jax.lax.dynamic_slice_in_dim(out, start, value.shape[0])
    fresh = jnp.reshape(fresh, fresh.shape + (1,) * (value.ndim - 1))
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(fresh, value, old), start, 0)


def _accumulate_outer(d_kernel, h, g, acc):
    """``d_kernel + h.T @ g`` for ``h [C, D]`` and ``g [C, V]``, updated in place.

    One ``[D, V]`` product would need a second ``[D, V]`` buffer before the
    addition. A loop over blocks of classes (a loop: XLA computes unrolled
    products up front and holds them all) bounds that buffer by the smaller
    of one chunk's logits and ``_BLOCK_ELEMENTS`` (16 MiB in float32), which
    measured as fast as one product.
    """
    c, d = h.shape
    v = d_kernel.shape[1]
    width = min(v, max(1, min(v * c, _BLOCK_ELEMENTS) // d))
    full = v // width

    def add_block(lo, d_kernel, size):
        part = jax.lax.dynamic_slice_in_dim(d_kernel, lo, size, axis=1)
        g_part = jax.lax.dynamic_slice_in_dim(g, lo, size, axis=1)
        part = part + jnp.dot(h.T, g_part, preferred_element_type=acc)
        return jax.lax.dynamic_update_slice_in_dim(d_kernel, part, lo, axis=1)

    d_kernel = _loop(full, lambda j, dk: add_block(j * width, dk, width), d_kernel)
    if full * width < v:
        d_kernel = add_block(full * width, d_kernel, v - full * width)
    return d_kernel


# --- the loops over chunks ------------------------------------------------------


def _forward(opts: _Options, hidden, kernel, bias, targets, mask, class_weights):
    """Per-position ``(loss, weight)``, one chunk at a time; forward work only."""
    acc = float_dtype(hidden.dtype, kernel.dtype)

    def body(i, carry):
        loss, weight = carry
        start, fresh, h, t, m = _chunk_inputs(opts, i, hidden, targets, mask)
        logits = _chunk_logits(h, kernel, bias, acc)
        loss_c, weight_c = _chunk_losses(opts, logits, t, m, class_weights)
        return _write(loss, loss_c, start, fresh), _write(weight, weight_c, start, fresh)

    n = hidden.shape[0]
    num, _ = _chunk_starts(n, opts.chunk)
    return _loop(num, body, (jnp.zeros(n, acc), jnp.zeros(n, acc)))


def _forward_backward(opts: _Options, hidden, kernel, bias, targets, mask, class_weights, ct):
    """Per-position ``(loss, weight)`` and the gradients of ``Σ ct·loss``, one chunk at a time.

    Returns ``loss, weight, d_hidden, d_kernel, d_bias`` in the accumulation
    dtype; under ``vocab_axis_name``, ``d_hidden`` is this shard's part.
    """
    acc = float_dtype(hidden.dtype, kernel.dtype)
    compute = jnp.result_type(hidden.dtype, kernel.dtype)

    def body(i, carry):
        loss, weight, d_hidden, d_kernel, d_bias = carry
        start, fresh, h, t, m = _chunk_inputs(opts, i, hidden, targets, mask)
        logits = _chunk_logits(h, kernel, bias, acc)
        (loss_c, weight_c), pull = jax.vjp(
            lambda x: _chunk_losses(opts, x, t, m, class_weights), logits
        )
        ct_c = jax.lax.dynamic_slice_in_dim(ct, start, opts.chunk).astype(loss_c.dtype)
        ct_c = _make_varying(ct_c, _varying_axes(loss_c))
        (d_logits,) = pull((ct_c, jnp.zeros_like(weight_c)))
        g = d_logits.astype(compute)
        d_h = jnp.dot(g, kernel.T, preferred_element_type=acc)
        d_kernel = _accumulate_outer(d_kernel, h, g, acc)
        if d_bias is not None:
            d_bias = d_bias + jnp.sum(d_logits, axis=0)
        loss = _write(loss, loss_c, start, fresh)
        weight = _write(weight, weight_c, start, fresh)
        d_hidden = _write(d_hidden, d_h, start, fresh)
        return loss, weight, d_hidden, d_kernel, d_bias

    n = hidden.shape[0]
    num, _ = _chunk_starts(n, opts.chunk)
    init = (
        jnp.zeros(n, acc),
        jnp.zeros(n, acc),
        jnp.zeros(hidden.shape, acc),
        jnp.zeros(kernel.shape, acc),
        None if bias is None else jnp.zeros(bias.shape, acc),
    )
    return _loop(num, body, init)


# --- the custom_vjp -------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(opts: _Options, hidden, kernel, bias, targets, mask, class_weights):
    loss, weight = _forward(opts, hidden, kernel, bias, targets, mask, class_weights)
    return reduce_losses(loss, weight, opts.reduction)


def _fused_fwd(opts: _Options, hidden, kernel, bias, targets, mask, class_weights):
    if opts.reduction == "none":
        # One cotangent per position, known only in the backward pass.
        loss, _ = _forward(opts, hidden, kernel, bias, targets, mask, class_weights)
        return loss, (hidden, kernel, bias, targets, mask, class_weights)
    ones = jnp.ones(targets.shape, float_dtype(hidden.dtype, kernel.dtype))
    loss, weight, d_hidden, d_kernel, d_bias = _forward_backward(
        opts, hidden, kernel, bias, targets, mask, class_weights, ones
    )
    value = reduce_losses(loss, weight, opts.reduction)
    # "mean" and "sum" are linear in the losses, value = a · Σ loss, with
    # a = 1 / Σ weight (0 when nothing is counted, as in reduce_losses) or 1:
    # the gradients of Σ loss only need scaling by a · cotangent.
    if opts.reduction == "sum":
        a = jnp.ones((), value.dtype)
    else:
        a = safe_divide(jnp.ones((), value.dtype), jnp.sum(weight))
    return value, (a, d_hidden, d_kernel, d_bias, hidden, kernel, bias)


def _fused_bwd(opts: _Options, residuals, cotangent):
    if opts.reduction == "none":
        hidden, kernel, bias, targets, mask, class_weights = residuals
        _, _, d_hidden, d_kernel, d_bias = _forward_backward(
            opts, hidden, kernel, bias, targets, mask, class_weights, cotangent
        )
    else:
        a, d_hidden, d_kernel, d_bias, hidden, kernel, bias = residuals
        scale = a * cotangent
        d_hidden, d_kernel = scale * d_hidden, scale * d_kernel
        d_bias = None if bias is None else scale * d_bias
    d_hidden = _cotangent_like(d_hidden, hidden).astype(hidden.dtype)
    d_kernel = _cotangent_like(d_kernel, kernel).astype(kernel.dtype)
    if bias is not None:
        d_bias = _cotangent_like(d_bias, bias).astype(bias.dtype)
    return d_hidden, d_kernel, d_bias, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# --- the public function ---------------------------------------------------------


def linear_cross_entropy(
    hidden: Float[ArrayLike, "*batch features"],
    kernel: Float[ArrayLike, "features classes"],
    targets: Int[ArrayLike, " *batch"],
    *,
    bias: Float[ArrayLike, " classes"] | None = None,
    where: Bool[ArrayLike, " *batch"] | None = None,
    ignore_index: int | None = -100,
    class_weights: Float[ArrayLike, " classes"] | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    vocab_axis_name: str | None = None,
) -> Float[Array, "..."]:
    """Cross-entropy of ``softmax(hidden @ kernel + bias)`` without materialising the logits.

    Value and gradients are those of
    ``softmax_cross_entropy(hidden @ kernel + bias, targets, ...)`` with the
    same options (see there): with ``z = h·K + b`` and ``lse = logsumexp(z)``,
    each counted position contributes

        ``ℓ = (1 − ε) · w_t · (lse − z_t) + (ε / V) · Σ_c w_c · (lse − z_c) + z_loss · lse²``

    and, from ``∂ℓ/∂z`` (``w · (softmax(z) − smoothed target)`` plus the z-loss
    and softcap terms), ``∂/∂hidden = ∂ℓ/∂z · Kᵀ``, ``∂/∂kernel = hᵀ · ∂ℓ/∂z``,
    ``∂/∂bias = Σ_positions ∂ℓ/∂z``. The positions are processed
    ``chunk_size`` at a time inside a ``jax.custom_vjp``: memory is one chunk
    of logits ``[chunk, V]`` and its gradient, never ``[N, V]``.

    Args:
      hidden: ``[..., D]`` hidden states, any float dtype.
      kernel: ``[D, V]``, the Flax ``nnx.Linear``/``nn.Dense`` layout. A tied
        embedding table ``[V, D]`` (or a PyTorch ``nn.Linear`` weight) is
        passed as ``emb.T`` (XLA:CPU then makes one transposed copy of the
        table per call, outside the loop: a ``[D, V]`` temporary).
      targets: ``[...]`` integer class ids (``hidden.shape[:-1]``, any integer
        dtype). Probability targets are not supported: they are ``[N, V]``.
      bias: ``[V]`` or ``None``.
      where: boolean ``[...]``; False positions are not counted.
      ignore_index: integer targets equal to it are not counted (``None``
        disables it).
      class_weights: ``[V]`` weight per class (PyTorch's ``weight``); a
        constant here: no gradient flows to it.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: coefficient of the PaLM ``lse²`` term.
      logit_softcap: ``c`` replaces the logits with ``c · tanh(z / c)`` first.
      reduction: ``"mean"`` (÷ the targets' total weight), ``"sum"`` or
        ``"none"`` (per position, 0 where not counted).
      chunk_size: positions per chunk; ``None`` takes ``min(2**25 / V, N / 32)``
        (at most 128 MiB of float32 logits), at least 192 and at most ``N``.
        It changes speed and memory, not the result (beyond float rounding).
      vocab_axis_name: inside ``jax.shard_map``, the mesh axis along which
        ``kernel``, ``bias`` and ``class_weights`` are sharded (each shard
        holds ``V / shards`` consecutive classes, in order; ``targets`` hold
        global class ids and ``hidden`` is replicated along that axis). The
        shards exchange ``[tokens]``-sized vectors (``pmax``/``psum``) for
        the loss, and the ``[N, D]`` gradient of ``hidden`` is summed over
        them; ``kernel`` and ``bias`` gradients stay on their shard.

    Returns:
      A scalar, or ``[...]`` per-position losses for ``reduction="none"``, in
      float32 (float64 under ``jax_enable_x64`` for float64 inputs). The
      gradients of ``hidden``, ``kernel`` and ``bias`` come back in their own
      dtypes (bf16 stays bf16; products and sums accumulate in float32).

    Transformations: ``jit``, ``grad``/``vjp``/``value_and_grad`` and ``vmap``.
    Forward mode (``jvp``, ``jacfwd``, ``hessian``) is not available: the
    function is a ``custom_vjp``. With ``"mean"``/``"sum"`` the gradients are
    computed in the forward pass of a differentiated call (three products per
    chunk in all); a call that is not differentiated does the forward work
    only (one product per chunk); ``"none"`` recomputes the logits in the
    backward pass (four).

    Vocab-parallel use (the vocabulary must divide evenly over the shards)::

        mesh = jax.make_mesh((4,), ("vocab",))

        def loss(hidden, kernel, bias, targets):
            return jxent.linear_cross_entropy(
                hidden, kernel, targets, bias=bias, vocab_axis_name="vocab")

        loss = jax.shard_map(
            loss, mesh=mesh, out_specs=P(),
            in_specs=(P(), P(None, "vocab"), P("vocab"), P()))
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
            hidden, kernel, bias, targets)  # kernel, bias placed with
                                            # NamedSharding(mesh, P(None, "vocab")), P("vocab")

    On a two-axis mesh with ``hidden``/``targets`` also sharded along a data
    axis, the reduction covers this device's positions: use ``"sum"`` and
    ``lax.psum`` over the data axis (and divide by the ``psum`` of the
    counts) for the global token mean; the ``kernel``/``bias`` gradients are
    then summed over the data axis by autodiff, as for any replicated input.
    Both ``check_vma=True`` (the default) and ``False`` give these gradients.

    Differences from ``softmax_cross_entropy``: integer targets only;
    ``class_weights`` gets no gradient; no forward-mode differentiation. Rows
    of ``hidden`` at positions that are not counted never reach the value or
    any gradient, even when they hold NaN (they are zeroed before the product).

    Out-of-range integer targets (other than ``ignore_index``): eager calls
    raise ``ValueError``; under ``jit`` that position's loss is NaN.

    Examples:
      >>> import jax, jax.numpy as jnp, jxent
      >>> hidden = jax.random.normal(jax.random.key(0), (6, 4))
      >>> kernel = jax.random.normal(jax.random.key(1), (4, 10))
      >>> targets = jnp.array([1, 2, 3, -100, 5, 9])
      >>> fused = jxent.linear_cross_entropy(hidden, kernel, targets, chunk_size=4)
      >>> full = jxent.softmax_cross_entropy(hidden @ kernel, targets)
      >>> bool(jnp.allclose(fused, full))
      True
      >>> g_fused = jax.grad(jxent.linear_cross_entropy, argnums=1)(hidden, kernel, targets)
      >>> g_full = jax.grad(lambda k: jxent.softmax_cross_entropy(hidden @ k, targets))(kernel)
      >>> bool(jnp.allclose(g_fused, g_full, atol=1e-6))
      True
    """
    hidden = jnp.asarray(hidden)
    kernel = jnp.asarray(kernel)
    targets = jnp.asarray(targets)
    check_option(reduction, "reduction", REDUCTIONS)
    label_smoothing = check_fraction(label_smoothing, "label_smoothing")
    z_loss = check_nonnegative_float(z_loss, "z_loss")
    logit_softcap = check_softcap(logit_softcap)
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    for name, x in (("hidden", hidden), ("kernel", kernel)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if hidden.ndim == 0:
        raise ValueError("hidden is a scalar; expected [..., D] hidden states")
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"kernel has shape {kernel.shape} but hidden {hidden.shape} expects "
            f"({hidden.shape[-1]}, V): the [D, V] Dense layout (pass a tied "
            "embedding table [V, D] as emb.T)"
        )
    num_local = kernel.shape[1]
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating-point array, got dtype {bias.dtype}")
        if bias.shape != (num_local,):
            raise ValueError(
                f"bias has shape {bias.shape} but kernel {kernel.shape} has "
                f"{num_local} classes; expected ({num_local},)"
            )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(
            f"targets must be integer class indices, got dtype {targets.dtype}; "
            "probability targets would need the [tokens, vocab] array this function avoids"
        )
    positions = hidden.shape[:-1]
    if targets.shape != positions:
        raise ValueError(
            f"targets has shape {targets.shape} but hidden {hidden.shape} expects "
            f"{positions} (hidden.shape[:-1])"
        )
    mask = check_loss_mask(where, positions)
    weights = check_class_weights(
        class_weights, num_local, "this shard of kernel" if vocab_axis_name else "kernel"
    )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")

    _, ignored, in_range = integer_targets_info(targets, num_local, ignore_index)
    counted = ~ignored if mask is None else mask & ~ignored
    if vocab_axis_name is None:
        check_targets_in_range(targets, counted, in_range, num_local, ignore_index)

    n = math.prod(positions)
    chunk = default_chunk_size(n, num_local) if chunk_size is None else min(chunk_size, n)
    opts = _Options(
        chunk, reduction, ignore_index, label_smoothing, z_loss, logit_softcap, vocab_axis_name
    )
    if weights is not None:
        weights = jax.lax.stop_gradient(weights)
    out = _fused(
        opts,
        hidden.reshape(n, hidden.shape[-1]),
        kernel,
        bias,
        targets.reshape(n),
        counted.reshape(n),
        weights,
    )
    return out.reshape(positions) if reduction == "none" else out
