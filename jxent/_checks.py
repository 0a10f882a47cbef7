"""Array validation shared by every module: dtypes, shapes, masks, probabilities.

Everything here runs at trace time on static information (shapes and dtypes)
or, for the value checks, only on concrete (eager) arrays: inside ``jit`` a
value check cannot raise, and the functions document what they return instead.
Options (non-array arguments) are parsed in ``jxent._options``; the alignment
of targets with positions is ``jxent._positions``.
"""

from __future__ import annotations

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
