"""``linear_cross_entropy``: the fused head equals the materialised one, in less memory.

The reference is always ``softmax_cross_entropy(hidden @ kernel + bias, ...)``
differentiated by plain autodiff (and float64 NumPy for bfloat16 inputs).
Value and gradients (hidden, kernel, bias) are compared for every option and
reduction, with a chunk size that does not divide the number of positions.
Memory is read from the compiled programs (no execution); the vocab-parallel
check runs on four of the suite's eight host devices.
"""

from __future__ import annotations

import functools
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jxent
from jxent._testing import assert_close, fused_and_dense

N, D, V, CHUNK = 37, 16, 50, 8  # 37 positions: five chunks, the last one partial


def draw(rng, n=N, d=D, v=V):
    """Float32 hidden states, kernel and bias, int32 targets with two ignored."""
    hidden = rng.standard_normal((n, d)).astype(np.float32)
    kernel = (rng.standard_normal((d, v)) / np.sqrt(d)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(v)).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int32)
    targets[[3, n - 2]] = -100
    return hidden, kernel, bias, targets


def materialised(hidden, kernel, targets, *, bias=None, **options):
    """The reference: the full logits, then ``softmax_cross_entropy``."""
    logits = hidden @ kernel
    if bias is not None:
        logits = logits + jnp.reshape(bias, (1,) * (logits.ndim - 1) + (-1,))
    return jxent.softmax_cross_entropy(logits, targets, **options)


def linear_loss(targets, options):
    """``f(logits)``: ``linear_cross_entropy`` on ``LinearLogits``, else ``softmax_cross_entropy``.

    The harness differentiates it with a seeded non-uniform cotangent, so with
    ``"none"`` each position's gradient is scaled differently.
    """

    def f(logits):
        if isinstance(logits, jxent.LinearLogits):
            out = jxent.linear_cross_entropy(logits.hidden, logits.kernel, targets,
                                             bias=logits.bias, **options)
        else:
            out = jxent.softmax_cross_entropy(
                logits, targets, **{k: v for k, v in options.items() if k != "chunk_size"})
        return out

    return f


def fused_and_materialised(options, hidden, kernel, bias, targets, *, fused_hidden=None):
    """One compiled program (the shared harness): the fused and the materialised loss's
    value and gradients, ``(value, (d_hidden, d_kernel, d_bias))`` each."""
    ((fused, dense),) = fused_and_dense(
        {"loss": linear_loss(targets, options)}, hidden, kernel, bias,
        chunk_size=options.get("chunk_size"), fused_hidden=fused_hidden,
    ).values()
    return fused, dense


OPTIONS = {
    "plain": {},
    "where": {"where": "mask"},
    "ignore_index_7": {"ignore_index": 7},
    "ignore_index_none": {"ignore_index": None},
    "class_weights": {"class_weights": "weights"},
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-2},
    "logit_softcap": {"logit_softcap": 2.0},
    "everything": {
        "where": "mask",
        "class_weights": "weights",
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_softcap": 3.0,
    },
}


def resolve(options, rng, n=N, v=V):
    """Replace the placeholders ``"mask"``/``"weights"`` by seeded arrays."""
    out = dict(options)
    if out.get("where") == "mask":
        out["where"] = rng.random(n) > 0.3
    if out.get("class_weights") == "weights":
        out["class_weights"] = rng.uniform(0.2, 2.0, v).astype(np.float32)
    return out


def test_every_option_at_once_equals_materialised(rng):
    """The quick tier's case: every option together, mean, fused and materialised."""
    hidden, kernel, bias, targets = draw(rng)
    options = resolve(OPTIONS["everything"], rng) | {"chunk_size": CHUNK}
    assert_close(*fused_and_materialised(options, hidden, kernel, bias, targets))


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_value_and_gradients_equal_materialised(rng, reduction):
    """Every option, one program per reduction: each option's loss fused and materialised."""
    hidden, kernel, bias, targets = draw(rng)
    calls = {}
    for name, spec in OPTIONS.items():
        t = targets.copy()
        if name.startswith("ignore_index"):  # -100 is a class index out of range there
            t = np.where(t < 0, 1, t).astype(np.int32)
        if name == "ignore_index_7":
            t[[0, 5, 9]] = 7
        options = resolve(spec, rng) | {"reduction": reduction}
        calls[name] = linear_loss(t, options)
    results = fused_and_dense(calls, hidden, kernel, bias, chunk_size=CHUNK)
    for name, (got, want) in results.items():
        try:
            assert_close(got, want)
        except AssertionError as e:
            raise AssertionError(f"option {name}, reduction {reduction}: {e}") from None


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1, 5, N, 1000, None])
def test_any_chunk_size(rng, chunk_size):
    """Chunks of one position, N, larger than N and the default: the same numbers."""
    hidden, kernel, bias, targets = draw(rng)
    got, want = fused_and_materialised({"chunk_size": chunk_size}, hidden, kernel, bias, targets)
    assert_close(got, want)


