"""Communication accounting: bytes moved by each kind of collective per step, counted by hooks, and the
analytic formula each parallel mode should match.

`CommCounter` is a TorchDispatchMode: every collective PyTorch issues from Python or from autograd (FSDP2's
all-gathers and reduce-scatters, DTensor's tensor-parallel redistributions, the pipeline's sends and
receives, tied-weight syncs) goes through a `c10d` / `_c10d_functional` operator, which the mode sees with
its tensors; DDP's bucketed all-reduces too, since its C++ reducer dispatches them through `c10d::allreduce_` on
the thread that runs the backward.

Bytes are the payload of the operation as the op sees it, the convention of NCCL's "algorithm bandwidth":
all-gather: the gathered output; reduce-scatter: the full input; all-reduce: the tensor; send/recv: the
tensor. On the wire a ring moves (n-1)/n of that per rank for all-gather and reduce-scatter, and twice
that for all-reduce.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send", "recv", "broadcast", "all_to_all")


def _classify(op) -> str | None:
    name = op._schema.name if hasattr(op, "_schema") else str(op)
    ns, _, base = name.partition("::")
    if ns not in ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"):
        return None
    base = base.rstrip("_")
    if base.startswith("allreduce") or base.startswith("all_reduce"):
        return "all_reduce"
    if base.startswith(("_allgather", "allgather", "all_gather")):
        return "all_gather"
    if base.startswith(("_reduce_scatter", "reduce_scatter")):
        return "reduce_scatter"
    if base in ("send",):
        return "send"
    if base in ("recv", "recv_any_source"):
        return "recv"
    if base.startswith("broadcast"):
        return "broadcast"
    if base.startswith(("alltoall", "all_to_all")):
        return "all_to_all"
    return None  # barrier, wait_tensor, monitored_barrier, ...


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _nbytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


class CommCounter(TorchDispatchMode):
    """Counts bytes and calls of every collective issued while active (`with CommCounter() as c:`)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = True
        self.steps = 0
        """Optimizer steps counted (the trainer adds one per step), for per-step figures."""

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.steps = 0

    def add(self, kind: str, nbytes: int) -> None:
        if self.enabled:
            self.bytes[kind] += nbytes
            self.calls[kind] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _classify(func)
        if kind is not None:
            self._count(func, kind, args, kwargs)
        return func(*args, **kwargs)

    def _count(self, func, kind: str, args, kwargs) -> None:
        if kind == "all_gather":
            # c10d allgather_(outputs, inputs, ...), _allgather_base_(output, input, ...); funcol (input, n, group)
            if func._schema.name.startswith("c10d::"):
                payload = _nbytes(args[0])
            else:
                payload = _nbytes(args[0]) * int(args[1])
        elif kind == "reduce_scatter":
            if func._schema.name.startswith("c10d::"):
                payload = _nbytes(args[1])  # (output, input(s), ...): the full input
            else:
                payload = _nbytes(args[0])
        elif kind in ("send", "recv", "broadcast", "all_reduce"):
            payload = _nbytes(args[0])
        else:
            payload = _nbytes(args[0])
        self.add(kind, payload)

    def summary(self) -> dict[str, dict[str, int]]:
        """{kind: {"bytes", "calls"}} for the kinds seen."""
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in KINDS if self.calls.get(k)}

    def total(self) -> int:
        return sum(self.bytes.values())


# ---- analytic formulas --------------------------------------------------------------------------------------------
def expected_bytes(mode: str, *, model_config, spec, train_config, dist_config, param_numel: int,
                   block_param_numel: int, other_param_numel: int, elem: int = 4, n_sync_params: int = 0,
                   microbatches: int = 1) -> dict[str, float]:
    """Bytes per optimizer step that `mode` must move, from the model and batch shapes alone.

    param_numel: parameters of the model (tied weights once); block_param_numel: of one decoder block;
    other_param_numel: those outside the blocks (embedding, final norm, untied head). Formulas (payload
    convention of CommCounter; B = this rank's sequences, T = seq_len, D = dim, L = layers):
      ddp:   all-reduce of every gradient once per step: 4P.
      fsdp:  all-gather of every parameter in forward and again in backward for the resharded blocks (all but
             the last), the root's parameters once; reduce-scatter of every gradient: 4P.
      tp+sp: per block, forward: 2 all-gathers and 2 reduce-scatters of B*T*D activations; backward the same
             again; plus the final norm's gather (fwd) and its reverse slicing (no comm).
      pp:    per micro-batch boundary: activations B_mb*T*D sent forward and gradients back, per stage edge.
    """
    B = train_config.batch_size // spec.dp_size
    T, D, L = train_config.seq_len, model_config.dim, model_config.n_layer
    act = B * T * D * elem
    out: dict[str, float] = {}
    if mode == "ddp":
        out["all_reduce"] = param_numel * elem
    elif mode in ("fsdp", "hsdp"):
        reshard = dist_config.reshard_after_forward
        gathered_blocks = L * block_param_numel * (2 if reshard else 1) - (block_param_numel if reshard else 0)
        out["all_gather"] = (gathered_blocks + other_param_numel) * elem
        out["reduce_scatter"] = param_numel * elem
        if mode == "hsdp":
            out["all_reduce"] = param_numel * elem / spec.dp_shard  # the shards, across replicas
    elif mode == "tp":
        out["all_gather"] = (2 * L + 1) * act + 2 * L * act  # fwd: 2 per block + final norm; bwd: 2 per block
        out["reduce_scatter"] = 2 * L * act + 2 * L * act
    elif mode == "pp":
        edges = spec.pp - 1
        out["send"] = 2 * edges * act  # activations forward, gradients backward, summed over micro-batches
        out["recv"] = 2 * edges * act
    return out
