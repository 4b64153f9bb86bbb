"""Prompt lookup decoding: propose the tokens that followed the last earlier occurrence of the current n-gram.

Saxena 2023 (apoorvumang/prompt-lookup-decoding), `prompt_lookup_num_tokens` in `transformers`. No draft
model: the proposer searches the prompt and the text generated so far for the last `max_ngram` tokens
(then shorter n-grams down to `min_ngram`) and proposes what came after the most recent earlier match.
Copy-heavy generation (summaries, edits, code, quoting a passage) accepts long runs of them.

Numerics contract: exact, through the speculative loop (`llmopt.inference.speculative`): a deterministic
proposal is the case q = one-hot(d), so greedy output is the target's own and sampling keeps the target's
distribution. When nothing matches, the round is a plain decode step (one target forward, no waste).
"""

from __future__ import annotations

import torch

from llmopt.inference.speculative import Proposal


class PromptLookupProposer:
    """n-gram lookup in the sequence so far; `propose` returns up to k tokens per row."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.padding: torch.Tensor | None = None

    def start(self, target, batch_size: int, max_len: int, padding: torch.Tensor | None) -> None:
        self.padding = padding

    def lookup(self, row: torch.Tensor, k: int) -> torch.Tensor:
        """Up to k tokens (1-D) that followed the most recent earlier match of the row's last n tokens."""
        S = row.numel()
        for n in range(min(self.max_ngram, S - 1), self.min_ngram - 1, -1):
            windows = row.unfold(0, n, 1)[:-1]  # (S - n, n): every n-gram except the last one itself
            hits = (windows == row[S - n:]).all(-1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                return row[start:start + k]
        return row[:0]

    def propose(self, seq: torch.Tensor, k: int, sampling: dict) -> Proposal:
        B, S = seq.shape
        if self.padding is not None:  # padding never matches: mark it with an id no token has
            pad = torch.zeros(B, S, dtype=torch.bool, device=seq.device)
            pad[:, : self.padding.size(1)] = self.padding
            seq = seq.masked_fill(pad, -1)
        found = [self.lookup(seq[b], k) for b in range(B)]
        width = max(len(f) for f in found)
        tokens = seq.new_zeros(B, width)
        valid = torch.zeros(B, width, dtype=torch.bool, device=seq.device)
        for b, f in enumerate(found):
            tokens[b, : len(f)] = f
            valid[b, : len(f)] = True
        return Proposal(tokens, None, valid)

    def rollback(self, length: int) -> None:
        pass
