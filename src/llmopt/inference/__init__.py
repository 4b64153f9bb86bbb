"""Inference: external KV caches, sampling, prefill/decode generation and its naive oracle (DESIGN.md §6),
quantized KV caches, speculative decoding and prompt lookup decoding."""

from llmopt.core import register_technique
from llmopt.inference.cache import KVCache, make_cache
from llmopt.inference.generate import (GenerateResult, decode_one_token, generate, generate_reference,
                                       prefill)
from llmopt.inference.prompt_lookup import PromptLookupProposer
from llmopt.inference.quantized_cache import QuantizedKVCache, make_quantized_cache
from llmopt.inference.sampling import logits_to_probs, sample
from llmopt.inference.speculative import (DraftModelProposer, SpeculativeResult, speculative_generate)

register_technique("kv_cache", kind="inference", factory=make_quantized_cache, workload="generate",
                   description="KV cache quantized to 8/4/2 bits, KIVI layout (keys per channel, values per token), "
                               "full-precision recent window, chunked dequantizing attention")
register_technique("speculative", kind="inference", factory=DraftModelProposer, workload="generate",
                   description="speculative decoding with a draft model: exact accept/reject, adaptive k, batch > 1")
register_technique("prompt_lookup", kind="inference", factory=PromptLookupProposer, workload="generate",
                   description="prompt lookup decoding: n-gram drafts from the text so far, exact greedy output")

__all__ = ["DraftModelProposer", "GenerateResult", "KVCache", "PromptLookupProposer", "QuantizedKVCache",
           "SpeculativeResult", "decode_one_token", "generate", "generate_reference", "logits_to_probs",
           "make_cache", "make_quantized_cache", "prefill", "sample", "speculative_generate"]
