"""Shared by the quantized-cache decode tests: logits of fixed-token decode steps through each CPU path, and a
spy counting the one-call C steps."""

import torch

from llmopt.inference.cpu_linear import cpu_linear_kernels


def quantized_logits(model, ids, steps, *, path, pad=None, truncate_at=None, **cache_kw):
    """Logits of `steps` one-token forwards after a prefill of ids, the fed tokens fixed (not argmax), so every
    path sees the same input; with `truncate_at` (step index, length) the cache is rolled back there first.
    path: "module" (kernels off, torch attention), "layers" (the stack's C halves around the cache's update and
    torch attend) or "fused" (one C call a step where no group is flushed)."""
    from llmopt.inference import decode_one_token, make_quantized_cache, prefill

    B, T = ids.shape
    cache = make_quantized_cache(model, B, T + steps + 2, kernel="auto" if path == "fused" else "torch", **cache_kw)
    if pad is not None:
        cache.set_key_padding(pad)
    feed = torch.randint(0, model.config.vocab_size, (steps, B, 1), generator=torch.Generator().manual_seed(5))
    out, pos = [], T
    with torch.no_grad(), cpu_linear_kernels(model, enabled=path != "module"):
        out.append(prefill(model, ids, cache))
        for i in range(steps):
            if truncate_at is not None and i == truncate_at[0]:
                cache.truncate(truncate_at[1])
                pos = truncate_at[1]
            out.append(decode_one_token(model, feed[i], torch.tensor([pos]), cache)[1])
            pos += 1
    return torch.stack(out), cache


def spy_one_call_steps(monkeypatch) -> list:
    """A list that grows by one at each one-call quantized decode step (a spy: the real method runs)."""
    from llmopt.kernels.dense_gemv import StackDecodePlan

    calls = []
    real = StackDecodePlan.step_with_c_attention
    monkeypatch.setattr(StackDecodePlan, "step_with_c_attention",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls
