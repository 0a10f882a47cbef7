"""jxent: exact, fast information theory for language-model training in JAX."""

from ._classes import class_log_probs as class_log_probs
from ._distillation import distillation_loss as distillation_loss
from ._information import cross_entropy as cross_entropy
from ._information import entropy as entropy
from ._information import entropy_from_logits as entropy_from_logits
from ._information import information_content as information_content
from ._information import js_divergence as js_divergence
from ._information import kl_divergence as kl_divergence
from ._information import kl_divergence_from_logits as kl_divergence_from_logits
from ._linear import linear_cross_entropy as linear_cross_entropy
from ._logits import LinearLogits as LinearLogits
from ._sequence import NLLStats as NLLStats
from ._sequence import nll_stats as nll_stats
from ._sequence import perplexity as perplexity
from ._sequence import sequence_nll as sequence_nll
from ._softmax import softmax_cross_entropy as softmax_cross_entropy
from ._tokens import TokenStats as TokenStats
from ._tokens import token_objective as token_objective
from ._tokens import token_stats as token_stats
from ._topk import TopK as TopK

__version__ = "0.4.0"

__all__ = [
    "LinearLogits",
    "NLLStats",
    "TokenStats",
    "TopK",
    "class_log_probs",
    "cross_entropy",
    "distillation_loss",
    "entropy",
    "entropy_from_logits",
    "information_content",
    "js_divergence",
    "kl_divergence",
    "kl_divergence_from_logits",
    "linear_cross_entropy",
    "nll_stats",
    "perplexity",
    "sequence_nll",
    "softmax_cross_entropy",
    "token_objective",
    "token_stats",
]


def __getattr__(name: str):
    # `jxent.toy` without `from jxent import toy`, imported on first access:
    # it pulls in optax, which `import jxent` should not pay for.
    if name == "toy":
        import importlib

        return importlib.import_module(".toy", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"toy"})
