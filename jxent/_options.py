"""Every option parser: the first of the four steps of each public function.

Options are the arguments that are not arrays: reductions, coefficients,
indices, the shift. Each public function on logits parses all of its options
in one call, into one frozen record (:func:`loss_options`,
:func:`sequence_options`, :func:`token_options`, :func:`distillation_options`),
once for the dense and the fused path alike. Most must be static Python values (they decide the
program's structure); a few coefficients (``label_smoothing``, ``z_loss``,
``temperature``, ``beta``, ``hard_weight``) may also be traced scalars, so a
schedule under ``jit`` does not recompile. Concrete values come back as Python
floats, so the common path stays static and specialised; traced ones come back
as float arrays, and the engine passes them to its cores as arguments.

A concrete value out of range raises ``ValueError``. A traced one cannot: it
comes back NaN instead (:func:`nan_if_invalid`), so the result is NaN, never
a finite number computed from a meaningless coefficient, and
``jax.experimental.checkify`` reports it with the eager error's words, naming
the option. Per-token ``weights`` are checked the same way, entry by entry
(``jxent._positions.token_targets``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from ._checks import float_dtype

REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("tokens", "sequences", "sum", "none")
DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
TOPK_MODES = ("tail", "renormalize")


def check_option(value: Any, name: str, valid: Sequence[str], hint: dict | None = None) -> str:
    """``value`` if it is one of ``valid``; else a ``ValueError`` listing them (and a hint)."""
    if value not in valid:
        suggestion = (hint or {}).get(value) if isinstance(value, str) else None
        tip = f"; did you mean {suggestion!r}?" if suggestion else ""
        raise ValueError(
            f"{name} must be one of {', '.join(repr(v) for v in valid)}; got {value!r}{tip}"
        )
    return value


def parse_reduction(reduction: Any) -> str:
    return check_option(reduction, "reduction", REDUCTIONS)


def parse_normalize(normalize: Any) -> str:
    # softmax_cross_entropy's "mean" is sequence_nll's "tokens" (the global token mean).
    return check_option(normalize, "normalize", NORMALIZATIONS, hint={"mean": "tokens"})


# --------------------------------------------------------------------------- numbers


def check_base(base: Any) -> float | None:
    """Validate a logarithm base; return ``ln(base)`` (``None`` means nats)."""
    if base is None:
        return None
    if isinstance(base, bool) or not isinstance(base, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"base must be None (nats) or a positive number != 1 given as a Python "
            f"value, got {base!r} of type {type(base).__name__}"
        )
    base = float(base)
    if not (base > 0) or base == 1 or math.isinf(base):
        raise ValueError(
            f"base must be None (nats), 2 (bits) or another finite number b > 0 with "
            f"b != 1, got {base!r}"
        )
    return math.log(base)


def static_float(value: Any, name: str, expected: str) -> float:
    """``value`` as a Python float: options are static, never traced."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float ({expected}), got a traced value")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {value!r}") from None


def nan_if_invalid(value: jax.Array, ok: jax.Array, requirement: str) -> jax.Array:
    """``value`` where ``ok``, NaN where not: the check of a traced option.

    An invalid traced value cannot raise; it turns what it touches into NaN,
    never a finite number, and ``jax.experimental.checkify`` reports
    ``"{requirement}, got {the smallest invalid entry}"`` (``debug_check`` is a
    no-op unless the function is checkified). ``ok`` has ``value``'s shape
    (an array is poisoned entry by entry). A valid value's gradient passes
    the ``where`` unchanged.
    """
    if value.size == 0:
        return value
    # A reduction, not an index into the flattened array: it keeps any layout
    # (a sequence axis split over Explicit mesh axes cannot be flattened).
    invalid = jnp.min(jnp.where(ok, jnp.inf, value))
    message = requirement.replace("{", "{{").replace("}", "}}") + ", got {}"
    checkify.debug_check(jnp.all(ok), message, invalid)
    return jnp.where(ok, value, jnp.nan)


def float_or_traced(value: Any, name: str, expected: str):
    """A Python float, or a traced real scalar (a schedule under ``jit``).

    Concrete values (Python numbers, NumPy scalars, concrete 0-d arrays) come
    back as Python floats; a tracer comes back as a float32/float64 scalar
    array (its range is checked by :func:`float_option`).
    """
    if isinstance(value, jax.core.Tracer):
        if value.shape != () or not (
            jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        ):
            raise TypeError(
                f"{name} must be {expected}: a Python float or a real scalar, got a traced "
                f"array of shape {value.shape} and dtype {value.dtype}"
            )
        return value.astype(float_dtype(value.dtype))
    return static_float(value, name, expected)


