"""What `mixed_precision:precision=auto` picks on this host for the demo model, and an independent check.

    .venv/bin/python benchmarks/bench_mixed_precision_auto.py     # writes docs/results/mixed_precision_auto_demo.json

1. Apply `MixedPrecisionConfig(precision="auto")` to a fresh `demo` model: its probe (4x128 tokens, 3 timed
   forward+backward passes per precision, fp32 and bf16 autocast interleaved) decides; the note says why.
2. Independently, `measure_precisions` on a second demo model at the bench's shape (8x128, 8 interleaved
   passes each): if bf16 autocast is slower than fp32 there, keeping fp32 was right.
"""
import json, torch
torch.set_num_threads(1)
import llmopt; llmopt.load_techniques()
from llmopt.core import apply_
from llmopt.models import build_model, ModelConfig
from llmopt.techniques.mixed_precision import MixedPrecisionConfig, measure_precisions
torch.manual_seed(0)
m = build_model(ModelConfig.from_name("demo"))
report = apply_(m, MixedPrecisionConfig(precision="auto"))
print(report.notes, m.llmopt_precision, flush=True)
torch.manual_seed(0)
m2 = build_model(ModelConfig.from_name("demo"))
check = measure_precisions(m2, steps=8, batch_size=8, seq_len=128)
out = {"auto_note": report.notes, "auto_chose": m.llmopt_precision,
       "independent_check_8x128_8_interleaved_steps": check,
       "bf16_over_fp32_time": check["bf16"]["seconds"] / check["fp32"]["seconds"]}
print(json.dumps(out, indent=1))
json.dump(out, open("docs/results/mixed_precision_auto_demo.json", "w"), indent=1)
