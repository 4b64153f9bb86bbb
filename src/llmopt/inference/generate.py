"""Autoregressive generation: `prefill` the prompt into a cache, then `decode_one_token` at a time.

Follows gpt-fast's `generate.py` split, with the cache passed in (DESIGN.md §6). `generate_reference` is
the naive oracle (a full forward over the whole sequence for every new token, no cache, like nanoGPT's
`GPT.generate`); every fast path is tested against it.

Numerics contract: exact up to attention's summation order. Cached logits match the full forward to
about 1e-6 in fp32; greedy tokens are identical, and sampled tokens are identical for the same seed
because both paths draw from one `torch.Generator` in the same order (one `sample` call per step).
`compile=True` compiles `decode_one_token` with `torch.compile(dynamic=False)` over a `static=True`
cache, and gives the same greedy tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from llmopt.inference.cache import KVCache, _max_len_error, make_cache
from llmopt.inference.cpu_linear import cpu_linear_kernels
from llmopt.inference.sampling import sample
from llmopt.models.contract import CausalLM


@dataclass
class GenerateResult:
    """What `generate` and `generate_reference` return."""

    tokens: torch.Tensor
    """(B, T + n): prompt followed by the generated tokens (a row that stopped repeats its stop token)."""
    prompt_len: int
    """T, the prompt length."""
    num_new_tokens: list[int]
    """Per row, tokens generated up to and including its stop token."""
    prefill_seconds: float
    """Wall time of the prompt's forward and the first sampled token."""
    decode_seconds: float
    """Wall time of the remaining decode steps."""
    decode_steps: int = 0
    """Number of decode steps after the prefill (n - 1 unless every row stopped early)."""
    prompt_padding: torch.Tensor | None = None
    """(B, T) bool, True where a shorter prompt was padded on the left; None when all prompts had length T."""

    @property
    def new_tokens(self) -> torch.Tensor:
        """(B, n): the generated tokens only."""
        return self.tokens[:, self.prompt_len:]

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.tokens.size(0) * self.prompt_len / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second over the decode steps, all rows together."""
        return self.tokens.size(0) * self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> dict:
        return {"batch_size": self.tokens.size(0), "prompt_len": self.prompt_len,
                "num_new_tokens": self.num_new_tokens, "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds, "decode_steps": self.decode_steps,
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


# ---- the two steps ------------------------------------------------------------------------------
def plain_forward(model) -> bool:
    """True when `model(x)` is exactly `model.lm_head(model.hidden_states(x))` (the plain contract, no forward
    hooks), so a caller may take the hidden states and the logits from one forward."""
    return (type(model).forward is CausalLM.forward and not model._forward_hooks and not model._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


def last_logits(model, idx: torch.Tensor, input_pos: torch.Tensor, cache) -> torch.Tensor:
    """Logits (B, V) of the last position of `idx` fed at `input_pos` (filling `cache`). For a model on the plain
    contract (`CausalLM.forward`, no forward hooks) only the last position goes through `lm_head`, as
    transformers' `logits_to_keep=1` does: a 32-token SmolLM2 prompt skips 31 x 49,152 x 576 multiply-adds."""
    if plain_forward(model):
        return model.lm_head(model.hidden_states(idx, input_pos=input_pos, cache=cache)[:, -1:])[:, -1]
    return model(idx, input_pos=input_pos, cache=cache)[:, -1]


def prefill(model, idx: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt idx (B, T) through the model, filling `cache`; logits (B, V) of the last position."""
    return last_logits(model, idx, torch.arange(idx.size(1), device=idx.device), cache)


def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor, cache, *, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed token (B, 1) at input_pos (1,); return (next token (B, 1), its logits (B, V))."""
    logits = model(token, input_pos=input_pos, cache=cache)[:, -1]  # (B, V)
    next_token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return next_token[:, None], logits


_compiled_decode_one_token = None


def _compiled_decode():
    global _compiled_decode_one_token
    if _compiled_decode_one_token is None:
        _compiled_decode_one_token = torch.compile(decode_one_token, dynamic=False)
    return _compiled_decode_one_token


# ---- helpers ------------------------------------------------------------------------------------
def _as_batch(prompt_ids, device) -> torch.Tensor:
    """list[int], list[list[int]], (T,) or (B, T) -> (B, T) int64 on `device`."""
    if isinstance(prompt_ids, torch.Tensor):
        idx = prompt_ids
    else:
        rows = [list(prompt_ids)] if not prompt_ids or not isinstance(prompt_ids[0], (list, tuple)) else prompt_ids
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"prompts have different lengths {sorted({len(r) for r in rows})}; batched generate "
                             "needs equal lengths (generate them one by one)")
        idx = torch.tensor(rows, dtype=torch.long)
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"prompt must be token ids of shape (T,) or (B, T) with T >= 1, got {tuple(idx.shape)}")
    return idx.to(device=device, dtype=torch.long)


