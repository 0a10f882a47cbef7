"""Multi-device checks of the vocab- and data-parallel losses, inside ``shard_map``.

Every check compares a computation on a mesh (``jax.shard_map`` over 4
devices, 8 devices, or a 2 × 4 data × model mesh) with the same computation on
one device: values and gradients to 1e-5. Each ``@check`` function is one
pytest item (``test_<name>``, slow) that runs all its cases and fails listing
every failing case by label. The 8 simulated devices come from
``tests/conftest.py``.

Groups: ``softmax`` (vocab-parallel ``softmax_cross_entropy``, every option
and reduction), ``data`` (data-parallel ``nll_stats`` + ``psum``, and the
two-axis mesh), ``linear`` (vocab-parallel ``linear_cross_entropy``: values,
gradients, compiled HLO and memory), ``fused`` (every function taking
``LinearLogits`` -- ``softmax_cross_entropy``, ``sequence_nll``,
``nll_stats``, ``token_stats``, ``distillation_loss`` -- on a ``vocab`` and a
``data`` × ``vocab`` mesh, with NaN in masked hidden rows), ``topk`` (stored
teachers, ``class_log_probs`` and ``TokenStats.argmax``, vocab-sharded and on
placed arrays), ``errors``.
"""

from __future__ import annotations

import contextlib
import math
import re
import traceback
import zlib
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent._testing import collectives

TOL = 1e-5
FAILURES: list[str] = []


def check(group: str):
    """Make ``fn`` the pytest item ``test_<fn name>`` (slow): every failing case listed by label.

    The function runs its cases one after another (``with case(label):``), so
    one failing case does not hide the next; the item fails naming each.
    """

    def register(fn):
        def test():
            FAILURES.clear()
            fn()
            if FAILURES:
                raise AssertionError(
                    f"{len(FAILURES)} failing case(s) in {group}/{fn.__name__}:\n"
                    + "\n".join(f"--- {failure}" for failure in FAILURES)
                )

        test.__name__ = test.__qualname__ = f"test_{fn.__name__}"
        test.__doc__ = fn.__doc__
        globals()[test.__name__] = pytest.mark.slow(test)
        return fn

    return register


@contextlib.contextmanager
def case(label: str):
    """Record a failure of the block under ``label`` and carry on with the next case."""
    try:
        yield
    except Exception:
        FAILURES.append(f"{label}\n{traceback.format_exc()}")
        print(f"  FAIL {label}", flush=True)


def close(actual, expected, what: str = "") -> None:
    chex.assert_trees_all_close(actual, expected, atol=TOL, rtol=TOL, custom_message=what)


def make_mesh(name: str) -> Mesh:
    """``"4"``, ``"8"``: one ``model`` axis; ``"2x4"``: ``data`` × ``model``."""
    shape = tuple(int(s) for s in name.split("x"))
    names = ("model",) if len(shape) == 1 else ("data", "model")
    devices = np.asarray(jax.devices()[: math.prod(shape)]).reshape(shape)
    return Mesh(devices, names)


MESHES = ("4", "8", "2x4")


def data_axis(mesh: Mesh) -> str | None:
    return "data" if "data" in mesh.axis_names else None


# --------------------------------------------------------------------------- softmax

B, T, V = 4, 3, 32  # logits [B, T, V]; B is split over `data`, V over `model`
REDUCTIONS = ("mean", "sum", "none")


def softmax_inputs(seed: int, blocks: int) -> dict:
    """Seeded logits, class weights, a mask and cotangents for the checks."""
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3 * rng.normal(size=(B, T, V)), jnp.float32)
    mask = jnp.asarray(rng.random((B, T)) < 0.7)
    return {
        "logits": logits,
        # Masked positions hold NaN: they must reach neither value nor gradient.
        "logits_nan": jnp.where(mask[..., None], logits, jnp.nan),
        "mask": mask,
        "weights": jnp.asarray(rng.uniform(0.25, 2.0, V), jnp.float32),
        "ct_none": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        "ct_blocks": jnp.asarray(rng.normal(size=(blocks,)), jnp.float32),
    }


def target_sets(shards: int) -> dict[str, jax.Array]:
    """Integer targets: spread over every shard, all owned by one shard, all ignored."""
    rng = np.random.default_rng(shards)
    spread = rng.integers(0, V, (B, T))
    spread[0, 0] = spread[2, 1] = -100
    local = V // shards
    one_shard = rng.integers(local, 2 * local, (B, T))  # all held by shard 1
    one_shard[1, 2] = -100
    return {
        "spread": jnp.asarray(spread, jnp.int32),
        "one shard": jnp.asarray(one_shard, jnp.int32),
        "all ignored": jnp.full((B, T), -100, jnp.int32),
    }


def softmax_loss(reduction: str, options: dict, axis_name: str | None):
    def loss(x, y, mask, w):
        return jxent.softmax_cross_entropy(
            x,
            y,
            where=mask,
            class_weights=w,
            reduction=reduction,
            vocab_axis_name=axis_name,
            **options,
        )

    return loss


def with_grads(fn, use_weights: bool):
    """``(x, y, mask, w, ct) -> (value, grad of Σ ct·value wrt x (and w))``."""

    def f(x, y, m, w, ct):
        objective = lambda x, w: (jnp.sum(fn(x, y, m, w) * ct), fn(x, y, m, w))
        argnums = (0, 1) if use_weights else 0
        (_, value), grads = jax.value_and_grad(objective, argnums, has_aux=True)(x, w)
        return value, grads

    return f


def on_mesh(mesh: Mesh, reduction: str, options: dict, use_weights: bool, prob: bool):
    """The loss inside ``shard_map``: B over ``data`` (if any), V over ``model``.

    Each data shard reduces its own block of the batch (``[blocks]`` for
    ``"mean"``/``"sum"``, the positions for ``"none"``).
    """
    data = data_axis(mesh)
    x_spec = P(data, None, "model")
    loss = softmax_loss(reduction, options, "model")
    per_block = (lambda out: out) if reduction == "none" else (lambda out: out[None])
    sharded = jax.shard_map(
        lambda x, y, m, w: per_block(loss(x, y, m, w)),
        mesh=mesh,
        in_specs=(x_spec, x_spec if prob else P(data, None), P(data, None), P("model")),
        out_specs=P(data) if reduction != "none" else P(data, None),
    )
    return with_grads(sharded, use_weights)


def on_one_device(blocks: int, reduction: str, options: dict, use_weights: bool):
    """The reference: the plain loss ``vmap``-ed over the same blocks of the batch."""
    loss = softmax_loss(reduction, options, None)

    def blocked(x, y, m, w):
        split = lambda a: None if a is None else a.reshape((blocks, -1) + a.shape[1:])
        out = jax.vmap(lambda x, y, m: loss(x, y, m, w))(split(x), split(y), split(m))
        return out.reshape((B, T)) if reduction == "none" else out

    return with_grads(blocked, use_weights)


