"""The named device mesh: parse `dp=2,tp=2,pp=2`, check it against the world and the model, build it.

Everything here that can be wrong is checked *before* a process group starts, so a bad `--mesh` is one
line on the launcher's terminal instead of a hang in eight processes.

Axes, outermost first (the order of `MESH_AXES`): `pp` (pipeline stages), `dp` (data parallel: FSDP2 or
DDP, `dist.data_parallel`), or the two HSDP axes `dp_replicate` x `dp_shard`, and `tp` (tensor + sequence
parallel). Innermost axes get neighbouring ranks, which torchrun places on the same node: put `tp` (most
traffic, every layer) inside a node and `dp_replicate` / `pp` (least traffic) across nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "dp", "tp")
"""Every axis name, outermost first. `dp` and `dp_replicate`/`dp_shard` exclude each other."""

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun (or a cluster launcher) sets in each process; init_process_group needs all of them."""


class MeshError(ValueError):
    """A mesh that cannot work for this world or model; one line naming the fix."""


@dataclass(frozen=True)
class MeshSpec:
    """Sizes of the named axes; an axis left out has size 1."""

    pp: int = 1
    dp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshSpec":
        """`"dp=2,tp=2"` -> MeshSpec(dp=2, tp=2). Empty text is one process."""
        sizes: dict[str, int] = {}
        for item in filter(None, (t.strip() for t in (text or "").split(","))):
            name, eq, value = item.partition("=")
            name = name.strip()
            if not eq:
                raise MeshError(f"mesh item {item!r} must look like name=size, e.g. --mesh dp=2,tp=2")
            if name not in MESH_AXES:
                raise MeshError(f"unknown mesh axis {name!r}; axes are {', '.join(MESH_AXES)} (e.g. --mesh dp=2,tp=2)")
            if name in sizes:
                raise MeshError(f"mesh axis {name!r} given twice in {text!r}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh axis {name}={value!r} is not an integer") from None
            if sizes[name] < 1:
                raise MeshError(f"mesh axis {name}={sizes[name]} must be at least 1")
        if "dp" in sizes and ({"dp_replicate", "dp_shard"} & set(sizes)):
            raise MeshError("use either dp=N or dp_replicate=R,dp_shard=S (HSDP), not both")
        return cls(**sizes)

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1 or self.dp_shard > 1

    @property
    def dp_size(self) -> int:
        """Ranks that see different data: the whole data-parallel extent."""
        return self.dp * self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_size * self.tp

    def axes(self) -> tuple[tuple[str, int], ...]:
        """(name, size) of the axes the DeviceMesh gets, outermost first. Size-1 axes are kept (a 1-rank
        DeviceMesh dimension costs nothing and keeps every code path the same)."""
        if self.hsdp:
            names = ("pp", "dp_replicate", "dp_shard", "tp")
        else:
            names = ("pp", "dp", "tp")
        return tuple((n, getattr(self, n)) for n in names)

    def __str__(self) -> str:
        parts = [f"{n}={s}" for n, s in self.axes() if s > 1]
        return ",".join(parts) or "single process"


