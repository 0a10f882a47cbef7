"""What a GPU or TPU would run, read from the program lowered for it on this CPU.

``jax.export`` lowers for platforms this machine does not have
(``platforms=("cuda", "tpu")``); its StableHLO text names every product's
operand and result types, every loop's carries and every chunk's shape. These
tests assert the backend policy from that text: with bf16/f16 ``hidden`` and
``kernel`` and the default ``precision``, every product of every fused
function takes the inputs' dtype with float32 accumulation, no float32 copy of
the kernel is made, and the kernel's gradient is carried across chunks in
float32; the chunk is the one of the platform lowered for, not of the host
that traced the program. Nothing here compiles; lowering allocates nothing,
so the sizes the issue names (``N, D, V = 16384, 4096, 131072``) are used as
they are.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jxent
from jxent._engine import default_chunk_size, default_precision
from jxent._testing import converts, loop_carries, lowered, products

N, D, V = 320, 48, 1000  # small, every dimension different: a shape names its role
CHUNK = 64  # 5 chunks

def avals(dtype, n=N, d=D, v=V):
    return (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32))


def _ce(h, k, t, **kw):
    return jxent.softmax_cross_entropy(jxent.LinearLogits(h, k, **kw), t)


def _ce_positions(h, k, t, **kw):
    return jnp.sum(jxent.softmax_cross_entropy(jxent.LinearLogits(h, k, **kw), t,
                                               reduction="none"))


def _nll(h, k, t, **kw):
    return jxent.sequence_nll(jxent.LinearLogits(h, k, **kw), t, shift=True)


def _nll_stats(h, k, t, **kw):
    return jxent.nll_stats(jxent.LinearLogits(h, k, **kw), t, shift=True).total


def _token_stats(h, k, t, **kw):
    stats = jxent.token_stats(jxent.LinearLogits(h, k, **kw), t, shift=True)
    return jnp.sum(stats.log_prob + 0.01 * stats.entropy)


def _token_objective(h, k, t, **kw):
    return jxent.token_objective(jxent.LinearLogits(h, k, **kw), t,
                                 lambda s: s.log_prob + 0.01 * s.entropy, shift=True)


def _distillation(h, k, t, **kw):
    teacher = jxent.LinearLogits(h, jax.lax.stop_gradient(k) * 1.5, **kw)
    return jxent.distillation_loss(jxent.LinearLogits(h, k, **kw), teacher, shift=False)


def _class_log_probs(h, k, t, **kw):
    ids = jnp.stack([t, (t + 1) % V], axis=-1)
    return jnp.sum(jxent.class_log_probs(jxent.LinearLogits(h, k, **kw), ids))


def _topk_distillation(h, k, t, **kw):
    ids = jnp.stack([t, (t + 1) % V], axis=-1)
    teacher = jxent.TopK(ids, jnp.log(jnp.full(ids.shape, 0.25)))
    return jxent.distillation_loss(jxent.LinearLogits(h, k, **kw), teacher, shift=False)


FUSED = {
    "softmax_cross_entropy": _ce,
    "softmax_cross_entropy none": _ce_positions,
    "sequence_nll": _nll,
    "nll_stats": _nll_stats,
    "token_stats": _token_stats,
    "token_objective": _token_objective,
    "distillation_loss": _distillation,
    "distillation_loss TopK": _topk_distillation,
    "class_log_probs": _class_log_probs,
}


def program(name: str, dtype, *, grad: bool, platforms=("cuda", "tpu"), **kw) -> str:
    fn = lambda h, k, t: FUSED[name](h, k, t, chunk_size=kw.pop("chunk_size", CHUNK), **kw)
    if grad:
        fn = jax.value_and_grad(fn, argnums=(0, 1))
    return lowered(fn, *avals(dtype), platforms=platforms)


def assert_input_dtype_products(text: str, dtype: str) -> None:
    """Every product ``dtype × dtype → f32``; no float32 copy of the kernel or of a tile of it."""
    found = products(text)
    assert found, "no product in the lowered program"
    wrong = {p for p in found if (p[1], p[3], p[5]) != (dtype, dtype, "f32")}
    assert not wrong, wrong
    widened = {c for c in converts(text) if c[2] == "f32" and c[0] and c[0][0] == D}
    assert not widened, widened


def test_default_policy_per_platform():
    assert default_precision("cpu") == "accurate"
    assert default_precision("cuda") == default_precision("tpu") == "balanced"
    # The accelerator chunk: 2 GiB of float32 logits in 256-row tiles.
    assert default_chunk_size(16384, 131072, "cuda") == 4096
    assert default_chunk_size(16384, 128256, "tpu") == 4096
    assert default_chunk_size(16384, 32768, "cuda") == 16384
    assert default_chunk_size(16384, 131072, "cpu") == 256
    assert default_chunk_size(100, 131072, "cuda") == 100


def test_cross_entropy_gradient_on_gpu_and_tpu_is_bf16_products_and_a_float32_carry():
    text = program("softmax_cross_entropy", jnp.bfloat16, grad=True)
    assert_input_dtype_products(text, "bf16")
    # The three products of one chunk: logits, ∂/∂hidden, ∂/∂kernel.
    assert products(text) == {
        ((CHUNK, D), "bf16", (D, V), "bf16", (CHUNK, V), "f32"),
        ((CHUNK, V), "bf16", (D, V), "bf16", (CHUNK, D), "f32"),
        ((D, CHUNK), "bf16", (CHUNK, V), "bf16", (D, V), "f32"),  # the chunk's hᵀ: [D, C]
    }
    # The kernel's gradient is a float32 carry of the chunk loop.
    assert any(((D, V), "f32") in carries for carries in loop_carries(text))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "value_and_grad"])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_every_fused_function_keeps_the_inputs_dtype_in_its_products(name, grad, dtype):
    short = jnp.dtype(dtype).name.replace("bfloat16", "bf16").replace("float16", "f16")
    # One export for both: their choices agree, so it holds one program (and
    # JAX's own per-platform lowering of each product, a case per dot).
    text = program(name, dtype, grad=grad, platforms=("cuda", "tpu"))
    assert_input_dtype_products(text, short)
    if grad:
        assert any(((D, V), "f32") in c for c in loop_carries(text)), name


@pytest.mark.slow
def test_cpu_keeps_float32_products_by_default_and_names_choose_on_any_platform():
    text = program("softmax_cross_entropy", jnp.bfloat16, grad=True, platforms=("cpu",))
    assert ((CHUNK, V), "f32", (D, V), "f32", (CHUNK, D), "f32") in products(text)
    # A user who wants float32 products on a GPU asks for them by name...
    text = program("softmax_cross_entropy", jnp.bfloat16, grad=True, precision="accurate")
    assert ((CHUNK, V), "f32", (D, V), "f32", (CHUNK, D), "f32") in products(text)
    # ... and "compact" carries the kernel's gradient in bf16.
    text = program("softmax_cross_entropy", jnp.bfloat16, grad=True, precision="compact")
    assert {(p[1], p[3], p[5]) for p in products(text)} == {("bf16", "bf16", "f32")}
    assert any(((D, V), "bf16") in c for c in loop_carries(text))
    assert not any(((D, V), "f32") in c for c in loop_carries(text))


@pytest.mark.slow
def test_accurate_asks_for_float32_products_under_highest_matmul_precision():
    """On a TPU a float32 product at the default precision is one bf16 pass: the knob."""
    with jax.default_matmul_precision("highest"):
        text = program("softmax_cross_entropy", jnp.bfloat16, grad=True, precision="accurate",
                       platforms=("tpu",))
    lines = [x for x in text.splitlines() if "stablehlo.dot_general" in x and "xf32>, tensor" in x]
    assert lines and all("HIGHEST" in x for x in lines), lines


def _chunk_rows(text: str, d: int, v: int) -> set[int]:
    """The rows of every chunk's logits product ``[C, D] × [D, V]``."""
    return {p[0][0] for p in products(text) if p[0][1:] == (d,) and p[2] == (d, v)}


