"""Argument and shape validation, with the error wording shared by every module.

Everything here runs at trace time on static information (shapes, dtypes and
plain Python options) or, for the value checks, only on concrete (eager)
arrays: inside ``jit`` a value check cannot raise, and the functions document
what they return instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("tokens", "sequences", "sum", "none")


def is_concrete(*xs: Any) -> bool:
    """True when none of ``xs`` is a tracer, i.e. values can be inspected now."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def float_dtype(*dtypes) -> jnp.dtype:
    """The dtype a computation runs in: float32, or float64 under ``jax_enable_x64``.

    bf16 and f16 are upcast to float32 (DESIGN: low precision is computed and
    returned in float32). Under x64, float64 wins, and integer-only inputs take
    the default float type (float64), as ``jnp.asarray(1) * 1.0`` would.
    """
    if not jax.config.jax_enable_x64:
        return jnp.dtype(jnp.float32)
    dtypes = [jnp.dtype(d) for d in dtypes]
    if any(d == jnp.float64 for d in dtypes) or not any(
        jnp.issubdtype(d, jnp.inexact) for d in dtypes
    ):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def as_float_array(x: Any, name: str, dtype=None) -> jax.Array:
    """``x`` as a real floating array (integers accepted, complex rejected)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if dtype is None:
        dtype = float_dtype(x.dtype)
    return x.astype(dtype)


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


def to_base(value: jax.Array, log_base: float | None) -> jax.Array:
    return value if log_base is None else value / log_base


def check_axis(axis: Any, ndim: int, name: str = "axis", arg: str = "logits") -> int:
    """Normalise ``axis`` to a non-negative int, with a clear error when out of range."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name}={axis} is out of range for {arg} with {ndim} dimension(s); "
            f"expected -{ndim} <= {name} < {ndim}"
        )
    return int(axis) % ndim


def check_option(value: Any, name: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(v) for v in valid)}; got {value!r}"
        )
    return value


def _static_float(value: Any, name: str, expected: str) -> float:
    """``value`` as a Python float: options are static, never traced."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float ({expected}), got a traced value")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {value!r}") from None


def _float_or_traced(value: Any, name: str, expected: str):
    """A Python float, or a traced real scalar (a schedule under ``jit``).

    Concrete values (Python numbers, NumPy scalars, concrete 0-d arrays) come
    back as Python floats, so the common path stays static and specialised;
    a tracer comes back as a float32/float64 scalar array, and its range can
    only be checked by the caller when it is concrete.
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
    return _static_float(value, name, expected)


def is_static_zero(value: Any) -> bool:
    """True for a Python float equal to 0 (a traced value may be anything)."""
    return isinstance(value, float) and value == 0.0


def check_fraction(value: Any, name: str, *, traced: bool = False):
    """A float in ``[0, 1]``; with ``traced=True`` a traced scalar is accepted as it is."""
    if traced:
        v = _float_or_traced(value, name, "a float in [0, 1]")
        if not isinstance(v, float):
            return v
    else:
        v = _static_float(value, name, "a float in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def check_nonnegative_float(value: Any, name: str, *, traced: bool = False):
    """A finite float ``>= 0``; with ``traced=True`` a traced scalar is accepted as it is."""
    if traced:
        v = _float_or_traced(value, name, "a non-negative float")
        if not isinstance(v, float):
            return v
    else:
        v = _static_float(value, name, "a non-negative float")
    if not (v >= 0.0) or math.isinf(v):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return v


def check_softcap(value: Any) -> float | None:
    if value is None:
        return None
    v = _static_float(value, "logit_softcap", "None or a float > 0")
    if not (v > 0.0) or math.isinf(v):
        raise ValueError(f"logit_softcap must be None or a finite float > 0, got {value!r}")
    return v


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


def as_integer_ids(x: Any, name: str) -> jax.Array:
    """``x`` as a JAX array, refusing integers that the conversion would wrap.

    Without ``jax_enable_x64`` JAX stores integers as int32: an int64 NumPy
    array holding ``2**32 + 3`` would silently become class 3. Such values are
    caught here, before the conversion, with the value and its position.
    """
    if isinstance(x, jax.Array):
        return x
    arr = np.asarray(x)
    if (
        not jax.config.jax_enable_x64
        and arr.size
        and np.issubdtype(arr.dtype, np.integer)
        and arr.dtype.itemsize > 4
    ):
        info = np.iinfo(np.int32)
        bad = (arr > info.max) | (arr < info.min)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0]) if arr.ndim else ()
            value = int(arr[where] if arr.ndim else arr)
            raise ValueError(
                f"{name} holds {value} at position {where}, outside the int32 range JAX "
                f"uses while jax_enable_x64 is off: it would silently wrap to "
                f"{int(np.int64(value).astype(np.int32))}. Class ids must be small "
                f"non-negative integers ({int(bad.sum())} such value(s) in all)"
            )
    return jnp.asarray(arr)


def check_broadcastable(a_shape, b_shape, a_name: str, b_name: str) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(tuple(a_shape), tuple(b_shape)))
    except ValueError:
        raise ValueError(
            f"{a_name} has shape {tuple(a_shape)} and {b_name} has shape {tuple(b_shape)}, "
            "which do not broadcast together"
        ) from None


