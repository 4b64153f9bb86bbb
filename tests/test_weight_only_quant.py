"""Weight-only int8/int4: packed bytes, kernel path = dequant path (to bf16 rounding), tied tables shared, meta."""

import copy

import pytest
import torch

from llmopt import apply_
from llmopt.models import ModelConfig, build_model
from llmopt.quant.int_quant import dequantize_weight, quantize_weight
from llmopt.techniques.weight_only_quant import IntWeightOnlyEmbedding, IntWeightOnlyLinear, WeightOnlyQuantConfig


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny", dim=64, **overrides))


def _sqnr(ref, out):
    ref, out = ref.detach(), out.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


@pytest.mark.parametrize("config,min_db,max_ratio", [
    (WeightOnlyQuantConfig(bits=8), 35, 0.27),
    (WeightOnlyQuantConfig(bits=4, group_size=32), 15, 0.16),
    (WeightOnlyQuantConfig(bits=4, group_size=16), 15, 0.19),  # fallback path (no kernel for 16)
])
def test_outputs_close_and_bytes_small(config, min_db, max_ratio):
    reference = _model()
    model = copy.deepcopy(reference)
    report = apply_(model, config)
    assert all(isinstance(m, (IntWeightOnlyLinear, IntWeightOnlyEmbedding)) for m in
               (model.lm_head, model.embed_tokens, model.layers[0].mlp.up_proj))
    x = torch.randint(0, 320, (2, 16))
    assert _sqnr(reference(x), model(x)) > min_db
    linear_bytes = sum(b.numel() * b.element_size() for b in {id(b): b for b in model.buffers()}.values()
                       if b.dtype in (torch.int8, torch.uint8, torch.bfloat16))
    fp_bytes = sum(m.weight.numel() * 4 for m in reference.modules() if isinstance(m, torch.nn.Linear)) - \
        reference.lm_head.weight.numel() * 4 + reference.embed_tokens.weight.numel() * 4
    assert linear_bytes / fp_bytes <= max_ratio
    assert "x," in report.notes[0]


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_kernel_path_matches_dequant_path(bits, group):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True)
    q = quantize_weight(linear.weight, bits=bits, group_size=group, symmetric=bits == 8, scale_dtype=torch.bfloat16)
    fast = IntWeightOnlyLinear(q, linear.bias, kernel="auto")
    exact = IntWeightOnlyLinear(q, linear.bias, kernel="dequant", chunk_rows=40)  # chunked: 3 chunks
    x = torch.randn(3, 5, 128)
    reference = x @ dequantize_weight(q).t() + linear.bias
    torch.testing.assert_close(exact(x), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(x), reference, atol=0.05, rtol=0.02)  # bf16 activations


def test_tied_embedding_shares_one_table_and_lookup_is_exact():
    model = _model()
    assert model.lm_head.weight is model.embed_tokens.weight
    apply_(model, WeightOnlyQuantConfig(bits=4, group_size=32))
    assert model.lm_head.qcodes is model.embed_tokens.qcodes
    idx = torch.tensor([[0, 17, 31, 32, 319]])
    assert torch.equal(model.embed_tokens(idx), model.lm_head.weight[idx])


def test_meta_and_exclude_and_errors():
    meta = build_model(ModelConfig.from_name("tiny", dim=64), device="meta")
    report = apply_(meta, WeightOnlyQuantConfig(bits=4, group_size=32, exclude=("lm_head", "embed_tokens")))
    assert all(b.is_meta for b in meta.buffers())
    assert "lm_head" in report.skipped and "lm_head" not in report.changed
    with pytest.raises(ValueError, match="group_size"):
        WeightOnlyQuantConfig(bits=4)
    model = _model()
    report = apply_(model, WeightOnlyQuantConfig(bits=4, group_size=48))  # 48 does not divide 64
    assert not report.changed or all("48" in r or "divide" in r for r in report.skipped.values())


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_cached_kernel_scales_follow_load_state_dict(bits, group):
    """The fused kernel's scale layout is cached; loading other weights in place must rebuild it."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(64, 48, bias=False)
    config = WeightOnlyQuantConfig(bits=bits, group_size=group)
    qa, qb = (torch.nn.Sequential(m) for m in (a, b))
    apply_(qa, config)
    apply_(qb, config)
    x = torch.randn(3, 64)
    with torch.no_grad():
        qa(x)  # builds qa's cache with a's scales
        qa.load_state_dict(qb.state_dict())
        assert torch.equal(qa(x), qb(x))
    assert not any("kernel_scales" in k for k in qa.state_dict())
