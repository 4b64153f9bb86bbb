"""Plan before you rent: memory and communication per rank for each mesh a model fits on N processes.

    llmopt plan smollm2-135m --nproc 8 --batch-size 32 --seq-len 2048

For every layout of N ranks that the model allows (tp dividing the heads, pp at most the layers), the
table gives rank 0's bytes of parameters, gradients and AdamW state (fp32, as llmopt trains), an estimate
of its saved activations, and the bytes each kind of collective moves per optimizer step (the formulas of
`llmopt.train.distributed.comm`, which the tests check against counted traffic). Rank 0 is the first
pipeline stage, so it holds the embedding: with large vocabularies it is the fullest rank.
"""

from __future__ import annotations

from dataclasses import replace

from llmopt.train.distributed.comm import _padded, expected_rank0_bytes, rank0_shapes
from llmopt.train.distributed.mesh import MeshError, MeshSpec, validate


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def rank0_state_bytes(model_config, spec: MeshSpec, dist_config, *, elem: int = 4) -> dict[str, int]:
    """Rank 0's parameters, gradients and AdamW moments in bytes (fp32 masters, all trainable)."""
    blocks, root, *_ = rank0_shapes(model_config, spec, dist_config)
    shapes = [s for b in blocks for s in b] + root
    dp = spec.dp_size
    mode = ("hsdp" if spec.hsdp else dist_config.data_parallel) if dp > 1 else None
    if mode in ("fsdp", "hsdp"):
        shard = spec.dp_shard if mode == "hsdp" else dp
        elems = sum(_padded(s, shard) for s in shapes) // shard
    else:
        elems = sum(_numel(s) for s in shapes)
    return {"params": elems * elem, "grads": elems * elem, "optimizer": 2 * elems * elem, "total": 4 * elems * elem}


def activation_bytes(model_config, spec: MeshSpec, train_config, dist_config, *, elem: int = 4) -> int:
    """Saved activations of rank 0's layers for one micro-batch set, after Korthikanti et al. (2022): per layer
    about s*b*h*(34 + 5*a*s/h) bytes at 2-byte precision, divided by tp for the parallel regions (and all of it
    with sequence parallel); scaled to `elem` bytes. An estimate for planning, not an accounting."""
    blocks, *_ = rank0_shapes(model_config, spec, dist_config)
    b = train_config.batch_size // spec.dp_size
    s, h, a = train_config.seq_len, model_config.dim, model_config.n_head
    per_layer = s * b * h * (34 + 5 * a * s / h) * (elem / 2)
    t = spec.tp
    if t > 1:
        per_layer = per_layer / t if dist_config.sequence_parallel else s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    return int(per_layer * len(blocks))


def candidate_meshes(model_config, nproc: int, dist_config) -> list[tuple[str, MeshSpec, str]]:
    """(label, spec, data-parallel mode) for the layouts of nproc ranks this model allows."""
    out = []
    for tp in range(1, nproc + 1):
        if nproc % tp:
            continue
        for pp in range(1, nproc // tp + 1):
            if (nproc // tp) % pp:
                continue
            dp = nproc // (tp * pp)
            spec = MeshSpec(pp=pp, dp=dp, tp=tp)
            try:
                validate(spec, world_size=nproc, model_config=model_config, dist_config=dist_config)
            except MeshError:
                continue
            if dp > 1:
                if tp == 1:  # DDP does not run over tensor-parallel weights
                    out.append(("ddp", spec, "ddp"))
                out.append(("fsdp", spec, "fsdp"))
                if dp >= 4 and dp % 2 == 0 and pp == 1 and tp == 1:
                    out.append(("hsdp", MeshSpec(dp_replicate=2, dp_shard=dp // 2), "fsdp"))
            else:
                out.append(("-", spec, "fsdp"))
    return out


def plan(model_config, nproc: int, train_config, dist_config) -> list[dict]:
    rows = []
    for label, spec, mode in candidate_meshes(model_config, nproc, dist_config):
        dc = replace(dist_config, data_parallel=mode)
        try:
            validate(spec, world_size=nproc, model_config=model_config, train_config=train_config, dist_config=dc)
        except MeshError as e:
            rows.append({"mesh": str(spec), "dp_mode": label, "error": str(e)})
            continue
        state = rank0_state_bytes(model_config, spec, dc)
        comm = expected_rank0_bytes(model_config, spec, train_config, dc)
        rows.append({"mesh": str(spec), "dp_mode": label, "state_bytes": state["total"],
                     "activation_bytes": activation_bytes(model_config, spec, train_config, dc),
                     "comm_bytes": comm, "comm_total": sum(comm.values())})
    return rows


def render_plan(rows: list[dict], *, title: str) -> str:
    def gib(n):
        return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"

    lines = [f"# {title}", "", "| mesh | dp | params+grads+AdamW / rank | activations / rank (est.) | "
             "comm / step / rank | of which |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mesh']} | {r['dp_mode']} | - | - | - | {r['error']} |")
            continue
        parts = ", ".join(f"{k} {gib(v)}" for k, v in r["comm_bytes"].items() if v >= 1024)
        lines.append(f"| {r['mesh']} | {r['dp_mode']} | {gib(r['state_bytes'])} | {gib(r['activation_bytes'])} | "
                     f"{gib(r['comm_total'])} | {parts} |")
    return "\n".join(lines) + "\n"
