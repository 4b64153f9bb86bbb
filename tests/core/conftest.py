"""Fixtures of the core tests: toy techniques registered into an isolated registry per test."""

import pytest
import torch
from core_toys import (
    ScaleLinearConfig,
    ToyCheckpointConfig,
    ToyCompileConfig,
    ToyHookConfig,
    apply_scale_linear,
    apply_toy_checkpoint,
    apply_toy_compile,
    apply_toy_hook,
    revert_scale_linear,
)

from llmopt.core import Stage, isolated_registry, register, register_revert


@pytest.fixture
def toys():
    """The toy techniques registered for one test, then removed."""
    with isolated_registry():
        register(ScaleLinearConfig, name="scale_linear", stage=Stage.SURGERY)(apply_scale_linear)
        register_revert(ScaleLinearConfig)(revert_scale_linear)
        register(ToyCompileConfig, name="toy_compile", stage=Stage.COMPILE)(apply_toy_compile)
        register(ToyHookConfig, name="toy_hook", stage=Stage.SURGERY)(apply_toy_hook)
        register(ToyCheckpointConfig, name="toy_checkpoint", stage=Stage.CHECKPOINTING)(apply_toy_checkpoint)
        yield


@pytest.fixture
def tiny_hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()
