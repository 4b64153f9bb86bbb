"""apply_ / revert_: dispatch, stage order, double apply, no effect, reports, revert."""

import copy
import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from core_toys import (
    CountingHook,
    ScaledLinear,
    ScaleLinearConfig,
    ToyCheckpointConfig,
    ToyCompileConfig,
    ToyHookConfig,
)

from llmopt.core import (
    ApplyReport,
    CombinedReport,
    NoEffectError,
    NoEffectWarning,
    NotReversibleError,
    TechniqueConfig,
    UnknownTechniqueError,
    applied_techniques,
    apply_,
    config_from_dict,
    count_parameters,
    fqn_filter,
    revert_,
)
from llmopt.models import ModelConfig, build_model

IDX = torch.tensor([[1, 2, 3, 4, 5, 6]])

# tiny llmopt model: 2 layers x (4 attention + 3 mlp) Linear, plus lm_head (tied to embed_tokens)
N_BLOCK_LINEAR = 14


def test_dispatch_swaps_and_reports(toys, tiny_model):
    report = apply_(tiny_model, ScaleLinearConfig(scale=2.0))
    assert isinstance(report, ApplyReport) and report.technique == "scale_linear"
    assert report.config == ScaleLinearConfig(scale=2.0)
    swapped = {n for n, m in tiny_model.named_modules() if isinstance(m, ScaledLinear)}
    assert set(report.changed) == swapped and len(swapped) == N_BLOCK_LINEAR
    assert report.changed["layers.0.self_attn.q_proj"] == ("Linear", "ScaledLinear")
    assert report.skipped == {"lm_head": "output layer (all-linear leaves it out; name it in include to target it)"}
    assert tiny_model.applied_techniques == [ScaleLinearConfig(scale=2.0)]


def test_report_counts_and_one_line(toys, tiny_model):
    total = sum(p.numel() for p in tiny_model.parameters())
    for name, p in tiny_model.named_parameters():
        p.requires_grad_("layers.0.mlp" in name)
    trainable = sum(p.numel() for n, p in tiny_model.named_parameters() if "layers.0.mlp" in n)
    report = apply_(tiny_model, ScaleLinearConfig(exclude=("lm_head",)))
    assert report.params_before == report.params_after == total
    assert report.trainable_before == report.trainable_after == trainable
    assert report.bytes_after == report.bytes_before > 4 * total  # fp32 params, plus rope buffers
    pct = 100 * trainable / total
    assert str(report) == (f"scale_linear: 14 Linear -> ScaledLinear, 1 skipped (lm_head: excluded); "
                           f"trainable {pct:.0f}% ({trainable / 1000:.1f}K / {total / 1000:.1f}K)")
    data = report.to_dict()
    assert data["config"]["_type"] == "scale_linear"
    assert data["changed"]["layers.1.mlp.down_proj"] == ["Linear", "ScaledLinear"]
    assert data["skipped"] == {"lm_head": "excluded"} and data["hooks"] == []


def test_report_line_shows_hooks_notes_and_param_change():
    report = ApplyReport(technique="t", changed={"a": ("Linear", "LoRALinear")}, params_before=1000,
                         params_after=1100, trainable_after=100, hooks=[CountingHook()], notes=["set X"])
    assert str(report) == ("t: 1 Linear -> LoRALinear; trainable 9.1% (100 / 1.1K); params 1.0K -> 1.1K; "
                           "+1 hook (CountingHook) | note: set X")


def test_unregistered_config_lists_registered_names(toys, tiny_model):
    @dataclass(frozen=True, kw_only=True)
    class Unknown(TechniqueConfig):
        pass

    with pytest.raises(UnknownTechniqueError, match="Unknown is not a registered technique; registered transforms: "
                                                    ".*scale_linear, toy_compile"):
        apply_(tiny_model, Unknown())
    with pytest.raises(TypeError, match="instantiate"):
        apply_(tiny_model, ScaleLinearConfig)
    with pytest.raises(ValueError, match="at least one config"):
        apply_(tiny_model)


