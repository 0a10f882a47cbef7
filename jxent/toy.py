"""A toy language model that shows, with numbers, that minimising cross-entropy is MLE.

The claim: for a model that can represent every conditional distribution
``q(y | c)``, the training loss

    L(q) = −(1/N) Σ_i log q(y_i | c_i) = H(Y | C) + Σ_c (N_c / N) · KL(p̂(· | c) ‖ q(· | c))

over a corpus of ``N`` (context, next token) events is minimised exactly by the
count ratios ``p̂(y | c) = N_{c,y} / N_c`` -- the maximum-likelihood estimate --
and its minimum is the corpus's *empirical* conditional entropy
``H(Y | C) = −(1/N) Σ_{c,y} N_{c,y} log p̂(y | c)``. Minimising the token-mean
loss and maximising the likelihood ``Σ_i log q(y_i | c_i) = −N · L(q)`` are the
same problem.

This module holds everything needed to watch that happen:

* Two seeded corpora from known sources. :func:`sample_corpus` draws sentences
  ("the cat sat on the mat") from a first-order Markov chain over a 17-word
  vocabulary with ``<bos>``/``<eos>`` and padding (causal language
  modelling, ``shift=True``); :func:`sample_pairs` draws word-aligned
  translation pairs in which a source word has one of several translations
  with known probabilities (conditional likelihood ``p(y | x)``,
  ``shift=False``).
* A tiny model in plain JAX that can represent those conditionals exactly: a
  table of logits indexed by the context token (:func:`init_params`,
  :func:`apply`). For the language model the context is the previous token,
  so it is a bigram model, ``p(x) = Π_t q(x_t | x_{t−1})`` (:func:`generate`
  samples from it).
* Training with optax on :func:`jxent.sequence_nll` (:func:`train`).
* The count-based MLE computed independently in NumPy from the corpus
  (:func:`count_table`, :func:`mle`) and the figures that compare the two:
  :func:`conditional_entropy`, :func:`log_likelihood`, :func:`kl_to_mle`.

``python -m jxent`` runs the whole demonstration.

Examples:
  >>> from jxent import toy
  >>> corpus = toy.sample_corpus(seed=0, num_sentences=200)
  >>> counts = toy.count_table(*toy.lm_events(corpus), len(toy.VOCAB), len(toy.VOCAB))
  >>> fit = toy.train(toy.lm_loss, toy.init_params(len(toy.VOCAB), len(toy.VOCAB)), corpus,
  ...                 steps=200)
  >>> gap = float(toy.lm_loss(fit.params, corpus)) - toy.conditional_entropy(counts)
  >>> abs(gap) < 1e-3
  True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from ._sequence import sequence_nll

# The corpora and their sources are defined in _toy_corpus and re-exported here
# (listed in __all__): users read them as jxent.toy.VOCAB, jxent.toy.sample_corpus, ...
from ._toy_corpus import (
    BOS,
    EOS,
    PAD,
    SOURCE_PROBS,
    SOURCE_WORDS,
    TARGET_WORDS,
    TRANSLATION_PROBS,
    VOCAB,
    Corpus,
    Pairs,
    decode,
    sample_corpus,
    sample_pairs,
)

__all__ = [
    "VOCAB", "PAD", "BOS", "EOS", "SOURCE_PROBS", "Corpus", "sample_corpus",
    "SOURCE_WORDS", "TARGET_WORDS", "TRANSLATION_PROBS", "Pairs", "sample_pairs",
    "init_params", "apply", "generate", "decode", "lm_loss", "translation_loss",
    "default_optimizer", "make_step", "Fit", "train", "lm_events", "translation_events",
    "count_table", "mle", "conditional_entropy", "log_likelihood", "kl_to_mle",
    "model_log_probs", "DEFAULT_STEPS",
]

DEFAULT_STEPS = 200

# --------------------------------------------------------------------------- the model


def init_params(num_contexts: int, vocab_size: int) -> dict[str, Float[Array, "C V"]]:
    """Parameters of the table model: ``{"logits": zeros [num_contexts, vocab_size]}``.

    ``q(y | c) = softmax(logits[c])[y]`` can be any distribution with full
    support, so the model can come arbitrarily close to any conditional,
    the count-based MLE included (zeros of the MLE are approached as logits
    go to −∞). Zero initialisation is the uniform distribution.
    """
    return {"logits": jnp.zeros((num_contexts, vocab_size), jnp.float32)}


def apply(
    params: Mapping[str, Array], context: Int[Array, "*batch T"]
) -> Float[Array, "*batch T V"]:
    """Next-token logits ``[..., T, V]``: row ``context[..., t]`` of the table.

    For the language model ``context`` is the token sequence itself, and
    ``logits[..., t, :]`` predicts ``tokens[..., t + 1]`` (``shift=True``);
    for translation it is the source sentence, aligned with the target
    (``shift=False``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jxent import toy
      >>> toy.apply(toy.init_params(3, 5), jnp.array([[0, 2, 1]])).shape
      (1, 3, 5)
    """
    return jnp.take(params["logits"], jnp.asarray(context), axis=0)


def model_log_probs(params: Mapping[str, Array]) -> np.ndarray:
    """``log q(y | c)`` for every context ``c`` as a float64 NumPy array ``[C, V]``.

    The log-softmax of the model's logits is taken in float64, so figures
    computed from it (KL to the MLE near 0) are not limited by float32 rounding.
    """
    num_contexts = params["logits"].shape[0]
    logits = np.asarray(apply(params, jnp.arange(num_contexts)), dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def generate(params: Mapping[str, Array], key: Array, num: int, max_len: int = 16) -> Array:
    """Sentences sampled from the trained bigram model, ``[num, max_len]`` tokens.

    Ancestral sampling, ``x_t ~ q(· | x_{t−1})`` from ``<bos>``; after
    ``<eos>`` the sentence is padded.
    """

    def step(prev, key):
        draw = jax.random.categorical(key, apply(params, prev))
        nxt = jnp.where((prev == EOS) | (prev == PAD), PAD, draw).astype(jnp.int32)
        return nxt, nxt

    first = jnp.full((num,), BOS, jnp.int32)
    _, rest = jax.lax.scan(step, first, jax.random.split(key, max_len - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def lm_loss(params, corpus: Corpus, normalize: str = "tokens") -> Float[Array, ""]:
    """Causal LM loss: :func:`jxent.sequence_nll` with ``shift=True`` and the padding mask."""
    tokens = jnp.asarray(corpus.tokens)
    return sequence_nll(
        apply(params, tokens), tokens, shift=True, where=corpus.mask, normalize=normalize
    )


def translation_loss(params, pairs: Pairs, normalize: str = "tokens") -> Float[Array, ""]:
    """Conditional loss ``−log q(y | x)``: :func:`jxent.sequence_nll` with ``shift=False``."""
    logits = apply(params, pairs.source)
    return sequence_nll(logits, pairs.target, shift=False, where=pairs.mask, normalize=normalize)


# --------------------------------------------------------------------------- training


def default_optimizer(steps: int) -> optax.GradientTransformation:
    """Adam with a cosine decay from learning rate 1.0 to 0 over ``steps``.

    The large rate is deliberate: the loss only reaches the entropy floor once
    the logits of words the corpus never shows in a context have gone far
    towards −∞, and Adam moves them by about one learning rate per step.
    """
    return optax.adam(optax.cosine_decay_schedule(1.0, max(int(steps), 1)))


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """The plain (not jitted) step ``(params, opt_state, data) -> (params, opt_state, loss)``."""

    def step(params, opt_state, data):
        loss, grads = jax.value_and_grad(loss_fn)(params, data)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class Fit(NamedTuple):
    """What :func:`train` returns: final ``params``, the loss before each step, wall time."""

    params: Any
    losses: np.ndarray
    seconds: float


def train(
    loss_fn: Callable,
    params: Any,
    data: Any,
    *,
    steps: int = DEFAULT_STEPS,
    optimizer: optax.GradientTransformation | None = None,
    callback: Callable[[int, float], None] | None = None,
    report_every: int = 10,
    wrap_step: Callable[[Callable], Callable] | None = None,
) -> Fit:
    """Full-batch training of ``loss_fn(params, data)`` with a jitted optax step.

    The step is compiled once and reused: ``data`` is an argument, not a
    captured constant, and nothing about it changes between steps.

    Args:
      loss_fn: ``(params, data) -> scalar``, e.g. :func:`lm_loss`.
      params: initial parameter pytree.
      data: the batch (a pytree of arrays), the same at every step.
      steps: number of optimizer steps.
      optimizer: defaults to :func:`default_optimizer`.
      callback: called as ``callback(step, loss)`` with the number of completed
        steps and the latest loss (a Python float) every ``report_every``
        steps and after the last one.
      report_every: how often to call ``callback`` (each call syncs the host).
      wrap_step: applied to the plain step before ``jax.jit``, e.g.
        ``functools.partial(chex.assert_max_traces, n=1)`` to check that the
        loop never retraces.

    Returns:
      :class:`Fit` with ``losses[k]`` the loss before step ``k`` and
      ``seconds`` the wall time, compilation included.
    """
    optimizer = default_optimizer(steps) if optimizer is None else optimizer
    step_fn = make_step(loss_fn, optimizer)
    step_fn = jax.jit(step_fn if wrap_step is None else wrap_step(step_fn))
    start = time.perf_counter()
    data = jax.tree.map(jnp.asarray, data)  # on the device once, not at every step
    opt_state = optimizer.init(params)
    losses = []
    for k in range(1, steps + 1):
        params, opt_state, loss = step_fn(params, opt_state, data)
        losses.append(loss)
        if callback is not None and (k % report_every == 0 or k == steps):
            callback(k, float(loss))
    history = np.asarray(jnp.stack(losses)) if losses else np.zeros((0,), np.float32)
    jax.block_until_ready(params)
    return Fit(params=params, losses=history, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- counts


def lm_events(corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
    """The counted (previous token, next token) pairs of a corpus, as two 1-D arrays."""
    counted = np.asarray(corpus.mask)[:, 1:]
    tokens = np.asarray(corpus.tokens)
    return tokens[:, :-1][counted], tokens[:, 1:][counted]


def translation_events(pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """The counted (source word, target word) pairs, as two 1-D arrays."""
    mask = np.asarray(pairs.mask)
    return np.asarray(pairs.source)[mask], np.asarray(pairs.target)[mask]


def count_table(contexts, targets, num_contexts: int, vocab_size: int) -> np.ndarray:
    """``N[c, y]``: how often ``y`` follows context ``c`` (float64 ``[C, V]``).

    Examples:
      >>> from jxent import toy
      >>> toy.count_table([0, 0, 1], [1, 1, 0], 2, 2).tolist()
      [[0.0, 2.0], [1.0, 0.0]]
    """
    counts = np.zeros((num_contexts, vocab_size))
    np.add.at(counts, (np.asarray(contexts), np.asarray(targets)), 1.0)
    return counts


def mle(counts: np.ndarray) -> np.ndarray:
    """The count-based MLE ``p̂(y | c) = N[c, y] / N[c]``; rows of unseen contexts are 0."""
    totals = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def conditional_entropy(counts: np.ndarray) -> float:
    """Empirical ``H(Y | C) = −(1/N) Σ_{c,y} N[c, y] log p̂(y | c)`` in nats per token.

    The minimum of the token-mean cross-entropy over all conditionals.

    Examples:
      >>> import numpy as np
      >>> from jxent import toy
      >>> round(toy.conditional_entropy(np.array([[1.0, 1.0], [0.0, 2.0]])), 4)  # ½·ln 2
      0.3466
    """
    log_mle = np.log(np.where(counts > 0, mle(counts), 1.0))
    return -log_likelihood(counts, log_mle) / float(counts.sum())


def log_likelihood(counts: np.ndarray, log_probs: np.ndarray) -> float:
    """``Σ_{c,y} N[c, y] log q(y | c)``: the log-likelihood of the counted events under ``q``.

    Pairs never seen contribute 0 whatever ``log q`` is (also −∞).
    """
    seen = counts > 0
    return float(np.sum(counts[seen] * np.asarray(log_probs, dtype=np.float64)[seen]))


def kl_to_mle(counts: np.ndarray, log_probs: np.ndarray) -> float:
    """Mean over observed contexts of ``KL(p̂(· | c) ‖ q(· | c)) = Σ_y p̂ (log p̂ − log q)``.

    Contexts never observed have no MLE and are left out; words with
    ``p̂ = 0`` contribute 0.

    Examples:
      >>> import numpy as np
      >>> from jxent import toy
      >>> counts = np.array([[3.0, 1.0], [0.0, 0.0]])
      >>> toy.kl_to_mle(counts, np.log(np.array([[0.75, 0.25], [0.5, 0.5]])))
      0.0
    """
    p = mle(counts)
    seen = counts > 0
    log_p = np.log(np.where(seen, p, 1.0))
    log_q = np.where(seen, np.asarray(log_probs, dtype=np.float64), 0.0)
    terms = np.where(seen, p * (log_p - log_q), 0.0)
    observed = counts.sum(axis=-1) > 0
    return float(np.mean(terms.sum(axis=-1)[observed]))
