"""llmopt: every LLM optimization technique, real on PyTorch, measured against a baseline in the same run."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `from llmopt import apply_` without importing every layer at `import llmopt`.
    if name in ("apply_", "revert_", "ApplyReport"):
        from llmopt import core

        return getattr(core, name)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
