"""Checks shared by the tests, examples and benchmarks: fused against dense, and collectives.

Private: the repository's tests, ``examples/`` and ``benchmarks/`` import it;
it needs nothing beyond jax and numpy, so it imports with a plain install.

- :func:`fused_and_dense` evaluates calls ``f(logits)`` on
  :class:`~jxent.LinearLogits` and on the materialised ``h @ K + b`` in one
  jitted program: each value and its vector-Jacobian product (a seeded,
  non-uniform cotangent for every floating output) with respect to the
  hidden states, the kernel and the bias. :func:`assert_close` compares
  results leaf by leaf, relative to each array's scale.
- :func:`collectives` reads a compiled program (``compile().as_text()``):
  every all-gather, all-reduce, reduce-scatter, all-to-all and
  collective-permute, with the shapes it moves and whether it runs inside a
  loop; :func:`summary` prints them one line a kind.
- :func:`lowered` exports a function for other platforms (``cuda``, ``tpu``)
  on this machine; :func:`products`, :func:`converts` and
  :func:`loop_carries` read that StableHLO text (the operand and result
  dtypes of every product, every dtype conversion, every loop's carries);
  :func:`compiled_products` reads the products of compiled HLO text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._logits import LinearLogits

__all__ = ["OPTIMIZED", "Collective", "assert_close", "collectives", "compiled_products",
           "converts", "dense_logits", "fused_and_dense", "loop_carries", "lowered", "products",
           "summary"]

# Compiler options for a program that computes more than it compiles: full LLVM
# optimisation, where the test suite's processes default to the quick setting
# (tests/conftest.py). ``jax.jit(f, compiler_options=OPTIMIZED)``.
OPTIMIZED = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}

_OPS = "all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
_COLLECTIVE = re.compile(rf"=\s*(.*?)\s({_OPS})(?:-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def dense_logits(hidden, kernel, bias=None):
    """The materialised ``hidden @ kernel + bias``, accumulated in float32 as the fused path is."""
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    if bias is None:
        return logits
    return logits + jnp.reshape(bias.astype(jnp.float32), (1,) * (logits.ndim - 1) + (-1,))


def cotangent(out, seed: int = 0):
    """A seeded cotangent in ``[0.5, 1.5)`` for every floating leaf (float0 for the others)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (
            jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
            if jnp.issubdtype(x.dtype, jnp.inexact)
            else np.zeros(x.shape, jax.dtypes.float0)
        ),
        out,
    )


def fused_and_dense(
    calls: Mapping[str, Callable[[Any], Any]],
    hidden,
    kernel,
    bias=None,
    *,
    chunk_size: int | None = None,
    fused_hidden=None,
) -> dict[str, tuple[Any, Any]]:
    """``{name: (fused, dense)}``, each ``(value, (d_hidden, d_kernel, d_bias))``, in one program.

    ``calls[name](logits)`` is evaluated on ``LinearLogits(hidden, kernel,
    bias, chunk_size=...)`` and on :func:`dense_logits` of the same arrays;
    the gradients are the vector-Jacobian products of :func:`cotangent`.
    ``fused_hidden``, if given, replaces ``hidden`` on the fused side only
    (e.g. NaN in rows that no target counts).
    """

    def run(hidden, kernel, bias, fused_hidden):
        out = {}
        for name, f in calls.items():
            pair = []
            for fused in (True, False):

                def g(h, k, b, fused=fused, f=f):
                    if fused:
                        return f(LinearLogits(h, k, b, chunk_size=chunk_size))
                    return f(dense_logits(h, k, b))

                h = fused_hidden if fused and fused_hidden is not None else hidden
                value, pull = jax.vjp(g, h, kernel, bias)
                pair.append((value, pull(cotangent(value))))
            out[name] = tuple(pair)
        return out

    return jax.jit(run)(hidden, kernel, bias, fused_hidden)


def assert_close(actual, expected, *, rtol: float = 1e-5, label: str = "") -> None:
    """Leaf by leaf: every entry finite and ``|a − e| ≤ rtol·|e| + rtol·max|e|``.

    Relative, with the scale of each array: an entry near zero in an array of
    large ones is held to the array's scale, not to its own.
    """
    a_leaves, e_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
    if len(a_leaves) != len(e_leaves):
        raise AssertionError(f"{label}: {len(a_leaves)} leaves, expected {len(e_leaves)}")
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        where = f"{label}: leaf {i} of {len(e_leaves)}, shape {e.shape}"
        assert np.isfinite(e).all() and np.isfinite(a).all(), f"{where}: not finite"
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale, err_msg=where)


class Collective(NamedTuple):
    """One collective instruction of a compiled program."""

    op: str  # "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"
    shapes: tuple[tuple[int, ...], ...]  # the shapes of its results
    dtypes: tuple[str, ...]
    in_loop: bool  # inside a while loop's body (directly or through the calls it makes)


