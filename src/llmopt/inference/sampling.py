"""Turning logits into the next token: greedy, temperature, top-k, nucleus (top-p).

Numerics contract: `sample` draws exactly from `logits_to_probs(...)`. The draw is an exponential race,
argmax(p / E) with E ~ Exp(1) i.i.d. (equivalent to sampling from p, like the Gumbel-max trick), as in
gpt-fast: no host synchronization, and one `exponential_` call per step, so a seeded `torch.Generator`
gives the same tokens on every path that feeds the same logits (cached, uncached, compiled).

Top-k and top-p follow the order of Hugging Face's logits processors: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Probabilities (..., V) in fp32 after temperature scaling, top-k and top-p filtering."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive for probabilities, got {temperature}; "
                         "use sample(..., temperature=0) for greedy decoding")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive number of tokens, got {top_k}; use None for no limit")
        if top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}; use None for no nucleus filtering")
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            # drop a token when the tokens before it already cover top_p (the most likely token always stays)
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids of shape logits.shape[:-1]: argmax when temperature == 0, else a draw from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    # exponential_ can return exactly 0, which would make 0 / 0 = NaN win the argmax for a filtered token
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(-1)
