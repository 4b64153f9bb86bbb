"""QLoRA: NF4 base with LoRA on top; equals LoRA on the dequantized weight, saves no fp weight, merge path."""

import pytest
import torch
import torch.nn as nn

from llmopt import apply_
from llmopt.core import revert_
from llmopt.models import ModelConfig, build_model
from llmopt.quant.nf4 import nf4_error_bound, quantize_nf4
from llmopt.techniques import LoRALinear, NF4Linear, QLoRAConfig, QLoRALinear, merge_
from llmopt.techniques.adapters_io import load_adapters, save_adapters


def qlora_layer(compute_dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(128, 48, bias=bias)
    layer = QLoRALinear(quantize_nf4(base.weight), base.bias, r=4, alpha=8.0, compute_dtype=compute_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    return base, layer


def lora_on_dequantized(layer: QLoRALinear) -> LoRALinear:
    ref = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantized_weight())
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    lora = LoRALinear.from_linear(ref, r=layer.r, alpha=layer.alpha)
    with torch.no_grad():
        lora.lora_A.copy_(layer.lora_A)
        lora.lora_B.copy_(layer.lora_B)
    return lora


@pytest.mark.parametrize("bias", [False, True])
def test_equals_lora_on_dequantized_weight(bias):
    _, layer = qlora_layer(bias=bias)
    ref = lora_on_dequantized(layer)
    x = torch.randn(2, 7, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = layer(x), ref(x_ref)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad, ref.lora_A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, ref.lora_B.grad, atol=1e-5, rtol=1e-5)


def test_backward_saves_no_full_precision_weight():
    _, layer = qlora_layer()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(3, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    weight_numel = layer.in_features * layer.out_features
    big_float = [s for s in saved if s[1].is_floating_point and torch.Size(s[0]).numel() >= weight_numel]
    assert big_float == [], f"saved full-size float tensors: {big_float}"
    assert any(dtype == torch.uint8 for _, dtype in saved)  # the packed NF4 codes are what backward keeps


def test_bf16_compute_dtype():
    _, layer32 = qlora_layer()
    _, layer16 = qlora_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    out16 = layer16(x)
    assert out16.dtype == torch.float32  # the adapters and the output stay in the model's dtype
    torch.testing.assert_close(out16, layer32(x), atol=0.05, rtol=0.02)


def test_apply_on_model_within_nf4_error_and_reports_bits(tiny_model):
    idx = torch.randint(0, 320, (2, 10))
    lin = tiny_model.layers[0].mlp.up_proj
    w = lin.weight.detach().clone()
    report = apply_(tiny_model, QLoRAConfig(r=4, target=("q_proj", "v_proj")))
    # adapters on q_proj/v_proj; every other Linear but lm_head is NF4 without an adapter (quantize's default)
    adapted = {f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert {k for k, v in report.changed.items() if v == ("Linear", "QLoRALinear")} == adapted
    assert {v for k, v in report.changed.items() if k not in adapted} == {("Linear", "NF4Linear")}
    assert len(report.changed) == 14 and not any(type(m) is nn.Linear for m in tiny_model.layers.modules())
    assert report.skipped == {"lm_head": "excluded"}
    assert any("bits/param" in n for n in report.notes) and any("unquantized" in n for n in report.notes)
    layer = tiny_model.layers[0].mlp.up_proj
    assert not any(isinstance(p, nn.Parameter) and p.shape == w.shape for p in layer.parameters())
    x = torch.randn(5, w.shape[1])
    q = layer.nf4
    bound = x.abs() @ nf4_error_bound(w, q).T
    assert ((layer(x) - x @ w.T).abs() <= bound + 1e-6).all()  # B = 0: only the NF4 error
    trainable = {n.rpartition(".")[2] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    tiny_model(idx).sum().backward()


def test_merge_dequantize_merge_requantize():
    _, layer = qlora_layer()
    x = torch.randn(6, 128)
    unmerged = layer(x).detach()
    merged_fp = (layer.dequantized_weight() + layer.lora_B @ layer.lora_A * layer.scale).detach()
    merged = layer.to_nf4_linear()
    assert type(merged) is NF4Linear
    assert merged.nf4_absmax.dtype == torch.int8  # requantized with double quantization again
    bound = x.abs() @ nf4_error_bound(merged_fp, merged.nf4).T
    assert ((merged(x) - unmerged).abs() <= bound + 1e-5).all()


def test_merge_and_revert_on_model(tiny_model):
    idx = torch.randint(0, 320, (2, 10))
    apply_(tiny_model, QLoRAConfig(r=4))
    base_only = tiny_model(idx)
    revert_(tiny_model, "qlora")
    # revert gives nn.Linear with the dequantized weights: the quantized model's outputs, adapters dropped
    assert type(tiny_model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(tiny_model(idx), base_only, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in tiny_model.parameters())
    apply_(tiny_model, QLoRAConfig(r=4))
    report = merge_(tiny_model)
    assert set(report.changed.values()) == {("QLoRALinear", "NF4Linear")}  # quantize-only layers stay NF4Linear
    assert type(tiny_model.layers[0].mlp.up_proj) is NF4Linear


def test_default_adapts_every_linear_but_lm_head(tiny_model):
    report = apply_(tiny_model, QLoRAConfig(r=4))  # the QLoRA paper's setting
    assert set(report.changed.values()) == {("Linear", "QLoRALinear")} and len(report.changed) == 14


def test_quantize_empty_keeps_other_linear_layers_fp(tiny_model):
    report = apply_(tiny_model, QLoRAConfig(r=4, target=("q_proj", "v_proj"), quantize=()))
    assert set(report.changed.values()) == {("Linear", "QLoRALinear")} and len(report.changed) == 4
    assert type(tiny_model.layers[0].mlp.up_proj) is nn.Linear


def test_save_load_adapters_and_state_dict(tiny_model, tmp_path):
    idx = torch.randint(0, 320, (2, 10))
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_(tiny_model, QLoRAConfig(r=4, target=("q_proj", "v_proj")))
    with torch.no_grad():
        for m in tiny_model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.normal_(std=0.1)
    expected = tiny_model(idx)
    path = save_adapters(tiny_model, tmp_path / "q.safetensors")
    fresh = build_model(ModelConfig.from_name("tiny"))
    fresh.load_state_dict(state)
    load_adapters(fresh, path)  # quantizing the same base gives the same NF4 weights
    assert torch.equal(fresh(idx), expected)
    sd = tiny_model.state_dict()
    assert any(k.endswith("nf4_codes") for k in sd)
    meta = build_model(ModelConfig.from_name("tiny")).to("meta")
    apply_(meta, QLoRAConfig(r=4, target=("q_proj", "v_proj")))
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_transformers_model_in_place():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    idx = torch.randint(0, 64, (1, 8))
    before = hf(idx).logits
    report = apply_(hf, QLoRAConfig(r=4))
    assert "model.layers.1.mlp.down_proj" in report.changed
    out = hf(idx).logits
    assert (out - before).abs().max() < 0.1 * before.abs().max()
    out.sum().backward()


def test_bnb_backend_matches_ours():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install llmopt[peers])")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    ours = nn.Sequential(nn.Linear(128, 64))
    ours.load_state_dict(model.state_dict())
    apply_(model, QLoRAConfig(r=4, backend="bnb", double_quant=False, target=("0",)))
    apply_(ours, QLoRAConfig(r=4, double_quant=False, nf4_scale="absmax", target=("0",)))
    x = torch.randn(3, 128)
    torch.testing.assert_close(model(x), ours(x), atol=1e-5, rtol=1e-5)  # the same NF4 weight, B = 0
    model(x).sum().backward()
    assert model[0].lora_B.grad is not None


def test_config_errors():
    with pytest.raises(ValueError, match="block_size"):
        QLoRAConfig(block_size=63)
    with pytest.raises(ValueError, match="r must be"):
        QLoRAConfig(r=-1)


def test_bnb_backend_quantize_only_layers_and_revert():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install llmopt[peers])")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 128))
    report = apply_(model, QLoRAConfig(r=4, backend="bnb", target=("0",)))
    assert report.changed == {"0": ("Linear", "BnbQLoRALinear"), "1": ("Linear", "Linear4bit")}
    assert isinstance(model[1], bnb.nn.Linear4bit) and any("bits/param" in n for n in report.notes)
    x = torch.randn(3, 128)
    quantized = model(x).detach()
    revert_(model, "qlora")
    assert all(type(m) is nn.Linear for m in model)
    torch.testing.assert_close(model(x), quantized, atol=1e-5, rtol=1e-5)
