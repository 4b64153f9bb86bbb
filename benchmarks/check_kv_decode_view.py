"""The quantized cache's decode view on SmolLM2: a chunked forward against token-by-token decoding.

    python benchmarks/check_kv_decode_view.py [--layers 2] [--tokens 200]

The first `--layers` layers of SmolLM2-135M, `--tokens` held-out tokens fed token by token and in chunks of
100/28/72 through `QuantizedKVCache(decode_view=True)` (int4 and int2), in fp32 (C kernel and torch path) and in
float64 (torch path). Prints the largest logit difference and, in float64, how many stored codes differ: in
float64 none do and the logits agree to rounding; in fp32 a batched and a one-token projection differ in the
last bit, which flips codes near a rounding boundary, so the logits differ from the first quantized group on.

`--peer`: instead, transformers' QuantizedCache (quanto, int4 and int2) on `--tokens` tokens of the whole model,
fed token by token and as the kv bench feeds it (one token, then 128 a forward): the two NLLs.
"""

import argparse

import torch

from llmopt.data.corpus import default_corpus_text
from llmopt.inference import make_quantized_cache
from llmopt.models import load_pretrained


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--peer", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_pretrained("smollm2-135m")
    if args.peer:
        return check_peer(model, tok, args.tokens)
    model.layers = model.layers[:args.layers]
    model.config.n_layer = args.layers
    text = default_corpus_text()
    ids = torch.tensor(tok.encode(text[-int(len(text) * 0.05):]))[None, :args.tokens]
    n = ids.size(1)
    pieces = [n // 2, n // 7, n - n // 2 - n // 7]

    def fed(cache, sizes):
        out, s = [], 0
        with torch.no_grad():
            for size in sizes:
                out.append(model(ids[:, s:s + size], input_pos=torch.arange(s, s + size), cache=cache))
                s += size
        return torch.cat(out, 1)

    for dtype, kernels in ((torch.float32, ("c", "torch")), (torch.float64, ("torch",))):
        model.to(dtype)
        for bits in (4, 2):
            for kernel in kernels:
                caches = [make_quantized_cache(model, 1, n, bits=bits, kernel=kernel) for _ in range(2)]
                one_by_one, chunked = fed(caches[0], [1] * n), fed(caches[1], pieces)
                codes = sum(int((a != b).sum()) for c0, c1 in [caches] for a, b in
                            zip([*c0.k_codes, *c0.v_codes], [*c1.k_codes, *c1.v_codes]))
                print(f"{str(dtype)[6:]} int{bits} kernel={kernel}: max |logit difference| "
                      f"{(chunked - one_by_one).abs().max().item():.2e}, stored codes differing: {codes}", flush=True)


def check_peer(model, tok, tokens):
    import sys
    from pathlib import Path

    from transformers import QuantizedCache

    from llmopt.models.hf import to_hf

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inference import _hf_nll

    hf = to_hf(model).eval()
    text = default_corpus_text()
    ids = torch.tensor(tok.encode(text[-int(len(text) * 0.05):]))[None, :tokens]
    for bits in (4, 2):
        nll = {chunk: _hf_nll(hf, ids, QuantizedCache(backend="quanto", config=hf.config, nbits=bits), chunk)
               for chunk in (0, 1)}
        print(f"transformers quanto int{bits}: NLL one token then 128 a forward {nll[0]:.6f}, token by token "
              f"{nll[1]:.6f}, difference {nll[0] - nll[1]:.1e}", flush=True)


if __name__ == "__main__":
    main()
