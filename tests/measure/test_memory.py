import copy

import pytest
import torch
import torch.nn as nn

from llmopt.measure import account_training_step, peak_rss_bytes, run_in_subprocess, saved_activation_bytes
from llmopt.measure.memory import storage_bytes

F32 = 4


def _linear_step(seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(8, 4)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    x = torch.randn(3, 8)
    return account_training_step(lin, opt, lambda: (lin(x) ** 2).sum())


def test_linear_adamw_is_exact_and_repeatable():
    m = _linear_step()
    param_bytes = (8 * 4 + 4) * F32
    assert m.params == param_bytes
    assert m.buffers == 0
    assert m.grads == param_bytes
    # AdamW keeps exp_avg and exp_avg_sq per parameter, plus a float32 scalar `step` per parameter tensor
    assert m.optimizer_state == 2 * param_bytes + 2 * F32
    # addmm saves x (3, 8) for the weight's gradient; pow saves its input (3, 4); x needs no gradient,
    # so the weight itself is not saved
    assert m.activations == (3 * 8 + 3 * 4) * F32
    assert m.saved_parameters == 0
    assert m.total == 4 * param_bytes + 2 * F32 + m.activations
    assert m.to_dict() == _linear_step(seed=1).to_dict()


def test_a_tensor_saved_twice_counts_once_and_parameters_are_not_activations():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16))
    x = torch.randn(16)

    def forward():
        h = x * w  # saves x (for w's grad); w only if x needed a gradient
        return (h * h).sum() + h.sin().sum() + (w * w).sum()  # h saved three times; w twice

    _, activations, of_params = saved_activation_bytes(forward, [w])
    assert activations == 2 * 16 * F32  # x and h, once each
    assert of_params == 16 * F32


def test_tied_weights_count_once():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.tensor([[1, 2, 3]])
    m = account_training_step(model, opt, lambda: head(emb(idx)).sum())
    assert m.params == 10 * 6 * F32 and m.grads == 10 * 6 * F32
    assert m.optimizer_state == 0  # plain SGD keeps no state


def test_tensor_subclass_is_opened_to_its_inner_tensors():
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    a, b = torch.zeros(5), torch.zeros(5)
    t = two_tensor.TwoTensor(a, b)
    assert storage_bytes([t])[0] == 2 * 5 * F32
    assert storage_bytes([t, a])[0] == 2 * 5 * F32  # a is the same storage: once


def test_tiny_model_step_is_repeatable(tiny_model):
    def run():
        model = copy.deepcopy(tiny_model)
        opt = torch.optim.AdamW(model.parameters())
        torch.manual_seed(1)
        idx, targets = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
        return account_training_step(model, opt, lambda: (lambda s, n: s / n)(*model.loss(idx, targets)))

    first, second = run(), run()
    assert first == second
    assert first.params == tiny_model.num_parameters() * F32  # tied embedding once
    assert first.grads == first.params
    n_tensors = len(list(tiny_model.parameters()))
    assert first.optimizer_state == 2 * first.params + n_tensors * F32
    assert first.activations > 0 and first.saved_parameters > 0


def test_step_fn_must_return_a_loss():
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="scalar loss"):
        account_training_step(lin, torch.optim.SGD(lin.parameters(), lr=1), lambda: lin(torch.ones(1, 2)))


def test_peak_rss_of_this_process():
    assert peak_rss_bytes() > 10 * 2**20


def test_subprocess_returns_result_and_peak_rss():
    out = run_in_subprocess("child_functions:allocate", {"mebibytes": 64})
    assert out["ok"], out
    assert out["result"] == {"allocated": 64 * 2**20}
    assert out["peak_rss_bytes"] >= 64 * 2**20
    assert out["wall_s"] >= out["fn_wall_s"] > 0


def test_subprocess_error_comes_back_in_one_line():
    out = run_in_subprocess("child_functions:fail", {"message": "boom\nsecond line"})
    assert not out["ok"]
    assert out["error"] == "child_functions:fail: ValueError: boom second line"
    assert "Traceback" in out["stderr_tail"]


def test_subprocess_that_dies_is_reported():
    out = run_in_subprocess("child_functions:die", {"status": 3})
    assert not out["ok"] and "\n" not in out["error"]
    assert "exit status 3" in out["error"]


def test_subprocess_rejects_bad_path():
    with pytest.raises(ValueError, match="module:function"):
        run_in_subprocess("child_functions.allocate")
