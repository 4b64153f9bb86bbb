"""GaLoreAdamW state bytes / AdamW state bytes at the peer_anchors W2 shape (41.9M params).

Ranks 32, 64 and 128, fp32 and 8-bit moments; one step on N(0, 1e-3) gradients, `state_bytes` (exact).

    python benchmarks/galore_state_ratio.py   # writes docs/results/galore_state_ratio_w2_42m.json
"""
import torch, json
torch.set_num_threads(1)
from llmopt.models import ModelConfig, build_model
from llmopt.optim import GaLoreAdamW, galore_param_groups, state_bytes
cfg = ModelConfig.from_name("demo", dim=512, n_layer=8, n_head=8, n_kv_head=8, intermediate_size=2048,
                            vocab_size=8192, tie_embeddings=False)
torch.manual_seed(0); m = build_model(cfg)
for p in m.parameters(): p.grad = torch.randn_like(p) * 1e-3
ref = torch.optim.AdamW(m.parameters(), foreach=True); ref.step(); base = state_bytes(ref); del ref
out = {"params": sum(p.numel() for p in m.parameters()), "adamw_state_bytes": base}
for r in (32, 64, 128):
    for bits in (32, 8):
        o = GaLoreAdamW(galore_param_groups(m, rank=r, optim_bits=bits), lr=1e-3); o.step()
        out[f"r{r}_bits{bits}"] = {"state_bytes": state_bytes(o), "ratio": state_bytes(o) / base}
        print(r, bits, out[f"r{r}_bits{bits}"], flush=True); del o
json.dump(out, open("docs/results/galore_state_ratio_w2_42m.json", "w"), indent=2)