def float_option(value: Any, name: str, expected: str, ok, wanted: str | None = None) -> Any:
    """A Python float checked with ``ok``, or a traced real scalar (NaN when ``ok`` fails).

    ``expected`` names the type in a ``TypeError``; ``wanted`` (default the
    same) the range in a ``ValueError``, and in ``checkify``'s report of a
    traced value out of range (:func:`nan_if_invalid`). ``ok`` works on a
    float and on an array alike (``&``, not ``and``; False for NaN).
    """
    v = float_or_traced(value, name, expected)
    requirement = f"{name} must be {wanted or expected}"
    if not isinstance(v, float):
        return nan_if_invalid(v, ok(v), requirement)
    if not ok(v):
        raise ValueError(f"{requirement}, got {value!r}")
    return v


def is_static(value: Any, number: float) -> bool:
    """True for a Python float equal to ``number`` (a traced value may be anything)."""
    return isinstance(value, float) and value == number


def fraction(value: Any, name: str):
    """A float in ``[0, 1]``, or a traced scalar."""
    return float_option(
        value, name, "a float in [0, 1]", lambda v: (0.0 <= v) & (v <= 1.0), "in [0, 1]"
    )


def nonnegative_float(value: Any, name: str):
    """A finite float ``>= 0``, or a traced scalar."""
    return float_option(
        value, name, "a non-negative float", lambda v: (0.0 <= v) & (v < math.inf),
        "a finite float >= 0",
    )


def parse_softcap(value: Any) -> float | None:
    if value is None:
        return None
    v = static_float(value, "logit_softcap", "None or a float > 0")
    if not (v > 0.0) or math.isinf(v):
        raise ValueError(f"logit_softcap must be None or a finite float > 0, got {value!r}")
    return v


def parse_temperature(value: Any) -> Any:
    """``temperature`` as a finite Python float > 0, or a traced scalar."""
    return float_option(
        value, "temperature", "a finite float > 0", lambda v: (0 < v) & (v < math.inf)
    )


def static_int(value: Any, name: str, *, allow_none: bool = True) -> int | None:
    """An integer option (``ignore_index``, ``chunk_size``) as a Python int.

    NumPy integer scalars and concrete 0-d integer arrays are accepted like
    Python ints. A traced value cannot decide the program's structure: the
    error says how to make it static.
    """
    if value is None and allow_none:
        return None
    what = "an int or None" if allow_none else "an int"
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python int, got a traced value ({value.aval}): under "
            f"jax.jit mark it static, jax.jit(f, static_argnames=({name!r},)), or close over "
            "a Python int instead of passing it as a jitted argument"
        )
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and jnp.issubdtype(
        value.dtype, jnp.integer
    ):
        return int(value)
    raise TypeError(f"{name} must be {what}, got {value!r}")


PRECISIONS = ("accurate", "balanced", "compact")


def parse_precision(value: Any) -> str:
    """``LinearLogits``' gradient precision policy (see its docstring)."""
    return check_option(value, "precision", PRECISIONS)


def parse_chunk_size(value: Any) -> int | None:
    value = static_int(value, "chunk_size")
    if value is not None and value < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------- shift


