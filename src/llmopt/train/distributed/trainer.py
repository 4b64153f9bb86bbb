"""The training loop of `llmopt.train.loop.fit`, on a named device mesh.

Run by every process that torchrun starts (`llmopt train RECIPE --nproc N --mesh dp=2,tp=2` does that for
you). What differs from the single-process loop, in the order of one step:

1. Every rank draws the same global batch from the same seeded loader and keeps its data-parallel slice of
   rows, so the data a step sees does not depend on the world size (a run resumes on another layout).
2. The loss of each rank is its token-loss sum times dp / (target tokens of the whole global step): the
   data-parallel gradient average (DDP all-reduce, FSDP reduce-scatter) then gives exactly the gradient of
   the global batch, as accumulation does in one process.
3. Pipeline parallel replaces forward/backward by `schedule.step` (micro-batches through the stages).
4. Gradients of sequence-parallel norms arrive as partial sums and are reduced; tied embedding copies of
   the first and last pipeline stage are summed.
5. The global gradient norm is reduced over every axis (each parameter counted once), then clipped.
6. Optimizer step on the local shards (AdamW states are sharded like their parameters).

Rank 0 writes metrics.jsonl, config.json, tokenizer.json and, at the end, one full model.safetensors;
checkpoints are DCP directories written by all ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from llmopt.train.config import RunConfig
from llmopt.train.distributed.mesh import MeshError, MeshSpec, build_device_mesh, check_rendezvous, microbatches, \
    validate


@dataclass
class DistContext:
    """What a rank knows about the world: the mesh, its coordinates and groups."""

    spec: MeshSpec
    mesh: Any
    rank: int
    world: int
    device: torch.device
    dp_rank: int = 0
    pp_rank: int = 0
    groups: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(spec: MeshSpec, *, backend: str = "", device: str = "cpu") -> DistContext:
    """Start the process group (torchrun's environment) and build the named mesh. Checks first."""
    from llmopt.train.distributed.parallelize import set_current_mesh

    world = check_rendezvous()
    validate(spec, world_size=world)
    device_type = torch.device(device).type
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise MeshError("train.device=cuda but no GPU is visible; use train.device=cpu (gloo)")
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device_type == "cuda" else "gloo"),
                                timeout=datetime.timedelta(minutes=10))
    mesh = build_device_mesh(spec, device_type)
    set_current_mesh(mesh)
    ctx = DistContext(spec=spec, mesh=mesh, rank=dist.get_rank(), world=world, device=dev)
    names = mesh.mesh_dim_names
    ctx.pp_rank = mesh["pp"].get_local_rank()
    dp_names = ("dp_replicate", "dp_shard") if spec.hsdp else ("dp",)
    ctx.dp_rank = (mesh[dp_names].get_local_rank() if len(dp_names) == 1 else
                   mesh["dp_replicate"].get_local_rank() * spec.dp_shard + mesh["dp_shard"].get_local_rank())
    ctx.groups = {n: mesh[n].get_group() for n in names}
    return ctx


