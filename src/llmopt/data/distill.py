"""Distillation data: a teacher's top-k next-token distributions over windows of a corpus, and the loss.

    targets = teacher_topk(teacher, ids, seq_len=128, top_k=32)        # one teacher pass, stored sparse
    targets.save("runs/x/teacher.safetensors"); targets = TeacherTargets.load(...)
    for inputs, ids, logprobs in targets.batches(8, seed=0): ...         # (8, 128), (8, 128, 32) x2
    loss = topk_distill_loss(student(inputs), ids, logprobs)             # soft cross-entropy = KL + const

Token-level knowledge distillation (Hinton et al. 2015; for language models, Kim & Rush 2016 and
DistilBERT): the student matches the teacher's next-token distribution at every position of real text.
The full distribution is 49152 floats per token for SmolLM2; its top-k (k = 32 keeps >= 0.9 of the mass
on Shakespeare) renormalized is stored instead, a 750x smaller target. The loss is the cross-entropy of
the student's full-vocabulary log-softmax against that renormalized top-k, which is the KL divergence up
to the teacher's (constant) entropy; its minimum puts the student's argmax on the teacher's, which is what
a greedy speculative draft needs.

`project_embedding` gives a narrower student the teacher's tied embedding restricted to its top principal
directions (SVD), so the student starts with the teacher's token geometry instead of noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TeacherTargets:
    """Windows of token ids and the teacher's top-k log-probabilities at each position."""

    inputs: torch.Tensor
    """(N, T) int64 token ids."""
    topk_ids: torch.Tensor
    """(N, T, K) int64: the teacher's K most likely next tokens after each position, most likely first."""
    topk_logprobs: torch.Tensor
    """(N, T, K) float32: their log-probabilities renormalized over the K (logsumexp over K is 0)."""
    mass: float = 0.0
    """Mean probability mass the teacher put on its top K (before renormalizing)."""

    def __post_init__(self) -> None:
        if self.inputs.dim() != 2 or self.topk_ids.shape[:2] != self.inputs.shape or \
                self.topk_logprobs.shape != self.topk_ids.shape:
            raise ValueError(f"teacher targets have mismatched shapes: inputs {tuple(self.inputs.shape)}, topk_ids "
                             f"{tuple(self.topk_ids.shape)}, topk_logprobs {tuple(self.topk_logprobs.shape)}")

    def __len__(self) -> int:
        return self.inputs.size(0)

    def batches(self, batch_size: int, *, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Endless shuffled batches (a new permutation each epoch): (inputs, topk_ids, topk_logprobs)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=generator)
            for start in range(0, len(self) - batch_size + 1, batch_size):
                rows = order[start:start + batch_size]
                yield self.inputs[rows], self.topk_ids[rows], self.topk_logprobs[rows]
            if len(self) < batch_size:
                raise ValueError(f"only {len(self)} teacher windows, fewer than batch_size={batch_size}")

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"inputs": self.inputs.contiguous(), "topk_ids": self.topk_ids.to(torch.int32).contiguous(),
                   "topk_logprobs": self.topk_logprobs.to(torch.float16).contiguous()},
                  str(tmp), metadata={"mass": str(self.mass)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "TeacherTargets":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            mass = float(f.metadata().get("mass", 0.0))
            return cls(f.get_tensor("inputs").long(), f.get_tensor("topk_ids").long(),
                       f.get_tensor("topk_logprobs").float(), mass)


def concat_targets(parts: list[TeacherTargets]) -> TeacherTargets:
    """One `TeacherTargets` from several with the same window length and top-k (mass averaged by tokens)."""
    if not parts:
        raise ValueError("no teacher targets to concatenate")
    tokens = sum(p.inputs.numel() for p in parts)
    return TeacherTargets(torch.cat([p.inputs for p in parts]), torch.cat([p.topk_ids for p in parts]),
                          torch.cat([p.topk_logprobs for p in parts]),
                          sum(p.mass * p.inputs.numel() for p in parts) / tokens)


def mixed_batches(first: TeacherTargets, second: TeacherTargets | None, batch_size: int, second_rows: int, *,
                  seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless batches of `batch_size` rows, `second_rows` of them from `second` and the rest from `first`
    (each shuffled on its own); `second=None` or `second_rows=0` is `first.batches(batch_size)`."""
    if second is None or second_rows == 0:
        yield from first.batches(batch_size, seed=seed)
        return
    if not 0 < second_rows <= batch_size:
        raise ValueError(f"second_rows must be in [0, batch_size={batch_size}], got {second_rows}")
    if first.inputs.size(1) != second.inputs.size(1):
        raise ValueError(f"window lengths differ ({first.inputs.size(1)} vs {second.inputs.size(1)}); "
                         "generate the continuations with prompt_len + new_tokens - 1 = seq_len")
    if second_rows == batch_size:
        yield from second.batches(batch_size, seed=seed)
        return
    a, b = first.batches(batch_size - second_rows, seed=seed), second.batches(second_rows, seed=seed + 1)
    while True:
        x, y = next(a), next(b)
        yield tuple(torch.cat([u, v]) for u, v in zip(x, y))


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len) of a 1-D id tensor; at most `max_windows`, evenly spread."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of seq_len={seq_len}; use more text")
    out = ids[: n * seq_len].view(n, seq_len)
    if max_windows is not None and n > max_windows:
        out = out[torch.linspace(0, n - 1, max_windows).long()]
    return out


@torch.no_grad()
def teacher_topk(teacher, inputs: torch.Tensor, *, top_k: int = 32, batch_size: int = 4,
                 on_batch: Callable[[int, int], None] | None = None) -> TeacherTargets:
    """One no-grad teacher pass over `inputs` (N, T); keeps the top-k next-token log-probabilities."""
    if top_k < 1 or top_k > teacher.config.vocab_size:
        raise ValueError(f"top_k must be in [1, {teacher.config.vocab_size}], got {top_k}")
    was_training = teacher.training
    teacher.eval()
    ids, logprobs, mass = [], [], 0.0
    for start in range(0, inputs.size(0), batch_size):
        logits = teacher(inputs[start:start + batch_size]).float()  # (b, T, V)
        values, top = logits.log_softmax(-1).topk(top_k, dim=-1)  # (b, T, K), most likely first
        mass += float(values.exp().sum(-1).sum())
        ids.append(top)
        logprobs.append(values.log_softmax(-1))  # renormalized over the K
        if on_batch is not None:
            on_batch(min(start + batch_size, inputs.size(0)), inputs.size(0))
    teacher.train(was_training)
    return TeacherTargets(inputs, torch.cat(ids), torch.cat(logprobs), mass / inputs.numel())


def topk_distill_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
    """Soft cross-entropy of the student's log-softmax (B, T, V) against the teacher's top-k (B, T, K).

    Equals KL(teacher_topk || student) plus the teacher's entropy (no gradient): minimized by the student
    putting the teacher's renormalized top-k probabilities on those tokens.
    """
    logq = student_logits.float().log_softmax(-1).gather(-1, topk_ids)  # (B, T, K)
    per_token = -(topk_logprobs.exp() * logq).sum(-1)  # (B, T)
    return per_token.mean() if reduction == "mean" else per_token.sum()


def project_embedding(embedding: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows of `embedding` (V, D) in its top-`rank` right-singular directions: (V, rank).

    E ~= E V_r V_r^T, so a student with the tied embedding E V_r reproduces the teacher's logits exactly
    when its final hidden state is the teacher's projected onto V_r.
    """
    if not 0 < rank <= embedding.size(1):
        raise ValueError(f"rank must be in [1, {embedding.size(1)}] (the teacher's width), got {rank}")
    _, _, vh = torch.linalg.svd(embedding.float(), full_matrices=False)  # vh: (D, D)
    return embedding.float() @ vh[:rank].T


def top1_agreement(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> float:
    """Share of positions where the student's argmax is the teacher's (the greedy acceptance per token)."""
    return float((student_logits.argmax(-1) == topk_ids[..., 0]).float().mean())

