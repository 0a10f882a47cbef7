"""Array validation shared by every module: dtypes, shapes, masks, probabilities,
class ids, a stored teacher's entries, ``token_objective``'s ``args``.

Everything here runs at trace time on static information (shapes and dtypes)
or, for the value checks, only on concrete (eager) arrays: inside ``jit`` a
value check cannot raise, and the functions document what they return instead.
Options (non-array arguments) are parsed in ``jxent._options``; the alignment
of targets with positions is ``jxent._positions``, whose builders call the
checks here.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


def boolean_mask(where: Any) -> jax.Array:
    """``where`` as a boolean array (True = counted); any other dtype is refused."""
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"where must be a boolean array (True = counted), got dtype {where.dtype}; "
            "use `where=mask.astype(bool)`"
        )
    return where


def check_where(where: Any, shape: tuple[int, ...], name: str, against: str) -> jax.Array | None:
    """A boolean mask that broadcasts to ``shape`` (for the information functions)."""
    if where is None:
        return None
    where = boolean_mask(where)
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


def floating_array(x: Any, name: str, what: str = "a floating-point array") -> jax.Array:
    """``x`` as a JAX array of a floating dtype (kept as it is); else a ``TypeError``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be {what}, got dtype {x.dtype}")
    return x


def float_logits(logits: Any, name: str) -> jax.Array:
    """``logits`` as a floating array with a class axis (dtype kept; cores upcast)."""
    logits = floating_array(logits, name, "a floating-point array of logits")
    if logits.ndim == 0:
        raise ValueError(f"{name} is a scalar; it needs a class axis (the last one)")
    return logits


def integer_ids(ids: Any, name: str, owner: str, what: str = "class ids") -> jax.Array:
    """``ids`` as an integer JAX array (see :func:`as_integer_ids`); ``owner`` opens the error."""
    ids = as_integer_ids(ids, name)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        opening = f"{owner}: " if owner else ""
        raise TypeError(
            f"{opening}{name} must be integer {what}, got dtype {ids.dtype} with shape "
            f"{ids.shape}; convert them with {name}.astype(jnp.int32)"
        )
    return ids


def in_class_range(ids: jax.Array, num_classes: int) -> jax.Array:
    """``0 <= ids < num_classes``, compared in the ids' own dtype (nothing wraps)."""
    info = jnp.iinfo(ids.dtype)
    ok = ids >= 0 if info.min < 0 else jnp.ones(ids.shape, bool)
    if num_classes <= info.max:
        ok = ok & (ids < jnp.asarray(num_classes, ids.dtype))
    return ok


def target_shape_error(targets, shape, axis: int, given_axis: int, position_shape) -> Exception:
    """The most useful message for targets whose shape or dtype does not fit the logits."""
    ndim = len(shape)
    integer = jnp.issubdtype(targets.dtype, jnp.integer)
    if integer and targets.shape == shape:
        return ValueError(
            f"targets is an integer array ({targets.dtype}) with the logits' shape {shape}: "
            "probabilities (e.g. one-hot) need a floating dtype (targets.astype(jnp.float32)); "
            f"class ids have shape {position_shape} (jnp.argmax(targets, axis={given_axis}))"
        )
    if integer and ndim >= 3 and axis == ndim - 1:
        if targets.shape == shape[:1] + shape[2:]:
            return ValueError(
                f"targets has shape {targets.shape} and logits {shape}: this is PyTorch's "
                "[N, C, d1, ...] layout with the classes on axis 1; pass axis=1 (with "
                f"axis={given_axis} the targets would need shape {position_shape})"
            )
    if not integer and targets.shape == position_shape:
        return TypeError(
            f"targets has floating dtype {targets.dtype} and shape {targets.shape}, the shape "
            "of class ids: class ids must be integers (targets.astype(jnp.int32)); "
            f"probability targets would have the logits' shape {shape}"
        )
    if integer:
        return ValueError(
            f"targets has shape {targets.shape} but logits {shape} with axis={given_axis} "
            f"expects {position_shape} (integer class indices), or {shape} (probabilities, "
            "floating dtype)"
        )
    return ValueError(
        f"targets has shape {targets.shape} but probability targets must have the logits' "
        f"shape {shape}; integer class indices would have shape {position_shape}"
    )


