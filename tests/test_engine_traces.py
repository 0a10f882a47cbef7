"""How often the engine traces a core: once per loop over the chunks.

A traced core is Python run again (and a longer compile). ``value_and_grad``
of a fused sum (``token_objective``, the losses) traces it once: one loop
computes the values and the gradients together, and stacks each chunk's
outputs (no separate trace for their shapes). A per-position core is traced
twice under ``value_and_grad``: the forward loop, and the backward loop that
differentiates it on each chunk's logits formed again (a ``Rule`` core's
backward loop calls its pullback instead). ``fn`` is called inside the core,
so counting its calls from a chunk (``chunk_step`` on the stack;
``token_objective`` also checks ``fn``'s output shape once, outside the
engine) counts the core's traces. And how deep the core sits: the jxent frames
between a public function and the per-chunk core.
"""

from __future__ import annotations

import os
import traceback

import jax

import jxent


def test_a_fused_sum_traces_its_core_once_per_value_and_grad():
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (2, 16, 8))
    kernel = jax.random.normal(k[1], (8, 32))
    tokens = jax.random.randint(k[2], (2, 16), 0, 32)
    calls = []

    def fn(stats):
        if any(f.name == "chunk_step" for f in traceback.extract_stack()):
            calls.append(1)
        return stats.log_prob + 0.1 * stats.entropy

    def loss(hidden, kernel):
        logits = jxent.LinearLogits(hidden, kernel, chunk_size=8)
        return jxent.token_objective(logits, tokens, fn, shift=True)

    jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, kernel)
    assert len(calls) == 1, len(calls)
    calls.clear()
    jax.jit(loss).lower(hidden, kernel)  # the forward alone: the loop
    assert len(calls) == 1, len(calls)


def test_a_per_position_core_is_traced_twice_per_value_and_grad(monkeypatch):
    """``class_log_probs``' core (a generic per-position core): the forward loop and the
    backward loop, nothing else."""
    import jxent._classes as classes

    calls = []
    core = classes._class_core

    def spy(*args, **kwargs):
        if any(f.name == "chunk_step" for f in traceback.extract_stack()):
            calls.append(1)
        return core(*args, **kwargs)

    monkeypatch.setattr(classes, "_class_core", spy)
    k = jax.random.split(jax.random.key(0), 2)
    hidden = jax.random.normal(k[0], (2, 16, 8))
    kernel = jax.random.normal(k[1], (8, 32))

    def loss(hidden, kernel):
        logits = jxent.LinearLogits(hidden, kernel, chunk_size=8)
        return jxent.class_log_probs(logits, jax.numpy.array([1, 5])).sum()

    jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, kernel)
    assert len(calls) == 2, len(calls)


def test_eight_jxent_frames_from_sequence_nll_to_the_per_chunk_core(monkeypatch):
    """``sequence_nll > _token_losses > cross_entropy_terms > run > _fused > summed_fwd >
    work > chunk_step``, then the core (it was 16 frames in 0.4.0)."""
    import jxent._softmax as softmax

    package = os.path.dirname(jxent.__file__) + os.sep
    stacks = []
    core = softmax.cross_entropy_core

    def spy(*args, **kwargs):
        stacks.append([f.name for f in traceback.extract_stack() if f.filename.startswith(package)])
        return core(*args, **kwargs)

    monkeypatch.setattr(softmax, "cross_entropy_core", spy)
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (2, 16, 8))
    kernel = jax.random.normal(k[1], (8, 32))
    tokens = jax.random.randint(k[2], (2, 16), 0, 32)

    def loss(hidden, kernel):
        logits = jxent.LinearLogits(hidden, kernel, chunk_size=8)
        return jxent.sequence_nll(logits, tokens, shift=True)

    jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, kernel)
    (stack,) = [s for s in stacks if "chunk_step" in s]
    route = stack[stack.index("sequence_nll"):]
    assert route == ["sequence_nll", "_token_losses", "cross_entropy_terms", "run", "_fused",
                     "summed_fwd", "work", "chunk_step"], route
