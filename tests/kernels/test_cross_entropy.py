"""Fused linear + cross-entropy: chunked and Triton paths vs the full-logits reference; no N x V is saved."""

import pytest
import torch
from conftest import interpreted, needs_cuda, needs_triton, rel_err

from llmopt.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference
from llmopt.measure.memory import account_training_step


def _inputs(n, dim, vocab, dtype=torch.float32, ignore=(3,), seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * 0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g).to(device)
    for i in ignore:
        t[i] = -100
    return h, w, t


def _loss_and_grads(fn, h, w, t, scale=0.7):
    h.grad = w.grad = None
    loss, count = fn(h, w, t)
    (loss * scale).backward()
    return loss.detach(), count, h.grad.clone(), w.grad.clone()


def _check(backend, n, dim, vocab, dtype=torch.float32, tol=1e-5, chunk_size=None, device="cpu"):
    h, w, t = _inputs(n, dim, vocab, dtype, device=device)
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
    out = _loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, backend=backend, chunk_size=chunk_size), h, w, t)
    assert out[1] == ref[1]
    for what, a, b in zip(("loss", "grad hidden", "grad weight"), (ref[0], ref[2], ref[3]), (out[0], out[2], out[3])):
        assert a.dtype == b.dtype, what
        assert rel_err(a, b) < tol, f"{backend} {what}: rel err {rel_err(a, b):.2e} >= {tol}"


@pytest.mark.parametrize("chunk_size", [1, 7, 16, None])
def test_chunked_matches_reference_fp32(chunk_size):
    _check("chunked", 37, 24, 300, chunk_size=chunk_size)


def test_chunked_matches_reference_at_256k_vocab():
    # the vocabulary size where fused CE implementations have lost precision (Megatron-LM PR #2206)
    _check("chunked", 8, 16, 262_144, chunk_size=4)


def test_chunked_bf16_close_to_reference():
    _check("chunked", 64, 32, 500, dtype=torch.bfloat16, tol=2e-2, chunk_size=16)


def test_frozen_weight_and_no_grad():
    h, w, t = _inputs(20, 8, 50)
    w.requires_grad_(False)
    loss, _ = fused_linear_cross_entropy(h, w, t, backend="chunked", chunk_size=6)
    loss.backward()
    ref_h = h.detach().clone().requires_grad_()
    linear_cross_entropy_reference(ref_h, w, t)[0].backward()
    assert rel_err(ref_h.grad, h.grad) < 1e-6 and w.grad is None
    with torch.no_grad():
        loss2, _ = fused_linear_cross_entropy(h, w, t, backend="chunked", chunk_size=6)
    assert not loss2.requires_grad and torch.allclose(loss2, loss.detach(), rtol=1e-6)


def test_all_targets_ignored_gives_zero():
    h, w, t = _inputs(5, 8, 30, ignore=range(5))
    loss, count = fused_linear_cross_entropy(h, w, t, backend="chunked")
    loss.backward()
    assert loss.item() == 0 and count.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_nothing_of_size_n_by_v_is_saved():
    n, dim, vocab = 64, 16, 4096
    h, w, t = _inputs(n, dim, vocab)
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = fused_linear_cross_entropy(h, w, t, backend="chunked", chunk_size=8)
    loss.backward()
    assert sizes and max(sizes) < n * vocab, f"largest saved tensor has {max(sizes)} elements >= N*V = {n * vocab}"

    # the accounting the bench uses: saved activations of a loss step, fused vs reference
    def accounted(fn):
        h2, w2, t2 = _inputs(n, dim, vocab)
        opt = torch.optim.SGD([h2, w2], lr=0.0)
        return account_training_step(torch.nn.Module(), opt, lambda: fn(h2, w2, t2)[0]).activations

    fused = accounted(lambda *a: fused_linear_cross_entropy(*a, backend="chunked", chunk_size=8))
    ref = accounted(linear_cross_entropy_reference)
    assert ref >= n * vocab * 4 > fused, (fused, ref)


def test_bad_shapes_and_backend_raise():
    h, w, t = _inputs(4, 8, 10)
    with pytest.raises(ValueError, match="flatten"):
        fused_linear_cross_entropy(h[None], w, t)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(h, w, t, backend="nope")
    with pytest.raises((RuntimeError, ImportError), match="triton"):
        fused_linear_cross_entropy(h, w, t, backend="triton")  # CPU tensors without the interpreter


@needs_triton
def test_triton_interpreter_matches_reference():
    errors = interpreted("cross_entropy")
    bad = {k: v for k, v in errors.items() if not v < 1e-5}
    assert not bad, f"Triton CE under the interpreter, rel err >= 1e-5: {bad}"


@needs_triton
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_on_gpu(dtype, tol):
    _check("triton", 1024, 256, 32_000, dtype=dtype, tol=tol, device="cuda")
    _check("triton", 64, 128, 262_144, dtype=dtype, tol=tol, device="cuda")


def test_second_backward_through_the_same_graph_is_refused():
    h, w, t = _inputs(6, 8, 20)
    loss, _ = fused_linear_cross_entropy(h, w, t, backend="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
