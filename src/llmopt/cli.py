"""The `llmopt` command.

    llmopt train RECIPE [--data PATH] [--out DIR] [--set key=value ...] [--technique NAME:opt=val ...] [--resume]
        [--nproc N] [--mesh dp=2,tp=2,pp=2] [--engine torch|deepspeed]
    llmopt eval MODEL --data PATH [--window N] [--stride N] [--json]
    llmopt generate MODEL --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
        [--kv-cache int8|int4|int2] [--draft MODEL [--draft-dtype bf16] | --prompt-lookup] [--batch-file FILE]
        [--compile] [--stream]
    llmopt demo [--quick] [--out DIR]

Bad input (a missing file, an unknown key, a corrupt checkpoint) prints one line starting with
`error:` and exits with status 2; set LLMOPT_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def _console():
    from rich.console import Console

    return Console()


# ---- train ------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from llmopt.recipes import get_recipe
    from llmopt.train import apply_overrides, fit

    run = get_recipe(args.recipe)
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.mesh:
        overrides.append(f"dist.mesh={args.mesh}")
    if args.engine:
        overrides.append(f"dist.engine={args.engine}")
    run = apply_overrides(run, overrides)
    run.techniques = list(run.techniques) + list(args.technique or [])
    if args.data and not Path(args.data).exists():
        raise UsageError(f"--data {args.data}: no such file or directory")
    out = Path(args.out or f"runs/{run.recipe}")
    if run.recipe == "distill_draft":  # a student trained on the teacher's top-k targets, not plain next-token
        from llmopt.recipes.distill import distill

        if args.nproc or run.dist.mesh or args.resume:
            raise UsageError("distill_draft runs in one process without --resume; drop --nproc/--mesh/--resume")
        distill(run, out)
        _console().print(f"done: draft in {out} (see {out / 'distill.json'})")
        return 0
    if args.nproc:  # start the ranks here (checked first); each runs llmopt.train.distributed.trainer
        from llmopt.train.distributed.launch import launch

        return launch(run, out, nproc=args.nproc, resume=args.resume)
    if run.dist.engine == "deepspeed" and not run.dist.mesh:
        raise UsageError("--engine deepspeed needs several processes: add --nproc N (or run under torchrun with --mesh)")
    console = _console()
    if run.dist.mesh and int(os.environ.get("RANK", "0")) != 0:
        console.quiet = True  # under torchrun: rank 0 speaks for the world
    console.print(f"[bold]llmopt train[/] {run.recipe} -> {out}  ({run.model.name}, {run.train.steps} steps, "
                  f"batch {run.train.batch_size}x{run.train.seq_len}, {run.train.precision})")
    if run.dist.mesh:  # under torchrun (or a cluster launcher): this process is one rank
        from llmopt.train.distributed.trainer import fit_distributed

        result = fit_distributed(run, out, resume=args.resume)
    else:
        result = fit(run, out, resume=args.resume)
    val = f"{result.final_val_loss:.4f} (ppl {math.exp(result.final_val_loss):.2f})" if result.final_val_loss else "-"
    console.print(f"done: {result.steps} steps, train loss {result.final_train_loss:.4f}, val loss {val}, "
                  f"{result.tokens_seen / result.seconds:.0f} tok/s; weights in {out / 'model.safetensors'}")
    return 0


# ---- eval -------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    import torch

    from llmopt.data import load_text
    from llmopt.measure import perplexity
    from llmopt.models import load_pretrained

    text = load_text(args.data)
    model, tokenizer = load_pretrained(args.model)
    model.eval()
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    window = args.window or min(model.config.max_seq_len, 1024)
    stride = args.stride or window // 2
    if stride > window or stride <= 0:
        raise UsageError(f"--stride {stride} must be in 1..--window {window}")
    result = perplexity(model, ids, window=window, stride=stride)
    result = {"model": args.model, "data": args.data, **result}
    if args.json:
        print(json.dumps(result))
    else:
        _console().print(f"perplexity {result['ppl']:.3f} (nll {result['nll']:.4f}) over {result['tokens']} tokens, "
                         f"window {window}, stride {stride}")
    return 0


# ---- generate ---------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    import torch

    from llmopt.inference import generate
    from llmopt.models import load_pretrained
    from llmopt.models.feature_draft import FeatureDraft, is_feature_draft_dir

    if args.draft and args.prompt_lookup:
        raise UsageError("pass either --draft or --prompt-lookup, not both")
    if args.speculate_k < 1:
        raise UsageError(f"--speculate-k must be at least 1, got {args.speculate_k}")
    if args.batch_file:
        texts = [line.rstrip("\n") for line in Path(args.batch_file).read_text().splitlines() if line.strip()]
        if not texts:
            raise UsageError(f"--batch-file {args.batch_file} has no prompts (one per line)")
    elif args.prompt is not None:
        texts = [args.prompt]
    else:
        raise UsageError("give --prompt TEXT or --batch-file FILE")
    model, tokenizer = load_pretrained(args.model)
    model.eval()
    prompts = [tokenizer.encode(text) for text in texts]
    if not all(prompts):
        raise UsageError("a prompt is empty; give some text to continue")
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None and not args.no_stop else []
    for text in args.stop or []:
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise UsageError(f"unknown stop token {text!r}: it encodes to {len(ids)} tokens, not one")
        stop.append(ids[0])
    draft = None
    if args.draft and is_feature_draft_dir(args.draft):  # an EAGLE head trained for this target
        try:
            # bf16 by default: half the bytes a drafted token reads (the head's step is bound by them), same output
            draft = FeatureDraft.load(args.draft, model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[
                args.draft_dtype or "bf16"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif args.draft:
        if args.draft_dtype:
            raise UsageError("--draft-dtype applies to a feature-draft (EAGLE) head directory; a draft model keeps "
                             "its own dtype")
        draft, draft_tokenizer = load_pretrained(args.draft)
        draft.eval()
        if draft.config.vocab_size != model.config.vocab_size or draft_tokenizer.encode(texts[0]) != prompts[0]:
            raise UsageError(f"draft {args.draft} has a different vocabulary or tokenizer than {args.model}; "
                             "the draft must share the target's tokenizer")
    kv_bits = {"int8": 8, "int4": 4, "int2": 2}[args.kv_cache] if args.kv_cache else None
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > model.config.max_seq_len:
        raise UsageError(f"prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                         f"context of {model.config.max_seq_len} tokens; shorten the prompt or generate fewer")
    stream = None
    if args.stream and len(prompts) == 1:
        print(texts[0], end="", flush=True)
        stream = lambda tokens: print(tokenizer.decode(tokens.tolist()), end="", flush=True)  # noqa: E731
    result = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, stop_ids=stop or None, compile=args.compile, draft=draft,
                      prompt_lookup=args.prompt_lookup, speculate_k=args.speculate_k, kv_bits=kv_bits,
                      stream=stream)
    for row, text in enumerate(texts):
        count = result.num_new_tokens[row]
        new = result.new_tokens[row, :count].tolist()
        if new and new[-1] in stop:
            new = new[:-1]
        if stream is not None:
            print()
        else:
            print(text + tokenizer.decode(new))
    if args.stats:
        stats = {"prefill_tokens_per_s": result.prefill_tokens_per_second,
                 "decode_tokens_per_s": result.decode_tokens_per_second}
        if hasattr(result, "acceptance_rate"):
            stats.update(acceptance_rate=result.acceptance_rate, target_forwards=result.target_forwards,
                         accept_counts=result.accept_counts)
        print(json.dumps(stats), file=sys.stderr)
    return 0


# ---- demo -------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    import torch

    from llmopt.inference import generate
    from llmopt.measure import perplexity
    from llmopt.models import load_pretrained
    from llmopt.recipes import get_recipe
    from llmopt.train import apply_overrides, fit
    from llmopt.train.loop import prepare_run

    console = _console()
    run = get_recipe("demo_quick" if args.quick else "demo")
    run = apply_overrides(run, list(args.set or []))
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    done = (out / "model.safetensors").exists() and (out / "config.json").exists()
    if done and not args.retrain:
        console.print(f"[bold]llmopt demo[/]: reusing the trained model in {out} (pass --retrain to train again)")
    else:
        resume = (out / "checkpoints" / "latest").exists() and not done
        console.print(f"[bold]llmopt demo[/]: training the {run.model.name} model ({run.recipe}) on the bundled "
                      f"Shakespeare corpus -> {out}")
        if done and args.retrain:
            import shutil

            shutil.rmtree(out)
        fit(run, out, resume=resume)

    model, tokenizer = load_pretrained(out)
    model.eval()
    _, _, _, val_ids, _ = prepare_run(run, out)
    window = run.train.seq_len
    ppl = perplexity(model, val_ids[:20_000], window=window, stride=window // 2)
    prompt = "ROMEO:\n"
    result = generate(model, [tokenizer.encode(prompt)], 120, temperature=0.8, top_k=50, seed=0)
    sample = prompt + tokenizer.decode(result.tokens[0, len(tokenizer.encode(prompt)):].tolist())
    (out / "sample.txt").write_text(sample + "\n")
    summary = {"run": str(out), "held_out_perplexity": ppl, "parameters": model.num_parameters(),
               "decode_tokens_per_s": result.decode_tokens_per_second}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"held-out perplexity {ppl['ppl']:.2f} over {ppl['tokens']} tokens (window {window}, "
                  f"stride {window // 2}); {model.num_parameters() / 1e6:.2f}M parameters")
    console.rule("sample (temperature 0.8, top-k 50)")
    console.print(sample, markup=False, highlight=False)
    console.rule()
    if not args.no_bench:
        from llmopt.measure.bench import bench_table

        # the same model and data, baseline recipe vs the optimized one, interleaved in fresh processes
        preset = "tiny" if args.quick else "demo"
        console.rule(f"llmopt bench: baseline vs {DEMO_OPTIMIZED} on the {preset} model")
        table = bench_table([DEMO_OPTIMIZED], model=preset, steps=4 if args.quick else 6, repeats=3,
                            out=out / "bench", force=True, peers="none")
        (out / "bench.md").write_text(table + "\n")
        console.print(table, markup=False, highlight=False)
    console.print(f"everything is in {out}/: config.json, tokenizer.json, model.safetensors, metrics.jsonl, "
                  "checkpoints/, sample.txt, summary.json, bench/ (results.json, report.md, plots)")
    del torch
    return 0


DEMO_OPTIMIZED = "fused_ops+adamw8bit"
"""The demo's optimized recipe: techniques that cut training memory on a CPU (see the README table)."""


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmopt", description="LLM optimization techniques, applied in one line and "
                                "measured against a baseline in the same run.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe (tiny, demo, ...) on the bundled corpus or --data")
    t.add_argument("recipe", help="recipe name: tiny, demo, demo_quick, draft")
    t.add_argument("--data", help="a text file or a directory of .txt files (default: bundled Shakespeare)")
    t.add_argument("--out", help="run directory (default runs/RECIPE)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.steps=200")
    t.add_argument("--technique", action="append", metavar="NAME:OPT=VAL", help="apply a technique, e.g. lora:r=8")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--nproc", type=int, help="start N processes on this machine with torchrun (gloo on CPU)")
    t.add_argument("--mesh", help="named device mesh, e.g. dp=4, dp=2,tp=2, pp=2,dp=2,tp=2, dp_replicate=2,dp_shard=2 "
                   "(sets dist.mesh; default with --nproc N: dp=N)")
    t.add_argument("--engine", choices=["torch", "deepspeed"], help="torch (DDP/FSDP2/TP/PP) or DeepSpeed ZeRO")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="perplexity of a model on a text file")
    e.add_argument("model", help="run directory, smollm2-135m, a GGUF file or a Hugging Face directory")
    e.add_argument("--data", required=True, help="text file or directory of .txt files")
    e.add_argument("--window", type=int, help="tokens per window (default min(max_seq_len, 1024))")
    e.add_argument("--stride", type=int, help="tokens the window advances (default window/2)")
    e.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("model", help="run directory, smollm2-135m, a GGUF file or a Hugging Face directory")
    g.add_argument("--prompt", help="text to continue")
    g.add_argument("--batch-file", help="a text file of prompts, one per line, generated as one left-padded batch")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument("--stats", action="store_true", help="print prefill/decode tokens/s to stderr as JSON")
    g.add_argument("--stop", action="append", metavar="TOKEN", help="also stop at this token (text of one token)")
    g.add_argument("--kv-cache", choices=["int8", "int4", "int2"], help="quantized KV cache (KIVI layout)")
    g.add_argument("--draft", metavar="MODEL", help="speculative decoding with this draft model (same tokenizer) or "
                   "feature-draft (EAGLE) head directory")
    g.add_argument("--draft-dtype", choices=("fp32", "bf16"), help="a feature-draft head's weights (default bf16: "
                   "about half the drafting time on CPU; the output stays exact either way)")
    g.add_argument("--prompt-lookup", action="store_true", help="prompt lookup decoding (n-gram drafts)")
    g.add_argument("--speculate-k", type=int, default=8, help="most tokens proposed per round (adapted)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (static cache)")
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt only)")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="train the demo model on the bundled corpus, report perplexity and a sample")
    d.add_argument("--quick", action="store_true", help="a smaller run of about a minute (what CI runs)")
    d.add_argument("--out", help="run directory (default runs/demo, or runs/demo-quick with --quick)")
    d.add_argument("--retrain", action="store_true", help="train again even if the run directory holds a model")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    d.add_argument("--no-bench", action="store_true", help="skip the closing baseline-vs-optimized bench table")
    d.set_defaults(fn=cmd_demo)

    pl = sub.add_parser("plan", help="memory and communication per rank of every mesh for N processes")
    pl.add_argument("model", help="model preset: tiny, demo, smollm2-135m, ...")
    pl.add_argument("--nproc", type=int, required=True, help="number of processes (GPUs) to plan for")
    pl.add_argument("--batch-size", type=int, default=32, help="global sequences per optimizer step")
    pl.add_argument("--seq-len", type=int, default=2048)
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="model.* or dist.* override")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(fn=cmd_plan)

    tq = sub.add_parser("techniques", help="list every registered technique, one line each")
    tq.add_argument("--json", action="store_true", help="print a JSON list")
    tq.set_defaults(fn=cmd_techniques)

    try:  # `llmopt bench` and `llmopt report` live with the measurement harness
        from llmopt.measure.bench_cli import add_bench_parsers
    except ImportError:
        add_bench_parsers = None
    if add_bench_parsers is not None:
        add_bench_parsers(sub)
    return p


