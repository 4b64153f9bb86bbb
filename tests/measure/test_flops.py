import math

import pytest
import torch
import torch.nn as nn

from llmopt.measure import count_flops, estimate_train_flops, matmul_weight_count, measure_peak_flops, mfu, train_step_flops


def test_linear_forward_is_2mnk():
    M, K, N = 5, 7, 3
    lin = nn.Linear(K, N, bias=False)
    x = torch.randn(M, K)
    assert count_flops(lin, x) == 2 * M * N * K
    assert count_flops(lambda: torch.randn(M, K) @ torch.randn(K, N)) == 2 * M * N * K


def test_train_step_matches_the_analytic_formula(tiny_model, tiny_config):
    B, T = 2, 16
    idx, targets = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
    counted = train_step_flops(tiny_model, idx, targets)
    c = tiny_config
    estimate = estimate_train_flops(matmul_weight_count(tiny_model), B * T, n_layer=c.n_layer, n_head=c.n_head,
                                    head_dim=c.head_dim, seq_len=T)
    # the counter also counts the Q K^T that the flash-attention backward recomputes: 2 L H Q T per token
    assert counted == estimate + 2 * c.n_layer * c.n_head * c.head_dim * T * B * T
    assert all(p.grad is None for p in tiny_model.parameters())  # no side effect on .grad


def test_peak_flops_and_mfu():
    peak = measure_peak_flops(size=64, seconds=0.05, repeats=3)
    assert peak["size"] == 64 and peak["dtype"] == "float32"
    assert 0 < peak["min"] <= peak["peak_flops"] <= peak["max"]
    assert mfu(1e9, 2.0, 1e10) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        mfu(1e9, 0.0, 1e10)
    assert math.isfinite(mfu(1e6, 1.0, peak["peak_flops"]))
