"""Fused RMSNorm, add + RMSNorm, SwiGLU, RoPE: compiled and Triton paths vs the model's own math."""

import pytest
import torch
from conftest import interpreted, needs_cuda, needs_triton, rel_err

from llmopt.kernels import add_rms_norm, rms_norm, rope, swiglu
from llmopt.models.llama import RMSNorm, apply_rope, rope_tables


def _grads(fn, inputs, seed=1):
    """Outputs of fn(*inputs) and gradients of a random projection of them w.r.t. every input."""
    for t in inputs:
        t.grad = None
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    sum(((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)).backward()
    return [o.detach() for o in outs] + [t.grad.clone() for t in inputs]


def _ops(dtype=torch.float32, device="cpu"):
    """{op name: (fn(backend) -> callable, input tensors)} on small shapes."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    cos, sin = rope_tables(16, 32, 10000.0)
    cos, sin = cos[3:14].to(device), sin[3:14].to(device)  # positions 3..13, as a cache would gather
    return {
        "rms_norm": (lambda b: lambda x, w: rms_norm(x, w, 1e-5, backend=b), [leaf(2, 5, 24), leaf(24)]),
        "add_rms_norm": (lambda b: lambda x, r, w: add_rms_norm(x, r, w, 1e-5, backend=b),
                         [leaf(2, 5, 24), leaf(2, 5, 24), leaf(24)]),
        "swiglu": (lambda b: lambda gt, up: swiglu(gt, up, backend=b), [leaf(3, 7, 33), leaf(3, 7, 33)]),
        "rope": (lambda b: lambda q, k: rope(q, k, cos, sin, backend=b), [leaf(2, 4, 11, 16), leaf(2, 2, 11, 16)]),
    }


def run_all(backend, dtype=torch.float32, device="cpu"):
    """{op/output index: rel err vs the reference backend}."""
    errors = {}
    for name, (make, inputs) in _ops(dtype, device).items():
        ref = _grads(make("reference"), inputs)
        out = _grads(make(backend), inputs)
        for i, (a, b) in enumerate(zip(ref, out)):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
            errors[f"{name}[{i}]"] = rel_err(a, b)
    return errors


def test_reference_is_the_model_math():
    x, w = torch.randn(3, 8), torch.rand(8)
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data.copy_(w)
    assert torch.equal(rms_norm(x, w, 1e-6, backend="reference"), norm(x))
    cos, sin = rope_tables(8, 4, 10000.0)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(rope(q, k, cos, sin, backend="reference"), apply_rope(q, k, cos, sin)))


def test_compiled_matches_reference():
    errors = run_all("compiled")
    assert max(errors.values()) < 1e-6, errors


def test_auto_is_compiled_on_cpu_and_backend_checked():
    from llmopt.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), "compiled", ("reference", "compiled", "triton")) == "compiled"
    with pytest.raises(ValueError, match="backend"):
        swiglu(torch.ones(2), torch.ones(2), backend="fast")


@needs_triton
def test_triton_interpreter_matches_reference():
    errors = interpreted("pointwise")
    assert max(errors.values()) < 1e-6, errors


@needs_triton
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_triton_on_gpu(dtype, tol):
    errors = run_all("triton", dtype, "cuda")
    assert max(errors.values()) < tol, errors