SOFTMAX_OPTIONS = {
    "defaults": ({}, False),
    "ignore_index=5": ({"ignore_index": 5}, False),
    "ignore_index=None": ({"ignore_index": None}, False),
    "class_weights": ({}, True),
    "label_smoothing": ({"label_smoothing": 0.2}, False),
    "z_loss": ({"z_loss": 1e-2}, False),
    "logit_softcap": ({"logit_softcap": 4.0}, False),
    "all options": ({"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 6.0}, True),
    # Without the softcap the reductions read the raw logits (NaN where masked).
    "all but softcap": ({"label_smoothing": 0.1, "z_loss": 1e-3}, True),
}
MASKED_CASES = (("defaults", "mean"), ("all but softcap", "none"), ("all options", "none"))


def integer_cases(full: bool) -> list[tuple[str, str, str, bool]]:
    """``(label, option set, reduction, masked)``.

    ``full``: every option × every reduction. Otherwise every option with
    ``"none"`` (the per-position values and, through a random cotangent, the
    whole vector-Jacobian product), and ``"mean"``/``"sum"`` for the defaults
    and all options together. Both add ``MASKED_CASES``: a mask, with NaN
    logits at the masked positions.
    """
    cases = []
    for opt in SOFTMAX_OPTIONS:
        for reduction in REDUCTIONS:
            if full or reduction == "none" or opt in ("defaults", "all options"):
                cases.append((f"{opt}, {reduction}", opt, reduction, False))
    for opt, reduction in MASKED_CASES:
        cases.append((f"{opt}, {reduction}, masked", opt, reduction, True))
    return cases


def integer_args(inputs: dict, targets, opt: str, reduction: str, masked: bool):
    if opt == "ignore_index=5":
        targets = jnp.where(targets == -100, 5, targets)
    elif opt == "ignore_index=None":  # every target counted
        targets = jnp.where(targets == -100, 7, targets)
    x = inputs["logits_nan"] if masked else inputs["logits"]
    m = inputs["mask"] if masked else None
    w = inputs["weights"] if SOFTMAX_OPTIONS[opt][1] else None
    ct = inputs["ct_none"] if reduction == "none" else inputs["ct_blocks"]
    return x, targets, m, w, ct


_REFERENCES: dict = {}


def integer_reference(blocks: int, cases: tuple):
    """One jit over every case (cached: meshes with the same blocks share it)."""
    key = (blocks, cases)
    if key not in _REFERENCES:
        fns = {
            label: on_one_device(blocks, r, SOFTMAX_OPTIONS[o][0], SOFTMAX_OPTIONS[o][1])
            for label, o, r, _ in cases
        }
        _REFERENCES[key] = jax.jit(
            lambda inputs, targets: {
                label: fns[label](*integer_args(inputs, targets, o, r, m))
                for label, o, r, m in cases
            }
        )
    return _REFERENCES[key]


def compare(got: dict, want: dict, prefix: str) -> None:
    for label in want:
        with case(f"{prefix}, {label}"):
            close(got[label], want[label], f"{prefix}, {label}")
            for leaf in jax.tree.leaves(got[label]):
                assert bool(jnp.all(jnp.isfinite(leaf))), f"non-finite result {leaf}"


@check("softmax")
def softmax_integer_targets():
    """Integer targets, every option and reduction, on meshes 4, 8 and 2 × 4.

    Target sets: spread over all shards, all owned by one shard, all ignored
    (then the mean is 0 with zero gradient, on the mesh as on one device).
    Mesh 4 runs every option × reduction; 8 and 2 × 4 the subset of
    ``integer_cases(full=False)``.
    """
    for mesh_name in MESHES:
        mesh = make_mesh(mesh_name)
        blocks = mesh.shape.get("data", 1)
        cases = tuple(integer_cases(full=mesh_name == "4"))
        fns = {label: on_mesh(mesh, r, *SOFTMAX_OPTIONS[o], prob=False) for label, o, r, _ in cases}
        run = jax.jit(
            lambda inputs, targets, fns=fns, cases=cases: {
                label: fns[label](*integer_args(inputs, targets, o, r, m))
                for label, o, r, m in cases
            }
        )
        # Meshes 4 and 8 share one reference: the full case set, sliced.
        reference = integer_reference(blocks, tuple(integer_cases(full=blocks == 1)))
        inputs = softmax_inputs(0, blocks)
        for t_name, targets in target_sets(mesh.shape["model"]).items():
            got, want = run(inputs, targets), reference(inputs, targets)
            compare(got, {label: want[label] for label, *_ in cases}, f"mesh {mesh_name}, {t_name}")
            if t_name == "all ignored":
                for label in ("defaults, mean", "all options, mean"):
                    with case(f"mesh {mesh_name}, all ignored, {label} is 0 with zero gradient"):
                        close(got[label], jax.tree.map(jnp.zeros_like, got[label]))


@check("softmax")
def softmax_probability_targets():
    """Probability targets sharded like the vocabulary, with −inf logits where the target is 0."""
    option_sets = {
        "plain": ({}, False),
        "all options": ({"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 8.0}, True),
    }
    rng = np.random.default_rng(1)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32))
    probs = probs.at[:, :, 3].set(0.0)
    for mesh_name in ("4", "2x4"):
        mesh = make_mesh(mesh_name)
        blocks = mesh.shape.get("data", 1)
        inputs = softmax_inputs(1, blocks)
        inputs["probs"] = probs
        inputs["logits"] = inputs["logits"].at[:, :, 3].set(-jnp.inf)
        # Label smoothing gives a −inf logit target mass ε/C, hence +inf loss, as
        # the math says: there the class gets a very negative finite logit.
        inputs["finite_logits"] = inputs["logits"].at[:, :, 3].set(-30.0)

        def args(inputs, opt, reduction):
            x = inputs["finite_logits"] if opt == "all options" else inputs["logits"]
            w = inputs["weights"] if option_sets[opt][1] else None
            ct = inputs["ct_none"] if reduction == "none" else inputs["ct_blocks"]
            return x, inputs["probs"], inputs["mask"], w, ct

        got, want = {}, {}
        for which, results in (("mesh", got), ("one", want)):
            fns = {
                (o, r): on_mesh(mesh, r, *option_sets[o], prob=True)
                if which == "mesh"
                else on_one_device(blocks, r, *option_sets[o])
                for o in option_sets
                for r in REDUCTIONS
            }
            out = jax.jit(lambda inputs, fns=fns: {k: f(*args(inputs, *k)) for k, f in fns.items()})
            results.update({f"{o}, {r}": v for (o, r), v in out(inputs).items()})
        compare(got, want, f"mesh {mesh_name}, probability targets")


@check("softmax")
def softmax_class_axis_one_and_out_of_range():
    """``axis=1`` (PyTorch layout) sharded on C, check_vma on and off; out-of-range targets."""
    inputs = softmax_inputs(2, 1)
    logits, weights = inputs["logits"], inputs["weights"]
    targets = target_sets(4)["spread"].at[0, 0].set(1)
    mesh = make_mesh("4")
    x = jnp.moveaxis(logits, -1, 1)  # [B, V, T]
    opts = dict(axis=1, label_smoothing=0.1)
    for check_vma in (True, False):
        label = f"axis=1, class_weights, label_smoothing, check_vma={check_vma}"
        with case(label):
            f = jax.shard_map(
                lambda x, t, w: jxent.softmax_cross_entropy(
                    x, t, class_weights=w, vocab_axis_name="model", **opts
                ),
                mesh=mesh,
                in_specs=(P(None, "model", None), P(), P("model")),
                out_specs=P(),
                check_vma=check_vma,
            )
            ref = lambda x, t, w: jxent.softmax_cross_entropy(x, t, class_weights=w, **opts)
            vg = lambda fn: jax.jit(jax.value_and_grad(fn, (0, 2)))(x, targets, weights)
            close(vg(f), vg(ref), label)
    with case("out-of-range target under the mesh is NaN, never a wrapped class"):
        bad = targets.at[0, 0].set(V).at[1, 1].set(-7)
        f = jax.shard_map(
            lambda x, t: jxent.softmax_cross_entropy(
                x, t, reduction="none", vocab_axis_name="model"
            ),
            mesh=mesh,
            in_specs=(P(None, None, "model"), P()),
            out_specs=P(),
        )
        out = jax.jit(f)(logits, bad)
        assert bool(jnp.isnan(out[0, 0])) and bool(jnp.isnan(out[1, 1])), out
        good = jnp.ones((B, T), bool).at[0, 0].set(False).at[1, 1].set(False)
        want = jax.jit(partial(jxent.softmax_cross_entropy, reduction="none"))(logits, targets)
        close(jnp.where(good, out, 0), jnp.where(good, want, 0))


# ------------------------------------------------------------------------------ data


def lm_inputs(batch: int, seed: int = 3, length: int = 6, width: int = 4, vocab: int = 16):
    """A linear LM head over hidden states; per-sequence counted tokens 0, 1, 2, ...

    ``mask[i, t] = t <= i`` with ``shift=True`` counts ``min(i, T - 1)``
    targets in sequence ``i`` (so 0 in the first), and one token is ignored.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length))
    tokens[-2, 3] = -100
    return {
        "hidden": jnp.asarray(rng.normal(size=(batch, length, width)), jnp.float32),
        "tokens": jnp.asarray(tokens, jnp.int32),
        "mask": jnp.arange(length)[None, :] <= jnp.arange(batch)[:, None],
        "kernel": jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.normal(size=(vocab,)), jnp.float32),
        "weights": jnp.asarray(rng.uniform(0.5, 2.0, vocab), jnp.float32),
    }


def head(h, kernel, bias):
    """Logits ``[B, T, V]`` of the linear head (explicit broadcast: rank promotion raises)."""
    return h @ kernel + bias[None, None, :]


LM_OPTIONS = {
    "defaults": ({}, False),
    "all options": ({"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0}, True),
}


def data_model_loss(mesh, options):
    """The global token mean on a ``data`` × ``model`` mesh, written per device.

    ``(h, kernel, bias, weights, tokens, mask) -> loss``: the batch is sharded
    over ``data`` and the vocabulary over ``model``; ``nll_stats`` combines the
    vocabulary shards and a ``psum`` of the stats over ``data`` makes the mean
    exact.
    """

    def local(h, kernel, bias, weights, tokens, mask):
        stats = jxent.nll_stats(
            head(h, kernel, bias),
            tokens,
            where=mask,
            class_weights=weights,
            vocab_axis_name="model",
            **options,
            shift=True,
        )
        return jax.lax.psum(stats, "data").mean()

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("model"), P("model"), P("data"), P("data")),
        out_specs=P(),
    )


def lm_reference(inputs, options, use_weights):
    """The global token mean on one device, and its gradients wrt (hidden, kernel, bias)."""

    def loss(h, kernel, bias):
        return jxent.sequence_nll(
            head(h, kernel, bias),
            inputs["tokens"],
            where=inputs["mask"],
            class_weights=inputs["weights"] if use_weights else None,
            **options,
            shift=True,
        )

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(
        inputs["hidden"], inputs["kernel"], inputs["bias"]
    )


@check("data")
def data_parallel_token_mean():
    """psum of NLLStats over 8 devices with 0, 1, 2, ... counted tokens = the global mean.

    Gradients taken outside ``shard_map``, and inside it (``check_vma=True``
    makes them the global gradient; with ``check_vma=False`` each device holds
    the number of devices times its own share, and a ``pmean`` gives the
    global gradient), and with two micro-batches
    per device accumulated before the ``psum``. The mean of per-device means
    is checked to differ, so the comparison can fail.
    """
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    inputs = lm_inputs(16)
    params = (inputs["kernel"], inputs["bias"])
    for opt_name, (options, use_weights) in LM_OPTIONS.items():
        want_value, want_grads = lm_reference(inputs, options, use_weights)
        weights = inputs["weights"] if use_weights else None

        def stats(kernel, bias, h, tokens, mask, options=options, weights=weights):
            return jxent.nll_stats(
                head(h, kernel, bias),
                tokens,
                where=mask,
                class_weights=weights,
                **options,
                shift=True,
            )

        def global_mean(kernel, bias, h, tokens, mask, stats=stats):
            return jax.lax.psum(stats(kernel, bias, h, tokens, mask), "data").mean()

        def micro_batched(kernel, bias, h, tokens, mask, stats=stats):
            parts = [
                stats(kernel, bias, h[i : i + 1], tokens[i : i + 1], mask[i : i + 1])
                for i in range(h.shape[0])
            ]
            local = jax.tree.map(lambda *xs: sum(xs), *parts)
            return jax.lax.psum(local, "data").mean()

        def inner_grad(fn, check_vma):
            def local(kernel, bias, h, tokens, mask):
                value, grads = jax.value_and_grad(fn, (0, 1))(kernel, bias, h, tokens, mask)
                if not check_vma:
                    # Without vma typing, psum transposes to psum: each device holds
                    # (number of devices) × its own share, so the mean is the total.
                    grads = jax.lax.pmean(grads, "data")
                return value, grads

            return local

        data_specs = (P(), P(), P("data"), P("data"), P("data"))
        args = (*params, inputs["hidden"], inputs["tokens"], inputs["mask"])
        outer = jax.shard_map(global_mean, mesh=mesh, in_specs=data_specs, out_specs=P())
        with case(f"data parallel, {opt_name}, grad outside shard_map"):
            got = jax.jit(jax.value_and_grad(outer, (0, 1, 2)))(*args)
            d_hidden, d_kernel, d_bias = want_grads
            close(got, (want_value, (d_kernel, d_bias, d_hidden)))
        for fn_name, fn in (("psum of stats", global_mean), ("micro-batches", micro_batched)):
            for check_vma in (True, False):
                label = f"data parallel, {opt_name}, {fn_name}, grad inside, check_vma={check_vma}"
                with case(label):
                    run = jax.shard_map(
                        inner_grad(fn, check_vma),
                        mesh=mesh,
                        in_specs=data_specs,
                        out_specs=(P(), P()),
                        check_vma=check_vma,
                    )
                    got = jax.jit(run)(*args)
                    close(got, (want_value, want_grads[1:]))
        with case(f"data parallel, {opt_name}: the mean of means is not the token mean"):
            mean_of_means = jax.shard_map(
                lambda *a: jax.lax.pmean(stats(*a).mean(), "data"),
                mesh=mesh,
                in_specs=data_specs,
                out_specs=P(),
            )
            assert abs(float(jax.jit(mean_of_means)(*args)) - float(want_value)) > 1e-2


@check("data")
def two_axis_mesh():
    """2 × 4 mesh: batch over ``data``, vocabulary over ``model`` (kernel, bias, weights).

    Each device computes ``nll_stats(..., vocab_axis_name="model")`` on its
    block of the batch and its slice of the vocabulary; ``psum`` over
    ``data`` gives the global token mean. Also: plain ``jit`` with the inputs
    placed by ``NamedSharding`` (no ``shard_map``) gives the same numbers.
    """
    mesh = make_mesh("2x4")
    inputs = lm_inputs(4)
    for opt_name, (options, use_weights) in LM_OPTIONS.items():
        want = lm_reference(inputs, options, use_weights)

        loss = data_model_loss(mesh, options)
        weights = inputs["weights"] if use_weights else None
        rest = (weights, inputs["tokens"], inputs["mask"])
        with case(f"2x4 mesh, nll_stats + psum, {opt_name}"):
            objective = lambda h, k, b, loss=loss, rest=rest: loss(h, k, b, *rest)
            got = jax.jit(jax.value_and_grad(objective, (0, 1, 2)))(
                inputs["hidden"], inputs["kernel"], inputs["bias"]
            )
            close(got, want)

        with case(f"2x4 mesh, plain jit with NamedSharding inputs, {opt_name}"):
            place = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
            h = place(inputs["hidden"], "data")
            kernel, bias = place(inputs["kernel"], None, "model"), place(inputs["bias"], "model")

            def plain(h, kernel, bias, options=options, weights=weights):
                return jxent.sequence_nll(
                    head(h, kernel, bias),
                    inputs["tokens"],
                    where=inputs["mask"],
                    class_weights=weights,
                    **options,
                    shift=True,
                )

            got = jax.jit(jax.value_and_grad(plain, (0, 1, 2)))(h, kernel, bias)
            close(got, want)


@check("data")
def explicit_axes_mesh():
    """``jax.make_mesh``'s default Explicit axes: shard_map, and plain jit, on 2 × 4 and data-only.

    With Explicit axes, inputs are placed with ``NamedSharding`` before the
    call. ``shard_map`` + ``vocab_axis_name`` works on the 2 × 4 mesh, and so
    does plain ``jit`` of the vocab-sharded logits (0.3 raised JAX's
    ``ShardingTypeError`` at the target gather; 0.4's engine runs the dense
    core per device, ``jxent._engine._sharding``), and plain ``jit`` when only
    the batch is sharded (every option, class weights included).
    """
    inputs = lm_inputs(8)
    options, _ = LM_OPTIONS["all options"]
    want = lm_reference(inputs, options, use_weights=True)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    place = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    weights, tokens, mask = (
        place(inputs[k], *s)
        for k, s in (("weights", ("model",)), ("tokens", ("data",)), ("mask", ("data",)))
    )
    h = place(inputs["hidden"], "data")
    kernel, bias = place(inputs["kernel"], None, "model"), place(inputs["bias"], "model")

    loss = data_model_loss(mesh, options)
    with case("Explicit 2x4 mesh, shard_map + vocab_axis_name, all options"):
        objective = lambda h, k, b: loss(h, k, b, weights, tokens, mask)
        close(jax.jit(jax.value_and_grad(objective, (0, 1, 2)))(h, kernel, bias), want)

    with case("Explicit 2x4 mesh, plain jit of vocab-sharded logits, all options"):
        plain = lambda h, k, b: jxent.sequence_nll(
            head(h, k, b), tokens, where=mask, class_weights=weights, **options, shift=True
        )
        with jax.set_mesh(mesh):
            close(jax.jit(jax.value_and_grad(plain, (0, 1, 2)))(h, kernel, bias), want)

    data_mesh = jax.make_mesh((8,), ("data",))
    place = lambda x, *spec: jax.device_put(x, NamedSharding(data_mesh, P(*spec)))
    args = (place(inputs["hidden"], "data"), place(inputs["kernel"]), place(inputs["bias"]))
    weights, tokens, mask = (
        place(inputs["weights"]),
        place(inputs["tokens"], "data"),
        place(inputs["mask"], "data"),
    )

    def plain(h, kernel, bias):
        return jxent.sequence_nll(
            head(h, kernel, bias), tokens, where=mask, class_weights=weights, **options, shift=True
        )

    with case("Explicit 8-device data mesh, plain jit, all options"):
        with jax.set_mesh(data_mesh):
            got = jax.jit(jax.value_and_grad(plain, (0, 1, 2)))(*args)
        close(got, want)


# ---------------------------------------------------------------------------- linear

D = 8  # hidden [B, T, D], kernel [D, V], bias [V]; V over `model`, B over `data`


def linear_inputs(seed: int, blocks: int) -> dict:
    rng = np.random.default_rng(seed)
    inputs = softmax_inputs(seed, blocks)
    inputs["hidden"] = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    inputs["kernel"] = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    inputs["bias"] = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    return inputs


def linear_loss(reduction: str, options: dict, axis_name: str | None, fused: bool):
    """The fused loss (``fused``), or the softmax loss of the materialised logits."""

    def loss(h, kernel, bias, y, mask, w):
        common = dict(where=mask, class_weights=w, reduction=reduction, **options)
        if fused:
            return jxent.linear_cross_entropy(
                h, kernel, y, bias=bias, chunk_size=5, vocab_axis_name=axis_name, **common
            )
        logits = h @ kernel + (0 if bias is None else bias[None, None, :])
        return jxent.softmax_cross_entropy(logits, y, **common)

    return loss


def linear_with_grads(fn):
    """``(h, kernel, bias, y, mask, w, ct) -> (value, grads wrt h, kernel and bias)``."""

    def f(h, kernel, bias, y, m, w, ct):
        objective = lambda h, k, b: (jnp.sum(fn(h, k, b, y, m, w) * ct), fn(h, k, b, y, m, w))
        (_, value), grads = jax.value_and_grad(objective, (0, 1, 2), has_aux=True)(h, kernel, bias)
        return value, grads

    return f


def linear_on_mesh(mesh: Mesh, reduction: str, options: dict, check_vma: bool = True):
    data = data_axis(mesh)
    loss = linear_loss(reduction, options, "model", fused=True)
    per_block = (lambda out: out) if reduction == "none" else (lambda out: out[None])
    sharded = jax.shard_map(
        lambda *args: per_block(loss(*args)),
        mesh=mesh,
        in_specs=(
            P(data),  # hidden [B, T, D]
            P(None, "model"),  # kernel [D, V]
            P("model"),  # bias [V]
            P(data),  # targets
            P(data),  # mask
            P("model"),  # class weights
        ),
        out_specs=P(data) if reduction != "none" else P(data, None),
        check_vma=check_vma,
    )
    return linear_with_grads(sharded)


def linear_on_one_device(blocks: int, reduction: str, options: dict):
    """Reference: softmax_cross_entropy of ``hidden @ kernel + bias``, per block of the batch."""
    loss = linear_loss(reduction, options, None, fused=False)

    def blocked(h, kernel, bias, y, m, w):
        split = lambda a: None if a is None else a.reshape((blocks, -1) + a.shape[1:])
        block_loss = lambda h, y, m: loss(h, kernel, bias, y, m, w)
        out = jax.vmap(block_loss)(split(h), split(y), split(m))
        return out.reshape((B, T)) if reduction == "none" else out

    return linear_with_grads(blocked)


def linear_cases() -> list[tuple[str, str, str, bool, bool]]:
    """``(label, option set, reduction, masked, with bias)``.

    Every reduction with the defaults and with all options together (class
    weights, label smoothing, z-loss, softcap): the options' vocab-parallel
    arithmetic is the softmax core's, checked one by one in the ``softmax``
    group; here the fused machinery (chunks, custom VJP, sharded bias, the
    hidden-state gradient) carries them. Plus a custom ``ignore_index`` and a
    mask, without bias.
    """
    cases = [
        (f"{opt}, {reduction}", opt, reduction, False, True)
        for opt in ("defaults", "all options")
        for reduction in REDUCTIONS
    ]
    cases.append(("ignore_index=5, none, no bias", "ignore_index=5", "none", False, False))
    cases.append(("all but softcap, sum, masked, no bias", "all but softcap", "sum", True, False))
    return cases


def linear_args(inputs: dict, targets, opt: str, reduction: str, masked: bool, with_bias: bool):
    _, targets, m, w, ct = integer_args(inputs, targets, opt, reduction, masked)
    h = inputs["hidden"]  # finite: NaN hidden gives NaN kernel gradients in the reference
    bias = inputs["bias"] if with_bias else None
    return h, inputs["kernel"], bias, targets, m, w, ct


@check("linear")
def linear_values_and_gradients():
    """``linear_cross_entropy(vocab_axis_name=...)`` = softmax of the materialised logits.

    Meshes 4, 8 and 2 × 4, the cases of ``linear_cases``, target sets spread /
    one shard / all ignored;
    ``chunk_size=5`` over 12 tokens per block so the chunks overlap at the end.
    Gradients with respect to hidden (psummed over the vocab axis), kernel
    and bias.
    """
    cases = tuple(linear_cases())
    references = {}
    for mesh_name in MESHES:
        mesh = make_mesh(mesh_name)
        blocks = mesh.shape.get("data", 1)
        if blocks not in references:
            fns = {
                c[0]: linear_on_one_device(blocks, c[2], SOFTMAX_OPTIONS[c[1]][0]) for c in cases
            }
            references[blocks] = jax.jit(
                lambda inputs, targets, fns=fns: {
                    c[0]: fns[c[0]](*linear_args(inputs, targets, *c[1:])) for c in cases
                }
            )
        fns = {c[0]: linear_on_mesh(mesh, c[2], SOFTMAX_OPTIONS[c[1]][0]) for c in cases}
        run = jax.jit(
            lambda inputs, targets, fns=fns: {
                c[0]: fns[c[0]](*linear_args(inputs, targets, *c[1:])) for c in cases
            }
        )
        inputs = linear_inputs(4, blocks)
        for t_name, targets in target_sets(mesh.shape["model"]).items():
            got, want = run(inputs, targets), references[blocks](inputs, targets)
            compare(got, want, f"linear, mesh {mesh_name}, {t_name}")


@check("linear")
def linear_without_vma_checks():
    """``check_vma=False`` (no mesh-variance types): the same values and gradients, 2 × 4 mesh."""
    mesh = make_mesh("2x4")
    inputs = linear_inputs(7, 2)
    targets = target_sets(4)["spread"]
    options = SOFTMAX_OPTIONS["all options"][0]
    for reduction in ("mean", "none"):
        with case(f"linear, check_vma=False, all options, {reduction}"):
            sharded = linear_on_mesh(mesh, reduction, options, check_vma=False)
            reference = linear_on_one_device(2, reduction, options)
            ct = inputs["ct_none"] if reduction == "none" else inputs["ct_blocks"]
            args = (inputs["hidden"], inputs["kernel"], inputs["bias"], targets, inputs["mask"])
            args += (inputs["weights"], ct)
            close(jax.jit(sharded)(*args), jax.jit(reference)(*args))


@check("linear")
def linear_communication_and_memory():
    """Compiled program at k = 4 and 8 shards: no all-gather, small all-reduces, 1/k memory.

    The only collectives allowed are all-reduces whose operands have at most
    ``tokens × D`` elements (the ``[tokens]`` max / sum / target-logit vectors
    and the hidden-state gradient) and no vocabulary-sized axis; per-device
    temp memory (``memory_analysis``) is at most 1.5/k of the single-device
    fused path's, for the value and gradients of the mean loss.
    """
    n, d, v, chunk = 384, 64, 4096, 128  # no two of n, d, v/4, v/8 alike
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v)) / 8, jnp.float32)
    bias = jnp.zeros((v,), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    options = dict(chunk_size=chunk, label_smoothing=0.1, z_loss=1e-4)

    def value_and_grads(axis_name):
        loss = lambda h, k, b, t: jxent.linear_cross_entropy(
            h, k, t, bias=b, vocab_axis_name=axis_name, **options
        )
        return jax.value_and_grad(loss, (0, 1, 2))

    with case("the HLO check can fail: it sees an all-gather of the kernel"):
        gather = jax.shard_map(
            lambda k: jnp.sum(jax.lax.all_gather(k, "model", axis=1, tiled=True)),
            mesh=Mesh(np.asarray(jax.devices()[:4]), ("model",)),
            in_specs=P(None, "model"),
            out_specs=P(),
            check_vma=False,
        )
        found = collectives(jax.jit(gather).lower(kernel).compile().as_text())
        assert any(c.op == "all-gather" and (d, v) in c.shapes for c in found), found

    single = jax.jit(value_and_grads(None)).lower(hidden, kernel, bias, targets).compile()
    single_temp = single.memory_analysis().temp_size_in_bytes
    want = single(hidden, kernel, bias, targets)
    for k in (4, 8):
        mesh = Mesh(np.asarray(jax.devices()[:k]), ("model",))
        sharded = jax.shard_map(
            value_and_grads("model"),
            mesh=mesh,
            in_specs=(P(), P(None, "model"), P("model"), P()),
            out_specs=(P(), (P(), P(None, "model"), P("model"))),
        )
        compiled = jax.jit(sharded).lower(hidden, kernel, bias, targets).compile()
        with case(f"linear, {k} shards: same value and gradients"):
            chex.assert_trees_all_close(
                compiled(hidden, kernel, bias, targets), want, atol=1e-4, rtol=1e-4
            )
        with case(f"linear, {k} shards: only small all-reduces in the compiled HLO"):
            found = collectives(compiled.as_text())
            assert found, "expected all-reduces of [tokens] vectors, found no collective"
            for c in found:
                assert c.op == "all-reduce", f"{c.op} of {c.shapes} in the compiled program"
                for shape in c.shapes:
                    assert v not in shape and v // k not in shape, f"vocab-sized {c.op} {shape}"
                    assert math.prod(shape) <= n * d, f"{c.op} of {shape}: more than tokens × D"
        with case(f"linear, {k} shards: temp memory about 1/{k} of one device's"):
            temp = compiled.memory_analysis().temp_size_in_bytes
            print(f"  {k} shards: temp {temp} B per device, one device {single_temp} B")
            assert temp <= 1.5 * single_temp / k, (temp, single_temp)


# ----------------------------------------------------------------------------- fused

FB, FT, FD, FV = 4, 7, 6, 32  # hidden [FB, FT, FD], kernel [FD, FV]; the teacher has FD + 2
# Per data block 14 positions (12 with shift), on one device 28 (24): never a multiple.
FCHUNK = 5
BATCHED = ("hidden", "hidden_nan", "hidden_shift_nan", "t_hidden", "t_hidden_nan")
BATCHED += ("tokens", "ids", "where", "where_shift")


def fused_mesh(name: str) -> Mesh:
    """``"4"``: one ``vocab`` axis; ``"2x4"``: ``data`` × ``vocab``."""
    shape = tuple(int(s) for s in name.split("x"))
    names = ("vocab",) if len(shape) == 1 else ("data", "vocab")
    return Mesh(np.asarray(jax.devices()[: math.prod(shape)]).reshape(shape), names)


def fused_inputs(seed: int = 11) -> dict:
    """Student and teacher heads, tokens, masks, and hidden states with NaN where masked.

    ``where`` masks one whole sequence (2) and scattered positions; ``tokens``
    hold ``-100`` twice. ``hidden_nan`` is NaN at the rows ``where`` masks
    (functions aligned with ``tokens``), ``hidden_shift_nan`` at the rows whose
    shifted target is masked and at the last row (``shift=True``; the last row
    scores nothing); ``where_shift`` is ``where`` moved to those rows.
    ``ids`` are in-range ids for ``token_stats``, some of them the argmax.
    """
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(FB, FT, FD)).astype(np.float32)
    kernel = (rng.normal(size=(FD, FV)) / 2).astype(np.float32)
    bias = rng.normal(size=FV).astype(np.float32)
    t_hidden = rng.normal(size=(FB, FT, FD + 2)).astype(np.float32)
    t_kernel = (rng.normal(size=(FD + 2, FV)) / 2).astype(np.float32)
    tokens = rng.integers(0, FV, (FB, FT)).astype(np.int32)
    tokens[0, 2] = tokens[3, 5] = -100
    where = rng.random((FB, FT)) < 0.75
    where[2] = False
    where[[0, 1, 3], 4] = True
    logits = hidden @ kernel + bias
    ids = np.where(tokens == -100, 1, tokens).astype(np.int32)
    ids[1, 1:] = np.argmax(logits[1, :-1], -1)  # the argmax with shift=True
    ids[3] = np.argmax(logits[3], -1)  # and without
    where_shift = np.concatenate([where[:, 1:], np.zeros((FB, 1), bool)], 1)
    nan = lambda x, mask: np.where(mask[..., None], x, np.nan).astype(np.float32)
    out = dict(
        hidden=hidden,
        hidden_nan=nan(hidden, where),
        hidden_shift_nan=nan(hidden, where_shift),
        kernel=kernel,
        bias=bias,
        t_hidden=t_hidden,
        t_hidden_nan=nan(t_hidden, where),
        t_kernel=t_kernel,
        tokens=tokens,
        ids=ids,
        where=where,
        where_shift=where_shift,
        weights=rng.uniform(0.25, 2.0, FV).astype(np.float32),
    )
    return {k: jnp.asarray(v) for k, v in out.items()}


class FusedCall(NamedTuple):
    """``fn(student, teacher, inputs, vocab_axis_name)``, one jxent call.

    ``kind``: ``"none"`` (per position), ``"sum"`` (additive over the batch:
    ``psum`` over ``data`` on the mesh) or ``"mean"`` (a mean: one value per
    ``data`` block, against the one-device call on each block). ``nan``:
    which hidden rows hold NaN on the mesh (``None``, ``"aligned"`` with
    ``where``, ``"shift"``); the one-device reference reads the finite rows,
    which the call must ignore just the same.
    """

    fn: Callable
    kind: str
    nan: str | None = None


FUSED_SOFTMAX_OPTIONS = {
    "defaults": {},
    "ignore_index=5": {"ignore_index": 5},
    "label_smoothing": {"label_smoothing": 0.1},
    "class_weights": {"class_weights": True},
    "z_loss": {"z_loss": 1e-2},
    "logit_softcap": {"logit_softcap": 4.0},
    "all options": {
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_softcap": 6.0,
        "class_weights": True,
    },
}
KINDS = {"mean": "mean", "sum": "sum", "none": "none", "tokens": "mean", "sequences": "mean"}


def _options(options: dict, x: dict) -> dict:
    return {k: x["weights"] if k == "class_weights" else v for k, v in options.items()}


def _targets(options: dict, x: dict):
    if "ignore_index" in options:
        return jnp.where(x["tokens"] == -100, options["ignore_index"], x["tokens"])
    return x["tokens"]


def fused_calls() -> dict[str, FusedCall]:
    """Every fused function, its options and reductions: 51 calls."""
    calls = {}
    for opt, options in FUSED_SOFTMAX_OPTIONS.items():
        for reduction in REDUCTIONS:
            both = opt in ("defaults", "all options")
            for masked in (False, True) if both else (False,):
                if masked and opt == "defaults" and reduction != "mean":
                    continue

                def sce(s, t, x, axis, options=options, reduction=reduction, masked=masked):
                    return jxent.softmax_cross_entropy(
                        s,
                        _targets(options, x),
                        where=x["where"] if masked else None,
                        reduction=reduction,
                        vocab_axis_name=axis,
                        **_options(options, x),
                    )

                label = f"softmax_cross_entropy, {opt}, {reduction}" + (", masked" * masked)
                calls[label] = FusedCall(sce, KINDS[reduction], "aligned" if masked else None)
    for opt in ("defaults", "all options"):
        options, masked = FUSED_SOFTMAX_OPTIONS[opt], opt == "all options"
        nan = "shift" if masked else None
        common = lambda x, options=options, masked=masked: dict(
            shift=True, where=x["where"] if masked else None, **_options(options, x)
        )
        for normalize in ("tokens", "sequences", "sum", "none") if masked else ("tokens", "none"):

            def seq(s, t, x, axis, normalize=normalize, common=common):
                return jxent.sequence_nll(
                    s, x["tokens"], normalize=normalize, vocab_axis_name=axis, **common(x)
                )

            calls[f"sequence_nll, {opt}, {normalize}"] = FusedCall(seq, KINDS[normalize], nan)

        def stats(s, t, x, axis, common=common):
            return jxent.nll_stats(s, x["tokens"], vocab_axis_name=axis, **common(x))

        calls[f"nll_stats, {opt}"] = FusedCall(stats, "sum", nan)
    for shift, temperature, masked in ((True, 1.0, True), (True, 0.7, True), (False, 1.3, False)):

        def tstats(s, t, x, axis, shift=shift, temperature=temperature, masked=masked):
            out = jxent.token_stats(
                s,
                x["ids"],
                shift=shift,
                where=x["where"] if masked else None,
                temperature=temperature,
                vocab_axis_name=axis,
            )
            return out._replace(is_argmax=out.is_argmax.astype(jnp.float32),
                                argmax=out.argmax.astype(jnp.float32))

        label = f"token_stats, shift={shift}, temperature={temperature}" + ", masked" * masked
        calls[label] = FusedCall(tstats, "none", "shift" if masked else None)

    def objective(s, t, x, axis):
        # A clipped policy-gradient objective with an entropy bonus (a "sum": additive).
        advantage = (x["ids"][..., 1:] % 3 - 1).astype(jnp.float32)  # the predicted positions

        def fn(stats, advantage):
            ratio = jnp.exp(stats.log_prob + 2.0)
            clipped = jnp.minimum(ratio * advantage, jnp.clip(ratio, 0.8, 1.2) * advantage)
            return -clipped - 0.01 * stats.entropy

        return jxent.token_objective(
            s,
            x["ids"],
            fn,
            shift=True,
            args=(advantage,),
            where=x["where"],
            temperature=0.7,
            vocab_axis_name=axis,
        )

    calls["token_objective, shift=True, temperature=0.7, masked"] = FusedCall(
        objective, "sum", "shift"
    )
    divergences = {
        "kl": {"divergence": "kl"},
        "reverse_kl T=2": {"divergence": "reverse_kl", "temperature": 2.0},
        "jsd beta=0.3 T=0.5": {"divergence": "jsd", "beta": 0.3, "temperature": 0.5},
    }
    for name, options in divergences.items():
        for hard in (False, True):
            # Every divergence per position and as a mean (the engine's two modes);
            # "sum" once without and once with targets.
            for reduction in ("none", "mean", "sum"):
                if reduction == "sum" and name != ("jsd beta=0.3 T=0.5" if hard else "kl"):
                    continue

                def distill(s, t, x, axis, options=options, hard=hard, reduction=reduction):
                    extra = {"targets": x["tokens"], "hard_weight": 0.4} if hard else {}
                    return jxent.distillation_loss(
                        s,
                        t, shift=False,
                        where=x["where"],
                        reduction=reduction,
                        vocab_axis_name=axis,
                        **options,
                        **extra,
                    )

                label = f"distillation_loss, {name}, {reduction}" + ", targets" * hard
                calls[label] = FusedCall(distill, KINDS[reduction], "aligned")
    return calls


def fused_cotangent(label: str, out):
    """A fixed cotangent for ``out`` (seeded by the call's label): the same on mesh and device."""
    rng = np.random.default_rng(zlib.crc32(label.encode()))
    return jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), out)


def dense_logits(h, kernel, bias=None):
    logits = jnp.dot(h, kernel, preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias[None, None, :]


def hidden_keys(call: FusedCall) -> tuple[str, str]:
    """The student's and the teacher's hidden states on the mesh."""
    student = {None: "hidden", "aligned": "hidden_nan", "shift": "hidden_shift_nan"}[call.nan]
    return student, "t_hidden_nan" if call.nan == "aligned" else "t_hidden"


def fused_on_mesh(mesh: Mesh, calls: dict[str, FusedCall], check_vma: bool = True):
    """One jitted function: ``x -> {label: (value, grads wrt hidden, kernel, bias)}``.

    Inside ``shard_map``: hidden, tokens and masks split over ``data`` (if
    any), kernels, bias and class weights over ``vocab``; the gradients are
    taken outside (the transposed ``shard_map``) and come back global.
    """
    data = "data" if "data" in mesh.axis_names else None
    x_specs = {k: P(data) if k in BATCHED else P() for k in fused_inputs()}
    x_specs.update(kernel=P(None, "vocab"), t_kernel=P(None, "vocab"))
    x_specs.update(bias=P("vocab"), weights=P("vocab"))

    def one(label, call):
        h_key, t_key = hidden_keys(call)

        def local(h, kernel, bias, x):
            student = jxent.LinearLogits(h, kernel, bias, chunk_size=FCHUNK)
            teacher = jxent.LinearLogits(x[t_key], x["t_kernel"], chunk_size=FCHUNK)
            out = call.fn(student, teacher, x, "vocab")
            if call.kind == "sum" and data:
                out = jax.lax.psum(out, data)
            return out[None] if call.kind == "mean" else out

        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(data), P(None, "vocab"), P("vocab"), x_specs),
            out_specs=P() if call.kind == "sum" else P(data),
            check_vma=check_vma,
        )

        def value_and_grads(x):
            f = lambda h, k, b: sharded(h, k, b, x)
            value, pull = jax.vjp(f, x[h_key], x["kernel"], x["bias"])
            return value, pull(fused_cotangent(label, value))

        return value_and_grads

    fns = {label: one(label, call) for label, call in calls.items()}
    return jax.jit(lambda x: {label: f(x) for label, f in fns.items()})


