"""Where SmolLM2's int2 KV error comes from: perplexity (decode view, chunks of 256, held-out Shakespeare, the
method of bench_kv_int2.py) with one half of the cache read exactly, or with keys fake-quantized another way.

    python benchmarks/kv_int2_diagnose.py exact --windows 2 v:mse k:minmax
        # EXACT:CLIP: int2 cache (4 sinks, rotated) whose keys (k) or values (v) are read from an exact copy;
        # the other half quantized with key_clip / value_clip = CLIP
    python benchmarks/kv_int2_diagnose.py keys --windows 1 post:1:64:mse pre:1:64:unbiased
        # MODE:HADAMARD:GROUP:CLIP: values exact, keys fake-quantized at 2 bits: MODE post (after RoPE), pre
        # (before RoPE, KVQuant) or token (per token instead of per channel); HADAMARD 1/0; GROUP tokens (or
        # channels for token) per scale; CLIP minmax/mse/unbiased
Prints one JSON line per spec: the perplexity ratio against the fp32 cache on the same windows. Slow (torch
path, an exact copy of the cache kept beside it): a diagnosis, not a cache to use.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kv_int2 import nll_with_cache  # noqa: E402

from llmopt.data.corpus import default_corpus_text  # noqa: E402
from llmopt.inference import make_cache  # noqa: E402
from llmopt.inference.quantized_cache import QuantizedKVCache, quantize_groups  # noqa: E402
from llmopt.models import load_pretrained  # noqa: E402
from llmopt.models.llama import rotate_half  # noqa: E402


class Diagnosed(QuantizedKVCache):
    """Keeps an exact copy of what it is written (keys unrotated, values rotated as stored) and reads the
    stored part's keys or values from it (`exact`), or, with `fake_keys`, keys fake-quantized from it."""
    exact, fake_keys = "", None  # fake_keys: (mode, hadamard, group, clip, cos, sin)

    def _allocate(self):
        super()._allocate()
        shape = (self.batch_size, self.n_kv_head, self.max_len, self.head_dim)
        self.fk = [torch.zeros(shape) for _ in range(self.n_layer)]
        self.fv = [torch.zeros(shape) for _ in range(self.n_layer)]

    def update(self, layer, input_pos, k, v):
        p0 = self.seq_len - k.size(2)
        self.fk[layer][:, :, p0:p0 + k.size(2)] = k.float()
        self.fv[layer][:, :, p0:p0 + k.size(2)] = v.float() @ self.H
        return super().update(layer, input_pos, k, v)

    def dequantize(self, layer, start, end, *, rotated=False):
        k, v = super().dequantize(layer, start, end, rotated=True)
        if "v" in self.exact or self.fake_keys:
            v = self.fv[layer][:, :, start:end].clone()
        if "k" in self.exact:
            k = self.fk[layer][:, :, start:end] @ self.H
        if self.fake_keys:
            mode, had, g, clip, cos, sin = self.fake_keys
            k = self.fk[layer][:, :, start:end].clone()
            cos, sin = cos[start:end], sin[start:end]
            if mode == "pre":
                k = k * cos - rotate_half(k) * sin
            k = k @ self.H if had else k
            B, H, n, D = k.shape
            if mode == "token":
                q, s, z = quantize_groups(k.view(B, H, n, D // g, g), 2, dim=4, clip=clip)
            else:
                q, s, z = quantize_groups(k.view(B, H, n // g, g, D), 2, dim=3, clip=clip)
            k = (q.float() * s.float() + z.float()).view(B, H, n, D)
            k = k @ self.H if had else k
            if mode == "pre":
                k = k * cos + rotate_half(k) * sin
            k = k @ self.H  # as stored (rotate="both")
        if not rotated:
            k, v = k @ self.H, v @ self.H
        return k, v


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["exact", "keys"])
    p.add_argument("specs", nargs="+")
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--context", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_pretrained("smollm2-135m")
    model.eval()
    c, L = model.config, args.context
    text = default_corpus_text()
    ids = torch.tensor(tok.encode(text[-int(len(text) * 0.05):]))
    windows = [ids[i * L:(i + 1) * L][None] for i in range(args.windows)]
    ref = [nll_with_cache(model, w, make_cache(model, 1, L), 256) for w in windows]
    for spec in args.specs:
        cache = Diagnosed(c.n_layer, 1, c.n_kv_head, L, c.head_dim, bits=2, sink_tokens=4, kernel="torch",
                          rotate="both", key_clip="minmax", value_clip="minmax")
        if args.what == "exact":
            cache.exact, clip = spec.split(":")
            cache.key_clip = cache.value_clip = clip
        else:
            mode, had, group, clip = spec.split(":")
            cache.fake_keys = (mode, had == "1", int(group), clip, model.rope_cos, model.rope_sin)
        per = [nll_with_cache(model, w, cache, 256) for w in windows]
        print(json.dumps(dict(what=args.what, spec=spec, windows=len(windows),
                              ppl_ratio_vs_fp32=float(torch.tensor((sum(per) - sum(ref)) / len(per)).exp()),
                              per_window=[float(torch.tensor(a - b).exp()) for a, b in zip(per, ref)])), flush=True)


if __name__ == "__main__":
    main()
