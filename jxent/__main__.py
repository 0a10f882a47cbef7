"""``python -m jxent``: minimising cross-entropy is maximum likelihood, shown with numbers.

Trains the toy models of :mod:`jxent.toy` with :func:`jxent.sequence_nll` and
compares them with the count-based MLE of their corpora:

* the training loss goes to the corpus's empirical conditional entropy,
* the model's conditionals go to the count ratios (KL(MLE ‖ model) → 0),
* the summed NLL (``normalize="sum"``) is minus the log-likelihood computed
  from the counts and the model's probabilities,

for a bigram language model (``shift=True``) and for a word-aligned
translation model ``p(y | x)`` (``shift=False``).

Usage: ``python -m jxent [--seed N] [--steps N] [--json] [--plot PATH] [--quiet]``.
Progress goes to stderr; with ``--json`` stdout holds one JSON object only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from . import toy

# (context, word) pairs whose learned probability is shown beside its count ratio.
_LM_EXAMPLES = (("the", "cat"), ("a", "dog"), ("bird", "sang"), ("sat", "on"), ("ran", "<eos>"))
_TRANSLATION_EXAMPLES = (("chat", "kitty"), ("un", "one"), ("tapis", "rug"))


class _Progress:
    """A live line on stderr: ``\\r``-updated on a terminal, a few plain lines otherwise."""

    def __init__(self, name: str, steps: int, floor: float, quiet: bool):
        self.name, self.steps, self.floor, self.quiet = name, steps, floor, quiet
        self.tty = sys.stderr.isatty()
        self.next_line = steps / 4  # off a terminal: a line per quarter of the run

    def __call__(self, step: int, loss: float) -> None:
        if self.quiet:
            return
        line = (
            f"[{self.name}] step {step:>5}/{self.steps}  loss {loss:.6f}  "
            f"gap to entropy floor {loss - self.floor:+.2e}"
        )
        if self.tty:
            end = "\n" if step == self.steps else ""
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        elif step >= self.next_line or step == self.steps:
            self.next_line += self.steps / 4
            print(line, file=sys.stderr, flush=True)


def _run(
    name: str,
    loss_fn: Callable,
    data,
    events: tuple[np.ndarray, np.ndarray],
    words: tuple[tuple[str, ...], tuple[str, ...]],
    source_probs: np.ndarray,
    examples: tuple[tuple[str, str], ...],
    steps: int,
    quiet: bool,
) -> dict:
    """Train one toy model and measure it against the counts of its corpus."""
    context_words, target_words = words
    counts = toy.count_table(*events, len(context_words), len(target_words))
    entropy = toy.conditional_entropy(counts)
    params = toy.init_params(len(context_words), len(target_words))
    progress = _Progress(name, steps, entropy, quiet)
    fit = toy.train(loss_fn, params, data, steps=steps, callback=progress)
    log_probs = toy.model_log_probs(fit.params)
    p_hat = toy.mle(counts)
    log_source = np.log(np.where(source_probs > 0, source_probs, 1.0))
    rows = []
    for context, word in examples:
        c, y = context_words.index(context), target_words.index(word)
        rows.append(
            {
                "context": context,
                "word": word,
                "source": float(source_probs[c, y]),
                "count": int(counts[c, y]),
                "context_count": int(counts[c].sum()),
                # no MLE for a context the corpus never shows (0/0)
                "mle": float(p_hat[c, y]) if counts[c].sum() > 0 else None,
                "model": float(np.exp(log_probs[c, y])),
            }
        )
    # one compiled evaluation of the trained model: token mean and sum
    evaluate = jax.jit(lambda params, data: (loss_fn(params, data), loss_fn(params, data, "sum")))
    final_loss, nll_sum = (float(x) for x in evaluate(fit.params, data))
    return {
        "final_loss": final_loss,
        "conditional_entropy": entropy,
        "loss_gap": final_loss - entropy,
        "kl_to_mle": toy.kl_to_mle(counts, log_probs),
        "nll_sum": nll_sum,
        "log_likelihood": toy.log_likelihood(counts, log_probs),
        "source_nll": -toy.log_likelihood(counts, log_source) / float(counts.sum()),
        "tokens": int(counts.sum()),
        "contexts": int((counts.sum(axis=-1) > 0).sum()),
        "steps": steps,
        "seconds": fit.seconds,
        "probabilities": rows,
        "_losses": fit.losses,
        "_params": fit.params,
    }


def _print_table(title: str, r: dict, context_label: str) -> None:
    rel = (r["nll_sum"] + r["log_likelihood"]) / abs(r["log_likelihood"])
    print(f"{title}  ({r['tokens']} tokens, {r['steps']} steps, {r['seconds']:.1f} s)")
    print(f"  {'':44}{'trained model':>14}{'from counts':>14}{'difference':>12}")
    print(
        f"  {'loss vs H(' + context_label + ') [nats/token]':44}"
        f"{r['final_loss']:>14.6f}{r['conditional_entropy']:>14.6f}{r['loss_gap']:>+12.1e}"
    )
    print(
        f"  {'total NLL vs -log-likelihood [nats]':44}"
        f"{r['nll_sum']:>14.4f}{-r['log_likelihood']:>14.4f}{rel:>+12.1e} rel"
    )
    kl_label = f"KL(MLE ‖ model), mean over {r['contexts']} contexts"
    print(f"  {kl_label:44}{r['kl_to_mle']:>14.1e}")
    print(
        f"  {'NLL of the true source on this corpus':44}{'':14}{r['source_nll']:>14.6f}"
        "  (the MLE fits its sample better)"
    )
    print(f"  {'':24}{'source':>8}{'counts':>12}{'MLE':>9}{'model':>9}")
    for row in r["probabilities"]:
        label = f"P({row['word']} | {row['context']})"
        ratio = f"{row['count']}/{row['context_count']}"
        if row["mle"] is None:
            print(f"  {label:24}{row['source']:>8.3f}{ratio:>12}{'—':>9}{row['model']:>9.4f}"
                  f"  (context never seen: no MLE)")
        else:
            print(f"  {label:24}{row['source']:>8.3f}{ratio:>12}{row['mle']:>9.4f}"
                  f"{row['model']:>9.4f}")


def _plot(path: str, lm: dict, translation: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for r, label, color in ((lm, "language model", "C0"), (translation, "translation", "C1")):
        steps = np.arange(len(r["_losses"]))
        left.plot(steps, r["_losses"], color=color, label=f"{label}: training loss")
        left.axhline(r["conditional_entropy"], color=color, linestyle="--",
                     label=f"{label}: conditional entropy")
        gap = np.maximum(r["_losses"] - r["conditional_entropy"], 1e-9)
        right.semilogy(steps, gap, color=color, label=label)
    left.set(xlabel="step", ylabel="nats / token", title="loss → empirical conditional entropy")
    left.legend(fontsize=8)
    right.set(xlabel="step", ylabel="loss − H  (nats / token)", title="gap to the entropy floor")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    """Run the demonstration; returns the exit status.

    A reader that stops early (``python -m jxent | head -3``) ends the run
    quietly with status 141 (128 + SIGPIPE, as a command killed by the broken
    pipe), without a traceback.
    """
    try:
        status = _main(argv)
        sys.stdout.flush()  # a broken pipe shows up here, not at interpreter exit
        return status
    except BrokenPipeError:
        # https://docs.python.org/3/library/signal.html#note-on-sigpipe: point
        # the broken streams at devnull so that Python's final flush is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):  # no real descriptor (captured in tests)
                pass
        return 141


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_sizes(parser, args)
    if args.plot is not None:
        if not _has_matplotlib():
            print("jxent: --plot needs matplotlib, which is not installed "
                  "(pip install matplotlib); nothing was run.", file=sys.stderr)
            return 2
        _check_plot_directory(parser, args.plot)

    start = time.perf_counter()
    corpus = toy.sample_corpus(args.seed, num_sentences=args.sentences)
    lm = _run("language model", toy.lm_loss, corpus, toy.lm_events(corpus),
              (toy.VOCAB, toy.VOCAB), toy.SOURCE_PROBS, _LM_EXAMPLES, args.steps, args.quiet)
    pairs = toy.sample_pairs(args.seed, num_pairs=args.sentences)
    translation = _run("translation", toy.translation_loss, pairs, toy.translation_events(pairs),
                       (toy.SOURCE_WORDS, toy.TARGET_WORDS), toy.TRANSLATION_PROBS,
                       _TRANSLATION_EXAMPLES, args.steps, args.quiet)
    if args.plot is not None:
        _plot(args.plot, lm, translation)
    total = time.perf_counter() - start

    if args.json:
        out = _public(lm) | {
            "seed": args.seed,
            "sentences": args.sentences,
            "total_seconds": total,
            "conditional": _public(translation),
        }
        print(json.dumps(out))
    else:
        _print_report(args, lm, translation, total)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jxent",
        description="Train toy models with jxent.sequence_nll and show that minimising "
        "cross-entropy is maximum-likelihood estimation.",
    )
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--steps", type=int, default=toy.DEFAULT_STEPS,
                        help=f"optimizer steps per model (default {toy.DEFAULT_STEPS})")
    parser.add_argument("--sentences", type=int, default=1000,
                        help="sentences (and translation pairs) in the corpus (default 1000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--plot", metavar="PATH", help="save the loss curves as a PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _check_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 1 or args.sentences < 1:
        parser.error("--steps and --sentences must be positive")
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _check_plot_directory(parser: argparse.ArgumentParser, path: str) -> None:
    """Fail before training, not after it, when the figure cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        parser.error(f"--plot {path}: directory {directory} does not exist; nothing was run")
    if not os.access(directory, os.W_OK):
        parser.error(f"--plot {path}: directory {directory} is not writable; nothing was run")


def _print_report(args: argparse.Namespace, lm: dict, translation: dict, total: float) -> None:
    print(f"jxent: minimising cross-entropy is maximum likelihood  (seed {args.seed})\n")
    _print_table("Language model p(next | previous), sequence_nll(shift=True)", lm,
                 "next | prev")
    print()
    _print_table("Conditional model p(y | x), sequence_nll(shift=False)", translation, "y | x")
    samples = toy.generate(lm["_params"], jax.random.key(args.seed), 3)
    print("\nSentences sampled from the trained language model:")
    for sentence in np.asarray(samples):
        print("  " + toy.decode(sentence))
    if args.plot is not None:
        print(f"\nLoss curves saved to {args.plot}")
    print(f"\nTotal {total:.1f} s.")


if __name__ == "__main__":
    sys.exit(main())