def fused_reference(calls: dict[str, FusedCall], blocks: dict[str, tuple[int, ...]]):
    """The same calls on one device on the materialised logits (finite hidden states).

    ``{(label, n): (value, grads)}`` for every ``n`` in ``blocks[label]``: a
    ``"mean"`` call per block of ``n`` blocks of the batch (stacked), the
    others over the whole batch (computed once, the same for every ``n``).
    """

    def one(label, call, n):
        def f(h, kernel, bias, x):
            if call.kind != "mean":
                teacher = dense_logits(x["t_hidden"], x["t_kernel"])
                return call.fn(dense_logits(h, kernel, bias), teacher, x, None)
            size = FB // n
            outs = []
            for i in range(n):
                part = lambda v, i=i: v[i * size : (i + 1) * size]
                xi = {k: part(v) if k in BATCHED else v for k, v in x.items()}
                teacher = dense_logits(xi["t_hidden"], xi["t_kernel"])
                outs.append(call.fn(dense_logits(part(h), kernel, bias), teacher, xi, None))
            return jnp.stack(outs)

        def value_and_grads(x):
            f_x = lambda h, k, b: f(h, k, b, x)
            value, pull = jax.vjp(f_x, x["hidden"], x["kernel"], x["bias"])
            return value, pull(fused_cotangent(label, value))

        return value_and_grads

    same = lambda label, n: n if calls[label].kind == "mean" else 0
    fns = {
        (label, same(label, n)): one(label, calls[label], n)
        for label, ns in blocks.items()
        for n in ns
    }

    def run(x):
        out = {key: f(x) for key, f in fns.items()}
        return {(label, n): out[label, same(label, n)] for label, ns in blocks.items() for n in ns}

    return jax.jit(run)


