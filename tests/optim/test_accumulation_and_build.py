"""Every optimizer after k accumulated micro-batches equals the full-batch step; build() and the loop."""

import copy

import pytest
import torch

from llmopt.core import registered
from llmopt.optim import (AdamW8bit, GaLoreAdamW, Lamb, NovoGrad, build, galore_param_groups, sgd,
                          sgd_finetune_param_groups)
from llmopt.train import OptimConfig, accumulate_gradients, apply_overrides
from llmopt.train.loop import build_optimizer

OPTIMIZERS = {
    "torch_adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),  # the baseline, for the tolerance
    "sgd": lambda m: sgd(m.parameters(), lr=1e-2, nesterov=True),
    "lamb": lambda m: Lamb(m.parameters(), lr=1e-2, weight_decay=0.01),
    "novograd": lambda m: NovoGrad(m.parameters(), lr=1e-2),
    "adamw8bit": lambda m: AdamW8bit(m.parameters(), lr=1e-2, min_8bit_size=256),
    "galore": lambda m: GaLoreAdamW(galore_param_groups(m, rank=8), lr=1e-2),
    "galore8bit": lambda m: GaLoreAdamW(galore_param_groups(m, rank=8, optim_bits=8), lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_accumulated_micro_batches_then_one_step_equal_the_full_batch_step(name, tiny_model):
    """The accumulated and full-batch gradients differ only by fp32 summation order (1e-6 relative, see
    tests/test_train.py). Adam-type first steps divide by |g| + eps, so an element with |g| ~ eps turns that
    into ~1e-4 of lr (torch.optim.AdamW itself shows it). Tolerance, per tensor, on the displacement from the
    start: ||acc - full|| <= 1e-5 ||full - start|| for the fp32-state optimizers (AdamW itself: 3.4e-6); 1e-4 for
    8-bit state, where such a difference may move a moment element across a code boundary (one code gap, ~1-7%,
    of that element; measured 2.4e-5), and for GaLore, whose projector is computed from the gradient (its
    subspace moves by the gradient difference over the spectral gap; measured 3.3e-5 on the tiny model)."""
    torch.manual_seed(0)
    V = tiny_model.config.vocab_size
    x, y = torch.randint(0, V, (4, 16)), torch.randint(0, V, (4, 16))
    y[1, 9:] = -100
    full, acc = tiny_model, copy.deepcopy(tiny_model)
    start = copy.deepcopy(tiny_model)
    opt_full, opt_acc = OPTIMIZERS[name](full), OPTIMIZERS[name](acc)
    for step in range(3):
        for model, opt, micro in ((full, opt_full, [(x, y)]), (acc, opt_acc, [(x[:1], y[:1]), (x[1:], y[1:])])):
            opt.zero_grad(set_to_none=True)
            accumulate_gradients(model, micro)
            opt.step()
        x, y = x.roll(1, 0), y.roll(1, 0)
    tolerance = 1e-4 if name in ("adamw8bit", "galore", "galore8bit") else 1e-5
    for (n, a), b, s in zip(full.named_parameters(), acc.parameters(), start.parameters()):
        moved = float((a - s).norm())
        assert float((a - b).norm()) <= tolerance * moved, f"{name}: {n}"


def test_every_optimizer_is_registered():
    assert {"sgd", "lamb", "novograd", "adamw8bit", "galore"} <= set(registered("optimizer"))


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("lamb", Lamb), ("novograd", NovoGrad),
                                       ("adamw8bit", AdamW8bit), ("galore", GaLoreAdamW)])
def test_the_loop_builds_each_by_name(name, cls, tiny_model):
    run = apply_overrides(__import__("llmopt.recipes", fromlist=["get_recipe"]).get_recipe("tiny"),
                          [f"optim.name={name}", "optim.rank=8"])
    opt = build_optimizer(tiny_model, run.optim)
    assert isinstance(opt, cls)
    if name == "galore":
        assert any(g["rank"] == 8 for g in opt.param_groups)


def test_sgd_recipe_freezes_embeddings_and_keeps_one_buffer(tiny_model):
    opt = build_optimizer(tiny_model, OptimConfig(name="sgd", freeze_embeddings=True, nesterov=True))
    assert not tiny_model.embed_tokens.weight.requires_grad
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    assert opt.param_groups[0]["nesterov"]
    for p in trainable:
        p.grad = torch.ones_like(p)
    opt.step()
    from llmopt.optim import state_bytes

    assert state_bytes(opt) == 4 * sum(p.numel() for p in trainable)  # one momentum buffer
    with pytest.raises(ValueError, match="no nn.Embedding"):
        sgd_finetune_param_groups(torch.nn.Linear(2, 2))


def test_stable_embedding_through_build(tiny_model):
    groups = [{"params": list(tiny_model.parameters()), "weight_decay": 0.0}]
    opt = build("adamw8bit", groups, OptimConfig(name="adamw8bit", stable_embedding=True), model=tiny_model)
    bits = {id(p): g["optim_bits"] for g in opt.param_groups for p in g["params"]}
    assert bits[id(tiny_model.embed_tokens.weight)] == 32 and bits[id(tiny_model.layers[0].mlp.up_proj.weight)] == 8


def test_unknown_name_and_galore_without_model_raise():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build("adamax", [], OptimConfig(name="adamax"))
    with pytest.raises(ValueError, match="pass model="):
        build("galore", [{"params": [torch.nn.Parameter(torch.zeros(4, 4))]}], OptimConfig(name="galore"))


def test_external_optimizer_builds_by_name_and_cannot_shadow_ours(tiny_model):
    from llmopt.optim import register_external_optimizer

    register_external_optimizer("test_external_sgd", lambda groups, oc, model: torch.optim.SGD(groups, lr=oc.lr))
    opt = build_optimizer(tiny_model, OptimConfig(name="test_external_sgd", lr=0.5))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="llmopt optimizer"):
        register_external_optimizer("lamb", lambda groups, oc, model: None)


@pytest.mark.parametrize("peer", ["bnb_adamw8bit", "galore_torch", "torch_optimizer_lamb", "torch_optimizer_novograd"])
def test_bench_peer_optimizers_build_and_step(peer, tiny_model):
    from llmopt.measure import bench_peers
    from llmopt.optim import register_external_optimizer

    module = {"bnb_adamw8bit": "bitsandbytes", "galore_torch": "galore_torch"}.get(peer, "torch_optimizer")
    pytest.importorskip(module)
    register_external_optimizer(peer, bench_peers._OPTIMIZER_PEERS[peer])
    opt = build_optimizer(tiny_model, OptimConfig(name=peer, lr=1e-3, rank=8, update_proj_gap=2))
    before = [p.detach().clone() for p in tiny_model.parameters()]
    for p in tiny_model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))
