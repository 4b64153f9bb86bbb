"""Activation checkpointing: gradients bitwise equal to no checkpointing, fewer saved bytes, budget planning."""

import copy

import pytest
import torch

from llmopt import apply_
from llmopt.core import revert_
from llmopt.models import ModelConfig, build_model
from llmopt.techniques.checkpointing import ActivationCheckpointingConfig, plan_budget, probe_blocks, block_list


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny", n_layer=3, **overrides))


def _grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (2, 17), generator=g)
    model.zero_grad(set_to_none=True)
    loss_sum, n = model.loss(x[:, :-1], x[:, 1:])
    (loss_sum / n).backward()
    return loss_sum.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _saved_bytes(model):
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, model.config.vocab_size, (4, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, n = model.loss(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("config", [ActivationCheckpointingConfig(policy="full"),
                                    ActivationCheckpointingConfig(policy="selective"),
                                    ActivationCheckpointingConfig(policy="budget", budget_bytes=3 * 2**20),
                                    ActivationCheckpointingConfig(policy="budget", budget_bytes=4 * 2**20, units="parts")])
def test_gradients_bitwise_equal_to_no_checkpointing(config):
    reference = _model()
    model = copy.deepcopy(reference)
    report = apply_(model, config)
    assert report.changed
    ref_loss, ref_grads = _grads(reference)
    loss, grads = _grads(model)
    assert torch.equal(loss, ref_loss)
    for k in ref_grads:
        assert torch.equal(grads[k], ref_grads[k]), k
    assert "recompute" in " ".join(report.notes)


def test_full_checkpointing_saves_fewer_bytes_and_keeps_names():
    model = _model()
    keys = list(model.state_dict())
    plain = _saved_bytes(model)
    apply_(model, ActivationCheckpointingConfig(policy="full"))
    assert list(model.state_dict()) == keys and type(model.layers[0]).__name__ == "Block"
    assert _saved_bytes(model) < plain / 2


def test_inference_with_cache_and_no_grad_runs_plain():
    from llmopt.inference import generate

    reference = _model()
    model = copy.deepcopy(reference)
    apply_(model, ActivationCheckpointingConfig(policy="selective"))
    prompt = torch.randint(0, 320, (1, 5))
    assert torch.equal(generate(model, prompt, 6).new_tokens, generate(reference, prompt, 6).new_tokens)


def test_budget_plan_is_the_cheapest_that_fits():
    """Coarse probe rows (no per-op record): none / selective / full per block, least recompute first."""
    probe = {f"layers.{i}": {"none": 100.0, "selective": 60.0, "full": 10.0, "flops": 1e9,
                             "selective_recompute_flops": 0.0} for i in range(3)}
    assert plan_budget(probe, 300) == {"layers.0": "none", "layers.1": "none", "layers.2": "none"}
    assert sorted(plan_budget(probe, 230).values()) == ["none", "selective", "selective"]
    assert sorted(plan_budget(probe, 100).values()) == ["full", "full", "selective"]
    with pytest.raises(ValueError, match="budget"):
        plan_budget(probe, 20)


def test_budget_plan_keeps_op_outputs_per_block_and_beats_whole_block_choices():
    """With the per-op record the planner keeps a subset of op outputs per block: it fits the same budget as the
    coarse none/selective/full plan with fewer recomputed matmul FLOPs, and the gradients stay bitwise equal."""
    from llmopt.techniques.checkpointing import plan_bytes, plan_cost, probe_outside_blocks

    wide = dict(dim=128, intermediate_size=352, head_dim=32)  # at tiny's width whole blocks are cheapest
    model = _model(**wide)
    probe = probe_blocks(model, block_list(model), 8, 128)
    assert all("ops" in row and 0 < row["stop"] <= len(row["ops"]) for row in probe.values())
    budget = 0.5 * sum(r["none"] for r in probe.values())
    coarse = {f: {k: v for k, v in row.items() if k not in ("ops", "stop")} for f, row in probe.items()}
    fine_plan, coarse_plan = plan_budget(probe, budget), plan_budget(coarse, budget)
    assert plan_bytes(probe, fine_plan) <= budget and plan_bytes(coarse, coarse_plan) <= budget
    assert any(isinstance(p, frozenset) for p in fine_plan.values())
    assert plan_cost(probe, fine_plan) < plan_cost(probe, coarse_plan)
    reference = _model(**wide)
    planned = copy.deepcopy(reference)
    outside = probe_outside_blocks(planned, block_list(planned), probe, 8, 128)
    report = apply_(planned, ActivationCheckpointingConfig(policy="budget", budget_bytes=int(budget + outside)))
    assert "planned selective" in report.notes[0]
    ref_loss, ref_grads = _grads(reference)
    loss, grads = _grads(planned)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)


def test_budget_measured_on_the_model_fits():
    model = _model()
    probe = probe_blocks(model, block_list(model), 8, 128)
    row = probe["layers.0"]
    assert row["full"] < row["selective"] < row["none"]
    budget = int(sum(r["none"] for r in probe.values()) * 0.5)
    report = apply_(model, ActivationCheckpointingConfig(policy="budget", budget_bytes=budget, units="blocks"))
    from llmopt.techniques.checkpointing import plan_bytes

    chosen = {f"layers.{i}": model.layers[i].__dict__.get("_llmopt_checkpoint_policy", "none") for i in range(3)}
    assert plan_bytes(probe, chosen) <= budget
    assert "MiB" in report.notes[0]


def test_revert_and_config_errors():
    model = _model()
    apply_(model, ActivationCheckpointingConfig())
    revert_(model, "checkpointing")
    assert all("forward" not in block.__dict__ for block in model.layers)
    with pytest.raises(ValueError, match="budget_bytes"):
        ActivationCheckpointingConfig(policy="budget")
    with pytest.raises(ValueError, match="only read"):
        ActivationCheckpointingConfig(policy="full", budget_bytes=10)
    meta = build_model(ModelConfig.from_name("tiny"), device="meta")
    with pytest.raises(ValueError, match="meta"):
        apply_(meta, ActivationCheckpointingConfig(policy="budget", budget_bytes=10))


def test_budget_covers_the_whole_step_as_accounted():
    """budget_bytes is for the step's saved activations, including what lies outside the blocks (loss,
    embedding, final norm); the accounted activations (measure: saved-tensor hooks plus selective
    checkpointing's own cache) of the planned model fit it, and selective counts as more than full."""
    from llmopt.measure.memory import account_training_step

    x = torch.randint(0, 320, (8, 129), generator=torch.Generator().manual_seed(0))

    def activations(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return account_training_step(model, opt, lambda: (lambda s, n: s / n)(*model.loss(x[:, :-1], x[:, 1:]))
                                     ).activations

    base = activations(_model())
    sizes = {}
    for policy in ("full", "selective"):
        model = _model()
        apply_(model, ActivationCheckpointingConfig(policy=policy))
        sizes[policy] = activations(model)
    assert sizes["full"] < sizes["selective"] < base
    budget = int(0.5 * base)
    model = _model()
    report = apply_(model, ActivationCheckpointingConfig(policy="budget", budget_bytes=budget, probe_seq_len=128))
    assert activations(model) <= budget
    assert "outside the blocks" in report.notes[-1]
    with pytest.raises(ValueError, match="outside the blocks"):
        apply_(_model(), ActivationCheckpointingConfig(policy="budget", budget_bytes=1024, probe_seq_len=128))