def on_two_axes(label: str) -> bool:
    """The calls also run on the 2 × 4 mesh (the 4-device mesh runs them all).

    What the ``data`` axis adds (``psum`` of sums, per-block means,
    per-position outputs split over ``data``) for every function and mode:
    ``softmax_cross_entropy`` with the defaults and all options, masked or
    not, every reduction, and a custom ``ignore_index``; ``sequence_nll`` and
    ``nll_stats`` with all options and NaN rows; every ``token_stats`` call;
    every ``distillation_loss`` call with targets, and ``"kl"`` without.
    """
    if label.startswith("softmax_cross_entropy"):
        return (
            ", defaults," in label or ", all options," in label or "ignore_index=5, none" in label
        )
    if label.startswith(("sequence_nll", "nll_stats")):
        return "all options" in label
    if label.startswith("distillation_loss"):
        return label.endswith("targets") or ", kl," in label
    return True


@check("fused")
def fused_values_and_gradients():
    """Every fused function on meshes 4 and 2 × 4 = the same call on one device.

    ``fused_calls``: ``softmax_cross_entropy`` (every option × every
    reduction; masked with NaN hidden rows for the defaults and all options),
    ``sequence_nll`` (``shift=True``, every ``normalize``) and ``nll_stats``,
    ``token_stats`` (temperatures, masks, both shifts), ``token_objective``
    (a clipped policy-gradient objective), ``distillation_loss``
    (kl / reverse_kl / jsd, student and teacher both ``LinearLogits``, with
    and without ``targets`` + ``hard_weight``, every reduction). Values and
    gradients with respect to hidden, kernel and bias (a fixed cotangent per
    output), to 1e-5; ``chunk_size=5`` never divides the positions. Mesh 4
    runs every call, 2 × 4 those of ``on_two_axes``: there sums are
    ``psum``-ed over ``data``, per-position outputs come back ``P("data")``,
    and means are per block of the batch. Three compiled programs in all.
    """
    calls = fused_calls()
    meshes = {"4": calls, "2x4": {k: c for k, c in calls.items() if on_two_axes(k)}}
    x = fused_inputs()
    with case("fused inputs: NaN in masked hidden rows"):
        assert bool(jnp.isnan(x["hidden_nan"]).any())
        assert bool(jnp.isnan(x["hidden_shift_nan"]).any())
    blocks = {label: (1, 2) if label in meshes["2x4"] else (1,) for label in calls}
    reference = fused_reference(calls, blocks)(x)
    with case("fused inputs: token_stats sees is_argmax True and False"):
        for label in (
            "token_stats, shift=True, temperature=1.0, masked",
            "token_stats, shift=False, temperature=1.3",
        ):
            hits = reference[label, 1][0].is_argmax
            assert 0 < float(jnp.sum(hits)) < hits.size, (label, hits)
    for mesh_name, mesh_calls in meshes.items():
        mesh = fused_mesh(mesh_name)
        n = mesh.shape.get("data", 1)
        got = fused_on_mesh(mesh, mesh_calls)(x)
        want = {label: reference[label, n] for label in mesh_calls}
        compare(got, want, f"fused, mesh {mesh_name}")


