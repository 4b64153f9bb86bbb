"""Curriculum learning, as pure functions: a sequence-length schedule and a difficulty ordering.

- `seq_len_at`: sequence-length warmup (Li, Zhang, He 2022, "The Stability-Efficiency Dilemma:
  Investigating Sequence Length Warmup for Training GPT Models", arXiv:2108.06084): train on short
  sequences first and grow them linearly to the full length.
- `difficulty_order`: easy-to-hard sampling (Bengio et al. 2009, "Curriculum Learning", ICML) with a
  competence pacing function (Platanios et al. 2019, arXiv:1903.09848): at training progress p only the
  easiest `fraction(p)` of the windows may be drawn. Difficulty is a window's mean unigram surprisal
  under the training text's token frequencies (`unigram_surprisal`: cheap and deterministic), or its
  loss under a reference model (`reference_loss_scores`).

`llmopt.techniques.curriculum` wraps them in loop hooks.
"""

from __future__ import annotations

import math

import torch

__all__ = ["difficulty_order", "pacing_fraction", "reference_loss_scores", "seq_len_at", "token_counts",
           "training_windows", "unigram_surprisal"]


def seq_len_at(step: int, start_len: int, full_len: int, warmup_steps: int, multiple: int = 8) -> int:
    """Sequence length at optimizer step `step`: linear from `start_len` to `full_len` over `warmup_steps`.

    Rounded down to a multiple of `multiple` (never below `min(start_len, full_len)` rounded the same way, nor
    below `multiple`), so a compiled model sees few distinct lengths; `full_len` from `warmup_steps` on.
    """
    if start_len <= 0 or full_len <= 0 or multiple <= 0 or warmup_steps < 0:
        raise ValueError(f"seq_len_at needs positive lengths and multiple, warmup_steps >= 0; got start_len="
                         f"{start_len}, full_len={full_len}, multiple={multiple}, warmup_steps={warmup_steps}")
    if step >= warmup_steps or start_len >= full_len:
        return full_len
    length = start_len + (full_len - start_len) * step / warmup_steps
    rounded = int(length) // multiple * multiple
    floor = max(multiple, min(start_len, full_len) // multiple * multiple)
    return min(full_len, max(rounded, floor))


def training_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of `seq_len + 1` tokens (input = w[:-1], target = w[1:]): (N, seq_len + 1)."""
    n = (len(tokens) - 1) // seq_len
    if n <= 0:
        raise ValueError(f"{len(tokens)} tokens make no window of {seq_len + 1}; use more text or a shorter seq_len")
    starts = torch.arange(n) * seq_len
    return tokens[starts.unsqueeze(1) + torch.arange(seq_len + 1)]


def token_counts(tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """How often each token id occurs, (vocab_size,) int64."""
    size = vocab_size if vocab_size is not None else int(tokens.max()) + 1
    return torch.bincount(tokens.flatten().long(), minlength=size)


def unigram_surprisal(windows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean surprisal -log p(token) of each window's target tokens under add-one-smoothed unigram frequencies:
    (N,) float64. Windows of rare tokens are "hard"; the score is a pure function of the data."""
    log_p = torch.log((counts.double() + 1) / (counts.sum().double() + len(counts)))
    return -log_p[windows[:, 1:].long()].mean(dim=1)


@torch.no_grad()
def reference_loss_scores(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean next-token loss of each window under a reference `model` (`model.loss(idx, targets)`): (N,) float64."""
    was_training = model.training
    model.eval()
    scores = []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        for row in w:  # per window: model.loss returns the sum over its batch
            loss_sum, n = model.loss(row[None, :-1], row[None, 1:])
            scores.append(float(loss_sum) / max(int(n), 1))
    model.train(was_training)
    return torch.tensor(scores, dtype=torch.float64)


def pacing_fraction(progress: float, pacing: str = "root", start_fraction: float = 0.2) -> float:
    """Share of the data (easiest first) available at training progress in [0, 1].

    "linear": start + (1 - start) * p; "root": sqrt(start^2 + (1 - start^2) * p) (Platanios et al. 2019),
    which opens the harder data faster early on.
    """
    if not 0.0 < start_fraction <= 1.0:
        raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
    p = min(1.0, max(0.0, progress))
    if pacing == "linear":
        return start_fraction + (1.0 - start_fraction) * p
    if pacing == "root":
        return math.sqrt(start_fraction ** 2 + (1.0 - start_fraction ** 2) * p)
    raise ValueError(f"pacing must be 'linear' or 'root', got {pacing!r}")


def difficulty_order(windows: torch.Tensor, scores: torch.Tensor, pacing: str, step: int, total_steps: int, *,
                     start_fraction: float = 0.2) -> torch.Tensor:
    """Indices into `windows` that may be drawn at `step`: the easiest `pacing_fraction(step / total_steps)` of
    them, easiest first (ties by index, so the order is deterministic). (K,) int64, 1 <= K <= N."""
    if len(windows) != len(scores):
        raise ValueError(f"{len(windows)} windows but {len(scores)} scores")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    order = torch.sort(scores, stable=True).indices
    k = max(1, math.ceil(pacing_fraction(step / total_steps, pacing, start_fraction) * len(order)))
    return order[:k]
