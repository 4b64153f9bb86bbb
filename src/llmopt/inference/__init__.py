"""Inference: external KV caches, sampling, prefill/decode generation and its naive oracle (DESIGN.md §6)."""

from llmopt.inference.cache import KVCache, make_cache
from llmopt.inference.generate import (GenerateResult, decode_one_token, generate, generate_reference,
                                       prefill)
from llmopt.inference.sampling import logits_to_probs, sample

__all__ = ["GenerateResult", "KVCache", "decode_one_token", "generate", "generate_reference", "logits_to_probs",
           "make_cache", "prefill", "sample"]
