"""The toy corpora behind ``jxent.toy``: two known sources and seeded samples from them.

A first-order Markov chain over a 17-word vocabulary (causal language
modelling) and a word-for-word translation source with ambiguous words
(conditional likelihood ``p(y | x)``). ``jxent.toy`` re-exports everything
here; this module needs NumPy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

# --------------------------------------------------------------------------- sources

VOCAB: tuple[str, ...] = (
    "<pad>", "<bos>", "<eos>", "the", "a", "cat", "dog", "bird", "mat", "rug", "sofa",
    "sat", "ran", "slept", "sang", "on", "under",
)
PAD, BOS, EOS = 0, 1, 2

# The language source: P(next word | previous word), a first-order Markov chain.
# Sentences start at <bos> and end at <eos>; some contexts are deterministic
# ("on" -> "the"), so the MLE puts probability 0 on most words there.
_BIGRAMS: dict[str, dict[str, float]] = {
    "<bos>": {"the": 0.6, "a": 0.4},
    "the": {"cat": 0.25, "dog": 0.25, "bird": 0.1, "mat": 0.2, "rug": 0.1, "sofa": 0.1},
    "a": {"cat": 0.4, "dog": 0.4, "bird": 0.2},
    "cat": {"sat": 0.5, "slept": 0.3, "ran": 0.2},
    "dog": {"ran": 0.5, "sat": 0.3, "slept": 0.2},
    "bird": {"sang": 0.6, "sat": 0.4},
    "sat": {"on": 0.6, "under": 0.1, "<eos>": 0.3},
    "ran": {"under": 0.3, "<eos>": 0.7},
    "slept": {"on": 0.4, "under": 0.2, "<eos>": 0.4},
    "sang": {"<eos>": 1.0},
    "on": {"the": 1.0},
    "under": {"the": 0.8, "a": 0.2},
    "mat": {"<eos>": 1.0},
    "rug": {"<eos>": 1.0},
    "sofa": {"<eos>": 1.0},
}

SOURCE_WORDS: tuple[str, ...] = (
    "<pad>", "le", "un", "chat", "chien", "oiseau", "dort", "court", "chante", "sur", "sous",
    "tapis",
)
TARGET_WORDS: tuple[str, ...] = (
    "<pad>", "the", "a", "one", "cat", "kitty", "dog", "hound", "bird", "sleeps", "naps",
    "runs", "sings", "on", "upon", "under", "beneath", "mat", "rug", "carpet",
)

# The translation source: P(target word | aligned source word); the ambiguity
# ("chat" is "cat" or "kitty") is what makes H(Y | X) > 0.
_TRANSLATIONS: dict[str, dict[str, float]] = {
    "le": {"the": 1.0},
    "un": {"a": 0.7, "one": 0.3},
    "chat": {"cat": 0.8, "kitty": 0.2},
    "chien": {"dog": 0.75, "hound": 0.25},
    "oiseau": {"bird": 1.0},
    "dort": {"sleeps": 0.6, "naps": 0.4},
    "court": {"runs": 1.0},
    "chante": {"sings": 1.0},
    "sur": {"on": 0.7, "upon": 0.3},
    "sous": {"under": 0.8, "beneath": 0.2},
    "tapis": {"mat": 0.5, "rug": 0.3, "carpet": 0.2},
}


def _table(rows: Mapping[str, Mapping[str, float]], contexts, words) -> np.ndarray:
    table = np.zeros((len(contexts), len(words)))
    for context, row in rows.items():
        for word, p in row.items():
            table[contexts.index(context), words.index(word)] = p
    table.setflags(write=False)
    return table


SOURCE_PROBS = _table(_BIGRAMS, VOCAB, VOCAB)
"""``[V, V]``: the language source's ``P(next | previous)``; rows of ``<pad>``/``<eos>`` are 0."""
TRANSLATION_PROBS = _table(_TRANSLATIONS, SOURCE_WORDS, TARGET_WORDS)
"""``[V_source, V_target]``: the translation source's ``P(target word | source word)``."""