@pytest.mark.slow
def test_leading_batch_axes(rng):
    """``hidden [B, T, D]``, ``targets [B, T]``: "none" keeps ``[B, T]``."""
    hidden, kernel, bias, targets = draw(rng, n=3 * 7)
    hidden, targets = hidden.reshape(3, 7, D), targets.reshape(3, 7)
    for reduction in ("mean", "none"):
        options = {"chunk_size": CHUNK, "reduction": reduction}
        got, want = fused_and_materialised(options, hidden, kernel, bias, targets)
        chex.assert_shape(got[1][0], (3, 7, D))
        assert_close(got, want)
    assert got[0].shape == (3, 7)


@pytest.mark.slow
def test_tied_embedding_as_transpose(rng):
    """A tied table ``emb [V, D]`` passed as ``emb.T``: its gradient is the materialised one."""
    hidden, kernel, _, targets = draw(rng)
    emb = np.ascontiguousarray(kernel.T)

    def loss(fn, hidden, emb):
        return fn(hidden, emb.T, targets, label_smoothing=0.1)

    fused = functools.partial(jxent.linear_cross_entropy, chunk_size=CHUNK)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)), static_argnums=0)
    got, want = grad(fused, hidden, emb), grad(materialised, hidden, emb)
    chex.assert_shape(got[1][1], (V, D))
    assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(rng, reduction):
    """Nothing counted: loss 0 and every gradient exactly 0 (not NaN), as the materialised path."""
    hidden, kernel, bias, _ = draw(rng)
    targets = np.full(N, -100, np.int32)
    options = {"chunk_size": CHUNK, "reduction": reduction}
    got, want = fused_and_materialised(options, hidden, kernel, bias, targets)
    assert_close(got, want)
    for leaf in jax.tree.leaves(got):
        np.testing.assert_array_equal(leaf, 0)


@pytest.mark.slow
def test_masked_rows_may_hold_nan(rng):
    """Padding rows of ``hidden`` full of NaN reach neither the value nor any gradient."""
    hidden, kernel, bias, targets = draw(rng)
    mask = rng.random(N) > 0.3
    poisoned = np.where(mask[:, None], hidden, np.nan).astype(np.float32)
    got, want = fused_and_materialised(
        {"chunk_size": CHUNK, "where": mask}, hidden, kernel, bias, targets,
        fused_hidden=poisoned,
    )
    assert_close(got, want)
    np.testing.assert_array_equal(got[1][0][~mask], 0)


@pytest.mark.slow
def test_bfloat16_within_2e2_of_float64(rng):
    """bf16 hidden/kernel/bias: float32 accumulation, gradients back in bf16, close to float64."""
    hidden, kernel, bias, targets = draw(rng, n=64, d=32, v=300)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (hidden, kernel, bias)]
    # The float64 reference sees exactly the bf16-rounded inputs.
    h, k, b = (np.asarray(x, np.float64) for x in bf16)
    logits = h @ k + b[None, :]
    top = logits.max(-1, keepdims=True)
    p = np.exp(logits - top)
    p /= p.sum(-1, keepdims=True)
    counted = targets >= 0
    rows = np.flatnonzero(counted)
    nll = -np.log(p[rows, targets[rows]])
    d_logits = p * counted[:, None]
    d_logits[rows, targets[rows]] -= 1
    d_logits /= counted.sum()
    want = (nll.mean(), (d_logits @ k.T, h.T @ d_logits, d_logits.sum(0)))

    fused = functools.partial(jxent.linear_cross_entropy, chunk_size=16)
    value, grads = jax.jit(
        jax.value_and_grad(lambda h, k, b: fused(h, k, targets, bias=b), argnums=(0, 1, 2))
    )(*bf16)
    assert value.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    assert_close((value, grads), want, rtol=2e-2)


