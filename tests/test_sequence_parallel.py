"""Sequence (context) parallelism under plain ``jit``: tokens split along ``T`` (issue 25.2).

``hidden [B, T, D]`` and ``tokens [B, T]`` placed with ``P(None, "seq")``
(alone, with a data axis, with the vocabulary split too), Auto and Explicit
axes, shifts 0, 1 and 2, with ``where``, ``segment_ids``, ``weights`` and
``ignore_index``, dense and fused: the token-level functions' values and
gradients equal one device, the gradients keep their inputs' layout, and the
compiled program gathers nothing: targets and masks cross the shard borders
by collective-permutes of ``k`` columns, and each device's chunk loop covers
its own positions.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent._testing import assert_close, collectives

B, T, D, V, CHUNK = 2, 32, 16, 64, 4

# name: (mesh shape, axis names, hidden spec, kernel spec)
LAYOUTS = {
    "seq": ((8,), ("seq",), P(None, "seq"), P()),
    "data+seq": ((2, 4), ("data", "seq"), P("data", "seq"), P()),
    "seq+vocab": ((4, 2), ("seq", "vocab"), P(None, "seq"), P(None, "vocab")),
}


def _data():
    k = jax.random.split(jax.random.key(11), 7)
    tokens = jax.random.randint(k[2], (B, T), 0, V).at[0, 5].set(-100)
    segments = jnp.cumsum(jax.random.bernoulli(k[3], 0.15, (B, T)), axis=1)
    return {
        "h": jax.random.normal(k[0], (B, T, D)),
        "ht": jax.random.normal(k[1], (B, T, D)),
        "K": jax.random.normal(k[4], (D, V)) / 4,
        "tokens": tokens,
        "segments": segments.astype(jnp.int32),
        "where": jax.random.bernoulli(k[5], 0.9, (B, T)),
        "weights": jax.random.uniform(k[6], (B, T), minval=0.5, maxval=1.5),
    }


def _everything(h, ht, kernel, tokens, segments, where, weights, *, shift, fused):
    """Every token-level function with every option: a scalar to differentiate, and outputs."""
    lg = (lambda x: jxent.LinearLogits(x, kernel, chunk_size=CHUNK)) if fused else (
        lambda x: x @ kernel)
    mask = dict(where=where, segment_ids=segments, shift=shift)
    nll = jxent.sequence_nll(lg(h), tokens, weights=weights, normalize="none", **mask)
    stats = jxent.token_stats(lg(h), tokens, **mask)
    objective = jxent.token_objective(
        lg(h), tokens, lambda s: s.log_prob + 0.1 * s.entropy, **mask)
    totals = jxent.nll_stats(lg(h), tokens, weights=weights, **mask)
    distill = jxent.distillation_loss(lg(h), lg(ht), divergence="jsd", reduction="none", **mask)
    loss = (jnp.sum(nll) + jnp.sum(stats.entropy) + objective + totals.total
            + jnp.sum(distill))
    return loss, (nll, stats.log_prob, stats.entropy, distill, totals.count)


def _program(fused, shift):
    f = functools.partial(_everything, shift=shift, fused=fused)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 2), has_aux=True))


def _args(x):
    return (x["h"], x["ht"], x["K"], x["tokens"], x["segments"], x["where"], x["weights"])


@functools.cache
def _reference(fused, shift):
    with jax.default_device(jax.devices()[0]):
        return _program(fused, shift)(*_args(_data()))


def _case(layout, axis_type, fused, shift):
    shape, names, hidden_spec, kernel_spec = LAYOUTS[layout]
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    x = _data()
    rows = P(*hidden_spec[:2])
    args = (put(x["h"], hidden_spec), put(x["ht"], hidden_spec), put(x["K"], kernel_spec),
            *(put(x[n], rows) for n in ("tokens", "segments", "where", "weights")))
    program = _program(fused, shift)
    with jax.set_mesh(mesh):
        got = program(*args)
        hlo = program.lower(*args).compile().as_text()
    return mesh, got, hlo


# (layout, shift, axis type, fused): every shift fused on both axis types, each
# other layout once per axis type, the dense path once per axis type.
CASES = (
    [("seq", k, t, True) for k in (0, 1, 2) for t in (AxisType.Auto, AxisType.Explicit)]
    + [("data+seq", 2, AxisType.Explicit, True), ("data+seq", 1, AxisType.Auto, True),
       ("seq+vocab", 1, AxisType.Auto, True), ("seq+vocab", 2, AxisType.Explicit, True),
       ("seq", 2, AxisType.Auto, False), ("seq", 1, AxisType.Explicit, False)]
)
PARAMS = [
    pytest.param(layout, axis_type, fused, shift, marks=pytest.mark.slow,
                 id=f"{layout}-shift{shift}-{axis_type.name}-{'fused' if fused else 'dense'}")
    for layout, shift, axis_type, fused in CASES
]


@pytest.mark.parametrize(("layout", "axis_type", "fused", "shift"), PARAMS)
def test_sequence_sharded_equals_one_device(layout, axis_type, fused, shift):
    mesh, got, hlo = _case(layout, axis_type, fused, shift)
    assert_close(got, _reference(fused, shift), rtol=1e-5, label=f"{layout} shift={shift}")
    hidden_spec = LAYOUTS[layout][2]
    d_hidden, d_kernel = got[1]
    assert tuple(d_hidden.sharding.spec)[:2] == tuple(hidden_spec)[:2], d_hidden.sharding
    found = collectives(hlo)
    gathers = [c for c in found if c.op == "all-gather"]
    assert not any(D in s or V in s for c in gathers for s in c.shapes), gathers
    permutes = [s for c in found if c.op == "collective-permute" for s in c.shapes]
    assert all(s[-1] == shift for s in permutes), permutes  # k columns of tokens and masks
    if fused:
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
        split = np.prod([sizes[a] for e in hidden_spec if e for a in ((e,) if isinstance(e, str)
                                                                      else e)])
        per_device = B * T // split
        trips = [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)]
        assert -(-per_device // CHUNK) in trips, trips