def _prepare_prompts(prompt_ids, device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like `_as_batch`, but prompts of different lengths (a list of lists) are padded on the left.

    Returns (idx (B, T), padding (B, T) bool or None). Rows share positions 0..T-1; the cache hides the
    padded key slots (`set_key_padding`) and rotary embeddings are relative, so each row attends as if
    it were alone (up to summation order).
    """
    if isinstance(prompt_ids, torch.Tensor) or not prompt_ids or not isinstance(prompt_ids[0], (list, tuple)):
        return _as_batch(prompt_ids, device), None
    lengths = [len(row) for row in prompt_ids]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    T = max(lengths)
    if min(lengths) == T:
        return _as_batch(prompt_ids, device), None
    idx = torch.tensor([[pad_id] * (T - len(row)) + list(row) for row in prompt_ids], dtype=torch.long, device=device)
    padding = torch.tensor([[True] * (T - n) + [False] * n for n in lengths], device=device)
    return idx, padding


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stopper:
    """Per-row stop tracking: a row that emitted a stop id repeats it; `done` when every row stopped."""

    def __init__(self, stop_ids, batch_size: int, device) -> None:
        if stop_ids is None:
            self.stop = None
            return
        ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        self.stop = torch.tensor(ids, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.stopped_with = torch.zeros(batch_size, dtype=torch.long, device=device)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> token with finished rows overwritten by their stop id."""
        if self.stop is None:
            return token
        token = torch.where(self.finished, self.stopped_with, token)
        hit = torch.isin(token, self.stop) & ~self.finished
        self.stopped_with = torch.where(hit, token, self.stopped_with)
        self.finished |= hit
        return token

    def done(self) -> bool:
        return self.stop is not None and bool(self.finished.all())  # one host sync per step, only with stop ids

    def counts(self, new_tokens: torch.Tensor) -> list[int]:
        B, n = new_tokens.shape
        if self.stop is None or n == 0:
            return [n] * B
        is_stop = torch.isin(new_tokens, self.stop)
        first = torch.where(is_stop.any(-1), is_stop.int().argmax(-1) + 1, torch.full((B,), n))
        return first.tolist()


def _check_kernels(kernels: str) -> None:
    if kernels not in ("auto", "torch"):
        raise ValueError(f"kernels must be 'auto' (CPU decode GEMV kernels where they build) or 'torch', got {kernels!r}")


# ---- generation ---------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_ids: int | Iterable[int] | None = None,
             cache: KVCache | None = None, max_len: int | None = None, compile: bool = False,
             stream: Callable[[torch.Tensor], None] | None = None, draft=None, prompt_lookup: bool = False,
             speculate_k: int = 8, adaptive_k: bool = True, kv_bits: int | None = None,
             pad_id: int = 0, kernels: str = "auto") -> GenerateResult:
    """Generate up to `max_new_tokens` after `prompt_ids` ((B, T) tensor, (T,) tensor or list of ints).

    temperature 0 is greedy. `seed` seeds a private generator (the global RNG is used when None).
    `stop_ids`: a row ends at the first of these it emits, then repeats it; generation stops when all
    rows have. `cache`: reuse a cache (it is reset); otherwise one of exactly T + max_new_tokens
    positions is built (or `max_len` positions). `compile`: compile the decode step over a static cache.
    `stream(tokens)` is called with each step's new tokens, shape (B,).

    Prompts of different lengths (a list of lists) are padded on the left with `pad_id` and the padded
    slots hidden from attention (`result.prompt_padding` says where). `draft` (a model sharing the
    vocabulary) or `prompt_lookup=True` switch to speculative decoding (`llmopt.inference.speculative`)
    with up to `speculate_k` tokens per round, adapted to the acceptance unless `adaptive_k=False`.
    `kv_bits` (8, 4 or 2) stores the keys and values in a `QuantizedKVCache`. `kernels="auto"` runs the
    plain linears of a CPU model through the decode GEMV kernel (`llmopt.inference.cpu_linear`; not with
    `compile`), `"torch"` keeps `F.linear`.
    """
    _check_kernels(kernels)
    if draft is not None and prompt_lookup:
        raise ValueError("pass either a draft model or prompt_lookup=True, not both")
    if kv_bits is not None:
        if cache is not None:
            raise ValueError("pass either cache= or kv_bits=, not both (kv_bits builds a QuantizedKVCache)")
        if compile:
            raise ValueError("compile=True needs a static dense cache; the quantized cache is dynamic")
        from llmopt.inference.quantized_cache import make_quantized_cache

        rows, longest = _prepare_prompts(prompt_ids, "cpu", pad_id)[0].shape
        size = max_len or min(longest + max_new_tokens, model.config.max_seq_len)
        cache = make_quantized_cache(model, rows, size, bits=kv_bits)
    if draft is not None or prompt_lookup:
        if compile:
            raise ValueError("compile=True applies to plain decoding; speculative decoding runs eagerly")
        from llmopt.inference.prompt_lookup import PromptLookupProposer
        from llmopt.inference.speculative import draft_proposer, speculative_generate

        proposer = draft_proposer(draft) if draft is not None else PromptLookupProposer()
        return speculative_generate(model, prompt_ids, max_new_tokens, proposer=proposer, k=speculate_k,
                                    adaptive=adaptive_k, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, stop_ids=stop_ids, cache=cache, pad_id=pad_id, stream=stream,
                                    kernels=kernels)
    param = next(model.parameters())
    device = param.device
    idx, padding = _prepare_prompts(prompt_ids, device, pad_id)
    B, T = idx.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    needed = T + max_new_tokens
    if cache is None:
        limit = model.config.max_seq_len if max_len is None else max_len
        if max_len is None and needed > limit:
            raise ValueError(f"prompt + new tokens = {needed} exceeds the model's max_seq_len={limit}; "
                             "shorten the prompt or generate fewer tokens")
        if needed > limit:
            raise _max_len_error(needed, limit)
        # a static cache keeps one shape across calls, so the compiled step is reused
        size = limit if (compile or max_len is not None) else needed
        cache = make_cache(model, B, size, static=compile)
    else:
        if needed > cache.max_len:
            raise _max_len_error(needed, cache.max_len)
        if compile and not cache.static:
            raise ValueError("compile=True needs a static cache: make_cache(model, batch_size, static=True)")
        cache.reset()
    cache.set_key_padding(padding)
    decode = _compiled_decode() if compile else decode_one_token
    generator = _make_generator(seed, device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    stopper = _Stopper(stop_ids, B, device)

    with cpu_linear_kernels(model, enabled=kernels == "auto" and not compile):
        _sync(device)
        start = time.perf_counter()
        token = stopper(sample(prefill(model, idx, cache), **sampling))  # (B,)
        _sync(device)
        prefill_seconds = time.perf_counter() - start
        out = [token]
        if stream is not None:
            stream(token)

        start = time.perf_counter()
        steps = 0
        for pos in range(T, needed - 1):
            if stopper.done():
                break
            token, _ = decode(model, token[:, None], torch.tensor([pos], device=device), cache, **sampling)
            token = stopper(token[:, 0])
            out.append(token)
            steps += 1
            if stream is not None:
                stream(token)
        _sync(device)
        decode_seconds = time.perf_counter() - start

    tokens = torch.cat([idx, torch.stack(out, dim=1)], dim=1)
    return GenerateResult(tokens=tokens, prompt_len=T, num_new_tokens=stopper.counts(tokens[:, T:]),
                          prefill_seconds=prefill_seconds, decode_seconds=decode_seconds, decode_steps=steps,
                          prompt_padding=padding)


@torch.no_grad()
def generate_reference(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       stop_ids: int | Iterable[int] | None = None) -> GenerateResult:
    """The oracle: a full forward over the whole sequence for every new token, no cache.

    Same arguments and the same generator sequence as `generate`, so both give the same tokens.
    """
    param = next(model.parameters())
    device = param.device
    idx = _as_batch(prompt_ids, device)
    B, T = idx.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generator = _make_generator(seed, device)
    stopper = _Stopper(stop_ids, B, device)
    seconds = []
    for _ in range(max_new_tokens):
        if stopper.done():
            break
        _sync(device)
        start = time.perf_counter()
        logits = model(idx)[:, -1]  # (B, V)
        token = stopper(sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
        idx = torch.cat([idx, token[:, None]], dim=1)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return GenerateResult(tokens=idx, prompt_len=T, num_new_tokens=stopper.counts(idx[:, T:]),
                          prefill_seconds=seconds[0], decode_seconds=sum(seconds[1:]), decode_steps=len(seconds) - 1)
