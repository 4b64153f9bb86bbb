"""Perplexity of SmolLM2-135M on a Shakespeare play: `llmopt eval` against transformers computed directly.

    python benchmarks/eval_vs_transformers.py --play hamlet --max-tokens 8192 --window 1024 --stride 512

The transformers side follows the Hugging Face guide "Perplexity of fixed-length models": windows of
`window` tokens advancing by `stride`, labels of the already-scored context set to -100, NLL summed over
scored tokens. Both load the weights from the same GGUF file; the token ids must be identical too.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def transformers_perplexity(ids, window: int, stride: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt.models.pretrained import smollm2_gguf_path

    gguf = Path(smollm2_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    ids = torch.tensor(ids).unsqueeze(0)
    n = ids.size(1)
    nll_sum, scored, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            target_len = end - prev_end  # tokens not scored by the previous window
            inp = ids[:, begin:end]
            labels = inp.clone()
            labels[:, :-target_len] = -100
            logits = model(inp).logits[:, :-1].float()
            lab = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), lab.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            nll_sum += float(loss)
            scored += int((lab != -100).sum())
            prev_end = end
            if end == n:
                break
    return {"ppl": math.exp(nll_sum / scored), "nll": nll_sum / scored, "tokens": scored}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--play", default="hamlet")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from llmopt.data import write_play
    from llmopt.models import load_pretrained

    path = write_play(args.play, Path(tempfile.mkdtemp()) / f"{args.play}.txt")
    _, tokenizer = load_pretrained("smollm2-135m")
    ids = tokenizer.encode(path.read_text())[: args.max_tokens]

    t = time.perf_counter()
    cmd = [sys.executable, "-m", "llmopt.cli", "eval", "smollm2-135m", "--data", str(path), "--window",
           str(args.window), "--stride", str(args.stride), "--max-tokens", str(args.max_tokens), "--json"]
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = transformers_perplexity(ids, args.window, args.stride)
    t_theirs = time.perf_counter() - t
    rel = abs(ours["ppl"] - theirs["ppl"]) / theirs["ppl"]
    print(json.dumps({"command": " ".join(["llmopt"] + cmd[3:]), "play": args.play, "tokens": len(ids),
                      "window": args.window, "stride": args.stride, "llmopt_ppl": ours["ppl"],
                      "llmopt_scored_tokens": ours["tokens"], "transformers_ppl": theirs["ppl"],
                      "transformers_scored_tokens": theirs["tokens"], "relative_difference": rel,
                      "llmopt_seconds": round(t_ours, 1), "transformers_seconds": round(t_theirs, 1)}, indent=1))


if __name__ == "__main__":
    main()
