"""Inference: external KV caches, sampling, prefill/decode generation and its naive oracle (DESIGN.md §6),
quantized KV caches, speculative decoding and prompt lookup decoding."""

from llmopt.inference.cache import KVCache, make_cache
from llmopt.inference.generate import (GenerateResult, decode_one_token, generate, generate_reference,
                                       prefill)
from llmopt.inference.prompt_lookup import PromptLookupProposer
from llmopt.inference.quantized_cache import QuantizedKVCache, make_quantized_cache
from llmopt.inference.sampling import logits_to_probs, sample
from llmopt.inference.speculative import (DraftModelProposer, SpeculativeResult, speculative_generate)

# Not registered yet: `register_technique("kv_cache" | "speculative" | "prompt_lookup", kind="inference", ...)`
# needs a ContractCase block per name in tests/contract/settings.py (the contract matrix fails otherwise), and
# that file is another change in flight; see docs/inference.md.

__all__ = ["DraftModelProposer", "GenerateResult", "KVCache", "PromptLookupProposer", "QuantizedKVCache",
           "SpeculativeResult", "decode_one_token", "generate", "generate_reference", "logits_to_probs",
           "make_cache", "make_quantized_cache", "prefill", "sample", "speculative_generate"]
