"""Quantized KV caches vs the dense cache through `generate` at a 1,984-token context: decode tok/s of each, rounds
rotated so that every configuration runs in every slot of a round. Columns: the dense cache (fused one-call C
step), int4 (one C call per step too, window write and packed-code attention inside; the step that quantizes a
group takes the per-layer path), int2 (with --int2: its defaults, pre-RoPE keys and 4 sinks, one C call per step
too, RoPE applied to each stored key inside), int4 with the per-layer path forced (--per-layer: the C layer halves
around the cache's Python update / attend, what int4 ran before the one-call step; with --int2 also int2 so, whose
attention over pre-RoPE keys is then the cache's torch `attend`, what int2 ran before the one-call step read
pre-RoPE keys), and the dense cache with kernels="torch" (module by module). Ratios are per round against the dense fused step: median and
band (min-max).

    python benchmarks/bench_kv_generate.py [--rounds 5] [--steps 32] [--int2] [--per-layer]

32 steps from position 1,984 stay inside one key group (no flush); --steps 64 includes the flush at 2,047.
"""
import argparse
import json
import statistics as st

import torch

from llmopt.data import load_text
from llmopt.inference import cpu_linear, generate
from llmopt.models import load_pretrained

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--steps", type=int, default=32)
ap.add_argument("--int2", action="store_true")
ap.add_argument("--per-layer", action="store_true")
ap.add_argument("--out", default="docs/results/inference_kv_int4_vs_fused_dense_generate.json")
args = ap.parse_args()
torch.set_num_threads(1)
m, tok = load_pretrained("smollm2-135m")
m.eval()
ids = tok.encode(load_text(None)[-60000:])[:1984]
prompt = torch.tensor([ids])
configs = {"dense (fused step)": {}, "int4": dict(kv_bits=4)}
if args.int2:
    configs["int2"] = dict(kv_bits=2)
if args.per_layer:
    configs["int4 per-layer path"] = dict(kv_bits=4, per_layer=True)
    if args.int2:
        configs["int2 per-layer path"] = dict(kv_bits=2, per_layer=True)
configs["dense kernels=torch"] = dict(kernels="torch")
names = list(configs)
res = {name: [] for name in names}
fused = cpu_linear._quantized_attention
for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
        kw = dict(configs[name])
        if kw.pop("per_layer", False):
            cpu_linear._quantized_attention = lambda *a: None  # every step through the cache's update / attend
        try:
            out = generate(m, prompt, args.steps + 1, **kw)
        finally:
            cpu_linear._quantized_attention = fused
        res[name].append(out.decode_steps / out.decode_seconds)
        print(name, "decode tok/s %.2f" % res[name][-1], flush=True)
base = res["dense (fused step)"]
ratios = {}
for name, v in res.items():
    rs = [a / b for a, b in zip(v, base)]
    ratios[name] = {"median": st.median(rs), "min": min(rs), "max": max(rs)}
    print(name, "vs dense fused: median %.3f (%.2f-%.2f)" % (st.median(rs), min(rs), max(rs)))
if "int4" in res:
    rs = [a / b for a, b in zip(res["int4"], res["dense kernels=torch"])]
    ratios["int4 vs dense kernels=torch"] = {"median": st.median(rs), "min": min(rs), "max": max(rs)}
    print("int4 vs dense kernels=torch: median %.3f (%.2f-%.2f)" % (st.median(rs), min(rs), max(rs)))
cmd = "python benchmarks/bench_kv_generate.py " + " ".join(
    f"--rounds {args.rounds} --steps {args.steps}".split() + (["--int2"] if args.int2 else [])
    + (["--per-layer"] if args.per_layer else []))
json.dump({"command": f"{cmd} (generate at 1,984-token context, {args.steps} decode steps, {args.rounds} rotated "
                      "rounds, one thread)", "tok_s": res, "ratio_vs_dense_fused": ratios},
          open(args.out, "w"), indent=1)