def test_configs_are_sorted_by_stage(toys, tiny_model):
    report = apply_(tiny_model, ToyCompileConfig(), ScaleLinearConfig())
    assert isinstance(report, CombinedReport)
    assert [r.technique for r in report] == ["scale_linear", "toy_compile"]
    assert report["toy_compile"].changed == {"": ("Transformer", "Transformer (toy compiled)")}
    assert str(report).splitlines()[1].startswith("toy_compile: 1 Transformer -> Transformer (toy compiled)")
    assert [type(c) for c in tiny_model.applied_techniques] == [ScaleLinearConfig, ToyCompileConfig]
    assert report.notes == ["toy_compile: nothing is really compiled"]


def test_out_of_order_names_both_and_changes_nothing(toys, tiny_model):
    apply_(tiny_model, ToyCompileConfig())
    before = copy.deepcopy(tiny_model.state_dict())
    with pytest.raises(ValueError, match=r"cannot apply 'scale_linear' \(stage SURGERY\) after 'toy_compile' "
                                         r"\(stage COMPILE\)"):
        apply_(tiny_model, ScaleLinearConfig())
    assert not any(isinstance(m, ScaledLinear) for m in tiny_model.modules())
    assert tiny_model.state_dict().keys() == before.keys()
    assert len(tiny_model.applied_techniques) == 1


def test_same_stage_in_later_call_is_allowed(toys, tiny_model):
    apply_(tiny_model, ScaleLinearConfig(include=("q_proj",)))
    apply_(tiny_model, ToyHookConfig())
    assert [type(c) for c in tiny_model.applied_techniques] == [ScaleLinearConfig, ToyHookConfig]


def test_double_apply_raises(toys, tiny_model):
    apply_(tiny_model, ScaleLinearConfig(include=("q_proj",)))
    with pytest.raises(ValueError, match="'scale_linear' is already applied"):
        apply_(tiny_model, ScaleLinearConfig(include=("k_proj",)))
    fresh = build_model(ModelConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="'scale_linear' appears twice in this call"):
        apply_(fresh, ScaleLinearConfig(), ScaleLinearConfig(scale=3.0))
    assert fresh.applied_techniques == []


def test_no_effect_raises_or_warns(toys, tiny_model):
    with pytest.raises(NoEffectError, match="'scale_linear' changed nothing in Transformer.*allow_no_effect=True"):
        apply_(tiny_model, ScaleLinearConfig(include=("no_such_module",)))
    with pytest.raises(NoEffectError, match=r"15 skipped: layers.0.self_attn.q_proj"):
        apply_(tiny_model, ScaleLinearConfig(mode="noop", include=("re:.*",)))
    assert tiny_model.applied_techniques == []
    with pytest.warns(NoEffectWarning, match="toy_checkpoint"):
        report = apply_(tiny_model, ToyCheckpointConfig(allow_no_effect=True))
    assert str(report).startswith("toy_checkpoint: nothing changed")
    assert tiny_model.applied_techniques == [ToyCheckpointConfig(allow_no_effect=True)]


def test_hooks_alone_are_an_effect(toys, tiny_model):
    report = apply_(tiny_model, ToyHookConfig())
    assert report.changed == {} and [type(h) for h in report.hooks] == [CountingHook]


def test_filter_fn_reaches_the_handler(toys, tiny_model):
    report = apply_(tiny_model, ScaleLinearConfig(), filter_fn=lambda m, fqn: fqn.startswith("layers.1."))
    assert set(report.changed) == {n for n, _ in tiny_model.named_modules() if n.startswith("layers.1.")
                                   and isinstance(_, ScaledLinear)}
    assert len(report.changed) == 7


def test_one_log_line_per_technique(toys, tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="llmopt"):
        apply_(tiny_model, ScaleLinearConfig(), ToyCompileConfig())
    lines = [r.getMessage() for r in caplog.records if r.name == "llmopt"]
    assert len(lines) == 2 and lines[0].startswith("scale_linear: 14 Linear") and lines[1].startswith("toy_compile")


def test_revert_restores_outputs_exactly(toys, tiny_model):
    expected = tiny_model(IDX)
    report = apply_(tiny_model, ScaleLinearConfig(scale=1.5, include=("q_proj", "o_proj", "down_proj")))
    assert len(report.changed) == 6
    assert not torch.equal(tiny_model(IDX), expected)
    undo = revert_(tiny_model, "scale_linear")
    assert undo.technique == "revert scale_linear" and len(undo.changed) == 6
    assert set(undo.changed.values()) == {("ScaledLinear", "Linear")}
    assert torch.equal(tiny_model(IDX), expected)
    assert tiny_model.applied_techniques == []
    apply_(tiny_model, ScaleLinearConfig())  # applicable again once reverted


