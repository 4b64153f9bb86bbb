"""Curriculum learning as a loop hook: sequence-length warmup or easy-to-hard sampling.

- kind="seq_len" (Li, Zhang, He 2022, "The Stability-Efficiency Dilemma", arXiv:2108.06084):
  `before_forward` crops each batch to `seq_len_at(step, start_len, T, warmup_steps, multiple)`,
  which grows linearly from `start_len` to the batch's full length T by `warmup_steps`.
- kind="difficulty" (Bengio et al. 2009, "Curriculum Learning"; pacing of Platanios et al. 2019):
  windows of the training tokens are scored by unigram surprisal, and `before_forward` replaces
  each batch with one drawn from the easiest `pacing_fraction(step / pacing_steps)` of them.

```bash
llmopt train demo --technique curriculum:kind=seq_len,start_len=32,warmup_steps=100
```
Registered as a model transform whose report holds only the hook (nothing in the model changes), so
`apply_`, `--technique` and the contract matrix handle it like every other technique. Evaluation is
always at full length on the held-out windows: the loop's `evaluate` calls no hook.

Numerics contract: exact at apply time (the model is untouched). Training sees different batches by
design (shorter, or ordered); with `warmup_steps=0` (seq_len) the batches are the loop's own. The
hook's state (steps done, batches drawn) is saved in checkpoints and resumes bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from llmopt.core import ApplyReport, Hook, Stage, TechniqueConfig, register
from llmopt.data.curriculum import (difficulty_order, seq_len_at, token_counts, training_windows,
                                    unigram_surprisal)

__all__ = ["CurriculumConfig", "DifficultySamplerHook", "SeqLenWarmupHook", "apply_curriculum"]


@dataclass(frozen=True, kw_only=True)
class CurriculumConfig(TechniqueConfig):
    """Curriculum learning: sequence-length warmup (Li et al. 2022) or easy-to-hard sampling (Bengio et al. 2009)."""

    kind: Literal["seq_len", "difficulty"] = "seq_len"
    """"seq_len": grow the sequence length; "difficulty": draw windows easy to hard."""
    start_len: int = 32
    """seq_len: length of the first step's sequences."""
    warmup_steps: int = 100
    """seq_len: optimizer steps until the full length."""
    multiple: int = 8
    """seq_len: lengths are multiples of this (few distinct shapes for a compiled model)."""
    pacing: Literal["linear", "root"] = "root"
    """difficulty: how fast the share of available windows grows (root opens the harder data sooner)."""
    start_fraction: float = 0.2
    """difficulty: share of the windows (the easiest) available at step 0."""
    pacing_steps: int | None = None
    """difficulty: steps until all windows are available; None means the run's train.steps."""
    seed: int = 0
    """difficulty: seed of the draws (batch n is drawn with seed (seed, n): resumable without RNG state)."""

    def __post_init__(self) -> None:
        if self.start_len <= 0 or self.multiple <= 0 or self.warmup_steps < 0:
            raise ValueError(f"start_len and multiple must be positive and warmup_steps >= 0, got start_len="
                             f"{self.start_len}, multiple={self.multiple}, warmup_steps={self.warmup_steps}")
        if not 0.0 < self.start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in (0, 1], got {self.start_fraction}; e.g. 0.2")
        if self.pacing_steps is not None and self.pacing_steps <= 0:
            raise ValueError(f"pacing_steps must be positive or none, got {self.pacing_steps}")


def _crop(batch: Any, length: int) -> Any:
    x, y = batch
    return (x[..., :length], y[..., :length]) if x.shape[-1] > length else None