# --------------------------------------------------------------------------- class ids


def class_index(ids: jax.Array, in_range: jax.Array, num_classes: int) -> jax.Array:
    """``ids`` as an int32 gather index: ``num_classes`` (one past the end) where not
    ``in_range``, so a gather in ``"fill"`` mode gives NaN there, never a wrapped class."""
    index = jnp.where(in_range, ids, 0).astype(jnp.int32)
    return jnp.where(in_range, index, jnp.int32(num_classes))


def check_class_range(ids, in_range, counted, num_classes: int, name: str, *, check: bool,
                      hint: str = "", noun: str = "target(s)") -> None:
    """Eager: a ``ValueError`` naming the first counted id outside ``[0, num_classes)``.

    ``counted`` None counts every position. Nothing is checked when not ``check``
    (the ids are global and this is one shard of the vocabulary) or under ``jit``
    (the gather index of such an id gives NaN instead: :func:`class_index`).
    """
    if not (check and is_concrete(ids, in_range, counted)):
        return
    bad = ~np.asarray(in_range)
    if counted is not None:
        bad = np.asarray(counted) & bad
    if bad.any():
        raise ValueError(
            f"{name} must be class indices in [0, {num_classes}){hint}; got "
            f"{int(np.asarray(ids)[bad].ravel()[0])} at position "
            f"{tuple(int(i) for i in np.argwhere(bad)[0])} ({int(bad.sum())} out-of-range "
            f"{noun} in all)"
        )


# Σ exp(log_probs) of a stored teacher may exceed 1 by this much (rounding) before it is an error.
MASS_TOLERANCE = 1e-3


def _first_bad(bad, what: str, ids, log_probs) -> ValueError:
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    stored = np.asarray(ids)[where].tolist()
    lp = np.round(np.asarray(log_probs, np.float64)[where], 4).tolist()
    return ValueError(
        f"teacher (TopK) {what} at position {where} of {bad.shape} (ids {stored}, "
        f"log_probs {lp}; {int(np.sum(bad))} such position(s) in all); entries at -inf "
        "log-prob are padding"
    )


def stored_entries(ids, log_probs, counted, num_classes: int, check: bool):
    """``(index, log_probs, bad)``: a stored teacher's ``[P, k]`` entries checked.

    ``index`` int32: the id of each finite entry, ``num_classes`` for a finite
    entry out of range (:func:`class_index`), 0 for padding (``−inf``).
    ``log_probs`` in the computation's dtype, without gradient. ``bad`` ``[P]``:
    counted positions with an id out of range, duplicate finite ids, or stored
    mass above ``1 + MASS_TOLERANCE``; a ``ValueError`` for them when ``check``
    and concrete.
    """
    log_probs = jax.lax.stop_gradient(log_probs)
    finite = log_probs != -jnp.inf  # NaN is an entry (it propagates), −inf is padding
    in_range = in_class_range(ids, num_classes)
    index = jnp.where(finite, class_index(ids, in_range, num_classes), 0)
    # Duplicates: sort the finite in-range ids; every other entry gets its own negative key.
    key = jnp.where(finite & in_range, index, -1 - jnp.arange(ids.shape[-1], dtype=jnp.int32))
    key = jnp.sort(key, axis=-1)
    dup = jnp.any(key[..., 1:] == key[..., :-1], axis=-1)
    oob = jnp.any(finite & ~in_range, axis=-1)
    lp = log_probs.astype(float_dtype(log_probs.dtype))
    mass = jax.nn.logsumexp(jnp.where(finite, lp, -jnp.inf), axis=-1)
    over = mass > math.log1p(MASS_TOLERANCE)
    if check and is_concrete(counted, oob, dup, over, mass):
        for bad, what in (
            (oob, f"has an id outside [0, {num_classes})"),
            (dup, "stores the same id twice"),
            (over, f"stores more than probability 1 + {MASS_TOLERANCE} (Σ exp(log_probs) = "
                   f"{float(np.exp(np.max(np.where(np.asarray(counted), mass, -np.inf)))):.6g})"),
        ):
            bad = np.asarray(counted) & np.asarray(bad)
            if bad.any():
                raise _first_bad(bad, what, ids, log_probs)
    return index, lp, counted & (oob | dup | over)


