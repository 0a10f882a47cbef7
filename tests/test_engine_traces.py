"""How often the engine traces a core: once for its chunk's shapes, once per loop.

A traced core is Python run again (and a longer compile): ``value_and_grad``
of a fused sum (``token_objective``, the losses) traces it twice, once for the
shapes of a chunk's outputs and once in the loop that computes the values
and gradients together. ``fn`` is called inside the core, so counting its
calls from a chunk (``chunk_step`` on the stack; ``token_objective`` also
checks ``fn``'s output shape once, outside the engine) counts the core's traces.
"""

from __future__ import annotations

import traceback

import jax

import jxent


def test_a_fused_sum_traces_its_core_twice_per_value_and_grad():
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (2, 16, 8))
    kernel = jax.random.normal(k[1], (8, 32))
    tokens = jax.random.randint(k[2], (2, 16), 0, 32)
    calls = []

    def fn(stats):
        if any(frame.name == "chunk_step" for frame in traceback.extract_stack()):
            calls.append(1)
        return stats.log_prob + 0.1 * stats.entropy

    def loss(hidden, kernel):
        logits = jxent.LinearLogits(hidden, kernel, chunk_size=8)
        return jxent.token_objective(logits, tokens, fn, shift=True)

    jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, kernel)
    assert len(calls) == 2, len(calls)
    calls.clear()
    jax.jit(loss).lower(hidden, kernel)  # the forward alone: shapes, then the loop
    assert len(calls) == 2, len(calls)
