"""DoRA: exact at apply, the paper's formula, the norm without the merged weight, merge, revert, HF in place."""

import pytest
import torch
import torch.nn as nn

from llmopt import apply_
from llmopt.core import revert_
from llmopt.techniques import DoRAConfig, DoRALinear, merge_
from llmopt.techniques.adapters_io import load_adapters, save_adapters


def perturbed_layer(bias=True, seed=0):
    torch.manual_seed(seed)
    layer = DoRALinear.from_linear(nn.Linear(24, 16, bias=bias), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.2)
        layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(16))
    return layer


@pytest.fixture
def idx():
    torch.manual_seed(2)
    return torch.randint(0, 64, (2, 12))


def test_apply_within_fp32_rounding(tiny_model, idx):
    before = tiny_model(idx)
    report = apply_(tiny_model, DoRAConfig(r=4))
    assert set(report.changed.values()) == {("Linear", "DoRALinear")}
    # [x; A] W^T rounds x W^T as a GEMM with r more rows may: equal to fp32 rounding, not bit for bit
    torch.testing.assert_close(tiny_model(idx), before, atol=1e-6, rtol=1e-5)
    trainable = {n.rpartition(".")[2] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude"}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fuse", [True, False])
def test_equals_base_at_init(bias, fuse, monkeypatch):
    monkeypatch.setattr(DoRALinear, "fuse_norm_gemm", fuse)
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=bias)
    x = torch.randn(3, 24, requires_grad=True)
    layer = DoRALinear.from_linear(base, r=4, alpha=8.0)
    out = layer(x)
    assert torch.equal(layer.lora_magnitude / layer._norm_cache[1], torch.ones(16))  # g = 1 exactly at apply
    torch.testing.assert_close(out, base(x), atol=1e-6, rtol=1e-5)  # [x; A] W^T: fp32 rounding, not bit for bit


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_autograd_function_matches_autograd_ops(bias, dropout):
    """The fused _DoRAFunction (forward and every gradient) equals the plain-autograd path of the same formula."""
    layer = perturbed_layer(bias)
    layer.dropout = dropout
    if bias:
        layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    grad = torch.randn(2, 5, 16)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.weight] + ([layer.bias] if bias else [])
    results = []
    for path in ("function", "autograd"):
        torch.manual_seed(3)  # the same dropout mask on both paths
        out = layer(x) if path == "function" else layer._forward_autograd(x.reshape(-1, 24)).view(2, 5, 16)
        grads = torch.autograd.grad(out, [x] + params, grad)
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_paper_formula(bias):
    layer = perturbed_layer(bias)
    x = torch.randn(2, 5, 24)
    v = layer.weight + layer.lora_B @ layer.lora_A * layer.scale  # W + s B A, (out, in)
    w_prime = layer.lora_magnitude[:, None] * v / v.norm(dim=1, keepdim=True)  # m * V / ||V||, per output row
    expected = x @ w_prime.T + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_norm_trick_equals_materialized_norm():
    layer = perturbed_layer()
    materialized = (layer.weight + layer.lora_B @ layer.lora_A * layer.scale).norm(dim=1)
    torch.testing.assert_close(layer.row_norm(), materialized, rtol=1e-6, atol=1e-7)
    assert not layer.row_norm().requires_grad  # detached (DoRA §4.3)


def test_norm_is_detached_gradient():
    # with the norm treated as a constant, d out / d m is (x V^T) / ||V|| exactly
    layer = perturbed_layer(bias=False)
    x = torch.randn(4, 24)
    layer(x).sum().backward()
    v = (layer.weight + layer.lora_B @ layer.lora_A * layer.scale).detach()
    expected = (x @ v.T).sum(0) / v.norm(dim=1)
    torch.testing.assert_close(layer.lora_magnitude.grad, expected, atol=1e-5, rtol=1e-5)
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_weight_norm_cache_follows_weight_changes():
    layer = perturbed_layer()
    first = layer.row_norm()
    with torch.no_grad():
        layer.weight.mul_(2)  # bumps the version counter
    materialized = (layer.weight + layer.lora_B @ layer.lora_A * layer.scale).norm(dim=1)
    torch.testing.assert_close(layer.row_norm(), materialized, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(first, layer.row_norm())


def test_forward_norm_cache_follows_adapter_updates():
    layer = perturbed_layer()
    x = torch.randn(5, 24)
    layer(x)  # fills the cached norm
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.5)
    layer(x).square().sum().backward()
    opt.step()  # in-place updates bump the version counters: the next forward recomputes the norm
    fresh = DoRALinear.from_linear(nn.Linear(24, 16), r=4, alpha=8.0)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), fresh(x))
    with torch.no_grad():
        layer.lora_B.zero_()
        fresh.lora_B.zero_()
    assert torch.equal(layer(x), fresh(x))


def _perturb(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DoRALinear):
                m.lora_B.normal_(std=0.1)
                m.lora_magnitude.mul_(1.1)


def test_revert_is_exact(tiny_model, idx):
    before = tiny_model(idx)
    apply_(tiny_model, DoRAConfig(r=4))
    _perturb(tiny_model)
    assert not torch.equal(tiny_model(idx), before)
    revert_(tiny_model, "dora")
    assert type(tiny_model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(tiny_model(idx), before)


def test_merge_within_1e5(tiny_model, idx):
    apply_(tiny_model, DoRAConfig(r=4))
    _perturb(tiny_model)
    adapted = tiny_model(idx)
    report = merge_(tiny_model)
    assert report.technique == "merge dora"
    assert not any(isinstance(m, DoRALinear) for m in tiny_model.modules())
    torch.testing.assert_close(tiny_model(idx), adapted, atol=1e-5, rtol=0)


def test_transformers_in_place_and_save_load(idx, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    before = hf(idx).logits
    apply_(hf, DoRAConfig(r=4, target=("q_proj", "v_proj")))
    assert torch.equal(hf(idx).logits, before)
    with torch.no_grad():
        for m in hf.modules():
            if isinstance(m, DoRALinear):
                m.lora_B.normal_(std=0.1)
                m.lora_magnitude.mul_(0.9)
    adapted = hf(idx).logits
    path = save_adapters(hf, tmp_path / "dora.safetensors")
    fresh = transformers.LlamaForCausalLM(config).eval()
    fresh.load_state_dict(state)
    load_adapters(fresh, path)
    assert torch.equal(fresh(idx).logits, adapted)
