"""llmopt: every LLM optimization technique, real on PyTorch, measured against a baseline in the same run."""

__version__ = "0.1.0"


def load_techniques() -> None:
    """Import every layer that registers techniques: transforms, optimizers, inference components.

    It lives at the top of the package because it reaches every layer (`llmopt techniques`, `llmopt
    bench` and the contract matrix list them all); the layers themselves only import downwards.
    """
    import importlib
    import logging

    for package in ("llmopt.techniques", "llmopt.optim", "llmopt.inference", "llmopt.data",
                    "llmopt.train.distributed.parallelize"):
        try:
            importlib.import_module(package)
        except ImportError as e:  # an optional dependency of one layer must not hide the others
            logging.getLogger("llmopt").warning("could not import %s: %s", package, e)


def __getattr__(name):
    # Lazy: `from llmopt import apply_` without importing every layer at `import llmopt`.
    if name in ("apply_", "revert_", "ApplyReport"):
        from llmopt import core

        return getattr(core, name)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