def validate(spec: MeshSpec, *, world_size: int, model_config=None, train_config=None, dist_config=None) -> None:
    """Raise MeshError (one line) if `spec` cannot run on `world_size` processes with this model and batch."""
    if spec.world_size != world_size:
        raise MeshError(f"mesh {spec} needs {spec.world_size} processes but the world has {world_size}; "
                        f"make the axis sizes multiply to {world_size} (e.g. --mesh dp={world_size})")
    if model_config is not None:
        mc = model_config
        if spec.tp > 1:
            for what, n in (("n_head", mc.n_head), ("n_kv_head", mc.n_kv_head), ("intermediate_size",
                                                                                   mc.intermediate_size)):
                if n % spec.tp:
                    raise MeshError(f"tp={spec.tp} does not divide model.{what}={n}; choose tp among the divisors "
                                    f"of {n}")
        if spec.pp > 1:
            per_rank = _virtual_stages_per_rank(dist_config)
            if spec.pp * per_rank > mc.n_layer:
                raise MeshError(f"pp={spec.pp} ({spec.pp * per_rank} stages) is more than model.n_layer="
                                f"{mc.n_layer}; use pp <= {mc.n_layer // per_rank}")
            if per_rank > 1 and mc.n_layer % (spec.pp * per_rank):
                raise MeshError(f"schedule {dist_config.pp_schedule} puts {per_rank} stages on each rank: "
                                f"model.n_layer={mc.n_layer} must be divisible by {spec.pp * per_rank}")
        if mc.family != "llama" and (spec.tp > 1 or spec.pp > 1):
            raise MeshError(f"tensor and pipeline parallel are written for the llama decoder, not {mc.family}; "
                            "use dp only")
    if train_config is not None:
        tc = train_config
        if tc.batch_size % spec.dp_size:
            raise MeshError(f"train.batch_size={tc.batch_size} is not divisible by the {spec.dp_size} data-parallel "
                            f"ranks; use a multiple of {spec.dp_size}")
        if spec.tp > 1 and (dist_config is None or dist_config.sequence_parallel) and tc.seq_len % spec.tp:
            raise MeshError(f"sequence parallel splits train.seq_len={tc.seq_len} over tp={spec.tp}; use a multiple "
                            f"of {spec.tp} or dist.sequence_parallel=false")
        if spec.pp > 1:
            mb = microbatches(spec, dist_config)
            local = tc.batch_size // spec.dp_size
            if local % mb:
                raise MeshError(f"each data-parallel rank gets {local} sequences, not divisible into "
                                f"{mb} pipeline micro-batches; set dist.pp_microbatches to a divisor of {local}")
            if tc.grad_accum > 1:
                raise MeshError("with pp > 1 the pipeline's micro-batches replace gradient accumulation: set "
                                "train.grad_accum=1 and raise dist.pp_microbatches")
    if dist_config is not None and spec.tp > 1 and spec.dp_size > 1 and not spec.hsdp and \
            dist_config.data_parallel == "ddp":
        raise MeshError("DDP over tensor-parallel (DTensor) weights is not supported; use dist.data_parallel=fsdp "
                        "with tp > 1")
    if dist_config is not None and spec.pp > 1 and spec.dp_size > 1 and _virtual_stages_per_rank(dist_config) > 1:
        raise MeshError(f"dist.pp_schedule={dist_config.pp_schedule} runs two stages per rank, written for pp x tp "
                        "meshes; with data parallel use pp_schedule=gpipe or 1f1b")
    if dist_config is not None and dist_config.engine == "deepspeed" and (spec.tp > 1 or spec.pp > 1 or spec.hsdp):
        raise MeshError("engine=deepspeed runs ZeRO over a plain dp axis; use --mesh dp=N with it")


def _virtual_stages_per_rank(dist_config) -> int:
    if dist_config is None:
        return 1
    return 2 if dist_config.pp_schedule in ("interleaved_1f1b", "looped_bfs") else 1


def microbatches(spec: MeshSpec, dist_config) -> int:
    n = getattr(dist_config, "pp_microbatches", 0) or 0
    return n or 2 * spec.pp


def check_rendezvous() -> int:
    """World size from torchrun's environment; MeshError naming the missing variable otherwise."""
    missing = [v for v in RENDEZVOUS_VARS if v not in os.environ]
    if missing:
        raise MeshError(f"distributed run without {missing[0]} in the environment: start it with "
                        f"`llmopt train ... --nproc N` or under torchrun (which sets {', '.join(RENDEZVOUS_VARS)})")
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise MeshError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def build_device_mesh(spec: MeshSpec, device_type: str):
    """The torch DeviceMesh with the spec's named axes (the process group must be up)."""
    from torch.distributed.device_mesh import init_device_mesh

    names, sizes = zip(*spec.axes())
    return init_device_mesh(device_type, tuple(sizes), mesh_dim_names=tuple(names))
