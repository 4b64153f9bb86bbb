"""Plain, readable models behind one contract: `logits = model(idx, *, input_pos=None, cache=None)`."""

from llmopt.models.config import PRESETS, ModelConfig
from llmopt.models.llama import Transformer
from llmopt.models.loss import linear_cross_entropy


def build_model(config: ModelConfig, *, device=None, dtype=None):
    """The model for `config.family`, built on `device` (use "meta" to build without memory)."""
    import torch

    if config.family == "mamba":
        from llmopt.models.mamba import Mamba as model_class
    elif config.family == "retnet":
        from llmopt.models.retnet import RetNet as model_class
    elif config.family == "llama":
        model_class = Transformer
    else:
        raise ValueError(f"unknown model family {config.family!r}; available: llama, mamba, retnet")
    with torch.device(device or "cpu"):
        model = model_class(config)
    if dtype is not None:
        model.to(dtype)
    return model


def load_pretrained(source, **kwargs):
    """An llmopt model and its tokenizer from a preset name, GGUF file, HF directory or run directory."""
    from llmopt.models.pretrained import load_pretrained as _load

    return _load(source, **kwargs)


__all__ = ["ModelConfig", "PRESETS", "Transformer", "build_model", "linear_cross_entropy", "load_pretrained"]
