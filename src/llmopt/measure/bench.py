"""`llmopt bench`: the baseline and every candidate on the same model, data and seed, interleaved.

    result = bench(["sgd", "optim.lr=3e-3"], model="tiny", repeats=2, steps=3, out="runs/bench-x")
    print(result.markdown)          # also in runs/bench-x/report.md, with results.json and PNGs

What a NAME may be (`resolve_candidate`):
- a registered technique with options, `lora:r=8` (core's `parse_technique_spec` checks the options),
  resolved by the entry's kind: `transform` and `hook` go to the run's technique list; `optimizer` sets
  `optim.name=<name>` and maps its options onto `optim.*` fields; `setting` calls the entry's factory
  (`entry.build(config=...)` or the spec's `build()`), which returns the config overrides it stands
  for, as `["train.precision=bf16", ...]` or `{"train.precision": "bf16"}` (the protocol for settings);
- a loop built-in optimizer, `adamw` or `sgd` (options mapped onto `optim.*`);
- a config override, `train.grad_clip=none` (a dotted key, `=`, a value), exactly as `--set` takes it;
- several of these joined by `+`, `compile+curriculum`: one candidate with all of them.

Each run of each round is a fresh subprocess (`measure.memory.run_in_subprocess`) so measured peak
memory is the run's own. Rounds rotate the order (round r starts at the r-th run), and every ratio
pairs a run with the baseline of the same round (`measure.report.summarize`). Candidates are grouped by
workload (the registry entry's `.workload`, or `--workload`); each workload is one section of
results.json with its own baseline and peers (`measure.bench_peers`).

Bad input is a `BenchError` (a ValueError: one line, exit status 2 at the CLI), raised before anything
is run or written. Output goes to a temporary directory beside `out` that replaces `out` only at the
end, so a crash never leaves half a report and `force=True` never loses the old one early.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmopt.core.registry import WORKLOADS
from llmopt.measure.timing import rotated

BUILTIN_OPTIMIZERS = ("adamw", "sgd")
"""Optimizers the training loop builds itself (registered optimizers are looked up by name too)."""
SUPPORTED_WORKLOADS = {"transform": WORKLOADS, "hook": ("train",), "optimizer": ("train",),
                       "setting": WORKLOADS, "override": WORKLOADS}
"""Workloads a candidate of each kind can run; a registry entry may narrow it with `supported_workloads`."""
FUNCTIONS = {"train": "llmopt.measure.workloads:run_train", "generate": "llmopt.measure.workloads:run_generate",
             "eval": "llmopt.measure.workloads:run_eval"}
OPTION_ALIASES = {"momentum": "beta1"}
"""Optimizer options whose `optim.*` field has another name (the loop passes beta1 as SGD's momentum)."""
PRESET_RECIPES = ("tiny", "demo", "draft", "demo_quick")
"""`--model` values trained from scratch by the workload (recipes in `llmopt.recipes`)."""
_OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+=")


class BenchError(ValueError):
    """Bad bench input; one line with the fix (exit status 2 at the CLI)."""


@dataclass(frozen=True)
class Candidate:
    """One column of a bench: what it changes relative to the baseline, and where it runs."""

    name: str
    """As typed (`lora:r=8`, `compile+curriculum`, `train.grad_clip=none`); the report's column name."""
    workload: str
    """"train", "generate" or "eval"."""
    techniques: tuple[str, ...] = ()
    """Transform and hook specs, applied in the child."""
    overrides: tuple[str, ...] = ()
    """Config overrides (`optim.name=sgd`), applied after the bench's own and `--set`."""
    kind: str = "candidate"
    """"baseline", "candidate" or "peer"."""
    fn: str = ""
    """`module:function` the subprocess calls (the workload's, or a peer's)."""
    skipped: str | None = None
    """Why it does not run (a peer's missing package)."""


# ---- resolving names ---------------------------------------------------------------------------
def _split_plus(name: str) -> list[str]:
    # `+` joins candidates; `1e+3` inside an option value is a number, not a join
    return [p for p in re.split(r"\+(?=[A-Za-z_])", name) if p.strip()]


def _registry():
    import llmopt.techniques
    from llmopt.core import registered

    llmopt.load_techniques()
    return registered()


def _known() -> str:
    names = list(_registry())
    extra = [n for n in BUILTIN_OPTIMIZERS if n not in names]
    return ", ".join(names + extra) + " (or a config override such as train.grad_clip=none)"


def _optimizer_overrides(name: str, options: dict[str, Any], spec: str) -> list[str]:
    from llmopt.train.config import OptimConfig

    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    out = [f"optim.name={name}"]
    for key, value in options.items():
        key = OPTION_ALIASES.get(key, key)
        if key not in fields:
            raise BenchError(f"{spec!r}: option {key!r} has no optim.* setting to carry it; "
                             f"bench can set: {', '.join(sorted(fields - {'name'}))}")
        out.append(f"optim.{key}={'none' if value is None else value}")
    return out


def _parse_builtin_optimizer(spec: str) -> list[str]:
    from llmopt.train.config import OptimConfig

    name, _, rest = spec.partition(":")
    options = {}
    types = {f.name: f.type for f in dataclasses.fields(OptimConfig)}
    for item in [i for i in rest.split(",") if i.strip()]:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in types or key == "name":
            raise BenchError(f"{spec!r}: {name} has no option {key!r}; its options are: "
                             f"{', '.join(k for k in types if k != 'name')}")
        options[key] = value.strip()
    return _optimizer_overrides(name.strip(), options, spec)


def _setting_overrides(entry, config, spec: str) -> list[str]:
    built = config.build() if hasattr(config, "options") else entry.build(config=config)
    if isinstance(built, dict):
        built = [f"{k}={'none' if v is None else v}" for k, v in built.items()]
    if not isinstance(built, (list, tuple)) or not all(isinstance(o, str) and "=" in o for o in built):
        raise BenchError(f"{spec!r}: a setting's factory must return config overrides, a list of 'key=value' "
                         f"strings or a dict, got {type(built).__name__}")
    return list(built)


def resolve_candidate(name: str, workload: str | None = None) -> Candidate:
    """The Candidate a NAME stands for (see the module docstring); BenchError on bad input."""
    from llmopt.core import parse_technique_spec

    if workload is not None and workload not in WORKLOADS:
        raise BenchError(f"unknown workload {workload!r}; choose one of: {', '.join(WORKLOADS)}")
    parts = _split_plus(name)
    if not parts:
        raise BenchError(f"empty candidate name {name!r}; give a technique, e.g. `llmopt bench sgd`")
    techniques, overrides, declared, supported = [], [], [], set(WORKLOADS)
    for spec in parts:
        spec = spec.strip()
        if _OVERRIDE.match(spec):
            overrides.append(spec)
            continue
        base = spec.partition(":")[0].strip()
        entries = _registry()
        if base not in entries:
            if base in BUILTIN_OPTIMIZERS:
                overrides += _parse_builtin_optimizer(spec)
                supported &= set(SUPPORTED_WORKLOADS["optimizer"])
                declared.append(("train", base))
                continue
            raise BenchError(f"unknown technique {base!r}; registered: {_known()}")
        entry = entries[base]
        try:
            config = parse_technique_spec(spec)
        except ValueError as e:
            raise BenchError(str(e).replace("--technique", "bench", 1)) from None
        if entry.kind in ("transform", "hook"):
            techniques.append(spec)
        elif entry.kind == "optimizer":
            options = dict(config.options) if hasattr(config, "options") else dataclasses.asdict(config)
            overrides += _optimizer_overrides(base, options, spec)
        elif entry.kind == "setting":
            overrides += _setting_overrides(entry, config, spec)
        else:
            raise BenchError(f"{base!r} is a {entry.kind} technique, which `llmopt bench` cannot run yet; "
                             "bench transforms, hooks, optimizers, settings or config overrides")
        supported &= set(getattr(entry, "supported_workloads", None) or SUPPORTED_WORKLOADS[entry.kind])
        declared.append((entry.workload, base))
    if workload is None:
        kinds = {w for w, _ in declared} or {"train"}
        if len(kinds) > 1:
            what = ", ".join(f"{n} ({w})" for w, n in declared)
            raise BenchError(f"{name!r} joins techniques shown by different workloads: {what}; pass --workload")
        workload = kinds.pop()
    if workload not in supported:
        raise BenchError(f"{name!r} cannot run the {workload} workload (it can run: "
                         f"{', '.join(w for w in WORKLOADS if w in supported) or 'none'}); pick another --workload")
    return Candidate(name=name, workload=workload, techniques=tuple(techniques), overrides=tuple(overrides),
                     fn=FUNCTIONS[workload])


# ---- the run config and the data -----------------------------------------------------------------
@dataclass
class Settings:
    """What every run of one bench shares (recorded as the section's `workload` in results.json)."""

    model: str
    run: Any  # RunConfig
    warmup: int
    steps: int
    eval_every: int = 1
    prompt_len: int = 32
    new_tokens: int = 64
    gen_batch: int = 1
    window: int = 128
    stride: int = 64
    eval_tokens: int = 8192
    extra: dict[str, Any] = field(default_factory=dict)


def base_run(model: str, *, overrides: list[str] = (), data: str | None = None, steps: int | None = None,
             warmup: int | None = None):
    """(RunConfig, warmup, steps) of the baseline: a preset recipe or a pretrained source to fine-tune."""
    from llmopt.models.pretrained import PRETRAINED_NAMES
    from llmopt.recipes import get_recipe
    from llmopt.train import RunConfig, apply_overrides
    from llmopt.train.config import DataConfig, OptimConfig, TrainConfig

    if model in PRESET_RECIPES:
        run = get_recipe(model)
        warmup = 3 if warmup is None else warmup
        steps = 20 if steps is None else steps
        run.train.batch_size = 8
        run.optim.warmup_steps = min(run.optim.warmup_steps, warmup)
    elif model in PRETRAINED_NAMES or Path(model).expanduser().exists():
        warmup = 2 if warmup is None else warmup
        steps = 10 if steps is None else steps
        run = RunConfig(recipe="finetune", init_from=model, data=DataConfig(),
                        train=TrainConfig(batch_size=8, seq_len=128), optim=OptimConfig(lr=1e-4, min_lr=1e-5,
                                                                                        warmup_steps=warmup))
    else:
        raise BenchError(f"--model {model!r}: not a preset ({', '.join(PRESET_RECIPES)}), a pretrained name "
                         f"({', '.join(PRETRAINED_NAMES)}) or an existing run/Hugging Face directory")
    if steps < 1 or warmup < 0:
        raise BenchError(f"--steps must be >= 1 and --warmup >= 0, got steps={steps}, warmup={warmup}")
    run.train.steps = warmup + steps
    run.train.eval_batches = min(run.train.eval_batches, 4)
    run.train.progress = False
    run.train.ckpt_every = 0
    if data is not None:
        if not Path(data).expanduser().exists():
            raise BenchError(f"--data {data}: no such file or directory")
        run.data.path = str(data)
    run = apply_overrides(run, list(overrides))
    return run, warmup, steps


def prepare_data(run, workspace: Path) -> tuple[Path, Any]:
    """Tokenize once for every run: `workspace/data.pt` with train and validation ids; (path, model config)."""
    import torch

    from llmopt.train.loop import prepare_run

    run = dataclasses.replace(run, techniques=[])
    scratch = workspace / "prepare"
    scratch.mkdir(parents=True, exist_ok=True)
    model, tokenizer, train_ids, val_ids, _ = prepare_run(run, scratch)
    path = workspace / "data.pt"
    torch.save({"train_ids": train_ids, "val_ids": val_ids}, path)
    tokenizer.save(workspace)
    return path, model.config


def workload_kwargs(workload: str, s: Settings, run_dict: dict, data_path: Path, techniques: tuple[str, ...],
                    peak_flops: float | None) -> dict[str, Any]:
    common = {"run": run_dict, "techniques": list(techniques), "data_path": str(data_path)}
    if workload == "train":
        return {**common, "warmup_steps": s.warmup, "steps": s.steps, "eval_every": s.eval_every,
                "peak_flops": peak_flops}
    if workload == "generate":
        return {**common, "prompt_len": s.prompt_len, "new_tokens": s.new_tokens, "batch_size": s.gen_batch,
                "warmup": s.warmup, "steps": s.steps}
    return {**common, "window": s.window, "stride": s.stride, "max_tokens": s.eval_tokens}


# ---- figures that need the baseline of the same round --------------------------------------------
TARGET_RTOL = 1e-4
"""A loss within this relative tolerance of the target has reached it (compile-style float noise is not a miss)."""


def time_to_target(val_curve: list, target: float, rtol: float = TARGET_RTOL) -> tuple[float | None, float | None]:
    """(seconds, steps) at which a (seconds, val_loss, step) curve first reaches `target`, interpolated."""
    prev = None
    reached = target + abs(target) * rtol
    for point in val_curve or []:
        t, v, s = point[0], point[1], point[2]
        if v is not None and v <= reached:
            if prev is None or prev[1] == v:
                return t, s
            t0, v0, s0 = prev
            frac = min(1.0, (v0 - target) / (v0 - v))  # v may sit just above the target, within rtol
            return t0 + frac * (t - t0), s0 + frac * (s - s0)
        prev = (t, v, s)
    return None, None


def add_round_figures(section: dict[str, Any]) -> None:
    """Time-to-target (train) and greedy-token agreement (generate) against the baseline of each round."""
    runs, base = section["runs"], section["runs"][section["baseline"]]["repeats"]
    for run in runs.values():
        for i, rep in enumerate(run.get("repeats") or []):
            if i >= len(base):
                continue
            ref = base[i]
            if "val_curve" in rep and ref.get("val_loss") is not None:
                seconds, steps = time_to_target(rep["val_curve"], ref["val_loss"])
                rep["time_to_target_s"], rep["steps_to_target"] = seconds, steps
                rep.setdefault("info", {})["target_val_loss"] = ref["val_loss"]
            if "new_token_ids" in rep and "new_token_ids" in ref:
                mine = [t for row in rep["new_token_ids"] for t in row]
                theirs = [t for row in ref["new_token_ids"] for t in row]
                same = sum(a == b for a, b in zip(mine, theirs))
                rep["greedy_token_accuracy"] = same / max(len(theirs), 1)
                rep["greedy_tokens_identical"] = mine == theirs


# ---- running ------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    out: Path
    results: dict[str, Any]
    markdown: str
    failures: list[str]


Runner = Callable[[str, dict[str, Any]], dict[str, Any]]


def _default_runner(fn: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from llmopt.measure.memory import run_in_subprocess

    return run_in_subprocess(fn, kwargs)


def default_out(names: list[str]) -> Path:
    slug = "-".join(re.sub(r"[^A-Za-z0-9._=-]+", "_", n) for n in names)[:80]
    return Path("runs") / f"bench-{slug or 'baseline'}"


def _summary_line(name: str, workload: str, rnd: int, repeats: int, rep: dict[str, Any]) -> str:
    from llmopt.measure.bench_report import progress_figures

    return f"[{workload}] round {rnd + 1}/{repeats} {name}: {progress_figures(rep)}"


def bench(names: list[str], *, model: str = "demo", workload: str | None = None, repeats: int = 5,
          steps: int | None = None, warmup: int | None = None, out: str | Path | None = None, force: bool = False,
          overrides: list[str] = (), data: str | None = None, peers: str = "all",
          progress: Callable[[str], None] | None = None, runner: Runner | None = None,
          peak_flops: dict[str, Any] | None = None, command: str | None = None) -> BenchResult:
    """Run the bench and write `out` (see the module docstring). `runner(fn, kwargs)` is injectable for tests."""
    from llmopt.measure.bench_peers import select_peers
    from llmopt.measure.bench_report import write_bench_outputs
    from llmopt.measure.machine import machine_info, versions

    say = progress or (lambda line: None)
    runner = runner or _default_runner
    if repeats < 1:
        raise BenchError(f"--repeats must be at least 1, got {repeats}")
    if not names:
        raise BenchError("name at least one technique to bench, e.g. `llmopt bench sgd` (see `llmopt techniques`)")
    if len(set(names)) != len(names):
        raise BenchError(f"a candidate is named twice in {' '.join(names)}")
    candidates = [resolve_candidate(n, workload) for n in names]
    command = command or _command(names, model, workload, repeats, steps, overrides, peers)
    run, warmup, steps = base_run(model, overrides=list(overrides), data=data, steps=steps, warmup=warmup)
    from llmopt.train import apply_overrides

    for c in candidates:  # every override must be valid before anything runs
        apply_overrides(run, list(c.overrides))
    out = Path(out) if out is not None else default_out(names)
    if out.exists() and not force:
        raise BenchError(f"--out {out} already exists; choose another directory or pass --force to replace it")

    by_workload: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_workload.setdefault(c.workload, []).append(c)
    plans = []
    for w, group in by_workload.items():
        techniques = {t.partition(":")[0] for c in group for t in c.techniques}
        techniques |= {c.name.partition(":")[0] for c in group}
        peer_runs = [Candidate(name=p.name, workload=w, kind="peer", fn=p.fn, skipped=p.missing())
                     for p in select_peers(peers, w, techniques)]
        for p in peer_runs:
            if p.name in {c.name for c in group} or p.name == "baseline":
                raise BenchError(f"peer {p.name!r} has the name of a candidate; rename the candidate")
        plans.append((w, [Candidate(name="baseline", workload=w, kind="baseline", fn=FUNCTIONS[w])] + group
                      + peer_runs))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    from llmopt.measure.bench_report import umask

    os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private; the results are not
    failures: list[str] = []
    try:
        say(f"preparing data for {model} (tokenizer and token ids, once for every run)")
        data_path, model_config = prepare_data(run, staging / "workspace")
        machine = machine_info()
        if peak_flops is None:
            peak_flops = measure_peak(run.train.device, run.train.threads)
        machine["peak_flops"] = peak_flops
        say(f"machine peak (measured matmul): {peak_flops.get('peak_flops', math.nan) / 1e9:.1f} GFLOP/s")
        sections = []
        for w, runs in plans:
            sections.append(_run_section(w, runs, run, model, model_config, warmup, steps, repeats, data_path,
                                         peak_flops.get("peak_flops"), runner, say, failures))
        results = {"command": command, "machine": machine, "versions": versions()}
        if len(sections) == 1:
            results.update(sections[0])
        else:
            results["workloads"] = sections
        shutil.rmtree(staging / "workspace")
        markdown = write_bench_outputs(staging, results)
        _swap_in(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BenchResult(out=out, results=results, markdown=markdown, failures=failures)


def measure_peak(device: str, threads: int | None) -> dict[str, Any]:
    """`measure_peak_flops` once, in a fresh process like the runs, so it uses the threads they use."""
    from llmopt.measure.memory import run_in_subprocess

    cuda = device.startswith("cuda")
    # a fixed 1024 on CPU: the automatic size stops at 256 on a loaded machine, where overhead dominates
    kwargs = {"device": "cuda" if cuda else "cpu", "size": None if cuda else 1024, "threads": threads}
    result = run_in_subprocess("llmopt.measure.bench:_peak_child", kwargs)
    if not result.get("ok"):
        raise RuntimeError(f"measuring the machine's peak FLOP/s failed: {result.get('error')}")
    return result["result"]


def _peak_child(device: str, size: int | None, threads: int | None) -> dict[str, Any]:
    import torch

    from llmopt.measure.flops import measure_peak_flops

    if threads:
        torch.set_num_threads(threads)
    return measure_peak_flops(device=device, size=size)


def _settings(w: str, run, model: str, warmup: int, steps: int) -> Settings:
    s = Settings(model=model, run=run, warmup=warmup, steps=steps)
    s.eval_every = max(1, (warmup + steps) // 5)
    if w == "generate":
        s.warmup, s.steps = min(warmup, 1), min(steps, 5)
        s.prompt_len = min(32, run.model.max_seq_len // 4)
        s.new_tokens = min(64, run.model.max_seq_len - s.prompt_len)
    if w == "eval":
        s.window = min(run.train.seq_len, run.model.max_seq_len)
        s.stride = max(1, s.window // 2)
        s.eval_tokens = 16 * s.window
    return s


def _describe(w: str, s: Settings, run, model_config) -> dict[str, Any]:
    d = {"name": f"{w} {s.model}", "model": s.model, "model_config": model_config.to_dict(),
         "data": run.data.path or "bundled corpus", "seed": run.train.seed, "device": run.train.device,
         "precision": run.train.precision, "optimizer": run.optim.name}
    if w == "train":
        d.update(batch_size=run.train.batch_size, seq_len=run.train.seq_len, grad_accum=run.train.grad_accum,
                 warmup_steps=s.warmup, timed_steps=s.steps, eval_every=s.eval_every,
                 eval_batches=run.train.eval_batches, lr=run.optim.lr)
    elif w == "generate":
        d.update(prompt_len=s.prompt_len, new_tokens=s.new_tokens, batch_size=s.gen_batch, warmup_calls=s.warmup,
                 timed_calls=s.steps, sampling="greedy")
    else:
        d.update(window=s.window, stride=s.stride, eval_tokens=s.eval_tokens)
    return d


def _run_section(w, runs, run, model, model_config, warmup, steps, repeats, data_path, peak, runner, say,
                 failures) -> dict[str, Any]:
    from llmopt.train import apply_overrides

    run = dataclasses.replace(run)
    run.model = model_config
    s = _settings(w, run, model, warmup, steps)
    section: dict[str, Any] = {"workload": _describe(w, s, run, model_config), "baseline": "baseline", "runs": {},
                               "orders": []}
    for c in runs:
        section["runs"][c.name] = {"kind": c.kind, "skipped": c.skipped, "repeats": [],
                                   "techniques": list(c.techniques), "overrides": list(c.overrides), "fn": c.fn}
        if c.skipped:
            say(f"[{w}] {c.name}: skipped: {c.skipped}")
    kwargs = {c.name: workload_kwargs(w, s, apply_overrides(run, list(c.overrides)).to_dict(), data_path,
                                      c.techniques, peak) for c in runs if not c.skipped}
    fns = {c.name: c.fn for c in runs}
    for r in range(repeats):
        active = [c.name for c in runs if not section["runs"][c.name]["skipped"]]
        order = rotated(active, r)
        section["orders"].append(order)
        for name in order:
            result = runner(fns[name], kwargs[name])
            entry = section["runs"][name]
            if not result.get("ok"):
                why = f"failed in round {r + 1}: {result.get('error')}"
                if name == "baseline":
                    tail = result.get("stderr_tail") or ""
                    raise RuntimeError(f"the baseline {why}" + (f"\n{tail}" if tail else ""))
                failures.append(f"{name}: {why}")
                entry.update(skipped=why, repeats=[], stderr_tail=result.get("stderr_tail"))
                say(f"[{w}] round {r + 1}/{repeats} {name}: {why}")
                continue
            rep = dict(result["result"])
            rep["peak_rss_bytes"] = result.get("peak_rss_bytes")
            rep["process_wall_s"] = result.get("wall_s")
            rep.setdefault("info", {}).update(round=r, position=order.index(name))
            entry["repeats"].append(rep)
            say(_summary_line(name, w, r, repeats, rep))
    add_round_figures(section)
    return section


def _swap_in(staging: Path, out: Path, force: bool) -> None:
    """Move the finished `staging` directory to `out`; an old `out` is removed only after the move."""
    if not out.exists():
        os.rename(staging, out)
        return
    if not force:
        raise BenchError(f"--out {out} appeared while the bench ran; the results are in {staging}")
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rename(out, old / "previous")
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _command(names, model, workload, repeats, steps, overrides, peers) -> str:
    import shlex

    parts = ["llmopt", "bench", *names, "--model", model, "--repeats", str(repeats)]
    if workload:
        parts += ["--workload", workload]
    if steps is not None:
        parts += ["--steps", str(steps)]
    for o in overrides:
        parts += ["--set", o]
    if peers != "all":
        parts += ["--peers", peers]
    return shlex.join(parts)


def bench_table(names: list[str], model: str = "demo", steps: int | None = None, repeats: int = 5,
                out: str | Path | None = None, **kwargs: Any) -> str:
    """Run `bench` and return the headline Markdown table (the report's first section).

    For `llmopt demo`'s closing "baseline recipe vs optimized recipe":
    `bench_table(["compile+curriculum"], model="demo", steps=20, repeats=3, out=run_dir / "bench", force=True)`.
    Extra keyword arguments go to `bench` (force, peers, progress, overrides, ...).
    """
    from llmopt.measure.bench_report import render_headline

    result = bench(list(names), model=model, steps=steps, repeats=repeats, out=out, **kwargs)
    return render_headline(result.results)
