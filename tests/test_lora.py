"""LoRA: exact at apply, only adapters train, merge, revert, adapter files, transformers models in place."""

import json

import pytest
import torch
import torch.nn as nn

from llmopt import apply_
from llmopt.core import NoEffectError, revert_
from llmopt.models import ModelConfig, build_model
from llmopt.techniques import LoRAConfig, LoRALinear, merge_
from llmopt.techniques.adapters_io import adapter_state_dict, load_adapters, save_adapters


def tiny_hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def randomize_adapters(model, std=0.1):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=std)


@pytest.fixture
def idx():
    torch.manual_seed(2)
    return torch.randint(0, 64, (2, 12))


def test_apply_is_exact_and_reports(tiny_model, idx):
    before = tiny_model(idx)
    report = apply_(tiny_model, LoRAConfig(r=4, target=("all-linear",)))
    assert torch.equal(tiny_model(idx), before)
    assert len(report.changed) == 14 and set(report.changed.values()) == {("Linear", "LoRALinear")}
    assert report.skipped == {"lm_head": "excluded"}
    lora = sum(p.numel() for n, p in tiny_model.named_parameters() if "lora_" in n)
    assert report.trainable_after == lora and report.params_after == report.params_before + lora
    assert "trainable" in str(report)


def test_default_targets_are_query_and_value(tiny_model):
    """The default is the LoRA paper's and PEFT's (Llama) setting: q_proj and v_proj only."""
    assert LoRAConfig().target == ("q_proj", "v_proj")
    report = apply_(tiny_model, LoRAConfig(r=4))
    assert sorted(report.changed) == [f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def test_only_adapters_train(tiny_model, idx):
    apply_(tiny_model, LoRAConfig(r=4, target=("q_proj", "v_proj")))
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2] in ("lora_A", "lora_B") for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    tiny_model(idx).sum().backward()
    for n, p in tiny_model.named_parameters():
        assert (p.grad is not None) == (n in trainable)
    # B = 0 at init: A gets no gradient yet, B does
    assert tiny_model.layers[0].self_attn.q_proj.lora_B.grad.abs().sum() > 0


def test_merge_within_1e5_and_swaps_back(tiny_model, idx):
    apply_(tiny_model, LoRAConfig(r=4, alpha=8, target=("all-linear",)))
    randomize_adapters(tiny_model)
    unmerged = tiny_model(idx)
    report = merge_(tiny_model)
    assert report.technique == "merge lora" and len(report.changed) == 14
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    assert tiny_model.applied_techniques == []
    assert all(p.requires_grad for p in tiny_model.parameters())
    torch.testing.assert_close(tiny_model(idx), unmerged, atol=1e-5, rtol=0)


def test_revert_is_exact(tiny_model, idx):
    before = tiny_model(idx)
    weight = tiny_model.layers[0].mlp.up_proj.weight
    tiny_model.layers[1].input_layernorm.weight.requires_grad_(False)  # a flag that revert must restore
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    apply_(tiny_model, LoRAConfig(r=4, target=("all-linear",)))
    randomize_adapters(tiny_model)
    assert not torch.equal(tiny_model(idx), before)
    revert_(tiny_model, "lora")
    assert type(tiny_model.layers[0].mlp.up_proj) is nn.Linear
    assert tiny_model.layers[0].mlp.up_proj.weight is weight
    assert torch.equal(tiny_model(idx), before)
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags


def test_dropout_only_in_training(tiny_model, idx):
    apply_(tiny_model, LoRAConfig(r=4, dropout=0.5))
    randomize_adapters(tiny_model)
    tiny_model.eval()
    assert torch.equal(tiny_model(idx), tiny_model(idx))
    tiny_model.train()
    torch.manual_seed(0)
    a = tiny_model(idx)
    torch.manual_seed(1)
    assert not torch.equal(a, tiny_model(idx))