@pytest.mark.slow
def test_memory_bounded_by_a_chunk():
    """Compiled temp memory: ≤ 5% of the materialised path's at 256 positions a chunk (≤ 7%
    at the CPU's default, N / 16), and flat in N at a fixed chunk.

    Lowering and compiling only (abstract shapes, nothing is allocated or run).
    """
    d, v = 512, 65536

    def temp_bytes(loss, n):
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused = functools.partial(jxent.linear_cross_entropy, chunk_size=256)
    full = temp_bytes(materialised, 8192)
    small = temp_bytes(fused, 8192)
    large = temp_bytes(fused, 4 * 8192)
    assert full >= 2 * 8192 * v * 4  # the logits and their gradient, at least
    assert small <= 0.05 * full, (small, full)
    assert abs(large - small) < 0.1 * small, (small, large)
    # The default chunk here: 512 positions of 8192, a sixteenth of the logits.
    default = temp_bytes(jxent.linear_cross_entropy, 8192)
    assert default <= 0.07 * full, (default, full)


def test_evaluation_runs_only_the_forward_product(rng):
    """No gradient: one matrix product per chunk; a gradient: three ("mean") or four ("none")."""
    hidden, kernel, bias, targets = draw(rng)
    fused = functools.partial(jxent.linear_cross_entropy, chunk_size=CHUNK)

    def count_dots(f, *args):
        return jax.jit(f).lower(*args).as_text().count("stablehlo.dot_general")

    assert count_dots(lambda h, k: fused(h, k, targets), hidden, kernel) == 1
    grad_mean = jax.grad(lambda h, k: fused(h, k, targets), argnums=(0, 1))
    assert count_dots(grad_mean, hidden, kernel) == 3
    # "none": the forward pass, then a backward pass that recomputes the logits.
    grad_none = jax.value_and_grad(
        lambda h, k: jnp.sum(fused(h, k, targets, reduction="none")), argnums=(0, 1)
    )
    assert count_dots(grad_none, hidden, kernel) == 4


@pytest.mark.slow
def test_vmap_equals_batched_and_no_retracing(rng):
    """``vmap`` over sequences equals the per-sequence calls; repeated calls do not retrace."""
    hidden, kernel, bias, targets = draw(rng, n=4 * 9)
    hidden, targets = hidden.reshape(4, 9, D), targets.reshape(4, 9)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def per_sequence(hidden, kernel, bias, targets):
        def one(h, t):
            return jxent.linear_cross_entropy(h, kernel, t, bias=bias, chunk_size=4)

        return jax.vmap(jax.value_and_grad(one))(hidden, targets)

    for _ in range(2):
        values, grads = per_sequence(hidden, kernel, bias, targets)
    want = [
        jax.value_and_grad(materialised)(hidden[i], kernel, targets[i], bias=bias) for i in range(4)
    ]
    assert_close((values, grads), (np.stack([w[0] for w in want]), np.stack([w[1] for w in want])))


@pytest.mark.slow
def test_flax_nnx_linear_head_training_step(rng):
    """An ``nnx.Linear`` head trained with optax: fused and materialised steps agree."""
    vocab, width, batch, length = 40, 12, 3, 10

    class LM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.head = nnx.Linear(width, vocab, rngs=rngs)

        def features(self, tokens):
            return jnp.tanh(self.embed(tokens))

    def fused_loss(model, tokens, targets):
        head = model.head
        return jxent.linear_cross_entropy(
            model.features(tokens), head.kernel[...], targets, bias=head.bias[...], chunk_size=7
        )

    def materialised_loss(model, tokens, targets):
        return jxent.softmax_cross_entropy(model.head(model.features(tokens)), targets)

    def train(loss_fn):
        model = LM(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, tokens, targets):
            loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, targets)
            optimizer.update(model, grads)
            return loss

        losses = [step(model, optimizer, tokens, targets) for _ in range(5)]
        return np.array(losses), nnx.state(model, nnx.Param)

    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    fused_losses, fused_params = train(fused_loss)
    want_losses, want_params = train(materialised_loss)
    assert fused_losses[-1] < fused_losses[0]
    assert_close(fused_losses, want_losses)
    assert_close(jax.tree.leaves(fused_params), jax.tree.leaves(want_params), rtol=1e-4)


@pytest.mark.slow
def test_out_of_range_targets(rng):
    """As ``softmax_cross_entropy``: eager ValueError; under jit a NaN loss at that position."""
    hidden, kernel, bias, targets = draw(rng)
    targets[4] = V
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 50\)"):
        jxent.linear_cross_entropy(hidden, kernel, targets)
    losses = jax.jit(
        functools.partial(jxent.linear_cross_entropy, reduction="none", chunk_size=CHUNK)
    )(hidden, kernel, targets)
    assert np.isnan(losses[4])
    assert np.isfinite(np.delete(np.asarray(losses), 4)).all()


