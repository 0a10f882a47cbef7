"""jxent with the ecosystem: a Flax NNX model trained with optax, and exact gradient accumulation.

Gradient accumulation weighted by token counts -- the pattern
--------------------------------------------------------------
The big-batch loss is the global token mean ``Σ_i total_i / Σ_i count_i``
over micro-batches ``i`` (``total_i, count_i = jxent.nll_stats(...)``). Its
gradient is ``Σ_i ∇total_i / N`` with ``N = Σ_i count_i``. Averaging each
micro-batch's *mean* loss (``sequence_nll(..., normalize="tokens")``) instead
gives ``(1/k) Σ_i ∇total_i / count_i``: a different gradient whenever the
micro-batches hold different numbers of counted tokens (uneven padding,
masked prompts), because every token of a short micro-batch then weighs more.

Two exact ways to accumulate, both shown below:

1. An explicit loop (here a ``lax.scan`` inside ``jax.jit``): accumulate the
   gradients of each micro-batch's ``total`` and its ``count``, then divide the
   summed gradient by the summed count once (:func:`accumulated_grads`).
2. ``optax.MultiSteps``: it sums (``use_grad_mean=False``) or averages
   (the default) the micro-step gradients with equal weights and cannot
   divide by a count it never sees, so each micro-step's loss must already
   be ``total_i / N`` (or ``k · total_i / N`` with the default). ``N`` does not
   depend on the parameters: count it from the masks of the whole
   accumulation window before the first micro-step (for ``shift=True``,
   ``sum(where[..., 1:])``).

Either way the update equals the big-batch update (up to float rounding),
whatever the optimizer, because the gradient it receives is the same.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _quoted import assert_quoted, run
from flax import nnx

import jxent
from jxent import toy

pytestmark = pytest.mark.slow  # every test here starts processes or trains models

V = len(toy.VOCAB)


class TinyLM(nnx.Module):
    """Embedding → tanh → linear head: next-token logits from the current token."""

    def __init__(self, vocab_size: int, features: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, features, rngs=rngs)
        self.head = nnx.Linear(features, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        return self.head(jnp.tanh(self.embed(tokens)))


@pytest.fixture(scope="module")
def corpus():
    return toy.sample_corpus(seed=7, num_sentences=256)


def test_nnx_model_trains_with_optax_inside_jit(corpus):
    model = TinyLM(V, 32, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    tokens, mask = jnp.asarray(corpus.tokens), jnp.asarray(corpus.mask)

    @nnx.jit
    @functools.partial(chex.assert_max_traces, n=1)
    def train_step(model, optimizer, tokens, mask):
        def loss_fn(model):
            return jxent.sequence_nll(model(tokens), tokens, where=mask, shift=True)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    chex.clear_trace_counter()
    losses = np.array([float(train_step(model, optimizer, tokens, mask)) for _ in range(40)])
    assert losses[0] == pytest.approx(np.log(V), abs=0.3)  # near uniform at initialisation
    assert losses[-1] < losses[0] - 1.0
    assert losses[-10:].max() < losses[:10].min()
    # the model conditions on the previous token only: its loss is bounded
    # below by the corpus's empirical H(next | previous) (Gibbs' inequality)
    counts = toy.count_table(*toy.lm_events(corpus), V, V)
    final = jxent.nll_stats(model(tokens), tokens, where=mask, shift=True)
    assert float(final.mean()) >= toy.conditional_entropy(counts) - 1e-6
    assert float(final.mean()) < losses[-1] + 1e-2


# --------------------------------------------------------------------------- accumulation


def _uneven_batch(corpus, k=4, per_micro=2):
    """k micro-batches whose counted tokens differ a lot: longest sentences first.

    The last micro-batch also has a masked "prompt" (its first two targets),
    so the counts differ even more than the padding alone makes them.
    """
    order = np.argsort(-corpus.mask.sum(axis=-1), kind="stable")
    picks = np.concatenate([order[: per_micro * (k - 1)], order[-per_micro:]])
    tokens, mask = corpus.tokens[picks], corpus.mask[picks].copy()
    mask[-per_micro:, 1:3] = False
    return jnp.asarray(tokens), jnp.asarray(mask)


def _split(x, k):
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])


@pytest.fixture(scope="module")
def functional_model():
    """The NNX model as (graphdef, params) for pure functions (split/merge)."""
    graphdef, params = nnx.split(TinyLM(V, 16, rngs=nnx.Rngs(1)))
    return graphdef, params


def _stats(graphdef, params, tokens, mask):
    return jxent.nll_stats(nnx.merge(graphdef, params)(tokens), tokens, where=mask, shift=True)


@functools.partial(jax.jit, static_argnums=0)
def big_batch_grads(graphdef, params, tokens, mask):
    return jax.grad(lambda p: _stats(graphdef, p, tokens, mask).mean())(params)


@functools.partial(jax.jit, static_argnums=0)
def accumulated_grads(graphdef, params, micro_tokens, micro_mask):
    """The gradient of the global token mean from micro-batches ``[k, b, T]``.

    Sum ``∇ total_i`` and ``count_i`` over the micro-batches, divide once.
    """

    def total_and_count(params, tokens, mask):
        stats = _stats(graphdef, params, tokens, mask)
        return stats.total, stats.count  # differentiate the total; carry the count along

    def body(carry, batch):
        grad_sum, count_sum = carry
        grads, count = jax.grad(total_and_count, has_aux=True)(params, *batch)
        return (jax.tree.map(jnp.add, grad_sum, grads), count_sum + count), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, count), _ = jax.lax.scan(body, (zeros, jnp.zeros(())), (micro_tokens, micro_mask))
    return jax.tree.map(lambda g: g / count, grad_sum)


def _sgd_step(params, grads, lr=1.0):
    updates, _ = optax.sgd(lr).update(grads, optax.sgd(lr).init(params), params)
    return optax.apply_updates(params, updates)


def _multisteps(graphdef, params, micro_tokens, micro_mask, micro_loss, use_grad_mean):
    """k micro-steps of optax.MultiSteps(sgd) inside jax.jit; returns the final params."""
    k = micro_tokens.shape[0]
    opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=k, use_grad_mean=use_grad_mean)

    @jax.jit
    def micro_step(params, state, tokens, mask):
        grads = jax.grad(micro_loss)(params, tokens, mask)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for i in range(k):
        params, state = micro_step(params, state, micro_tokens[i], micro_mask[i])
    return params


def test_the_micro_batches_are_uneven(corpus):
    tokens, mask = _uneven_batch(corpus)
    counts = _split(mask[:, 1:], 4).sum(axis=(1, 2))
    assert counts.max() >= 2 * counts.min()


def test_explicit_accumulation_equals_the_big_batch(corpus, functional_model):
    graphdef, params = functional_model
    tokens, mask = _uneven_batch(corpus)
    big = big_batch_grads(graphdef, params, tokens, mask)
    acc = accumulated_grads(graphdef, params, _split(tokens, 4), _split(mask, 4))
    chex.assert_trees_all_close(acc, big, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        _sgd_step(params, acc), _sgd_step(params, big), rtol=1e-5, atol=1e-6
    )


def test_multisteps_with_count_weighting_equals_the_big_batch(corpus, functional_model):
    graphdef, params = functional_model
    tokens, mask = _uneven_batch(corpus)
    expected = _sgd_step(params, big_batch_grads(graphdef, params, tokens, mask))
    k = 4
    # N: the global count of the window, from the masks alone (shift=True)
    global_count = jnp.sum(mask[:, 1:]).astype(jnp.float32)
    window_stats = _stats(graphdef, params, tokens, mask)
    assert float(global_count) == float(window_stats.count)

    def summed(params, tokens, mask):  # for use_grad_mean=False: Σ_i total_i / N
        return _stats(graphdef, params, tokens, mask).total / global_count

    def averaged(params, tokens, mask):  # for the default mean: (1/k) Σ_i k·total_i / N
        return k * _stats(graphdef, params, tokens, mask).total / global_count

    for loss, use_grad_mean in ((summed, False), (averaged, True)):
        got = _multisteps(graphdef, params, _split(tokens, k), _split(mask, k), loss, use_grad_mean)
        chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_averaging_micro_batch_means_is_not_the_big_batch(corpus, functional_model):
    """The naive pattern -- MultiSteps over per-micro-batch mean losses -- is biased."""
    graphdef, params = functional_model
    tokens, mask = _uneven_batch(corpus)
    expected = _sgd_step(params, big_batch_grads(graphdef, params, tokens, mask))

    def micro_mean(params, tokens, mask):
        return jxent.sequence_nll(
            nnx.merge(graphdef, params)(tokens), tokens, where=mask, shift=True
        )

    naive = _multisteps(graphdef, params, _split(tokens, 4), _split(mask, 4), micro_mean, True)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(naive), jax.tree.leaves(expected), strict=True)
    )
    assert diff > 1e-3


@pytest.mark.slow
def test_sharded_nnx_example_matches_one_device_and_its_quote():
    """examples/sharded_nnx.py: an NNX LM sharded over data × vocabulary, plain jit, optax.

    The script, run as a user runs it, trains on one device and on Auto and
    Explicit 2 × 4 meshes of its 8 CPU devices, and exits 1 unless losses and
    parameters agree, the head's gradient stays vocab-sharded and nothing is
    all-gathered; docs/distributed.md quotes its output.
    """
    out = run("python examples/sharded_nnx.py")
    assert out.count("same as one device, nothing gathered") == 2, out
    assert "all-gather" not in out
    assert_quoted("python examples/sharded_nnx.py", out)