class SeqLenWarmupHook(Hook):
    """Crops each batch to `seq_len_at(steps_done, ...)`; puts the length in `state.metrics["seq_len"]`."""

    def __init__(self, start_len: int, warmup_steps: int, multiple: int = 8) -> None:
        self.start_len, self.warmup_steps, self.multiple = start_len, warmup_steps, multiple
        self.steps_done = 0

    def before_forward(self, state: Any, batch: Any) -> Any:
        full = batch[0].shape[-1]
        length = seq_len_at(self.steps_done, self.start_len, full, self.warmup_steps, self.multiple)
        if isinstance(getattr(state, "metrics", None), dict):
            state.metrics["seq_len"] = length
        return _crop(batch, length)

    def after_optimizer_step(self, state: Any) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict["steps_done"])


class DifficultySamplerHook(Hook):
    """Replaces each batch with windows drawn from the easiest share of the training data (paced by step).

    Needs the training token ids: `state.train_ids` (the loop passes them), or `tokens=` here. The
    windows are non-overlapping, of the batch's length + 1, scored once (unigram surprisal unless
    `scores` is given, e.g. from `llmopt.data.curriculum.reference_loss_scores`).
    """

    def __init__(self, *, pacing: str = "root", start_fraction: float = 0.2, pacing_steps: int | None = None,
                 seed: int = 0, tokens: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> None:
        self.pacing, self.start_fraction, self.pacing_steps, self.seed = pacing, start_fraction, pacing_steps, seed
        self.tokens, self.scores = tokens, scores
        self.windows: torch.Tensor | None = None
        self.steps_done = 0
        self.drawn = 0

    def on_fit_start(self, state: Any) -> None:
        if self.tokens is None:
            self.tokens = getattr(state, "train_ids", None)
        if self.pacing_steps is None:
            self.pacing_steps = getattr(getattr(getattr(state, "config", None), "train", None), "steps", None)

    def _prepare(self, seq_len: int) -> None:
        if self.tokens is None:
            raise ValueError("curriculum kind=difficulty needs the training tokens: run it in llmopt's loop (which "
                             "passes state.train_ids) or build DifficultySamplerHook(tokens=train_ids)")
        if self.pacing_steps is None:
            raise ValueError("curriculum kind=difficulty needs pacing_steps (or a run config with train.steps)")
        self.windows = training_windows(self.tokens, seq_len)
        if self.scores is None:
            self.scores = unigram_surprisal(self.windows, token_counts(self.tokens))
        elif len(self.scores) != len(self.windows):
            raise ValueError(f"{len(self.scores)} scores for {len(self.windows)} windows of {seq_len + 1} tokens")

    def before_forward(self, state: Any, batch: Any) -> Any:
        x, _ = batch
        batch_size, seq_len = x.shape
        if self.windows is None or self.windows.shape[1] != seq_len + 1:
            self._prepare(seq_len)
        available = difficulty_order(self.windows, self.scores, self.pacing, self.steps_done, self.pacing_steps,
                                     start_fraction=self.start_fraction)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.drawn)
        chosen = available[torch.randint(len(available), (batch_size,), generator=g)]
        self.drawn += 1
        if isinstance(getattr(state, "metrics", None), dict):
            state.metrics["curriculum_fraction"] = round(len(available) / len(self.windows), 4)
        w = self.windows[chosen].to(x.device)
        return w[:, :-1], w[:, 1:]

    def after_optimizer_step(self, state: Any) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "drawn": self.drawn}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done, self.drawn = int(state_dict["steps_done"]), int(state_dict["drawn"])


@register(CurriculumConfig, name="curriculum", stage=Stage.SURGERY, workload="train")
def apply_curriculum(model: nn.Module, config: CurriculumConfig, *, filter_fn=None) -> ApplyReport:
    """Return the curriculum hook; the model itself is not changed."""
    if config.kind == "seq_len":
        hook: Hook = SeqLenWarmupHook(config.start_len, config.warmup_steps, config.multiple)
    else:
        hook = DifficultySamplerHook(pacing=config.pacing, start_fraction=config.start_fraction,
                                     pacing_steps=config.pacing_steps, seed=config.seed)
    return ApplyReport(hooks=[hook], notes=["changes the training batches only; evaluation stays at full length"])
