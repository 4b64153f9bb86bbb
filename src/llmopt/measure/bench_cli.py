"""`llmopt bench` and `llmopt report`, added to the `llmopt` parser by `add_bench_parsers`.

    llmopt bench NAME... [--model PRESET|PATH] [--workload train|generate|eval] [--repeats N] [--steps N]
                 [--warmup N] [--out DIR] [--force] [--set key=value ...] [--data PATH] [--peers all|none|a,b]
    llmopt report DIR              # re-render report.md and the PNGs from DIR/results.json
    llmopt report DIR1 DIR2        # compare the ratios of two benches

Bad input raises a ValueError (`BenchError`), which `llmopt.cli.main` prints as one `error:` line with
exit status 2. A candidate that crashes is reported and gives exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_bench_parsers(sub) -> None:
    """Add the `bench` and `report` subcommands to the `llmopt` subparsers."""
    b = sub.add_parser("bench", help="same-run A/B of techniques against a baseline (and peers), interleaved",
                       description="Run the baseline and each NAME on the same model, data and seed, one fresh "
                                   "process per repeat, interleaved; write results.json, report.md and PNGs.")
    b.add_argument("names", nargs="+", metavar="NAME",
                   help="technique with options (lora:r=8), optimizer (sgd), config override (train.grad_clip=none), "
                        "or several joined by + (compile+curriculum)")
    b.add_argument("--model", default="demo", help="preset trained from scratch (tiny, demo, draft) or a pretrained "
                                                    "source to fine-tune (smollm2-135m, a run directory); default demo")
    b.add_argument("--workload", help="train, generate or eval (default: what each technique declares)")
    b.add_argument("--repeats", type=int, default=5, help="interleaved rounds, one fresh process per run (default 5)")
    b.add_argument("--steps", type=int, help="timed steps per run (default 20 on presets, 10 on pretrained; "
                                             "generate: timed calls, at most 5)")
    b.add_argument("--warmup", type=int, help="untimed steps before the timed ones (default 3 on presets)")
    b.add_argument("--out", help="output directory (default runs/bench-NAMES)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists (only once the new run is done)")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the config of every run")
    b.add_argument("--data", help="a text file or directory of .txt files (default: the bundled corpus)")
    b.add_argument("--peers", default="all", help="peer libraries as extra columns: all (installed ones), none, "
                                                   "or names separated by commas")
    b.add_argument("--nproc", type=int, help="distributed bench: NAMEs are modes (ddp fsdp hsdp tp pp pp_gpipe dp_tp "
                                             "pp_dp pp_dp_tp) or meshes (dp=2,tp=2) on N processes, against one process")
    b.set_defaults(fn=cmd_bench)

    r = sub.add_parser("report", help="re-render a bench report, or compare two benches")
    r.add_argument("dirs", nargs="+", metavar="DIR", help="one bench directory, or two to compare")
    r.add_argument("--out", help="with two directories: also write the comparison to this file")
    r.set_defaults(fn=cmd_report)


def _console():
    from rich.console import Console

    return Console()


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from llmopt.measure.bench import bench

    console = _console()
    if args.nproc:
        from llmopt.measure.bench_dist import bench_distributed

        out = args.out or f"runs/bench-dist-{args.nproc}"
        console.print(f"[bold]llmopt bench[/] {' '.join(args.names)} on {args.model}, {args.nproc} processes")
        bench_distributed(args.names, nproc=args.nproc, model=args.model, steps=args.steps or 10, out=out,
                          overrides=args.set, force=args.force)
        console.print((Path(out) / "report.md").read_text())
        return 0
    console.print(f"[bold]llmopt bench[/] {' '.join(args.names)} on {args.model}")
    result = bench(args.names, model=args.model, workload=args.workload, repeats=args.repeats, steps=args.steps,
                   warmup=args.warmup, out=args.out, force=args.force, overrides=list(args.set or []),
                   data=args.data, peers=args.peers, progress=lambda line: console.print(escape(line), highlight=False,
                                                                                         soft_wrap=True))
    from llmopt.measure.bench_report import render_headline

    console.print(render_headline(result.results), markup=False, highlight=False, soft_wrap=True)
    files = ", ".join(sorted(p.name for p in result.out.iterdir()))
    console.print(f"wrote {result.out}/: {files}", highlight=False, soft_wrap=True)
    for failure in result.failures:
        console.print(f"[red]failed[/] {escape(failure)}")
    return 1 if result.failures else 0


def cmd_report(args: argparse.Namespace) -> int:
    from llmopt.measure.bench_report import rerender
    from llmopt.measure.report import compare_runs, load_results

    if len(args.dirs) > 2:
        raise ValueError(f"llmopt report takes one directory (re-render) or two (compare), got {len(args.dirs)}")
    for d in args.dirs:
        if not (Path(d) / "results.json").is_file():
            raise ValueError(f"{d}: no results.json there; point at a `llmopt bench --out` directory")
    if len(args.dirs) == 1:
        markdown = rerender(args.dirs[0])
        print(markdown)
        return 0
    a, b = args.dirs
    markdown = compare_runs(load_results(a), load_results(b), labels=(a, b))
    if args.out:
        Path(args.out).write_text(markdown)
    print(markdown)
    return 0
