"""Inference: external KV caches, sampling, prefill/decode generation and its naive oracle (DESIGN.md §6),
quantized KV caches, speculative decoding and prompt lookup decoding."""

from llmopt.inference.cache import KVCache, make_cache
from llmopt.inference.generate import (GenerateResult, decode_one_token, generate, generate_reference,
                                       prefill)
from llmopt.inference.prompt_lookup import PromptLookupProposer
from llmopt.inference.quantized_cache import QuantizedKVCache, make_quantized_cache
from llmopt.inference.sampling import logits_to_probs, sample
from llmopt.inference.speculative import (DraftModelProposer, FeatureDraftProposer, SpeculativeResult,
                                          speculative_generate)

from llmopt.core import register_technique

# Inference components are listed with the techniques (`llmopt techniques`); their own tests
# (tests/test_inference_*.py) check them against `generate_reference` and the target distribution.
register_technique("kv_cache", kind="inference", workload="generate", factory=make_quantized_cache,
                   description="Quantized KV cache (KIVI layout, 8/4/2 bits, full-precision recent window): "
                               "`llmopt generate --kv-cache int4`.")
register_technique("speculative", kind="inference", workload="generate", factory=DraftModelProposer,
                   description="Speculative decoding with a draft model or an EAGLE feature-draft head, exact "
                               "accept/reject, adaptive k: `llmopt generate --draft MODEL|HEAD_DIR`.")
register_technique("prompt_lookup", kind="inference", workload="generate", factory=PromptLookupProposer,
                   description="Prompt lookup decoding: drafts from n-gram matches in the context, no draft "
                               "model: `llmopt generate --prompt-lookup`.")

__all__ = ["DraftModelProposer", "FeatureDraftProposer", "GenerateResult", "KVCache", "PromptLookupProposer",
           "QuantizedKVCache", "SpeculativeResult", "decode_one_token", "generate", "generate_reference", "logits_to_probs",
           "make_cache", "make_quantized_cache", "prefill", "sample", "speculative_generate"]