def test_bad_shapes_and_types():
    hidden = np.zeros((2, 5, 8), np.float32)
    kernel = np.zeros((8, 11), np.float32)
    targets = np.zeros((2, 5), np.int32)
    f = jxent.linear_cross_entropy
    with pytest.raises(
        ValueError, match=r"kernel has shape \(7, 11\) but hidden \(2, 5, 8\) expects \(8, V\)"
    ):
        f(hidden, np.zeros((7, 11), np.float32), targets)
    with pytest.raises(ValueError, match=r"pass a tied embedding table \[V, D\] as emb.T"):
        f(hidden, np.zeros((11, 8), np.float32), targets)
    with pytest.raises(
        ValueError, match=r"bias has shape \(10,\) but kernel \(8, 11\) has 11 classes"
    ):
        f(hidden, kernel, targets, bias=np.zeros(10, np.float32))
    with pytest.raises(
        ValueError,
        match=r"targets has shape \(2, 4\) but LinearLogits with hidden \(2, 5, 8\) "
        r"expects \(2, 5\)",
    ):
        f(hidden, kernel, np.zeros((2, 4), np.int32))
    with pytest.raises(TypeError, match="targets must be integer class ids with LinearLogits"):
        f(hidden, kernel, np.zeros((2, 5, 11), np.float32))
    with pytest.raises(TypeError, match="hidden must be a floating-point array"):
        f(hidden.astype(np.int32), kernel, targets)
    with pytest.raises(ValueError, match=r"where has shape \(5,\)"):
        f(hidden, kernel, targets, where=np.ones(5, bool))
    with pytest.raises(ValueError, match=r"class_weights has shape \(3,\) but kernel has 11"):
        f(hidden, kernel, targets, class_weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(hidden, kernel, targets, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int, got 0"):
        f(hidden, kernel, targets, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int or None, got 2.5"):
        f(hidden, kernel, targets, chunk_size=2.5)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        f(hidden, kernel, targets, label_smoothing=1.5)


VOCAB_PARALLEL = textwrap.dedent(
    """
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jxent

    rng = np.random.default_rng(7)
    n, d, v = 29, 8, 48  # 12 classes per shard; 29 positions in chunks of 8
    hidden = rng.standard_normal((n, d)).astype(np.float32)
    kernel = (rng.standard_normal((d, v)) / 3).astype(np.float32)
    bias = rng.standard_normal(v).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, v).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int32)
    targets[[2, 11]] = -100
    mask = rng.random(n) > 0.2
    cotangent = rng.standard_normal(n).astype(np.float32)
    options = dict(where=mask, label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0)

    mesh = jax.make_mesh((4,), ("vocab",), devices=jax.devices()[:4])
    by_vocab = NamedSharding(mesh, P("vocab"))
    sharded = (
        jax.device_put(kernel, NamedSharding(mesh, P(None, "vocab"))),
        jax.device_put(bias, by_vocab),
        jax.device_put(weights, by_vocab),
    )

    def total(out):
        return jnp.sum(out * cotangent) if out.ndim else out

    for reduction in ("mean", "sum", "none"):
        def parallel(hidden, kernel, bias, weights):
            loss = functools.partial(
                jxent.linear_cross_entropy, reduction=reduction, chunk_size=8,
                vocab_axis_name="vocab", **options,
            )
            out = jax.shard_map(
                lambda h, k, b, w: loss(h, k, targets, bias=b, class_weights=w),
                mesh=mesh,
                in_specs=(P(), P(None, "vocab"), P("vocab"), P("vocab")),
                out_specs=P(),
            )(hidden, kernel, bias, weights)
            return total(out)

        def single(hidden, kernel, bias, weights):
            logits = hidden @ kernel + bias[None, :]
            return total(jxent.softmax_cross_entropy(
                logits, targets, class_weights=weights, reduction=reduction, **options))

        step = jax.jit(jax.value_and_grad(parallel, argnums=(0, 1, 2)))
        got = step(hidden, *sharded)
        want = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2)))(
            hidden, kernel, bias, weights)
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            e = np.asarray(e)
            np.testing.assert_allclose(
                np.asarray(a), e, rtol=1e-5, atol=1e-5 * np.abs(e).max())
        # The shards exchange [tokens]-sized vectors and the [N, D] hidden gradient only.
        hlo = step.lower(hidden, *sharded).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, reduction
        print(reduction, "ok")
    """
)


@pytest.mark.slow
def test_vocab_parallel_in_shard_map(capsys):
    """Four host devices: kernel, bias and class_weights sharded along V equal one device."""
    exec(compile(textwrap.dedent(VOCAB_PARALLEL), "VOCAB_PARALLEL", "exec"), {})
    assert capsys.readouterr().out.split() == ["mean", "ok", "sum", "ok", "none", "ok"]
