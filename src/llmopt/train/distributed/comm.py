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
        else:  # all-reduce, send, recv, broadcast, all-to-all: the tensor(s) given
            payload = _nbytes(args[0])
        self.add(kind, payload)

    def summary(self) -> dict[str, dict[str, int]]:
        """{kind: {"bytes", "calls"}} for the kinds seen."""
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in KINDS if self.calls.get(k)}

    def total(self) -> int:
        return sum(self.bytes.values())


# ---- analytic formulas --------------------------------------------------------------------------------------------
def _padded(shape, n: int) -> int:
    """Elements of a parameter FSDP2 shards over n ranks (dim 0 padded to a multiple of n)."""
    rows = -(-shape[0] // n) * n
    rest = 1
    for d in shape[1:]:
        rest *= d
    return rows * rest


def _tp_local(name: str, shape, tp: int) -> tuple:
    """Shape of a block parameter on one tensor-parallel rank (column-split: dim 0; row-split: dim 1)."""
    if tp == 1:
        return tuple(shape)
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
        return (shape[0] // tp, *shape[1:])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return (shape[0], shape[1] // tp)
    return tuple(shape)


def rank0_shapes(model_config, spec, dist_config):
    """Parameter shapes rank 0 holds after the pipeline split and tensor parallel, before data-parallel sharding:
    (per-block lists of shapes, shapes outside the blocks, layers held, whether it holds the head, pipeline
    edges it talks over)."""
    from llmopt.models import build_model

    model = build_model(model_config, device="meta")
    tp, pp = spec.tp, spec.pp
    n_stages = pp * (2 if dist_config.pp_schedule in ("interleaved_1f1b", "looped_bfs") and pp > 1 else 1)
    L = model_config.n_layer
    stages = [0, pp] if n_stages > pp else [0]
    layer_ids = [i for s in stages for i in range(s * L // n_stages, (s + 1) * L // n_stages)]
    has_head = (n_stages - 1) in stages
    blocks = [[_tp_local(n, p.shape, tp) for n, p in model.named_parameters() if n.startswith(f"layers.{i}.")]
              for i in layer_ids]
    root = [tuple(model.embed_tokens.weight.shape)]  # the first stage always holds the embedding
    if has_head:
        root.append(tuple(model.norm.weight.shape))
        if not model_config.tie_embeddings or pp > 1:  # an untied head, or the last stage's own copy
            root.append(tuple(model.lm_head.weight.shape))
    edges = len(stages) * 2 - (1 if 0 in stages else 0) - (1 if has_head else 0) if pp > 1 else 0
    return blocks, root, len(layer_ids), has_head, edges


def expected_rank0_bytes(model_config, spec, train_config, dist_config, *, elem: int = 4) -> dict[str, float]:
    """Bytes per optimizer step that rank 0 (first pipeline stage, data and tensor coordinate 0) must move, by
    kind, from the model's parameter shapes and the batch shape alone (payload convention of CommCounter).

    Terms (B = rank's sequences per step, T = seq_len, D = dim, Ls = layers of rank 0's stage,
    act = B*T*D*4 bytes, P = parameter elements; FSDP sizes are padded to the shard count):
      DDP            all-reduce P once per step.
      FSDP / HSDP    all-gather: each resharded block twice (forward, backward), the last block and the root
                     once more, the rest of the root twice; with pipeline stages (no resharding) once.
                     reduce-scatter: every gradient once. HSDP adds an all-reduce of the shard across replicas.
      TP + SP        all-gather (4*Ls + 2)*act: per block 2 in forward (before attention and MLP) and 2 in
                     backward, plus the stage's entry (backward) and exit (forward); reduce-scatter 4*Ls*act;
                     all-reduce of the norm weights' partial gradients, 2*Ls*D.
      PP             send act forward, receive act of gradients; tied embedding: all-reduce of V*D.
      clipping       one scalar all-reduce per sharded gradient (4 bytes) and, with pp, one float64 (8 bytes).
    """
    import torch

    tp, pp, dp = spec.tp, spec.pp, spec.dp_size
    mode = ("hsdp" if spec.hsdp else dist_config.data_parallel) if dp > 1 else None
    blocks, root, Ls, has_head, edges = rank0_shapes(model_config, spec, dist_config)
    D = model_config.dim
    tied = model_config.tie_embeddings
    B = train_config.batch_size // dp
    T = train_config.seq_len
    act = B * T * D * elem * train_config.grad_accum
    out: dict[str, float] = {"all_reduce": 0.0, "all_gather": 0.0, "reduce_scatter": 0.0, "send": 0.0, "recv": 0.0}
    n_tensors = sum(len(b) for b in blocks) + len(root)
    if mode in ("fsdp", "hsdp"):
        shard = spec.dp_shard if mode == "hsdp" else dp
        blk = [sum(_padded(s, shard) for s in b) for b in blocks]
        rt = sum(_padded(s, shard) for s in root)
        reshard = dist_config.reshard_after_forward and pp == 1
        k = train_config.grad_accum
        if reshard:  # every block but the last gathered in forward and backward; the root twice
            gathered = k * (2 * sum(blk[:-1]) + blk[-1] + 2 * rt)
        else:
            gathered = sum(blk) + rt
        out["all_gather"] += gathered * elem
        out["reduce_scatter"] += (sum(blk) + rt) * elem
        if mode == "hsdp":
            out["all_reduce"] += (sum(blk) + rt) * elem / shard
        out["all_reduce"] += n_tensors * elem  # clipping: a scalar norm per sharded gradient
    elif mode == "ddp":
        out["all_reduce"] += sum(sum(int(torch.Size(s).numel()) for s in b) for b in blocks) * elem
        out["all_reduce"] += sum(int(torch.Size(s).numel()) for s in root) * elem
    if tp > 1:
        sp = dist_config.sequence_parallel
        if sp:
            out["all_gather"] += (4 * Ls + 2) * act
            out["reduce_scatter"] += 4 * Ls * act
            out["all_reduce"] += 2 * Ls * D * elem
        else:
            out["all_reduce"] += 4 * Ls * act
        # each column/row-split gradient adds a scalar norm all-reduce over tp (7 Linears per block); with FSDP
        # this comes on top of the one over dp that every sharded gradient has
        out["all_reduce"] += 7 * Ls * elem
    if pp > 1:
        out["send"] += edges * act
        out["recv"] += edges * act
        if tied:
            V = model_config.vocab_size
            out["all_reduce"] += (_padded((V, D), spec.dp_shard if mode == "hsdp" else dp) // (
                spec.dp_shard if mode == "hsdp" else dp) if mode in ("fsdp", "hsdp") else V * D) * elem
        out["all_reduce"] += 8
    return {k: v for k, v in out.items() if v}