def fit_distributed(run: RunConfig, out_dir: str | Path, *, resume: bool = False, hooks=(), on_log=None,
                    comm_counter=None, on_end=None):
    """Train `run` on the mesh `run.dist.mesh` (this process is one rank of a torchrun world).

    comm_counter: a CommCounter active around each step's forward, backward, reductions and optimizer step.
    on_end(rank_model, optimizer): called after the last step (e.g. to account this rank's bytes)."""
    from llmopt.core import Stage, apply_, parse_technique_spec
    from llmopt.core.registry import entry_for_config
    from llmopt.data import BatchLoader
    from llmopt.train.checkpoint import CheckpointError, latest_checkpoint
    from llmopt.train.distributed.checkpoint import export_full_model, load_dcp, save_dcp
    from llmopt.train.distributed.parallelize import DataParallelConfig, TensorParallelConfig, ddp_engine
    from llmopt.train.distributed import pipeline as pipe
    from llmopt.train.loop import (FitResult, TrainState, _log, _write_config, autocast, build_optimizer, call_hooks,
                                   lr_at, prepare_run)

    import llmopt

    out_dir = Path(out_dir)
    tc, oc, dc = run.train, run.optim, run.dist
    spec = MeshSpec.parse(dc.mesh)
    if dc.engine == "deepspeed":
        from llmopt.train.distributed.deepspeed_engine import fit_deepspeed

        return fit_deepspeed(run, out_dir, resume=resume, on_log=on_log)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.precision == "fp16":
        raise MeshError("train.precision=fp16 (loss scaling) is single-process only; use bf16 with a mesh")
    if tc.clip_mode == "agc":
        raise MeshError("train.clip_mode=agc is single-process only; use norm or value with a mesh")
    ctx = init_distributed(spec, backend=dc.backend, device=tc.device)
    random.seed(tc.seed)
    ckpt_dir = out_dir / "checkpoints"
    start_ckpt = latest_checkpoint(ckpt_dir) if resume else None
    if resume and start_ckpt is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to resume from; drop --resume to start a new run")
    if not resume and (ckpt_dir / "latest").exists():
        raise CheckpointError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    # ---- model: surgery techniques, pipeline split, tensor parallel, checkpointing/compile, sharding --------
    model, tokenizer, train_ids, val_ids, _ = prepare_run(run, out_dir, apply_techniques=False)
    validate(spec, world_size=ctx.world, model_config=run.model, train_config=tc, dist_config=dc)
    llmopt.load_techniques()
    configs = [parse_technique_spec(s) for s in run.techniques]
    early = [c for c in configs if entry_for_config(c).stage < Stage.TENSOR_PARALLEL]
    late = [c for c in configs if entry_for_config(c).stage >= Stage.TENSOR_PARALLEL]
    if early:
        apply_(model, *early)
    pp, tp, dp = spec.pp, spec.tp, spec.dp_size
    tied = model.config.tie_embeddings
    if pp > 1:
        parts = pipe.split_stages(model, ctx.pp_rank, pp, dc.pp_schedule)
    else:
        parts = [model]
    mode = ("hsdp" if spec.hsdp else dc.data_parallel) if dp > 1 else None
    extra = []
    if tp > 1:
        extra.append(TensorParallelConfig(sequence_parallel=dc.sequence_parallel))
    if mode in ("fsdp", "hsdp"):
        extra.append(DataParallelConfig(mode=mode, param_dtype=dc.param_dtype, reduce_dtype=dc.reduce_dtype,
                                        reshard_after_forward=dc.reshard_after_forward and pp == 1))
    reports = []
    for part in parts:
        if late or extra:
            r = apply_(part, *late, *extra)
            reports.extend(r.reports)
    hooks = list(hooks) + [h for r in reports for h in getattr(r, "hooks", [])]
    rank_model = parts[0] if len(parts) == 1 else pipe.RankModel(parts)
    engine = None
    submods = None
    if mode == "ddp":
        if pp > 1:
            submods = [ddp_engine(parts[0], ctx.groups["dp"], forward_is_loss=False)]
        else:
            engine = ddp_engine(model, ctx.groups["dp"])
    rank_model.train()
    optimizer = build_optimizer(rank_model, oc)
    _split_groups_by_kind(optimizer)
    params = [p for p in rank_model.parameters() if p.requires_grad]

    # ---- pipeline schedule ----------------------------------------------------------------------------------
    loss_scale = {"value": 1.0}
    schedule = None
    holds_last = True
    tied_params, tied_grp = [], None
    if pp > 1:
        n_mb = microbatches(spec, dc)
        schedule = pipe.build_schedule(parts, schedule=dc.pp_schedule, pp=pp, pp_group=ctx.groups["pp"],
                                       microbatches=n_mb, device=ctx.device, submods=submods,
                                       loss_fn=lambda out, y: pipe.logits_loss(out, y)[0] * loss_scale["value"])
        holds_last = any(p.lm_head is not None for p in parts)
        holds_first = any(p.embed_tokens is not None for p in parts)
        tied_grp = pipe.tied_group(ctx.mesh, pp) if tied else None
        if tied and (holds_first or holds_last):
            tied_params = pipe.tied_params(parts)
    # parameters counted once in the global gradient norm: the last stage's copy of a tied head is skipped
    norm_params = [p for p in params if not (tied and pp > 1 and any(
        part.lm_head is not None and part.lm_head.weight is p for part in parts))]

    # ---- state, resume ------------------------------------------------------------------------------------
    loader = BatchLoader(train_ids, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)
    step, tokens_seen = 0, 0
    if start_ckpt is not None:
        state = load_dcp(start_ckpt, model=rank_model, optimizer=optimizer, expected_model_config=run.model.to_dict())
        step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["data"])
    elif ctx.is_main:
        tokenizer.save(out_dir)
        # the run directory's model.safetensors is the full, unsharded model: record only the techniques that
        # change the model itself (LoRA, checkpointing, ...), not how it was split over ranks
        kept = [c for c in getattr(rank_model, "applied_techniques", [])
                if not isinstance(c, (TensorParallelConfig, DataParallelConfig))]
        _write_config(out_dir, run, SimpleNamespace(applied_techniques=kept))
    ts = TrainState(step=step, model=rank_model, optimizer=optimizer, scaler=None, config=run,
                    tokens_seen=tokens_seen, train_ids=train_ids)
    history: list[dict[str, Any]] = []
    metrics_file = open(out_dir / "metrics.jsonl", "a") if ctx.is_main else None
    call_hooks(hooks, "on_fit_start", ts)
    rows = tc.batch_size // dp
    lo, hi = ctx.dp_rank * rows, (ctx.dp_rank + 1) * rows
    t_start = t_log = time.perf_counter()
    tokens_at_log = tokens_seen
    last_loss, val_loss = float("nan"), None

    def evaluate_global() -> float:
        """Validation loss over the same windows as the single-process evaluate, split across dp ranks."""
        n_windows = tc.batch_size * tc.eval_batches
        span = len(val_ids) - tc.seq_len - 1
        if span <= 0:
            raise ValueError(f"validation split has {len(val_ids)} tokens, fewer than train.seq_len+1; "
                             "lower train.seq_len or raise data.val_fraction")
        starts = torch.linspace(0, span, n_windows).long()
        total = torch.zeros(2, dtype=torch.float64)
        for m in parts:
            m.eval()
        with torch.no_grad():
            for b in range(tc.eval_batches):
                s = starts[b * tc.batch_size:(b + 1) * tc.batch_size][lo:hi].tolist()
                x = torch.stack([val_ids[i:i + tc.seq_len] for i in s]).to(ctx.device)
                y = torch.stack([val_ids[i + 1:i + 1 + tc.seq_len] for i in s]).to(ctx.device)
                with autocast(tc.precision, tc.device):
                    if schedule is not None:
                        loss_scale["value"] = 1.0
                        losses: list = []
                        _run_schedule(schedule, parts, x, y, losses, train=False)
                        if holds_last:
                            total[0] += float(sum(float(v.detach()) for v in losses))
                            total[1] += int((y != -100).sum())
                    else:
                        loss_sum, n = model.loss(x, y)
                        total[0] += float(loss_sum)
                        total[1] += int(n)
        for m in parts:
            m.train()
        dist.all_reduce(total)  # tp and pp copies scale both sums alike: the ratio is the global mean
        return float(total[0] / total[1])

    def checkpoint(at_step: int) -> None:
        save_dcp(ckpt_dir, step=at_step, model=rank_model, optimizer=optimizer,
                 state={"tokens_seen": ts.tokens_seen, "data": loader.state_dict(), "run_config": run.to_dict(),
                        "world_size": ctx.world, "mesh": str(spec)})

    counter = comm_counter if comm_counter is not None else contextlib.nullcontext()
    first_step = step  # the first step is a warm-up for counting: pipeline shape inference, lazy FSDP init
    with loader:
        while step < tc.steps:
            ts.step, ts.metrics = step, {}
            lr = lr_at(step, lr=oc.lr, min_lr=oc.min_lr, warmup_steps=oc.warmup_steps, total_steps=tc.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [call_hooks(hooks, "before_forward", ts, next(loader)) for _ in range(tc.grad_accum)]
            step_tokens = sum(int((y != -100).sum()) for _, y in batches)  # of the global batch: no comm needed
            if comm_counter is not None:
                comm_counter.enabled = step > first_step
            scale = dp / step_tokens
            local_loss = torch.zeros((), dtype=torch.float64)
            with counter:
                for i, (x, y) in enumerate(batches):
                    x, y = x[lo:hi].to(ctx.device), y[lo:hi].to(ctx.device)
                    last_micro = i == len(batches) - 1
                    if schedule is not None:
                        loss_scale["value"] = scale
                        losses: list = []
                        with autocast(tc.precision, tc.device):
                            _run_schedule(schedule, parts, x, y, losses, train=True)
                        if holds_last:
                            local_loss += float(sum(float(v.detach()) for v in losses))
                        continue
                    sync = _no_sync(engine, model, mode, enabled=not last_micro)
                    with sync, autocast(tc.precision, tc.device):
                        loss_sum, _ = engine(x, y) if engine is not None else model.loss(x, y)
                    (loss_sum * scale).backward()
                    local_loss += float(loss_sum.detach()) * scale
                call_hooks(hooks, "after_backward", ts)
                _reduce_partial_grads(params)
                if tied_params:
                    pipe.sync_tied_grads(tied_params, tied_grp)
                grad_norm = _clip_(params, norm_params, tc.clip_mode, tc.grad_clip, ctx, pp)
                call_hooks(hooks, "before_optimizer_step", ts)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if comm_counter is not None and comm_counter.enabled:
                comm_counter.steps += 1
            call_hooks(hooks, "after_optimizer_step", ts)
            dist.all_reduce(local_loss)
            loss = float(local_loss) / (tp * dp)
            step += 1
            ts.step = step
            ts.tokens_seen += step_tokens
            last_loss = loss
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower optim.lr")
            is_last = step == tc.steps
            if step % tc.log_every == 0 or is_last:
                now = time.perf_counter()
                tps = (ts.tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
                t_log, tokens_at_log = now, ts.tokens_seen
                record = {"step": step, "loss": round(loss, 6), "loss_exact": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens": ts.tokens_seen, "tokens_per_s": round(tps, 1),
                          "elapsed_s": round(now - t_start, 3), "world_size": ctx.world, **ts.metrics}
                if ctx.is_main:
                    _log(metrics_file, history, record, on_log)
            if step % tc.eval_every == 0 or is_last:
                val_loss = evaluate_global()
                eval_metrics = {"step": step, "val_loss": round(val_loss, 6),
                                "val_ppl": round(math.exp(min(val_loss, 50)), 3)}
                call_hooks(hooks, "on_eval", ts, eval_metrics)
                if ctx.is_main:
                    _log(metrics_file, history, eval_metrics, on_log)
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or is_last:
                checkpoint(step)
    if metrics_file is not None:
        metrics_file.close()
    if on_end is not None:
        on_end(rank_model, optimizer)
    export_full_model(rank_model, out_dir / "model.safetensors",
                      pp_group=ctx.groups["pp"] if pp > 1 else None, is_pp_root=_is_pp_root(ctx))
    dist.barrier()
    return FitResult(out_dir=out_dir, steps=step, final_train_loss=last_loss, final_val_loss=val_loss,
                     tokens_seen=ts.tokens_seen, seconds=time.perf_counter() - t_start, history=history)


def _split_groups_by_kind(optimizer) -> None:
    """Foreach optimizers cannot mix DTensors (tensor-parallel weights) and plain tensors (the replicated
    embedding and head) in one call: give each kind its own param group, same hyperparameters."""
    from torch.distributed.tensor import DTensor

    groups = []
    for g in optimizer.param_groups:
        for is_dt in (True, False):
            ps = [p for p in g["params"] if isinstance(p, DTensor) == is_dt]
            if ps:
                groups.append({**g, "params": ps})
    optimizer.param_groups = groups


def _is_pp_root(ctx: DistContext) -> bool:
    """Whether this rank is at data- and tensor-parallel coordinate 0 (it sends its stage to rank 0)."""
    names = [n for n in ctx.mesh.mesh_dim_names if n != "pp"]
    return all(ctx.mesh[n].get_local_rank() == 0 for n in names)


def _run_schedule(schedule, parts, x, y, losses: list, *, train: bool) -> None:
    first = any(p.embed_tokens is not None for p in parts)
    last = any(p.lm_head is not None for p in parts)
    args = (x,) if first else ()
    kwargs = {"target": y, "losses": losses} if last else {}
    if train:
        schedule.step(*args, **kwargs)
    else:
        schedule.eval(*args, **kwargs)


def _no_sync(engine, model, mode, *, enabled: bool):
    """Skip the gradient reduction for all but the last micro-batch of a step (the reduction then carries the
    accumulated gradient once)."""
    if not enabled:
        if mode in ("fsdp", "hsdp"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if engine is not None:
        return engine.no_sync()
    if mode in ("fsdp", "hsdp"):
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def _reduce_partial_grads(params) -> None:
    """Sequence-parallel norm weights are replicated but their gradients are partial sums over the tp ranks."""
    from torch.distributed.tensor import DTensor

    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


def _clip_(params, norm_params, mode: str, max_value, ctx: DistContext, pp: int) -> float:
    """Global gradient L2 norm (each parameter once, every shard counted) and clipping; returns the norm."""
    from torch.distributed.tensor import DTensor

    sq = torch.zeros((), dtype=torch.float64)
    for p in norm_params:
        if p.grad is None:
            continue
        g = p.grad
        n = torch.linalg.vector_norm(g.float())
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq += float(n) ** 2
    if pp > 1:
        dist.all_reduce(sq, group=ctx.groups["pp"])
    norm = math.sqrt(float(sq))
    if max_value is None:
        return norm
    if mode == "norm":
        coef = max_value / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    elif mode == "value":
        for p in params:
            if p.grad is not None:
                p.grad.clamp_(-max_value, max_value)
    return norm


def run_from_argv() -> None:
    """Entry point of each torchrun worker: `python -m llmopt.train.distributed.trainer RUN_JSON OUT [--resume]`."""
    import sys

    from llmopt.train.checkpoint import CheckpointError
    from llmopt.train.config import ConfigError

    os.environ.setdefault("LLMOPT_NO_PROGRESS", "1")
    args = sys.argv[1:]
    run = RunConfig.from_dict(json.loads(Path(args[0]).read_text()))
    try:
        fit_distributed(run, args[1], resume="--resume" in args)
    except (MeshError, CheckpointError, ConfigError, ValueError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_from_argv()
