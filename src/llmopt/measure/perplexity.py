"""Perplexity of a fixed-length model over a long text, by a sliding window.

The method of the Hugging Face guide "Perplexity of fixed-length models": windows of `window` tokens
start every `stride` tokens; each window scores only the tokens the previous window did not score, so
no token is scored twice, and with `stride < window` every token from the second on is scored once,
with at least `window - stride` tokens of context. A token that is first in its window has no context
and is not scored: the first token of the text, and with `stride == window` (the fast, context-poor
extreme) the first token of every window, as in the guide's label shift. `stride == 1` gives every
token a full window. `tokens` in the result is the number actually scored.

    perplexity = exp( sum of token negative log-likelihoods / number of scored tokens )

Numerics: log-softmax in fp32 and the sum in fp64, so with fp32 logits the result equals a direct
computation up to fp32 rounding of the model itself; with `window >= len(token_ids)` it is exactly one
full-sequence cross-entropy.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window, positions absolute in the token sequence."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (one to condition on, one to score), got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window={window}, got {stride}; "
                         "a stride above the window would leave tokens unscored")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def perplexity(model: Callable[[torch.Tensor], torch.Tensor] | None, token_ids: torch.Tensor, *, window: int,
               stride: int, batch_size: int = 1,
               logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float | int]:
    """Sliding-window perplexity of `token_ids` (N,) under `model`.

    `model(idx)` must return logits (B, T, V) for idx (B, T) (the llmopt contract); any callable does.
    For a `transformers` model pass `logits_fn=lambda idx: hf_model(idx).logits` (and `model=None` or
    the module itself, which is then only put in eval mode). Windows of equal length are run
    `batch_size` at a time. Returns {"ppl", "nll" (mean per scored token), "nll_sum", "tokens" (scored),
    "window", "stride", "windows"}.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (N,), got shape {tuple(token_ids.shape)}; flatten the batch first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    fn = logits_fn or model
    if fn is None:
        raise ValueError("pass a model returning logits, or logits_fn=lambda idx: hf_model(idx).logits")
    module = model if isinstance(model, torch.nn.Module) else None
    if module is not None:
        first = next(module.parameters(), None)
        if first is not None:
            token_ids = token_ids.to(first.device)
    token_ids = token_ids.long()
    windows = sliding_windows(token_ids.numel(), window, stride)

    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    nll_sum, scored = 0.0, 0
    try:
        i = 0
        while i < len(windows):
            length = windows[i][1] - windows[i][0]
            group = [windows[i]]
            while (len(group) < batch_size and i + len(group) < len(windows)
                   and windows[i + len(group)][1] - windows[i + len(group)][0] == length):
                group.append(windows[i + len(group)])
            i += len(group)
            idx = torch.stack([token_ids[b:e] for b, e, _ in group])  # (G, L)
            logits = fn(idx)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"the model returned {type(logits).__name__}, not a logits tensor; "
                                "for a transformers model pass logits_fn=lambda idx: model(idx).logits")
            if logits.shape[:2] != idx.shape:
                raise ValueError(f"logits of shape {tuple(logits.shape)} do not match input {tuple(idx.shape)}; "
                                 "expected (B, T, vocab)")
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (G, L, V)
            for row, (begin, end, first) in enumerate(group):
                # position p (absolute) is predicted by the logits at p - 1
                targets = token_ids[first:end]  # (S,)
                lp = logprobs[row, first - begin - 1:end - begin - 1]  # (S, V)
                nll_sum -= lp.gather(-1, targets[:, None]).double().sum().item()
                scored += targets.numel()
    finally:
        if module is not None:
            module.train(was_training)
    mean = nll_sum / scored
    return {"ppl": math.exp(mean), "nll": mean, "nll_sum": nll_sum, "tokens": scored, "window": window,
            "stride": stride, "windows": len(windows)}
