"""int4 KV cache vs the dense cache through `generate` at a 1,984-token context: decode tok/s of each, 32 steps,
3 rotated rounds, and the dense cache with kernels="torch" (module by module). The quantized cache takes the
stack step's halves around its own attend; the dense one the fused C step.

    python benchmarks/bench_kv_generate.py
"""
import torch, time, statistics as st, json
torch.set_num_threads(1)
from llmopt.models import load_pretrained
from llmopt.inference import generate
from llmopt.data import load_text
m, tok = load_pretrained("smollm2-135m"); m.eval()
ids = tok.encode(load_text(None)[-60000:])[:1984]
prompt = torch.tensor([ids])
res = {"dense (fused step)": [], "int4": [], "dense kernels=torch": []}
for r in range(3):
    for name in list(res)[r % 3:] + list(res)[:r % 3]:
        kw = dict(kv_bits=4) if name == "int4" else (dict(kernels="torch") if "torch" in name else {})
        out = generate(m, prompt, 33, **kw)
        res[name].append(out.decode_steps / out.decode_seconds)
        print(name, "decode tok/s %.2f" % res[name][-1], flush=True)
base = res["dense (fused step)"]
for name, v in res.items():
    rs = [a / b for a, b in zip(v, base)]
    print(name, "vs dense fused: median %.3f (%.2f-%.2f)" % (st.median(rs), min(rs), max(rs)))
json.dump({"command": "python benchmarks/bench_kv_generate.py (generate at 1,984-token context, 32 decode steps, 3 rotated rounds)", "tok_s": res}, open("docs/results/inference_kv_int4_vs_fused_dense_generate.json", "w"), indent=1)
