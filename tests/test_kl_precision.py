"""KL divergence of logits in float32: no worse than PyTorch's, against float64.

PyTorch computes the KL of two sets of logits as ``kl_div(log_softmax(s),
log_softmax(t), log_target=True)`` (TRL's and Liger Kernel's references do
the same on logits); jxent's ``distillation_loss`` and
``kl_divergence_from_logits`` take the logits directly. Both are measured
against the same computation in float64, per row, over vocabularies of 1271
and 32000 classes, for close and for unrelated distributions. jxent 0.3 formed
``log t − log s`` from separately normalised terms (two rounded logs of size
``log V``) and added the normalisers after the weighted sum (a cancellation
at the end); now each class's ``x_t − x_s`` is one rounded difference of the
logits and the two normalisers enter as one log of their ratio, and the error
is at most PyTorch's (``pytest tests/test_kl_precision.py -s`` prints both).

When the inputs are already log-probabilities, ``kl_div`` on them directly
skips the normalisation that any function of logits must do; that sum's
rounding (about 1e-7 absolute in float32) is the floor of the comparison.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent._testing import OPTIMIZED

torch = pytest.importorskip("torch")


# These tests compute more than they compile: full LLVM optimisation (the suite's
# processes default to the quick setting, tests/conftest.py).
jit = functools.partial(jax.jit, compiler_options=OPTIMIZED)


def log_softmax64(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl64(student, teacher):
    ls, lt = log_softmax64(student), log_softmax64(teacher)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def cases():
    for v in (1271, 32000):
        for scale in (0.5, 1.0, 3.0):
            for related in (False, True):
                yield v, scale, related


@pytest.mark.slow
@pytest.mark.parametrize("v, scale, related", list(cases()))
def test_per_row_kl_error_is_at_most_pytorchs(v, scale, related):
    rng = np.random.default_rng(v + int(10 * scale) + related)
    student = (rng.standard_normal((128, v)) * scale).astype(np.float32)
    noise = rng.standard_normal((128, v)) * scale
    teacher = ((student + 0.5 * noise) if related else noise).astype(np.float32)
    exact = kl64(student, teacher)

    s, t = torch.from_numpy(student), torch.from_numpy(teacher)
    theirs = torch.nn.functional.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none"
    ).sum(-1).double().numpy()
    torch_error = np.abs(theirs - exact).max()
    ours = {
        "distillation_loss kl": jxent.distillation_loss(student, teacher, shift=False,
                                                        reduction="none"),
        "distillation_loss reverse_kl": jxent.distillation_loss(
            teacher, student, shift=False, divergence="reverse_kl", reduction="none"),
        "kl_divergence_from_logits": jxent.kl_divergence_from_logits(teacher, student),
    }
    for name, values in ours.items():
        error = np.abs(np.asarray(values, np.float64) - exact).max()
        print(f"V={v} scale={scale} related={related} {name}: {error:.3g} "
              f"(torch {torch_error:.3g})")
        assert error <= torch_error, (name, error, torch_error)


@pytest.mark.slow
@pytest.mark.parametrize("v", [1271, 32000])
def test_kl_gradient_error_is_at_most_pytorchs(v):
    rng = np.random.default_rng(v)
    student = rng.standard_normal((64, v)).astype(np.float32)
    teacher = rng.standard_normal((64, v)).astype(np.float32)
    # d/d student of the summed KL: softmax(student) − softmax(teacher), in float64.
    exact = np.exp(log_softmax64(student)) - np.exp(log_softmax64(teacher))

    s = torch.from_numpy(student).requires_grad_(True)
    torch.nn.functional.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(torch.from_numpy(teacher), -1),
        log_target=True, reduction="sum",
    ).backward()
    torch_error = np.abs(s.grad.double().numpy() - exact).max()
    grad = jit(jax.grad(lambda x: jxent.distillation_loss(
        x, jnp.asarray(teacher), shift=False, reduction="sum")))(student)
    error = np.abs(np.asarray(grad, np.float64) - exact).max()
    print(f"V={v} gradient: {error:.3g} (torch {torch_error:.3g})")
    assert error <= 1.05 * torch_error, (error, torch_error)
