"""Shared fixtures. Every test runs single-threaded: the shared CPU machines are noisy with 2 threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_config():
    from llmopt.models import ModelConfig

    return ModelConfig.from_name("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    from llmopt.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(autouse=True)
def _system_cpu_allocator_after_each_test():
    """`buffer_reuse` installs llmopt's caching CPU allocator process-wide; give torch its own back after
    every test, so no test depends on which ran before it."""
    yield
    import sys

    alloc = sys.modules.get("llmopt.kernels.cpu_allocator")
    if alloc is not None and alloc._library.cache_info().currsize and alloc.installed():
        alloc.uninstall()
        alloc.empty_cache()
