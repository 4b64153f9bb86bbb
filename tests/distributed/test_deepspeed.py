"""`--engine deepspeed`: ZeRO stages 1-3 on 2 gloo processes give the single-process losses (needs the
`deepspeed` extra; skipped without it)."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

from test_distributed import TOL, _job, _losses, _world  # noqa: E402

pytestmark = pytest.mark.distributed


def test_zero_stages_match_one_process(tmp_path, reference):
    results = _world(tmp_path, 2, [_job(tmp_path, f"zero{z}", "dp=2", "dist.engine=deepspeed", f"dist.zero_stage={z}")
                                   for z in (1, 2, 3)])
    for name, res in results.items():
        losses = _losses(res)
        worst = max(abs(losses[s] - reference[2]["losses"][s]) for s in losses)
        assert worst < TOL, f"{name}: {worst:.2e}"