@pytest.mark.slow
def test_the_chunk_is_the_lowering_platforms_at_the_issues_sizes():
    """N, D, V = 16384, 4096, 131072: 4 chunks of 4096 on GPU/TPU, 64 of 256 on CPU."""
    n, d, v = 16384, 4096, 131072
    fn = jax.value_and_grad(lambda h, k, t: jxent.linear_cross_entropy(h, k, t), argnums=(0, 1))
    args = avals(jnp.bfloat16, n, d, v)
    for platform, rows in (("cuda", 4096), ("tpu", 4096), ("cpu", 256)):
        text = lowered(fn, *args, platforms=(platform,))
        assert _chunk_rows(text, d, v) == {rows}, platform
        chunk_loops = [c for c in loop_carries(text) if ((d, v), "f32") in c]
        assert chunk_loops, platform  # the kernel gradient's carry: float32 [D, V]
        assert -(-n // rows) == {"cuda": 4, "tpu": 4, "cpu": 64}[platform]
    # Exported for several platforms at once, the program carries each one's chunk
    # (the CPU rule, 256 rows, is what an export for cuda carried before).
    both = lowered(fn, *args, platforms=("cpu", "cuda"))
    assert _chunk_rows(both, d, v) == {256, 4096}
    assert "stablehlo.case" in both


@pytest.mark.slow
def test_a_multi_platform_export_carries_each_platforms_policy():
    """cpu: float32 gradient products; cuda and tpu: bf16, in the one exported program."""
    text = program("softmax_cross_entropy", jnp.bfloat16, grad=True,
                   platforms=("cpu", "cuda", "tpu"))
    found = products(text)
    assert ((CHUNK, V), "f32", (D, V), "f32", (CHUNK, D), "f32") in found  # cpu's "accurate"
    assert ((CHUNK, V), "bf16", (D, V), "bf16", (CHUNK, D), "f32") in found  # the others'
    # Where the platforms agree (float32 inputs, a chunk given) there is one loop, no switch.
    text = program("softmax_cross_entropy", jnp.float32, grad=True, platforms=("cpu", "cuda"))
    assert len([c for c in loop_carries(text) if ((D, V), "f32") in c]) == 1


def test_float32_inputs_are_one_program_on_every_platform():
    texts = {p: program("softmax_cross_entropy", jnp.float32, grad=True, platforms=(p,))
             for p in ("cpu", "cuda")}
    strip = lambda t: re.sub(r"loc\(.*?\)|#loc\d*", "", t)
    # Same products: float32 in, float32 out, on both.
    assert products(texts["cpu"]) == products(texts["cuda"])
    assert {(p[1], p[3], p[5]) for p in products(texts["cpu"])} == {("f32", "f32", "f32")}
    assert strip(texts["cpu"]).count("stablehlo.while") == strip(texts["cuda"]).count(
        "stablehlo.while")


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_benchmark_reads_products_from_compiled_gpu_and_cpu_programs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("accelerator", None)
    import accelerator

    gpu = """
  %p.1 = bf16[4096,4096]{1,0} parameter(0)
  %p.2 = bf16[4096,128256]{1,0} parameter(1)
  %cublas-gemm.3 = (f32[4096,128256]{1,0}, s8[33554432]{0}) custom-call(%p.1, %p.2), custom_call_target="__cublas$lt$matmul", backend_config={}
  %f.4 = f32[4096,4096]{1,0} parameter(2)
  %f.5 = f32[4096,128256]{1,0} parameter(3)
  ROOT %dot.6 = f32[4096,128256]{1,0} dot(%f.4, %f.5), lhs_contracting_dims={1}, rhs_contracting_dims={0}
"""  # noqa: E501
    assert accelerator.compiled_products(gpu) == ["bf16·bf16→f32", "f32·f32→f32"]


@pytest.mark.slow
def test_the_benchmark_runs_on_cpu_at_small_sizes():
    """The GPU table's script, as the suite runs it: small sizes, one round, under 15 s."""
    size = "128,32,500"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "accelerator.py"), "--sizes", size,
         "--lowered-sizes", size, "--rounds", "1"],
        capture_output=True, text=True, timeout=120, cwd=BENCHMARKS,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "not measured on a GPU since 0.2.0" in out
    rows = [line for line in out.splitlines() if line.startswith("| 128, 32, 500")]
    assert len(rows) == 8 + 6, out  # 2 dtypes × 2 passes × 2 programs; 2 dtypes × 3 platforms
    assert "| 128, 32, 500 | bf16 | cuda | 128 | 1 | bf16·bf16→f32 |" in rows
