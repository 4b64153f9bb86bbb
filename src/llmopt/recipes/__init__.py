"""Recipes: Python functions that return a full `RunConfig` (`llmopt train RECIPE --set key=value`)."""

from __future__ import annotations

from typing import Callable

from llmopt.models.config import ModelConfig
from llmopt.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig

RECIPES: dict[str, Callable[[], RunConfig]] = {}


def recipe(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    RECIPES[fn.__name__] = fn
    return fn


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()


@recipe
def tiny() -> RunConfig:
    """The `tiny` model on 200 KB of the bundled corpus: seconds on a CPU; tests and CI use it."""
    return RunConfig(
        recipe="tiny",
        model=ModelConfig.from_name("tiny"),
        data=DataConfig(max_chars=200_000),
        train=TrainConfig(steps=30, batch_size=8, seq_len=64, eval_every=15, eval_batches=4, log_every=5,
                          progress=False),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5),
    )


@recipe
def demo() -> RunConfig:
    """The `demo` model (~5.5M parameters), 400 steps of 16x128 tokens on the bundled Shakespeare (~7 min on 2 quiet cores)."""
    return RunConfig(
        recipe="demo",
        model=ModelConfig.from_name("demo"),
        data=DataConfig(),
        train=TrainConfig(steps=400, batch_size=16, seq_len=128, eval_every=100, eval_batches=16, log_every=10),
        optim=OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=30),
    )


@recipe
def demo_quick() -> RunConfig:
    """`llmopt demo --quick`: a smaller demo model on 500 KB for about a minute (CI uses it)."""
    return RunConfig(
        recipe="demo_quick",
        model=ModelConfig.from_name("demo", n_layer=2, dim=128, n_head=4, n_kv_head=2, intermediate_size=352,
                                    vocab_size=1024),
        data=DataConfig(max_chars=500_000),
        train=TrainConfig(steps=60, batch_size=8, seq_len=128, eval_every=30, eval_batches=4, log_every=10),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10),
    )


@recipe
def draft() -> RunConfig:
    """The `draft` model (about 1/8 of `demo`) on the bundled corpus, for speculative decoding."""
    run = demo()
    run.recipe = "draft"
    run.model = ModelConfig.from_name("draft")
    return run


# ---- finetune_lora (issue 5: LoRA fine-tuning of a pretrained model) ----------------------------------
@recipe
def finetune_lora() -> RunConfig:
    """LoRA r=8 on SmolLM2-135M over `--data` (default: the bundled corpus); writes adapters.safetensors too."""
    return RunConfig(
        recipe="finetune_lora",
        model=ModelConfig.from_name("smollm2-135m"),  # replaced by the checkpoint's config at load
        init_from="smollm2-135m",
        data=DataConfig(max_chars=400_000),
        train=TrainConfig(steps=100, batch_size=4, seq_len=128, eval_every=50, eval_batches=4, log_every=10),
        optim=OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10, weight_decay=0.0),
        techniques=["lora:r=8"],
    )


# ---- linear-time architectures (issue 8): Mamba and RetNet on the same data and budgets as tiny / demo ----
def _same_run_as(base: Callable[[], RunConfig], name: str, preset: str) -> RunConfig:
    run = base()
    run.recipe = name
    run.model = ModelConfig.from_name(preset)
    return run


@recipe
def tiny_mamba() -> RunConfig:
    """The `tiny_mamba` model with the `tiny` recipe's data and steps."""
    return _same_run_as(tiny, "tiny_mamba", "tiny_mamba")


@recipe
def demo_mamba() -> RunConfig:
    """The `demo_mamba` model (~4.5M parameters) with the `demo` recipe's data, steps and optimizer."""
    return _same_run_as(demo, "demo_mamba", "demo_mamba")


@recipe
def tiny_retnet() -> RunConfig:
    """The `tiny_retnet` model with the `tiny` recipe's data and steps."""
    return _same_run_as(tiny, "tiny_retnet", "tiny_retnet")


@recipe
def demo_retnet() -> RunConfig:
    """The `demo_retnet` model (~5.5M parameters) with the `demo` recipe's data, steps and optimizer."""
    return _same_run_as(demo, "demo_retnet", "demo_retnet")


@recipe
def tiny_mamba2() -> RunConfig:
    """The `tiny_mamba2` model (Mamba-2 SSD block) with the `tiny` recipe's data and steps."""
    return _same_run_as(tiny, "tiny_mamba2", "tiny_mamba2")


@recipe
def demo_mamba2() -> RunConfig:
    """The `demo_mamba2` model (Mamba-2 SSD block, ~4.5M parameters) with the `demo` recipe's data and steps."""
    return _same_run_as(demo, "demo_mamba2", "demo_mamba2")


# ---- distill_draft (issue 6: a draft model for speculative decoding of SmolLM2-135M) -------------------
@recipe
def distill_draft() -> RunConfig:
    """A SmolLM2-135M draft (width 256, 4 layers, SmolLM2's tokenizer; about 1/9 of its compute per token)
    distilled from SmolLM2's top-32 next-token distributions on the bundled corpus. Run it with
    `python -m llmopt.recipes.distill --out runs/smollm2-draft` (init_from is the teacher, not the student's
    weights; see docs/inference.md for the time it takes)."""
    return RunConfig(
        recipe="distill_draft",
        model=ModelConfig(name="smollm2-draft", vocab_size=49152, dim=256, n_layer=4, n_head=4, n_kv_head=2,
                          head_dim=64, intermediate_size=704, rope_theta=100000.0, max_seq_len=8192),
        init_from="smollm2-135m",
        data=DataConfig(max_chars=240_000),  # ~65k teacher tokens (the teacher pass is most of the time)
        train=TrainConfig(steps=240, batch_size=8, seq_len=128, eval_every=60, eval_batches=4, log_every=10,
                          threads=1),
        optim=OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=20, weight_decay=0.0),
    )
