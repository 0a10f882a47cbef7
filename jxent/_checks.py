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
