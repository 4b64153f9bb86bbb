"""The single-process reference runs the distributed tests compare against."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test_deepspeed reuses test_distributed's helpers

from test_distributed import _run  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Single-process runs: 2 layers (most modes) and 4 layers (schedules with two stages per rank)."""
    from llmopt.train import fit
    from llmopt.train.distributed.jobs import accounted_bytes

    out = {}
    for layers in (2, 4):
        captured = {}

        class Capture:
            def after_optimizer_step(self, state):
                captured.update(accounted_bytes(state.model, state.optimizer))

        d = tmp_path_factory.mktemp(f"ref{layers}")
        res = fit(_run(f"model.n_layer={layers}"), d / "run", hooks=[Capture()])
        out[layers] = {"losses": {r["step"]: r["loss"] for r in res.history if "loss" in r},
                       "val": {r["step"]: r["val_loss"] for r in res.history if "val_loss" in r},
                       "accounted": captured, "dir": d / "run"}
    return out


