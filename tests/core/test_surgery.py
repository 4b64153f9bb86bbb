"""Module surgery: replace_modules, fqn_filter, get_submodule_parent, freeze_all_but, count_parameters."""

import pytest
import torch
import torch.nn as nn
from core_toys import ScaledLinear

from llmopt.core import (
    SkipModule,
    count_parameters,
    fqn_filter,
    freeze_all_but,
    get_submodule_parent,
    replace_modules,
)


class SubLinear(nn.Linear):
    pass


def nested_model(device="cpu") -> nn.Module:
    with torch.device(device):
        root = nn.Module()
        root.blocks = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Sequential(nn.Linear(4, 4))})
                                     for _ in range(2)])
        root.head = nn.Linear(4, 2)
        root.special = SubLinear(4, 4)
    return root


def wrap(m, fqn):
    return ScaledLinear(m, 2.0)


def test_replace_in_nested_containers_on_meta():
    model = nested_model("meta")
    changed = replace_modules(model, {nn.Linear: wrap})
    assert changed == {
        "blocks.0.a": ("Linear", "ScaledLinear"), "blocks.0.b.0": ("Linear", "ScaledLinear"),
        "blocks.1.a": ("Linear", "ScaledLinear"), "blocks.1.b.0": ("Linear", "ScaledLinear"),
        "head": ("Linear", "ScaledLinear"),
    }
    assert isinstance(model.blocks[1]["b"][0], ScaledLinear) and model.blocks[1]["b"][0].inner.weight.is_meta
    assert isinstance(model.special, SubLinear)  # exact class match: subclasses are not swapped


def test_descendants_of_a_replaced_module_are_not_visited():
    model = nested_model()
    changed = replace_modules(model, {nn.ModuleDict: lambda m, fqn: nn.Sequential(m), nn.Linear: wrap})
    assert changed == {"blocks.0": ("ModuleDict", "Sequential"), "blocks.1": ("ModuleDict", "Sequential"),
                       "head": ("Linear", "ScaledLinear")}
    assert type(model.blocks[0][0]["a"]) is nn.Linear


def test_filter_skip_and_none():
    model = nested_model()
    skipped = {}

    def policy(m, fqn):
        if fqn == "head":
            raise SkipModule("output dims not a multiple of 4")
        return None if fqn.endswith("b.0") else wrap(m, fqn)

    changed = replace_modules(model, {nn.Linear: policy}, filter_fn=fqn_filter(exclude="blocks.1.a"),
                              skipped=skipped)
    assert set(changed) == {"blocks.0.a"}
    assert skipped == {"blocks.1.a": "excluded", "head": "output dims not a multiple of 4"}


def test_shared_module_replaced_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    changed = replace_modules(model, {nn.Linear: wrap})
    assert changed == {"0": ("Linear", "ScaledLinear")}
    assert model[0] is model[2] and isinstance(model[2], ScaledLinear)


def test_policy_must_return_a_module():
    with pytest.raises(TypeError, match="policy for Linear returned int at 'blocks.0.a'"):
        replace_modules(nested_model(), {nn.Linear: lambda m, fqn: 3})


def test_get_submodule_parent():
    model = nested_model()
    parent, name = get_submodule_parent(model, "blocks.1.b.0")
    assert parent is model.blocks[1]["b"] and name == "0"
    assert get_submodule_parent(model, "head") == (model, "head")
    with pytest.raises(ValueError, match="root"):
        get_submodule_parent(model, "")
    with pytest.raises(AttributeError):
        get_submodule_parent(model, "blocks.1.zz")


@pytest.mark.parametrize("pattern, selected", [
    ("q_proj", {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}),
    ("layers.1.self_attn.q_proj", {"model.layers.1.self_attn.q_proj"}),
    ("lm_head", {"lm_head"}),
    ("proj", set()),  # suffixes match on dot boundaries only
    ("re:.*layers\\.1\\..*_proj", {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"}),
    ("re:q_proj", set()),  # a regex must match the whole fqn
    ("all-linear", {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"}),
])
def test_fqn_filter_syntax(pattern, selected):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
             "lm_head"]
    select = fqn_filter(include=pattern)
    assert {n for n in names if select(nn.Linear(1, 1), n)} == selected


def test_fqn_filter_exclude_and_reasons():
    select = fqn_filter(include=("q_proj", "up_proj"), exclude=("layers.1.self_attn.q_proj",))
    assert select(nn.Linear(1, 1), "layers.0.self_attn.q_proj")
    assert not select(nn.Linear(1, 1), "layers.1.self_attn.q_proj")
    assert select.skip_reason("layers.1.self_attn.q_proj") == "excluded"
    assert select.skip_reason("layers.1.self_attn.k_proj") is None  # never targeted: not a skip
    everything = fqn_filter()
    assert everything(nn.ReLU(), "x") and fqn_filter(include=()) (nn.ReLU(), "x") is False
    assert not fqn_filter(include="all-linear")(nn.ReLU(), "layers.0.act")
    assert fqn_filter(include="all-linear").skip_reason("lm_head").startswith("output layer")
    with pytest.raises(ValueError, match="bad regular expression"):
        fqn_filter(include="re:(")
    with pytest.raises(ValueError, match="include pattern"):
        fqn_filter(exclude="all-linear")


def test_freeze_all_but(tiny_model):
    from llmopt.models import ModelConfig, build_model

    trainable = freeze_all_but(tiny_model, "mlp")
    assert trainable == [f"layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert all(p.requires_grad == (n in trainable) for n, p in tiny_model.named_parameters())
    model = build_model(ModelConfig.from_name("tiny"))
    assert freeze_all_but(model, lambda fqn, p: p.ndim == 1) == [
        n for n, p in model.named_parameters() if "norm" in n]


def test_count_parameters_meta_and_tied():
    model = nested_model("meta")
    model.tied = nn.Linear(4, 4, device="meta")
    model.tied.weight = model.blocks[0]["a"].weight  # tied: counted once
    count = count_parameters(model)
    per_linear = 4 * 4 + 4
    assert count.total == 5 * per_linear + 2 * 4 + 2 + 4  # 5 Linear(4,4) + head + tied bias only
    assert count.trainable == count.total and count.nbytes == 4 * count.total
    model.head.weight.requires_grad_(False)
    assert count_parameters(model).trainable == count.total - 8