def _computations(hlo: str) -> dict[str, list[str]]:
    """The instruction lines of each computation of an HLO module, by name."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
        if head and not line[:1].isspace():
            name = head.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


def _loop_bodies(comps: dict[str, list[str]]) -> set[str]:
    """Every computation a while loop runs, directly or through the calls it makes."""
    todo = [m for lines in comps.values() for line in lines
            for m in re.findall(r"body=%?([\w.\-]+)", line)]
    bodies: set[str] = set()
    while todo:
        name = todo.pop()
        if name in bodies:
            continue
        bodies.add(name)
        for line in comps.get(name, ()):
            todo += re.findall(r"(?:to_apply|calls|body|condition|branch_computations)="
                               r"\{?%?([\w.\-]+)", line)
    return bodies


def collectives(hlo: str) -> list[Collective]:
    """Every collective of a compiled program's text (``jit(f).lower(...).compile().as_text()``)."""
    comps = _computations(hlo)
    bodies = _loop_bodies(comps)
    found = []
    for name, lines in comps.items() or {"": hlo.splitlines()}.items():
        for line in lines:
            m = _COLLECTIVE.search(line)
            if m:
                typed = _SHAPE.findall(m.group(1))
                found.append(Collective(
                    m.group(2),
                    tuple(tuple(int(d) for d in dims.split(",") if d) for _, dims in typed),
                    tuple(dtype for dtype, _ in typed),
                    name in bodies,
                ))
    return found


def summary(found: list[Collective]) -> str:
    """``"2× all-reduce f32[8]; 1× all-reduce f32[6,32] (in a loop)"``, or ``"none"``."""
    counts = Counter(
        f"{c.op} " + ", ".join(f"{t}[{','.join(map(str, s))}]"
                               for t, s in zip(c.dtypes, c.shapes, strict=True))
        + (" (in a loop)" if c.in_loop else "")
        for c in found
    )
    return "; ".join(f"{n}× {what}" for what, n in sorted(counts.items())) or "none"


# ----------------------------------------------------------------- lowered and compiled products

_TENSOR = r"tensor<([0-9x]*?)x?([a-z]+[0-9]*)>"
_DOT = re.compile(
    r"stablehlo\.dot_general .*?: \(" + _TENSOR + r", " + _TENSOR + r"\) -> " + _TENSOR
)
_CONVERT = re.compile(r"stablehlo\.convert .*?: \(" + _TENSOR + r"\) -> " + _TENSOR)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("x") if x)


def products(program: str) -> set[tuple]:
    """``(lhs shape, lhs dtype, rhs shape, rhs dtype, out shape, out dtype)`` of every product."""
    return {
        (_shape(m[0]), m[1], _shape(m[2]), m[3], _shape(m[4]), m[5])
        for m in _DOT.findall(program)
    }


def converts(program: str) -> set[tuple]:
    """``(shape, from dtype, to dtype)`` of every dtype conversion."""
    return {(_shape(m[0]), m[1], m[3]) for m in _CONVERT.findall(program)}


def loop_carries(program: str) -> list[list[tuple]]:
    """The ``(shape, dtype)`` of each ``stablehlo.while`` loop's carries."""
    out = []
    for line in program.splitlines():
        if "stablehlo.while(" in line:
            types = line.rsplit(") : ", 1)[1]
            out.append([(_shape(s), t) for s, t in re.findall(_TENSOR, types)])
    return out


def lowered(fn, *args, platforms=("cuda", "tpu")) -> str:
    """The StableHLO text of ``jit(fn)`` exported for ``platforms`` (no device needed)."""
    return jax.export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


def product_dtypes(text: str) -> list[str]:
    """``lhs·rhs→out`` dtypes of every ``stablehlo.dot_general`` in lowered text (distinct)."""
    return sorted({f"{p[1]}·{p[3]}→{p[5]}" for p in products(text)})


# One HLO instruction: "%name = type[shape]{layout} opcode(%operand, ...), attributes".
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?(%[\w.-]+) = \(?([a-z]+[0-9]*)\[[^=]*?\s([\w-]+)\((.*?)\)"
)
_GEMM_TARGET = re.compile(r'custom_call_target="(__cublas\$[^"]*|__cudnn\$[^"]*)"')


def compiled_products(hlo: str) -> list[str]:
    """``lhs·rhs→out`` dtypes of every product in compiled HLO text (sorted, distinct).

    ``dot`` instructions (CPU, TPU, and inside GPU Triton GEMM fusions) and
    cuBLAS/cuDNN GEMM ``custom-call``s; operands are named, not typed, in the
    text, so each name is looked up where it is defined (names are unique in
    an HLO module). A GEMM's first result (a tuple with its workspace) is its
    output.
    """
    dtypes, products = {}, []
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, dtype, opcode, operands = match.groups()
        dtypes[name] = dtype
        if opcode == "dot" or (opcode == "custom-call" and _GEMM_TARGET.search(line)):
            products.append((dtype, re.findall(r"%[\w.-]+", operands)[:2]))
    return sorted({f"{dtypes.get(a, '?')}·{dtypes.get(b, '?')}→{out}"
                   for out, (a, b) in products})
