"""`--engine deepspeed`: DeepSpeed ZeRO stages 1-3 for users who already run it (the `deepspeed` extra).

    pip install --no-build-isolation deepspeed      # an sdist that imports torch at build time
    llmopt train tiny --nproc 2 --engine deepspeed --set dist.zero_stage=3

The same recipe, data slicing and loss normalization as the torch engine (each rank's loss sum times
dp / target tokens of the global step), with DeepSpeed owning the data-parallel part: ZeRO-1 shards the
optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the parameters (Rajbhandari et al. 2020). The
optimizer is torch's AdamW handed to DeepSpeed as a client optimizer, so no C++ op is JIT-built for it;
DeepSpeed's CPU communication op (`deepspeed_shm_comm`) builds once on first use (about 40 s, cached).
Checkpoints are DeepSpeed's own (`engine.save_checkpoint`); they resume on the same world size.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llmopt.train.config import RunConfig
from llmopt.train.distributed.mesh import MeshError, MeshSpec, check_rendezvous, validate


def fit_deepspeed(run: RunConfig, out_dir: str | Path, *, resume: bool = False, on_log=None):
    try:
        import deepspeed
    except ImportError:
        raise MeshError("--engine deepspeed needs DeepSpeed: pip install --no-build-isolation deepspeed "
                        "(or use the default torch engine)") from None
    from llmopt.data import BatchLoader
    from llmopt.train.checkpoint import CheckpointError
    from llmopt.train.distributed.parallelize import _LossForward
    from llmopt.train.loop import FitResult, _log, _write_config, build_optimizer, lr_at, prepare_run

    out_dir = Path(out_dir)
    tc, oc, dc = run.train, run.optim, run.dist
    spec = MeshSpec.parse(dc.mesh)
    world = check_rendezvous()
    validate(spec, world_size=world, model_config=run.model, train_config=tc, dist_config=dc)
    if tc.grad_accum != 1:
        raise MeshError("engine=deepspeed: set train.grad_accum=1 (DeepSpeed's own accumulation is not wired here)")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    deepspeed.init_distributed(dist_backend=dc.backend or ("nccl" if tc.device.startswith("cuda") else "gloo"))
    rank = dist.get_rank()
    ckpt_dir = out_dir / "checkpoints"
    if not resume and (ckpt_dir / "latest").exists():
        raise CheckpointError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model, tokenizer, train_ids, val_ids, _ = prepare_run(run, out_dir)
    model.train()
    optimizer = build_optimizer(model, oc)
    rows = tc.batch_size // world
    config = {"train_micro_batch_size_per_gpu": rows, "gradient_accumulation_steps": 1,
              "train_batch_size": tc.batch_size, "zero_optimization": {"stage": dc.zero_stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
              "bf16": {"enabled": tc.precision == "bf16"}}
    if tc.grad_clip is not None and tc.clip_mode == "norm":
        config["gradient_clipping"] = tc.grad_clip
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=_LossForward(model), optimizer=optimizer, config=config)
    loader = BatchLoader(train_ids, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)
    step, tokens_seen = 0, 0
    if resume:
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise CheckpointError(f"{ckpt_dir}: no DeepSpeed checkpoint to resume from; drop --resume")
        step, tokens_seen = client["step"], client["tokens_seen"]
        loader.load_state_dict(client["data"])
    elif rank == 0:
        tokenizer.save(out_dir)
        _write_config(out_dir, run, model)
    lo, hi = rank * rows, (rank + 1) * rows
    history: list = []
    metrics_file = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None
    t_start = time.perf_counter()
    last_loss, val_loss = float("nan"), None
    with loader:
        while step < tc.steps:
            lr = lr_at(step, lr=oc.lr, min_lr=oc.min_lr, warmup_steps=oc.warmup_steps, total_steps=tc.steps)
            for group in ds_optimizer.param_groups:
                group["lr"] = lr
            x, y = next(loader)
            step_tokens = int((y != -100).sum())
            scale = world / step_tokens
            loss_sum, _ = engine(x[lo:hi], y[lo:hi])
            loss = loss_sum * scale
            engine.backward(loss)
            engine.step()
            total = torch.tensor([float(loss.detach())], dtype=torch.float64)
            dist.all_reduce(total)
            last_loss = float(total) / world
            step += 1
            tokens_seen += step_tokens
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss became {last_loss} at step {step}; lower optim.lr")
            if step % tc.log_every == 0 or step == tc.steps:
                record = {"step": step, "loss": round(last_loss, 6), "loss_exact": last_loss, "lr": lr,
                          "tokens": tokens_seen, "engine": f"deepspeed-zero{dc.zero_stage}", "world_size": world}
                if rank == 0:
                    _log(metrics_file, history, record, on_log)
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps:
                engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step:06d}",
                                       client_state={"step": step, "tokens_seen": tokens_seen,
                                                     "data": loader.state_dict()})
    if metrics_file is not None:
        metrics_file.close()
    _export(engine, model, out_dir / "model.safetensors", stage=dc.zero_stage, rank=rank)
    dist.barrier()
    return FitResult(out_dir=out_dir, steps=step, final_train_loss=last_loss, final_val_loss=val_loss,
                     tokens_seen=tokens_seen, seconds=time.perf_counter() - t_start, history=history)


def _export(engine, model, path: Path, *, stage: int, rank: int) -> None:
    """One full safetensors file on rank 0 (ZeRO-3 gathers the partitioned parameters first)."""
    import os

    from safetensors.torch import save_file

    if stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # gathers every partition to rank 0
        sd = {k.removeprefix("model."): v for k, v in (sd or {}).items()}
    else:
        sd = {k: v for k, v in model.state_dict().items()}
    if rank != 0:
        return
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(sd, str(tmp), metadata={"format": "llmopt"})
    os.replace(tmp, path)
