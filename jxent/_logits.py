"""``LinearLogits``: the logits ``hidden @ kernel + bias``, never materialised.

Every token-level function accepts it in place of logits; the engine
(``jxent._engine``) is the one place that tells it from a dense array and
runs it in chunks.
"""

from __future__ import annotations

import jax

from ._checks import float_dtype, floating_array
from ._options import parse_chunk_size, parse_precision

__all__ = ["LinearLogits"]


@jax.tree_util.register_pytree_node_class
class LinearLogits:
    """The logits ``hidden @ kernel + bias``, never materialised.

    Pass it wherever a token-level function takes ``logits`` with the class
    axis last: ``softmax_cross_entropy`` (integer targets), ``sequence_nll``,
    ``nll_stats``, ``token_stats``, ``token_objective`` and either argument
    of ``distillation_loss``. Values and gradients (for ``hidden``, ``kernel``
    and ``bias``) equal those of the same call on the materialised
    ``hidden @ kernel + bias``; memory is one chunk of positions × ``V``.

    Args:
      hidden: ``[..., D]`` hidden states, any float dtype; the leading axes are
        the positions (``[..., T]`` for the sequence functions).
      kernel: ``[D, V]``, the Flax ``nnx.Linear``/``nn.Dense`` layout. A tied
        embedding table ``[V, D]`` (or a PyTorch ``nn.Linear`` weight) is
        passed as ``emb.T`` (XLA:CPU then makes one transposed copy of the
        table per call, outside the loop).
      bias: ``[V]`` or ``None``.
      chunk_size: positions per chunk (static); ``None`` takes the engine's
        default for the backend and sizes (``jxent._engine.default_chunk_size``,
        where the rule and its measurements live). It changes speed and memory,
        not the result (beyond float rounding).
      precision: how the products are formed from bf16/f16 ``hidden`` and
        ``kernel`` (static; float32 inputs are computed the same way under
        every policy). The logits are a product of the inputs with float32
        accumulation; then ``g = ∂/∂logits`` (float32) goes into two
        products, ``∂/∂hidden = g · kernelᵀ`` and ``∂/∂kernel = hiddenᵀ · g``,
        and ``∂/∂kernel`` is summed over the chunks:

        * ``None`` (default): the policy of the platform the program is
          lowered for (``jxent._engine.default_precision``): ``"accurate"``
          on CPU, ``"balanced"`` on GPU and TPU;
        * ``"accurate"``: ``g`` stays float32 in both products (the bf16
          operands widened, exactly) and the kernel's gradient is summed in
          float32. On CPU these are float32 products, the gradients of the
          materialised ``softmax_cross_entropy(jnp.dot(hidden, kernel,
          preferred_element_type=jnp.float32), ...)``; on a GPU float32
          products run as TF32 at the default matmul precision, on a TPU as
          one bf16 pass: ask for ``jax.default_matmul_precision("highest")``
          to get float32 there;
        * ``"balanced"``: ``g`` is rounded to the inputs' dtype for the two
          products (bf16 × bf16, float32 accumulation, no float32 copy of the
          kernel), the kernel's gradient summed in float32: the products of
          the materialised bf16 program (``hidden @ kernel``) on a GPU or TPU,
          with 8 significant bits of ``g``, an error that grows where the
          terms of ``hiddenᵀ · g`` cancel (large logits, peaked distributions);
        * ``"compact"``: as ``"balanced"``, and the kernel's gradient summed
          across chunks in the inputs' dtype (half the ``[D, V]`` carry):
          its error grows with the number of chunks.

        ``docs/precision.md`` has each policy's products per backend and its
        error against float64 on tokamax's failing case next to the
        materialised program's (``python benchmarks/linear_ce.py``).

    Inside ``shard_map`` with ``vocab_axis_name``, ``kernel`` and ``bias`` are
    this device's shard of the classes (``V / shards`` consecutive classes).

    Differentiation: reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``)
    and every derivative of it (``jax.hessian``, ``jax.jvp(jax.grad(f), ...)``
    for Hessian-vector products) equal those of the materialised logits; a
    member that is not differentiated (a teacher) stays a constant at every
    order, even when it shares ``kernel`` with the student. A first-order
    forward derivative (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) is
    refused with a ``TypeError``: the fused functions are a ``jax.custom_vjp``.

    Examples:
      >>> import jax, jax.numpy as jnp, jxent
      >>> hidden = jax.random.normal(jax.random.key(0), (6, 4))
      >>> kernel = jax.random.normal(jax.random.key(1), (4, 10))
      >>> targets = jnp.array([1, 2, 3, -100, 5, 9])
      >>> fused = jxent.softmax_cross_entropy(jxent.LinearLogits(hidden, kernel), targets)
      >>> bool(jnp.allclose(fused, jxent.softmax_cross_entropy(hidden @ kernel, targets)))
      True
    """

    def __init__(
        self, hidden, kernel, bias=None, *, chunk_size: int | None = None,
        precision: str | None = None,
    ):
        hidden, kernel = floating_array(hidden, "hidden"), floating_array(kernel, "kernel")
        if hidden.ndim == 0:
            raise ValueError("hidden is a scalar; expected [..., D] hidden states")
        if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
            raise ValueError(
                f"kernel has shape {kernel.shape} but hidden {hidden.shape} expects "
                f"({hidden.shape[-1]}, V): the [D, V] Dense layout (pass a tied "
                "embedding table [V, D] as emb.T)"
            )
        if kernel.shape[1] == 0:
            raise ValueError(f"kernel has shape {kernel.shape}: 0 classes")
        if bias is not None:
            bias = floating_array(bias, "bias")
            if bias.shape != (kernel.shape[1],):
                raise ValueError(
                    f"bias has shape {bias.shape} but kernel {kernel.shape} has "
                    f"{kernel.shape[1]} classes; expected ({kernel.shape[1]},)"
                )
        self.hidden, self.kernel, self.bias = hidden, kernel, bias
        self.chunk_size = parse_chunk_size(chunk_size)
        self.precision = None if precision is None else parse_precision(precision)

    def tree_flatten(self):
        return (self.hidden, self.kernel, self.bias), (self.chunk_size, self.precision)

    @classmethod
    def tree_unflatten(cls, static, children):
        # No validation: JAX rebuilds pytrees with placeholders (tracers, None, objects).
        out = object.__new__(cls)
        out.hidden, out.kernel, out.bias = children
        out.chunk_size, out.precision = static
        return out

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the logits it stands for: ``hidden.shape[:-1] + (V,)``."""
        return tuple(self.hidden.shape[:-1]) + (self.kernel.shape[1],)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        """The dtype the logits are computed in (float32, or float64 under x64)."""
        return float_dtype(self.hidden.dtype, self.kernel.dtype)

    def __repr__(self) -> str:
        bias = "None" if self.bias is None else f"{tuple(self.bias.shape)}"
        return (
            f"LinearLogits(hidden={tuple(self.hidden.shape)}, kernel={tuple(self.kernel.shape)}, "
            f"bias={bias}, chunk_size={self.chunk_size}, precision={self.precision!r})"
        )