def test_forward_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = LoRALinear.from_linear(base, r=3, alpha=6.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 20)
    expected = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * 2.0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_size(tiny_model, idx, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_(tiny_model, LoRAConfig(r=4, target=("q_proj", "v_proj", "down_proj")))
    randomize_adapters(tiny_model)
    expected = tiny_model(idx)
    path = save_adapters(tiny_model, tmp_path / "adapters.safetensors")
    n = sum(t.numel() for t in adapter_state_dict(tiny_model).values())
    assert path.stat().st_size < n * 4 + 4096  # only the adapters (fp32) and a small header
    assert json.loads(path.with_suffix(".json").read_text())["r"] == 4

    fresh = build_model(ModelConfig.from_name("tiny"))
    fresh.load_state_dict(state)
    report = load_adapters(fresh, path)
    assert report.technique == "lora" and len(report.changed) == 6
    assert torch.equal(fresh(idx), expected)


def test_load_refuses_mismatched_shapes(tiny_model, tmp_path):
    apply_(tiny_model, LoRAConfig(r=4))
    path = save_adapters(tiny_model, tmp_path / "a.safetensors")
    other = build_model(ModelConfig.from_name("tiny", dim=48))
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, \d+\) but the model expects \(4, \d+\)") as e:
        load_adapters(other, path)
    assert "\n" not in str(e.value)
    assert other.applied_techniques == [] and not any(isinstance(m, LoRALinear) for m in other.modules())
    with pytest.raises(FileNotFoundError):
        load_adapters(other, tmp_path / "missing.safetensors")


def test_transformers_model_in_place(idx, tmp_path):
    hf = tiny_hf_llama()
    before = hf(idx).logits
    report = apply_(hf, LoRAConfig(r=4, target=("all-linear",)))
    assert "model.layers.0.self_attn.q_proj" in report.changed and "lm_head" in report.skipped
    assert isinstance(hf.model.layers[0].mlp.gate_proj, LoRALinear)
    assert torch.equal(hf(idx).logits, before)
    randomize_adapters(hf)
    adapted = hf(idx).logits
    path = save_adapters(hf, tmp_path / "hf.safetensors")
    again = tiny_hf_llama()
    load_adapters(again, path)
    assert torch.equal(again(idx).logits, adapted)
    merge_(hf)
    torch.testing.assert_close(hf(idx).logits, adapted, atol=1e-5, rtol=0)


def test_adapters_cross_load_llmopt_to_transformers(tmp_path, idx):
    from llmopt.models.hf import from_hf

    hf = tiny_hf_llama()
    ours = from_hf(hf)
    apply_(ours, LoRAConfig(r=2))
    randomize_adapters(ours)
    path = save_adapters(ours, tmp_path / "x.safetensors")
    load_adapters(hf, path)  # keys gain the "model." prefix
    torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip_and_meta(tiny_model, idx):
    apply_(tiny_model, LoRAConfig(r=4))
    randomize_adapters(tiny_model)
    sd = tiny_model.state_dict()
    assert "layers.0.self_attn.q_proj.weight" in sd and "layers.0.self_attn.q_proj.lora_A" in sd
    other = build_model(ModelConfig.from_name("tiny"))
    apply_(other, LoRAConfig(r=4))
    other.load_state_dict(sd)
    assert torch.equal(other(idx), tiny_model(idx))
    meta = build_model(ModelConfig.from_name("tiny")).to("meta")
    apply_(meta, LoRAConfig(r=4))
    assert meta.layers[0].self_attn.q_proj.lora_A.is_meta


def test_autocast_bf16(tiny_model, idx):
    apply_(tiny_model, LoRAConfig(r=4))
    randomize_adapters(tiny_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(idx)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()


def test_config_errors_and_no_match(tiny_model):
    with pytest.raises(ValueError, match="r must be"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(NoEffectError):
        apply_(tiny_model, LoRAConfig(target=("no_such_proj",)))
    with pytest.raises(ValueError, match="no adapters"):
        merge_(tiny_model)