def test_revert_refusals(toys, tiny_model):
    with pytest.raises(ValueError, match="'scale_linear' is not applied to this model; applied: nothing"):
        revert_(tiny_model, ScaleLinearConfig)
    apply_(tiny_model, ScaleLinearConfig(), ToyCompileConfig())
    with pytest.raises(NotReversibleError, match="'toy_compile' cannot be reverted"):
        revert_(tiny_model, "toy_compile")
    with pytest.raises(ValueError, match="'toy_compile' applied after it.*revert_ 'toy_compile' first"):
        revert_(tiny_model, "scale_linear")


def test_applied_configs_are_data(toys, tiny_model):
    apply_(tiny_model, ScaleLinearConfig(scale=3.0, exclude=("lm_head", "o_proj")), ToyCompileConfig())
    saved = [c.to_dict() for c in tiny_model.applied_techniques]
    assert [config_from_dict(d) for d in saved] == tiny_model.applied_techniques


def test_tied_weights_counted_once(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.embed_tokens.weight
    count = count_parameters(tiny_model)
    assert count.total == sum(p.numel() for p in tiny_model.parameters()) == tiny_model.num_parameters()
    untied = build_model(ModelConfig.from_name("tiny", tie_embeddings=False))
    assert count_parameters(untied).total == count.total + tiny_model.lm_head.weight.numel()


def test_apply_on_meta_model(toys):
    # .to("meta") rather than build_model(device="meta"): the same meta model without the one-time ~5 s import of
    # torch._dynamo that torch's meta normal_ triggers; .to() unties the tied weights, so tie them again
    model = build_model(ModelConfig.from_name("tiny")).to("meta")
    model.lm_head.weight = model.embed_tokens.weight
    assert model.lm_head.weight.is_meta
    report = apply_(model, ScaleLinearConfig())
    assert len(report.changed) == N_BLOCK_LINEAR
    assert report.params_after == report.params_before == count_parameters(
        build_model(ModelConfig.from_name("tiny"))).total
    assert model.layers[1].mlp.up_proj.inner.weight.is_meta


def test_apply_to_transformers_llama_in_place(toys, tiny_hf_llama):
    model = tiny_hf_llama
    idx = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        expected = model(idx).logits
    assert not hasattr(model, "applied_techniques")
    report = apply_(model, ScaleLinearConfig(scale=1.25, include=("q_proj", "v_proj")))
    assert set(report.changed) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert isinstance(model.model.layers[0].self_attn.q_proj, ScaledLinear)
    assert applied_techniques(model) == [ScaleLinearConfig(scale=1.25, include=("q_proj", "v_proj"))]
    with torch.no_grad():
        assert not torch.equal(model(idx).logits, expected)
        revert_(model, "scale_linear")
        assert torch.equal(model(idx).logits, expected)


def test_handler_must_return_a_report(toys, tiny_model):
    from llmopt.core import Stage, register

    @dataclass(frozen=True, kw_only=True)
    class Bad(TechniqueConfig):
        pass

    register(Bad, name="bad", stage=Stage.SURGERY)(lambda model, config, *, filter_fn=None: model)
    with pytest.raises(TypeError, match="must return an ApplyReport"):
        apply_(tiny_model, Bad())


def test_deepcopy_keeps_technique_state(toys, tiny_model):
    apply_(tiny_model, ScaleLinearConfig())
    clone = copy.deepcopy(tiny_model)
    revert_(clone, "scale_linear")
    assert isinstance(tiny_model.lm_head, nn.Linear)
    assert not any(isinstance(m, ScaledLinear) for m in clone.modules())
    assert any(isinstance(m, ScaledLinear) for m in tiny_model.modules())
    assert len(tiny_model.applied_techniques) == 1 and clone.applied_techniques == []


def test_fqn_filter_is_a_filter_fn(toys, tiny_model):
    report = apply_(tiny_model, ScaleLinearConfig(), filter_fn=fqn_filter(include="re:layers\\.0\\..*"))
    assert len(report.changed) == 7