class Corpus(NamedTuple):
    """Padded sentences: ``tokens [N, T]`` (int32) and ``mask [N, T]``.

    ``mask`` is True on ``<bos>`` … ``<eos>`` and False on padding.
    """

    tokens: np.ndarray
    mask: np.ndarray


class Pairs(NamedTuple):
    """Word-aligned translation pairs ``source, target [N, T]`` (int32) and ``mask [N, T]``."""

    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray


def _draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """One index drawn with probabilities ``probs`` (only from its support)."""
    support = np.flatnonzero(probs)
    cumulative = np.cumsum(probs[support])
    k = np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")
    return int(support[min(int(k), len(support) - 1)])


def sample_corpus(seed: int = 0, num_sentences: int = 1000, max_len: int = 16) -> Corpus:
    """Sentences from the Markov source :data:`SOURCE_PROBS`, padded to ``max_len``.

    Each sentence is ``<bos> w_1 … w_k <eos>`` followed by ``<pad>``; a draw
    that has not ended within ``max_len`` tokens is discarded and drawn again
    (rare: the chain ends quickly). The figures compare the model with this
    corpus's own counts, so the truncation does not affect them.

    Examples:
      >>> from jxent import toy
      >>> corpus = toy.sample_corpus(seed=0, num_sentences=3)
      >>> corpus.tokens.shape, int(corpus.mask.sum()) == int((corpus.tokens != toy.PAD).sum())
      ((3, 16), True)
      >>> [toy.decode(sentence) for sentence in corpus.tokens]
      ['a cat sat', 'a bird sang', 'the sofa']
    """
    rng = np.random.default_rng(seed)
    tokens = np.full((num_sentences, max_len), PAD, dtype=np.int32)
    i = 0
    while i < num_sentences:
        sentence = [BOS]
        while sentence[-1] != EOS and len(sentence) < max_len:
            sentence.append(_draw(rng, SOURCE_PROBS[sentence[-1]]))
        if sentence[-1] == EOS:
            tokens[i, : len(sentence)] = sentence
            i += 1
    return Corpus(tokens=tokens, mask=tokens != PAD)


def sample_pairs(seed: int = 0, num_pairs: int = 1000) -> Pairs:
    """Source sentences ``det noun verb [prep det tapis]`` and their word-by-word translations.

    Source words are drawn uniformly within their slot; each target word is
    drawn independently from :data:`TRANSLATION_PROBS` given its aligned
    source word. Sentences have 3 or 6 words, padded to 6.

    Examples:
      >>> from jxent import toy
      >>> pairs = toy.sample_pairs(seed=0, num_pairs=2)
      >>> pairs.source.shape == pairs.target.shape == pairs.mask.shape == (2, 6)
      True
    """
    rng = np.random.default_rng(seed)
    slots = [("le", "un"), ("chat", "chien", "oiseau"), ("dort", "court", "chante")]
    phrase = [("sur", "sous"), ("le", "un"), ("tapis",)]
    source = np.zeros((num_pairs, 6), dtype=np.int32)
    target = np.zeros((num_pairs, 6), dtype=np.int32)
    for i in range(num_pairs):
        words = [slot[rng.integers(len(slot))] for slot in slots]
        if rng.random() < 0.5:
            words += [slot[rng.integers(len(slot))] for slot in phrase]
        for t, word in enumerate(words):
            source[i, t] = SOURCE_WORDS.index(word)
            target[i, t] = _draw(rng, TRANSLATION_PROBS[source[i, t]])
    return Pairs(source=source, target=target, mask=source != 0)


def decode(tokens, words: tuple[str, ...] = VOCAB) -> str:
    """The words of a 1-D token array, without ``<bos>``, up to ``<eos>``/``<pad>``.

    Examples:
      >>> from jxent import toy
      >>> toy.decode([1, 3, 5, 11, 15, 3, 8, 2, 0])
      'the cat sat on the mat'
    """
    out = []
    for token in np.asarray(tokens).tolist():
        word = words[token]
        if word in ("<eos>", "<pad>"):
            break
        if word != "<bos>":
            out.append(word)
    return " ".join(out)
