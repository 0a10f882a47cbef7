"""``shard_map`` bookkeeping for the fused losses: which mesh axes a value varies along.

Inside ``jax.shard_map`` (with ``check_vma=True``, the default) JAX tracks, for
every value, the manual mesh axes along which it differs between devices. A
loop carry must start with the variance of what the loop body writes into
it, and a cotangent must have the variance of its primal: a value replicated
along an axis (``hidden`` over the vocabulary shards, ``kernel`` over the data
shards) was used by every shard, so its cotangent is the sum of the shards'
parts. Outside ``shard_map`` every helper here is the identity.
"""

from __future__ import annotations

import jax


def varying_axes(x) -> frozenset:
    """The manual mesh axes along which ``x`` (a value or an aval) varies."""
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    axis_type = getattr(aval, "manual_axis_type", None)
    if axis_type is not None:
        return frozenset(axis_type.varying)
    return frozenset(getattr(aval, "vma", ()))


def make_varying(x, axes):
    """``x`` marked as varying along ``axes`` (those it does not vary along yet)."""
    missing = tuple(sorted(frozenset(axes) - varying_axes(x)))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


def carry_init(body, init):
    """``init`` with the mesh variance of what ``body(i, carry)`` writes into it.

    Inside ``shard_map`` a carry that starts as invariant zeros but is updated
    with shard-dependent values must be marked varying from the start, which
    takes one more trace of the body; outside it, ``init`` as it is. The
    caller runs ``jax.lax.fori_loop(0, num, body, carry_init(body, init))``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Manual not in mesh.axis_types:
        return init
    out = jax.eval_shape(lambda carry: body(0, carry), init)
    return jax.tree.map(lambda z, o: make_varying(z, varying_axes(o)), init, out)


def loop(num: int, body, init):
    """``fori_loop(0, num, body, init)`` whose carries start with the body's mesh variance."""
    return jax.lax.fori_loop(0, num, body, carry_init(body, init))


def cotangent_like(ct, primal):
    """Give ``primal``'s mesh variance to its cotangent, summing over the axes it drops."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
    if extra:
        ct = jax.lax.psum(ct, extra)
    return make_varying(ct, varying_axes(primal))
