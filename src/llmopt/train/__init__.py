"""The explicit training loop, checkpoints and run configuration."""

from llmopt.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from llmopt.train.config import ConfigError, DataConfig, OptimConfig, RunConfig, TrainConfig, apply_overrides
from llmopt.train.loop import FitResult, TrainState, accumulate_gradients, evaluate, fit, lr_at

__all__ = ["CheckpointError", "ConfigError", "DataConfig", "FitResult", "OptimConfig", "RunConfig", "TrainConfig",
           "TrainState", "accumulate_gradients", "apply_overrides", "evaluate", "fit", "latest_checkpoint",
           "load_checkpoint", "lr_at", "save_checkpoint"]