@check("fused")
def fused_training_step_inside_shard_map():
    """The per-device training step: ``value_and_grad`` inside ``shard_map`` on 2 × 4.

    The global token mean from ``psum`` of ``nll_stats`` over ``data`` plus a
    distillation term (``psum`` of the ``"sum"`` reduction over the counted
    positions), with NaN in the masked hidden rows; the kernel and bias
    gradients come back sharded over ``vocab`` (summed over ``data`` by the
    vma types), the hidden gradient over ``data``. Against ``sequence_nll``
    and ``distillation_loss`` of the materialised logits on one device.
    """
    x = fused_inputs(12)
    mesh = fused_mesh("2x4")
    options = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=6.0)

    def loss(h, kernel, bias, x, axis):
        fused = axis is not None
        make = jxent.LinearLogits if fused else dense_logits
        student = make(h, kernel, bias, **({"chunk_size": FCHUNK} if fused else {}))
        teacher = make(x["t_hidden"], x["t_kernel"], **({"chunk_size": FCHUNK} if fused else {}))
        weights = x["weights"]
        common = dict(vocab_axis_name=axis, where=x["where_shift"])
        if fused:
            stats = jxent.nll_stats(
                student,
                x["tokens"],
                shift=True,
                where=x["where"],
                class_weights=weights,
                vocab_axis_name=axis,
                **options,
            )
            distill = jxent.distillation_loss(
                student, teacher, shift=False, divergence="jsd", beta=0.3, reduction="sum", **common
            )
            stats, distill = jax.lax.psum((stats, distill), "data")
            count = jax.lax.psum(jnp.sum(x["where_shift"]), "data")
            return stats.mean() + 0.5 * distill / count
        nll = jxent.sequence_nll(
            student, x["tokens"], shift=True, where=x["where"], class_weights=weights, **options
        )
        distill = jxent.distillation_loss(
            student, teacher, shift=False, divergence="jsd", beta=0.3, reduction="mean", **common
        )
        return nll + 0.5 * distill

    specs = {k: P("data") if k in BATCHED else P() for k in x}
    specs.update(kernel=P(None, "vocab"), t_kernel=P(None, "vocab"))
    specs.update(bias=P("vocab"), weights=P("vocab"))
    step = jax.shard_map(
        lambda h, k, b, x: jax.value_and_grad(loss, (0, 1, 2))(h, k, b, x, "vocab"),
        mesh=mesh,
        in_specs=(P("data"), P(None, "vocab"), P("vocab"), specs),
        out_specs=(P(), (P("data"), P(None, "vocab"), P("vocab"))),
    )
    with case("fused, 2x4 mesh, training step with value_and_grad inside shard_map"):
        got = jax.jit(step)(x["hidden_shift_nan"], x["kernel"], x["bias"], x)
        want = jax.jit(jax.value_and_grad(partial(loss, axis=None), (0, 1, 2)))(
            x["hidden"], x["kernel"], x["bias"], x
        )
        close(got, want, "training step")
        for leaf in jax.tree.leaves(got):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"non-finite result {leaf}"