class _Required:
    """The default of ``shift``: there is none, and leaving it out says what to pass."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def parse_shift(value: Any, function: str) -> int:
    """``shift`` as an int ``k >= 0`` (``True`` = 1, ``False`` = 0); it must be given.

    A default would silently shift logits that the caller has already sliced.
    """
    if value is REQUIRED:
        raise TypeError(
            f"{function}() needs shift: pass shift=True for causal LM logits (logits[..., t, :] "
            "predicts tokens[..., t + 1]) or shift=False for logits already aligned with "
            "their targets (e.g. after logits[:, :-1] and tokens[:, 1:]); an int k >= 2 "
            "scores the k-th next token (multi-token prediction)"
        )
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"shift must be a static Python bool or int, got a traced value: under jax.jit "
            f"mark it static, jax.jit({function}, static_argnames=('shift',)), or pass it "
            "from a closure"
        )
    if isinstance(value, (bool, np.bool_)):
        return int(bool(value))
    if isinstance(value, (int, np.integer)) and value >= 0:
        return int(value)
    raise TypeError(f"shift must be True, False or an int k >= 0, got {value!r}")


# --------------------------------------------------------------------------- records


class LossOptions(NamedTuple):
    """Validated options of a cross-entropy; the coefficients may be traced scalars.

    ``how`` reduces the losses (``reduction``; ``sequence_nll``'s ``normalize``;
    ``"sum"`` for ``nll_stats``), ``shift`` is 0 for ``softmax_cross_entropy``
    and ``log_base`` is ``ln(base)`` (None: nats).
    """

    how: str
    ignore_index: int | None
    label_smoothing: Any
    z_loss: Any
    logit_softcap: float | None
    shift: int = 0
    log_base: float | None = None

    def core_options(self) -> dict:
        """The keyword options of the cross-entropy core (``_softmax.cross_entropy_core``)."""
        return dict(label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                    logit_softcap=self.logit_softcap)


def _loss_options(how, *, shift=0, log_base=None, ignore_index, label_smoothing, z_loss,
                  logit_softcap) -> LossOptions:
    return LossOptions(
        how, shift=shift, log_base=log_base,
        label_smoothing=fraction(label_smoothing, "label_smoothing"),
        z_loss=nonnegative_float(z_loss, "z_loss"), logit_softcap=parse_softcap(logit_softcap),
        ignore_index=static_int(ignore_index, "ignore_index"),
    )


def loss_options(*, reduction, **coefficients) -> LossOptions:
    """``softmax_cross_entropy``'s options (``reduction``, ``ignore_index``, ``label_smoothing``,
    ``z_loss``, ``logit_softcap``), validated once for the dense and fused paths."""
    return _loss_options(parse_reduction(reduction), **coefficients)


def sequence_options(function: str, *, shift, normalize="sum", base=None,
                     **coefficients) -> LossOptions:
    """The options of ``sequence_nll`` and ``nll_stats`` (whose ``how`` is ``"sum"``):
    ``normalize``, ``base``, ``shift``, then those of :func:`loss_options`."""
    how, log_base = parse_normalize(normalize), check_base(base)
    return _loss_options(how, shift=parse_shift(shift, function), log_base=log_base,
                         **coefficients)


class TokenOptions(NamedTuple):
    """Validated options of ``token_stats``, ``token_objective`` and ``class_log_probs``.

    ``temperature`` may be a traced scalar; ``shift`` is 0 and ``ignore_index``
    None for ``class_log_probs``; ``fn`` is ``token_objective``'s function of
    the statistics (None for the others).
    """

    temperature: Any
    shift: int = 0
    fn: Callable | None = None
    ignore_index: int | None = None


_NO_FN = object()


def token_options(function: str, *, temperature, shift=False, fn=_NO_FN,
                  ignore_index=None) -> TokenOptions:
    """The options of the token functions, validated once (``fn`` when ``function`` takes one).

    ``fn`` is checked only to be callable here; what it returns, one float per
    position, is checked on shapes with the positions (``_positions.objective_rows``).
    """
    if fn is not _NO_FN and not callable(fn):
        raise TypeError(f"fn must be a function of (stats, *args), got {type(fn).__name__}")
    return TokenOptions(
        temperature=parse_temperature(temperature),
        shift=parse_shift(shift, function),
        fn=None if fn is _NO_FN else fn,
        ignore_index=static_int(ignore_index, "ignore_index"),
    )


class DistillationOptions(NamedTuple):
    """Validated options of ``distillation_loss``; the floats may be traced scalars."""

    reduction: str
    shift: int
    divergence: str
    beta: Any
    temperature: Any
    hard_weight: Any
    topk_mode: str  # checked for every teacher, used by a TopK
    ignore_index: int | None

    def core_options(self) -> dict:
        """The keyword options of ``distillation_core`` (``topk_core`` adds ``topk_mode``)."""
        return dict(divergence=self.divergence, beta=self.beta, temperature=self.temperature,
                    hard_weight=self.hard_weight)


def distillation_options(
    *, reduction, shift, divergence, beta, temperature, hard_weight, topk_mode, ignore_index,
    has_targets: bool,
) -> DistillationOptions:
    """Validate the options of ``distillation_loss`` once, for the dense and fused paths.

    ``"jsd"`` is ``β·KL(t‖m) + (1 − β)·KL(s‖m)`` with ``m = β·t + (1 − β)·s``:
    as ``β → 0`` it tends to ``β·KL(t‖s)`` (forward, ``"kl"``) and as
    ``β → 1`` to ``(1 − β)·KL(s‖t)`` (reverse, ``"reverse_kl"``).
    """
    reduction = parse_reduction(reduction)
    shift = parse_shift(shift, "distillation_loss")
    check_option(divergence, "divergence", DIVERGENCES)
    if divergence == "jsd":
        beta = float_option(
            beta, "beta", 'a float in the open interval (0, 1) for divergence="jsd" (beta -> 0 '
            'tends to beta * "kl", the forward KL(t||s), and beta -> 1 to (1 - beta) * '
            '"reverse_kl", KL(s||t); pass those divergences instead)', lambda v: (0 < v) & (v < 1),
        )
    hard_weight = float_option(
        hard_weight, "hard_weight", "a float in [0, 1]", lambda v: (0 <= v) & (v <= 1)
    )
    if not has_targets and not is_static(hard_weight, 0.0):
        raise ValueError(
            f"hard_weight={hard_weight!r} weights a cross-entropy on targets, but targets is "
            "None; pass targets= (integer token ids of the positions' shape) or hard_weight=0"
        )
    return DistillationOptions(
        reduction, shift, divergence, beta, parse_temperature(temperature), hard_weight,
        topk_mode=check_option(topk_mode, "topk_mode", TOPK_MODES,
                               hint={"renormalise": "renormalize"}),
        ignore_index=static_int(ignore_index, "ignore_index"),
    )