def cmd_plan(args) -> int:
    from llmopt.models import ModelConfig
    from llmopt.train.config import RunConfig, apply_overrides
    from llmopt.train.distributed.plan import plan, render_plan

    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc} must be at least 1")
    run = RunConfig(model=ModelConfig.from_name(args.model))
    run = apply_overrides(run, [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                                *(args.set or [])])
    rows = plan(run.model, args.nproc, run.train, run.dist)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_plan(rows, title=f"{args.model} on {args.nproc} ranks, batch {args.batch_size} x "
                                      f"{args.seq_len}, fp32 AdamW"))
    return 0


def cmd_techniques(args) -> int:
    import llmopt.techniques
    from llmopt.core import registered, technique_options

    llmopt.load_techniques()
    rows = []
    for name, entry in registered().items():
        try:
            options = ", ".join(technique_options(name))
        except Exception:  # a technique without options
            options = ""
        rows.append({"name": name, "kind": entry.kind, "stage": entry.stage.name.lower() if entry.stage else "",
                     "workload": entry.workload, "description": entry.description, "options": options})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"{len(rows)} registered techniques", show_lines=False)
    for col in ("name", "kind", "stage", "workload", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["stage"], r["workload"], r["description"])
    _console().print(table)
    return 0


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from llmopt.train import CheckpointError, ConfigError

    errors: list[type[BaseException]] = [UsageError, ConfigError, CheckpointError, FileNotFoundError]
    try:
        from llmopt.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    errors.append(ValueError)  # our validation errors are ValueErrors with one-line messages
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("LLMOPT_DEBUG"):
        return args.fn(args)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _bad_input_errors() as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
