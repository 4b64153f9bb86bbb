"""Accounted saved-activation bytes of one demo train step (8x128): baseline, full, selective, budget = 50% of baseline.

    .venv/bin/python benchmarks/bench_checkpointing_bytes.py    # writes docs/results/checkpointing_accounted_demo.json

Exact (saved-tensor hooks plus tensors a forward leaves alive, `llmopt.measure.memory`), so repeatable on a loaded machine.
"""
import torch, copy, json
torch.set_num_threads(1)
import llmopt; llmopt.load_techniques()
from llmopt.core import apply_, parse_technique_spec
from llmopt.models import build_model, ModelConfig
from llmopt.measure.memory import account_training_step
torch.manual_seed(0)
base = build_model(ModelConfig.from_name("demo"))
x = torch.randint(0, 4096, (8, 129), generator=torch.Generator().manual_seed(0))
out = {}
for spec in [None, "checkpointing:policy=full", "checkpointing:policy=selective", "checkpointing:policy=budget,budget_bytes=73009187"]:
    m = copy.deepcopy(base)
    notes = apply_(m, parse_technique_spec(spec)).notes if spec else []
    acc = account_training_step(m, torch.optim.AdamW(m.parameters()), lambda: (lambda s, n: s / n)(*m.loss(x[:, :-1], x[:, 1:])))
    out[spec or "baseline"] = {"activations_bytes": acc.activations, "notes": notes}
    print(spec, acc.activations / 2**20, notes, flush=True)
json.dump(out, open("docs/results/checkpointing_accounted_demo.json", "w"), indent=1)