def check_where(where: Any, shape: tuple[int, ...], name: str, against: str) -> jax.Array | None:
    """A boolean mask that broadcasts to ``shape`` (for the information functions)."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"where must be a boolean array (True = counted), got dtype {where.dtype}; "
            "use `where=mask.astype(bool)`"
        )
    try:
        out = np.broadcast_shapes(where.shape, tuple(shape))
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"where has shape {where.shape}, which does not broadcast to {against} "
            f"shape {tuple(shape)}"
        )
    return jnp.broadcast_to(where, shape)


def check_probabilities(x: jax.Array, name: str) -> None:
    """Eager-only check that probabilities lie in ``[0, 1]`` (NaN is let through)."""
    if is_concrete(x):
        arr = np.asarray(x)
        bad = (arr < 0) | (arr > 1)
        if arr.size and np.any(bad):
            value = arr[bad].ravel()[0]
            raise ValueError(
                f"{name} must hold probabilities in [0, 1], but it contains {value!r}; "
                "inputs are not renormalised or clipped"
            )


def check_loss_mask(where: Any, target_shape: tuple[int, ...]) -> jax.Array | None:
    """A position mask for the losses: boolean, exactly the targets' shape."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"where must be a boolean array (True = counted), got dtype {where.dtype}; "
            "use `where=mask.astype(bool)`"
        )
    if where.shape != tuple(target_shape):
        raise ValueError(
            f"where has shape {where.shape} but the targets' positions have shape "
            f"{tuple(target_shape)}; a loss mask marks whole positions"
        )
    return where


def check_class_weights(class_weights: Any, num_classes: int, what: str) -> jax.Array | None:
    if class_weights is None:
        return None
    w = jnp.asarray(class_weights)
    if not jnp.issubdtype(w.dtype, jnp.floating) and not jnp.issubdtype(w.dtype, jnp.integer):
        raise TypeError(f"class_weights must be a real array, got dtype {w.dtype}")
    if w.shape != (num_classes,):
        raise ValueError(
            f"class_weights has shape {w.shape} but {what} has {num_classes} classes; "
            f"expected ({num_classes},)"
        )
    return w


def integer_targets_info(targets: jax.Array, num_classes: int, ignore_index: int | None):
    """Split integer targets into (index for the gather, ignored mask, in-range mask).

    The comparisons run in the targets' own dtype (no wrap-around of large or
    negative values). ``index`` is int32: the class for in-range targets and
    ``num_classes`` (one past the end, so a gather in ``"fill"`` mode gives NaN
    and ``checkify`` flags it) for out-of-range ones; never a wrapped class.
    """
    info = jnp.iinfo(targets.dtype)
    if ignore_index is not None and info.min <= ignore_index <= info.max:
        ignored = targets == jnp.asarray(ignore_index, targets.dtype)
    else:
        ignored = jnp.zeros(targets.shape, bool)
    if num_classes <= info.max:
        below = targets < jnp.asarray(num_classes, targets.dtype)
    else:
        below = jnp.ones(targets.shape, bool)
    in_range = below & (targets >= 0) if info.min < 0 else below
    index = jnp.where(in_range, targets, 0).astype(jnp.int32)
    index = jnp.where(in_range, index, jnp.int32(num_classes))
    return index, ignored, in_range


def check_targets_in_range(
    targets, counted, in_range, num_classes: int, ignore_index, name: str = "targets"
) -> None:
    """Eager-only: counted targets must be valid classes."""
    if not is_concrete(targets, counted):
        return
    bad = np.asarray(counted) & ~np.asarray(in_range)
    if bad.any():
        values = np.asarray(targets)[bad]
        hint = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        raise ValueError(
            f"{name} must be class indices in [0, {num_classes}){hint}; "
            f"got {int(values.ravel()[0])} at position {tuple(int(i) for i in np.argwhere(bad)[0])}"
            f" ({int(bad.sum())} out-of-range target(s) in all)"
        )


def _float_option(value: Any, name: str, expected: str, ok) -> Any:
    """A Python float checked with ``ok``, or a traced real scalar (range unchecked)."""
    v = _float_or_traced(value, name, expected)
    if isinstance(v, float) and not ok(v):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return v


def parse_temperature(temperature: Any) -> Any:
    """``temperature`` as a finite Python float > 0, or a traced scalar."""
    return _float_option(
        temperature, "temperature", "a finite float > 0", lambda v: 0 < v < math.inf
    )


def float_logits(logits: Any, name: str) -> jax.Array:
    """``logits`` as a floating array with a class axis (dtype kept; cores upcast)."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array of logits, got dtype {logits.dtype}"
        )
    if logits.ndim == 0:
        raise ValueError(f"{name} is a scalar; it needs a class axis (the last one)")
    return logits


def class_ids(
    ids: Any,
    where: Any,
    position_shape: tuple[int, ...],
    ops,
    *,
    name: str,
    ignore_index: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Validate integer class ids and the mask; return ``(index, counted)``, both ``[positions]``.

    ``index`` is int32: the class id where counted and in range, ``num_classes``
    where counted and out of range (the cores then give NaN), 0 elsewhere.
    Out-of-range counted ids raise ``ValueError`` when the values are concrete
    and the vocabulary is not sharded. ``ops`` is the ``ClassOps`` of the
    logits (it knows the global number of classes under ``vocab_axis_name``).
    """
    ids = as_integer_ids(ids, name)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"{name} must hold integer token ids, got dtype {ids.dtype}; "
            f"use `{name}.astype(jnp.int32)`"
        )
    if ids.shape != tuple(position_shape):
        raise ValueError(
            f"{name} has shape {ids.shape} but the logits' positions have shape "
            f"{tuple(position_shape)} ([...] for logits [..., V])"
        )
    ignore_index = static_int(ignore_index, "ignore_index")
    mask = check_loss_mask(where, position_shape)
    num_classes = ops.num_classes
    index, ignored, in_range = integer_targets_info(ids, num_classes, ignore_index)
    counted = ~ignored if mask is None else mask & ~ignored
    if ops.axis_name is None:
        check_targets_in_range(ids, counted, in_range, num_classes, ignore_index, name=name)
    return jnp.where(counted, index, 0), counted
