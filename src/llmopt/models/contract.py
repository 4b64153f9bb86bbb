"""The model contract every architecture shares (DESIGN.md §4), written once.

A model defines `hidden_states(idx, *, input_pos, cache)` (the final normalized states, (B, T, dim)),
an `lm_head` Linear and a `loss_fn`; this base adds the contract's `forward`, the `loss` that training
goes through (so fused linear + cross-entropy can replace `loss_fn`) and a parameter count.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class CausalLM(nn.Module):
    def forward(self, idx: torch.Tensor, *, input_pos: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Logits (B, T, vocab_size), in fp32 when the weights are fp32."""
        return self.lm_head(self.hidden_states(idx, input_pos=input_pos, cache=cache))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
        """(sum of next-token losses, number of target tokens) over targets != ignore_index."""
        h = self.hidden_states(idx)
        return self.loss_fn(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1), ignore_index)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters counted once each (tied embeddings once)."""
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