# ------------------------------------------------------------------------------ topk
# Stored teachers (TopK), class_log_probs and TokenStats.argmax, vocab-sharded: one
# self-contained group (issue 27), kept apart from the groups above.


def topk_inputs(seed: int = 27) -> dict:
    """A [2, 4] batch over V = 32 classes; ties of the maximum on both sides of shard borders."""
    rng = np.random.default_rng(seed)
    b, t, d, v, k = 2, 4, 8, 32, 5
    x = {
        "logits": (2 * rng.standard_normal((b, t, v))).astype(np.float32),
        "hidden": rng.standard_normal((b, t, d)).astype(np.float32),
        "kernel": (0.5 * rng.standard_normal((d, v))).astype(np.float32),
        "tokens": rng.integers(0, v, (b, t)).astype(np.int32),
        "where": rng.random((b, t)) < 0.85,
    }
    x["logits"][0, 0, [3, 9, 30]] = 9.0  # ties in shards 0, 1 and 3 (of 4): id 3 wins
    x["logits"][0, 1, [20, 17]] = 9.0  # shard 2 before shard 2: id 17
    teacher = jax.nn.log_softmax(2 * rng.standard_normal((b, t, v)), -1)
    top = jxent.TopK.from_logits(teacher, k)
    lp = np.array(top.log_probs)
    lp[1, 2, 3:] = -np.inf  # padding
    x["ids"], x["log_probs"] = np.asarray(top.ids), lp
    x["choices"] = rng.integers(0, v, (b, t, 3)).astype(np.int32)
    return x