# --------------------------------------------------------------------------- position arrays


def position_array(x, shape, name: str, kind: str, function: str):
    """``x`` (None passes) checked as an ``kind`` (``"integer"``, ``"floating"``) array of
    the tokens' ``shape``."""
    if x is None:
        return None
    x = as_integer_ids(x, name) if kind == "integer" else jnp.asarray(x)
    ok = jnp.issubdtype(x.dtype, jnp.integer if kind == "integer" else jnp.floating)
    if not ok:
        raise TypeError(f"{function}: {name} must be {kind} [..., T], got dtype {x.dtype}")
    if x.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {x.shape} but tokens has shape {tuple(shape)}; {name} "
            "marks token positions [..., T]"
        )
    return x


def class_weight_array(weights: Any, num_local: int, of: str) -> jax.Array | None:
    """``class_weights`` (None passes) as a ``[V]`` real array; ``of`` names what has
    the ``num_local`` classes (``"logits"``, ``"this shard of kernel"``)."""
    if weights is None:
        return None
    w = jnp.asarray(weights)
    if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
        raise TypeError(f"class_weights must be a real array, got dtype {w.dtype}")
    if w.shape != (num_local,):
        raise ValueError(
            f"class_weights has shape {w.shape} but {of} has {num_local} classes; "
            f"expected ({num_local},)"
        )
    return w


def predicted_args(args: Any, shape: tuple, predicted: tuple, shift: int) -> tuple:
    """``token_objective``'s ``args`` broadcast to the ``predicted`` positions.

    Each argument has the rank of the predicted positions (``[..., T − k]``,
    what ``token_stats`` returns), with size-1 axes broadcasting (``[B, 1]``
    per sequence, ``[1, T − k]`` per position), or is a scalar; ``shape`` is
    the tokens' (``[..., T]``), named in the error when an argument has it.
    No gradient flows to them.
    """
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of arrays, got {type(args).__name__}")
    out = []
    for k, a in enumerate(args):
        a = jax.lax.stop_gradient(jnp.asarray(a))
        if a.ndim and (a.ndim != len(predicted) or not _broadcasts(a.shape, predicted)):
            raise ValueError(
                f"args[{k}] has shape {a.shape}, which does not broadcast to the predicted "
                f"positions {predicted}{_args_hint(a, k, shape, predicted, shift)}"
            )
        out.append(jnp.broadcast_to(a, predicted))
    return tuple(out)


def _broadcasts(shape, to) -> bool:
    return all(a in (1, b) for a, b in zip(shape, to, strict=True))


def _args_hint(a, k: int, shape: tuple, predicted: tuple, shift: int) -> str:
    if shift and a.shape == shape:
        return (
            f": that is the tokens' shape, but with shift={shift} args are aligned "
            f"with the predicted positions (what token_stats returns); pass "
            f"args[{k}][..., {shift}:] for values that belong to the target tokens, "
            f"or args[{k}][..., :-{shift}] for values of the predicting positions"
        )
    if a.ndim != len(predicted):
        return (
            f": give it the positions' rank {len(predicted)} (e.g. a[:, None] for one "
            "value per sequence) or pass a scalar"
        )
    return ""


def one_value_per_position(fn, stats, args: tuple, shape: tuple) -> None:
    """``fn(stats, *args)`` must return a float array of ``shape``: checked on shapes
    (``stats`` and ``args`` as ``jax.ShapeDtypeStruct`` or arrays), nothing is run."""
    out = jax.eval_shape(fn, stats, *args)
    got, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if got != tuple(shape) or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"fn(stats, *args) must return a float array of the positions' shape "
            f"{tuple(shape)} (one value per position), got "
            f"{out if got is None else f'shape {got}, dtype {dtype}'}"
        )
