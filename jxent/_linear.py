"""``linear_cross_entropy``: the fused linear head and cross-entropy, in one call.

The shorthand for ``softmax_cross_entropy(LinearLogits(hidden, kernel, bias),
targets, ...)``; the loops behind it are in ``jxent._engine``.
"""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._logits import LinearLogits
from ._softmax import softmax_cross_entropy

__all__ = ["linear_cross_entropy"]


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
    precision: str | None = None,
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
      label_smoothing: ``ε`` in ``[0, 1]``; a Python float or a traced scalar
        (an invalid traced value gives NaN, reported by ``checkify`` naming
        it), as in :func:`softmax_cross_entropy`.
      z_loss: coefficient ``>= 0`` of the PaLM ``lse²`` term, like ``label_smoothing``.
      logit_softcap: ``c`` replaces the logits with ``c · tanh(z / c)`` first.
      reduction: ``"mean"`` (÷ the targets' total weight), ``"sum"`` or
        ``"none"`` (per position, 0 where not counted).
      chunk_size: positions per chunk; ``None`` takes the default of the
        platform lowered for (at most 128 MiB of float32 logits on CPU, 2 GiB
        on GPU/TPU: the rule and its arithmetic are in
        ``jxent._engine.default_chunk_size``). It changes
        speed and memory, not the result (beyond float rounding).
      precision: the products' policy for bf16/f16 inputs, ``None`` (the
        platform's: ``"accurate"`` on CPU, ``"balanced"`` on GPU/TPU),
        ``"accurate"``, ``"balanced"`` or ``"compact"``: see :class:`LinearLogits`.
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
      dtypes (bf16 stays bf16); which operands are rounded on the way is the
      ``precision`` policy's (by default on CPU none: float32 throughout).

    Transformations: ``jit``, ``grad``/``vjp``/``value_and_grad``, ``vmap``,
    and the derivatives of reverse mode (``hessian``, ``jvp`` of ``grad``).
    A first-order forward derivative (``jvp``, ``jacfwd``, ``linearize``) is
    refused: the function is a ``custom_vjp``. With ``"mean"``/``"sum"`` the gradients are
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
    ``class_weights`` and traced ``label_smoothing``/``z_loss`` are constants
    here (no gradient flows to them); no forward-mode differentiation. Rows
    of ``hidden`` at positions that are not counted never reach the value or
    any gradient, even when they hold NaN (they are zeroed before the product).

    Out-of-range integer targets (other than ``ignore_index``): eager calls
    raise ``ValueError``; under ``jit`` that position's loss is NaN and so are
    the gradients it reaches (a training step never silently drops a target).

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
    logits = LinearLogits(hidden, kernel, bias, chunk_size=chunk_size, precision=precision)
    return softmax_cross_entropy(
        logits,
        targets,
        where=where,
        ignore_index=ignore_index,
        class_weights=class_weights,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        reduction=reduction,
        vocab_axis_name=vocab_axis_name,
    )