def topk_calls(x: dict, fused: bool, axis):
    """Scalars of every stored-teacher function on the (local) student; used by both sides."""

    def run(logits, h, kernel):
        student = jxent.LinearLogits(h, kernel, chunk_size=3) if fused else logits
        teacher = jxent.TopK(x["ids"], x["log_probs"])
        out = {}
        for mode, divergence in (("tail", "kl"), ("tail", "tvd"), ("renormalize", "jsd")):
            out[f"{mode} {divergence}"] = jxent.distillation_loss(
                student, teacher, shift=True, divergence=divergence, temperature=1.3,
                topk_mode=mode, where=x["where"], targets=x["tokens"], hard_weight=0.2,
                vocab_axis_name=axis,
            )
        lp = jxent.class_log_probs(student, x["choices"], temperature=0.8, where=x["where"],
                                   vocab_axis_name=axis)
        out["class_log_probs"] = jnp.sum(lp * jnp.arange(1.0, 1.0 + lp.size).reshape(lp.shape))
        stats = jxent.token_stats(student, x["tokens"], shift=False, vocab_axis_name=axis)
        return out, stats.argmax

    return run


def topk_value_and_grads(run):
    """``run``'s values, argmax and the gradients of their sum (taken outside any shard_map)."""

    def f(*a):
        values, argmax = run(*a)
        return sum(values.values()), (values, argmax)

    def value_and_grads(logits, h, kernel):
        (_, aux), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(logits, h, kernel)
        return aux, grads

    return jax.jit(value_and_grads)


@check("topk")
def topk_vocab_sharded():
    """TopK distillation (both modes), class_log_probs and argmax: shard_map and placed arrays."""
    x = topk_inputs()
    args = (x["logits"], x["hidden"], x["kernel"])
    mesh = make_mesh("4")
    want = {fused: topk_value_and_grads(topk_calls(x, fused, None))(*args)
            for fused in (False, True)}
    for fused in (False, True):
        with case(f"topk shard_map, fused={fused}"):
            sharded = jax.shard_map(
                topk_calls(x, fused, "model"), mesh=mesh,
                in_specs=(P(None, None, "model"), P(), P(None, "model")), out_specs=(P(), P()),
            )
            got = topk_value_and_grads(sharded)(*args)
            close(got, want[fused], f"fused={fused}")
            if not fused:
                assert got[0][1][0, 0] == 3 and got[0][1][0, 1] == 17, got[0][1]
    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with case("topk on placed arrays under plain jit (Auto 2 x 4), fused"):
        put = lambda a, *spec: jax.device_put(a, NamedSharding(auto, P(*spec)))
        placed = dict(x, hidden=put(x["hidden"], "data"), kernel=put(x["kernel"], None, "model"),
                      ids=put(x["ids"], "data"), log_probs=put(x["log_probs"], "data"),
                      tokens=put(x["tokens"], "data"), where=put(x["where"], "data"),
                      choices=put(x["choices"], "data"))
        logits = put(x["logits"], "data", None, "model")
        got = topk_value_and_grads(topk_calls(placed, True, None))(
            logits, placed["hidden"], placed["kernel"])
        close(got, want[True], "placed, fused")


# ------------------------------------------------------------------------------ errors


@check("errors")
def uneven_vocabulary_and_unsharded_class_arrays():
    """Clear errors: a vocabulary that does not divide over the shards, unsharded class arrays.

    ``shard_map`` itself rejects a class axis that does not divide evenly,
    naming the argument, the axis and both sizes; jxent does not pad.
    """
    mesh = make_mesh("4")
    rng = np.random.default_rng(6)
    targets = jnp.asarray(rng.integers(0, 30, (B, T)), jnp.int32)

    def expect(error, pattern: str, fn, *args) -> None:
        try:
            jax.jit(fn)(*args)
        except error as e:
            assert re.search(pattern, str(e)), f"message {str(e)!r} does not match {pattern!r}"
        else:
            raise AssertionError(f"no {error.__name__} matching {pattern!r}")

    softmax = lambda x, t, w=None: jxent.softmax_cross_entropy(
        x, t, class_weights=w, vocab_axis_name="model"
    )
    with case("softmax_cross_entropy: 30 classes over 4 shards"):
        uneven = jax.shard_map(
            softmax, mesh=mesh, in_specs=(P(None, None, "model"), P()), out_specs=P()
        )
        pattern = r"maps array axis 2 \(of size 30\) to mesh axis 'model' \(of size 4\)"
        expect(
            ValueError,
            pattern + r", but 4 does not evenly divide 30",
            uneven,
            jnp.zeros((B, T, 30)),
            targets,
        )
    with case("softmax_cross_entropy: class_weights not sharded like the vocabulary"):
        unsharded = jax.shard_map(
            softmax, mesh=mesh, in_specs=(P(None, None, "model"), P(), P()), out_specs=P()
        )
        pattern = r"class_weights has shape \(32,\) but this shard of logits has 8 classes"
        expect(ValueError, pattern, unsharded, jnp.zeros((B, T, 32)), targets, jnp.ones(32))
    with case("softmax_cross_entropy: vocab_axis_name outside shard_map"):
        pattern = r"vocab_axis_name='model' is not a mesh axis bound here: call the loss inside"
        expect(ValueError, pattern, softmax, jnp.zeros((B, T, 32)), targets)

    def linear(h, k, t, b=None):
        return jxent.linear_cross_entropy(h, k, t, bias=b, vocab_axis_name="model")

    with case("linear_cross_entropy: kernel with 30 classes over 4 shards"):
        uneven = jax.shard_map(
            linear, mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P()
        )
        pattern = r"maps array axis 1 \(of size 30\) to mesh axis 'model' \(of size 4\)"
        expect(ValueError, pattern, uneven, jnp.zeros((B, T, D)), jnp.zeros((D, 30)), targets)
    with case("linear_cross_entropy: bias not sharded like the kernel"):
        unsharded = jax.shard_map(
            linear, mesh=mesh, in_specs=(P(), P(None, "model"), P(), P()), out_specs=P()
        )
        pattern = r"bias has shape \(32,\) but kernel \(8, 8\) has 8 classes"
        expect(
            ValueError,
            pattern,
            unsharded,
            jnp.zeros((B, T, D)),
            jnp.zeros((D, 32)),
            targets,
            jnp.zeros(32),
        )
    with case("linear_cross_entropy: vocab_axis_name outside shard_map"):
        pattern = r"vocab_axis_name='model' is not a mesh axis bound here"
        expect(ValueError, pattern, linear, jnp.zeros((B, T, D)), jnp.zeros((D, 32)), targets)
