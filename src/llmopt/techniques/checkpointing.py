"""Activation checkpointing: full, selective (per op) and memory-budget planned, per decoder block.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174); selective
recomputation after Korthikanti et al. 2022 (arXiv:2205.05198).

```python
apply_(model, ActivationCheckpointingConfig(policy="full"))        # every block recomputed in backward
apply_(model, ActivationCheckpointingConfig(policy="selective"))   # keep matmul/attention outputs, recompute the rest
apply_(model, ActivationCheckpointingConfig(policy="budget", budget_bytes=64 * 2**20))
```
Each block of the model's repeated block list (`layers.N`) keeps its class and its parameter names:
its `forward` is replaced, on the instance, by one that runs the original under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`. "full" saves only the block's inputs and
recomputes the whole block in backward. "selective" passes a `create_selective_checkpoint_contexts`
policy that saves the outputs of matrix products and attention (expensive to recompute, cheap to
store relative to their FLOPs) and recomputes everything else (norms, RoPE, SiLU, products, casts).
"budget" measures, once at apply time on a probe batch (`probe_batch_size` x `probe_seq_len` tokens),
the bytes each block saves for backward under no / full checkpointing (saved-tensor hooks, unique storages,
parameters excluded) and records every op of the block's forward (`record_block_ops`: output bytes, FLOPs,
bytes moved, and the point after which a recomputation stops early because backward has every tensor it
needs). Per block the options are none, full, or selective with any set of op outputs kept (the selective
policy above is one such set); each kept output costs its bytes, each recomputed op its FLOPs and bytes
moved, and a selective block the Python dispatch modes its ops pass through. `plan_budget` solves this
exactly (a 0/1 knapsack per block, then a min-plus combination over blocks) for the least modelled recompute
time whose saved bytes fit. The budget is for the whole step: what the model saves outside the blocks
(embedding, final norm, loss; measured once with every block fully checkpointed) is subtracted first. Saved
bytes scale with batch x sequence, so give the probe the shape you train with.

With a KV cache (inference) or under `torch.no_grad()` the block runs plainly.

Numerics contract: exact. The recomputation repeats the same ops on the same inputs (RNG state is
restored by `checkpoint`), and a kept output is the forward's own tensor, so logits, loss and gradients are
bitwise those of the unwrapped model (tests/test_checkpointing.py checks gradient equality in fp32). Cost:
the report notes the recomputed matmul/attention FLOPs per probe step and the bytes the recomputed
elementwise ops move.
Stage CHECKPOINTING: after surgery (LoRA, quantization), before compile. Reversible.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (SAC_IGNORED_OPS, CheckpointPolicy, checkpoint,
                                   create_selective_checkpoint_contexts)

from llmopt.core import ApplyReport, Stage, TechniqueConfig, fqn_filter, register, register_revert

aten = torch.ops.aten

SAVE_OPS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._weight_int8pack_mm.default, aten._weight_int4pack_mm_for_cpu.default,
}
"""Ops whose outputs the selective policy keeps: matrix products and fused attention (Korthikanti et al.)."""

POLICIES = ("none", "selective", "full")


@dataclass(frozen=True, kw_only=True)
class ActivationCheckpointingConfig(TechniqueConfig):
    """Activation checkpointing per decoder block: full, selective (per op) or planned for a memory budget."""

    policy: Literal["full", "selective", "budget"] = "full"
    """"full": recompute whole blocks; "selective": keep matmul/attention outputs, recompute the rest;
    "budget": choose per block or block part (none / full / selective keeping a chosen set of op outputs) so
    that saved activations fit budget_bytes at the least modelled recompute time."""
    budget_bytes: int | None = None
    """policy="budget": bytes the whole training step may save for backward at the probe shape: the blocks
    plus what lies outside them (embedding, final norm, loss), which checkpointing the blocks cannot reduce."""
    probe_batch_size: int = 8
    """policy="budget": batch size of the probe that measures each block's saved bytes."""
    probe_seq_len: int = 128
    """policy="budget": sequence length of the probe (capped at model.config.max_seq_len)."""
    units: Literal["best", "blocks", "parts"] = "best"
    """policy="budget": plan per whole block, per part (each block's direct children, e.g. its norms, attention
    and MLP, checkpointed separately: a selective part pays the dispatch modes for its own ops only), or
    "best": both, and keep the plan with the lower modelled recompute time."""
    include: tuple[str, ...] = ()
    """Checkpoint only these blocks (fqn_filter patterns, e.g. "layers.0"); empty means every block."""

    def __post_init__(self) -> None:
        if self.policy == "budget":
            if self.budget_bytes is None or self.budget_bytes < 0:
                raise ValueError("policy='budget' needs budget_bytes >= 0 (e.g. budget_bytes=64 * 2**20)")
        elif self.budget_bytes is not None:
            raise ValueError(f"budget_bytes is only read by policy='budget', not {self.policy!r}; drop it")
        if self.probe_batch_size <= 0 or self.probe_seq_len <= 1:
            raise ValueError("probe_batch_size must be positive and probe_seq_len above 1")


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The context pair for `checkpoint(context_fn=...)` that saves matmul/attention outputs only."""
    return create_selective_checkpoint_contexts(_selective_policy)


def planned_context(cached: frozenset[int]):
    """The context pair for `checkpoint(context_fn=...)` that keeps the outputs of the block's ops number `cached`
    (numbered in forward order, as `record_block_ops` lists them) and recomputes every other op."""
    counter = itertools.count()

    def policy(ctx, op, *args, **kwargs):  # called once per op, in the forward only
        return CheckpointPolicy.MUST_SAVE if next(counter) in cached else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _checkpointed_forward(original, policy, *args: Any, **kwargs: Any):
    if policy == "none" or kwargs.get("cache") is not None or not torch.is_grad_enabled():
        return original(*args, **kwargs)
    if policy == "selective":
        context = {"context_fn": selective_context}
    elif isinstance(policy, frozenset):
        context = {"context_fn": functools.partial(planned_context, policy)}
    else:
        context = {}
    return checkpoint(original, *args, use_reentrant=False, **context, **kwargs)


def block_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(fqn, block) of the model's repeated block list: the children of the largest nn.ModuleList."""
    best: list[tuple[str, nn.Module]] = []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            best = [(f"{fqn}.{i}" if fqn else str(i), m) for i, m in enumerate(module)]
    return best


def wrap_block_(block: nn.Module, policy: str | frozenset[int]) -> None:
    """Run `block` under checkpointing `policy` ("none", "selective", "full", or a frozenset of the op numbers
    whose outputs a selective checkpoint keeps, as `plan_budget` chooses), in place (instance forward)."""
    if "forward" in block.__dict__:
        raise ValueError(f"{type(block).__name__} already has an instance forward (checkpointed or compiled); "
                         "revert_ that technique first")
    original = block.forward
    block.forward = functools.partial(_checkpointed_forward, original, policy)
    block._llmopt_checkpoint_policy = policy


def unwrap_block_(block: nn.Module) -> None:
    block.__dict__.pop("forward", None)
    block.__dict__.pop("_llmopt_checkpoint_policy", None)


# ---- the budget planner: per-op caching choices, costed, solved as a knapsack ---------------------

MATMUL_FLOPS_PER_S = 4e10
"""Cost model (used only to rank plans): matrix-product throughput of one CPU core, fp32 (measured ~3.7e10 here)."""
MEMORY_BYTES_PER_S = 1e10
"""Cost model: bytes an elementwise op reads + writes per second (mul ~4.7e10, silu ~0.4e10 here)."""
OP_OVERHEAD_S = 5e-6
"""Cost model: dispatching one recomputed op (eager, C++)."""
SELECTIVE_OP_OVERHEAD_S = 1e-4
"""Cost model: per op of a selective block, its trips through the caching and the cached dispatch modes (Python,
forward and recompute): measured here as selective checkpointing keeping nothing minus full checkpointing,
~12 ms per demo block of 65 ops at 8x128 tokens (~10% of the block's forward+backward)."""


def _op_flops(func, args, kwargs, out) -> float:
    from torch.utils.flop_counter import flop_registry

    if func in (aten._scaled_dot_product_flash_attention_for_cpu.default,):
        q, k = args[0], args[1]  # (B, H, T, D), (B, Hk, S, D): QK^T and PV, 2 FLOPs per multiply-add
        return 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    formula = flop_registry.get(getattr(func, "_overloadpacket", None))
    if formula is None:
        return 0.0
    try:
        return float(formula(*args, **kwargs, out_val=out))
    except Exception:  # a formula that does not fit this overload: count the op as elementwise
        return 0.0


def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class _OpRecorder(TorchDispatchMode):
    """Records every op a block's forward dispatches (in the order the caching mode of selective checkpointing
    numbers them: SAC_IGNORED_OPS skipped): its fresh output bytes, FLOPs and bytes moved; and, through a
    saved-tensor hook, the index of the last op before which autograd saved a tensor for backward."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[dict[str, Any]] = []
        self.last_pack = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.last_pack = len(self.ops)
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SAC_IGNORED_OPS:
            return out
        ins = _tensors((args, kwargs))
        in_storages = {t.untyped_storage().data_ptr() for t in ins}
        outs = _tensors(out)
        fresh = {}
        for t in outs:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in in_storages:
                fresh[ptr] = t.untyped_storage().nbytes()
        moved = sum(t.numel() * t.element_size() for t in ins + outs) if fresh else 0
        self.ops.append({"op": str(func), "bytes": float(sum(fresh.values())), "flops": _op_flops(func, args, kwargs, out),
                         "moved": float(moved), "fresh": bool(fresh) and len(fresh) == len(outs)})
        return out


def _op_cost(op: dict[str, Any]) -> float:
    return op["flops"] / MATMUL_FLOPS_PER_S + op["moved"] / MEMORY_BYTES_PER_S + OP_OVERHEAD_S


def record_block_ops(block: nn.Module, x: torch.Tensor, rest: list, kwargs: dict) -> tuple[list[dict[str, Any]], int]:
    """(ops of one forward of `block`, number of ops a recomputation runs before it has every tensor backward
    needs: ops from there on are never recomputed, non-reentrant checkpoint stops early)."""
    recorder = _OpRecorder()
    with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t), recorder:
        out = block.forward(x, *rest, **kwargs)
    del out
    return recorder.ops, recorder.last_pack


# ---- probing: saved bytes and FLOPs per block ---------------------------------------------------

def _saved_bytes(fn, exclude: set[int]) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


class _SavedOpBytes(TorchDispatchMode):
    """Counts the bytes of the outputs of SAVE_OPS (what the selective policy stores outside saved-tensor hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAVE_OPS:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.nbytes += t.untyped_storage().nbytes()
        return out


def probe_blocks(model: nn.Module, blocks: list[tuple[str, nn.Module]], batch_size: int, seq_len: int
                 ) -> dict[str, dict[str, float]]:
    """{block fqn: {"none"/"selective"/"full": saved bytes, "flops": forward matmul FLOPs,
    "selective_recompute_flops": FLOPs recomputed under selective, "ops"/"stop": `record_block_ops`}} at a
    (batch_size, seq_len) probe. Works for any modules of the model (blocks or their parts); modules the
    forward never calls are left out."""
    from torch.utils.flop_counter import FlopCounterMode

    seq_len = min(seq_len, getattr(getattr(model, "config", None), "max_seq_len", seq_len))
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2)
    inputs: dict[str, tuple] = {}
    handles = [block.register_forward_pre_hook(
        functools.partial(lambda fqn, _m, args, kwargs: inputs.__setitem__(fqn, (args, kwargs)), fqn),
        with_kwargs=True) for fqn, block in blocks]
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device))
    finally:
        for h in handles:
            h.remove()
    exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    result = {}
    for fqn, block in blocks:
        if fqn not in inputs:  # a part the forward never calls
            continue
        args, kwargs = inputs[fqn]
        x = args[0].detach().requires_grad_(True)
        rest = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:]]
        row = {}
        for policy in ("none", "full"):
            row[policy] = float(_saved_bytes(lambda: _checkpointed_forward(block.forward, policy, x, *rest, **kwargs),
                                             exclude))
        with _SavedOpBytes() as saved_ops:  # selective = the inputs full keeps + the saved ops' outputs
            block.forward(x.detach(), *rest, **kwargs)
        row["selective"] = min(row["none"], row["full"] + saved_ops.nbytes)
        with FlopCounterMode(display=False) as counter:
            block.forward(x.detach(), *rest, **kwargs)
        row["flops"] = float(counter.get_total_flops())
        row["selective_recompute_flops"] = 0.0  # every op the counter counts (matmul, attention) is saved
        ops, stop = record_block_ops(block, x.detach().requires_grad_(True), rest, kwargs)
        if _numbering_matches(block, ops, x, rest, kwargs):  # else: the planner keeps to none/selective/full
            row["ops"], row["stop"] = ops, stop
        result[fqn] = row
    return result


def probe_outside_blocks(model: nn.Module, blocks: list[tuple[str, nn.Module]], probe: dict[str, dict[str, float]],
                         batch_size: int, seq_len: int) -> float | None:
    """Saved bytes of a training forward outside the blocks (embedding, final norm, loss), or None if the
    model has no `loss(idx, targets)`. Measured with every block fully checkpointed: then the blocks save
    only their inputs (`probe[fqn]["full"]`, distinct storages), and the rest is what lies outside."""
    if not callable(getattr(model, "loss", None)):
        return None
    seq_len = min(seq_len, getattr(getattr(model, "config", None), "max_seq_len", seq_len))
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2)
    device = next(model.parameters()).device
    x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    for _, block in blocks:
        wrap_block_(block, "full")
    try:
        total = _saved_bytes(lambda: model.loss(x[:, :-1], x[:, 1:])[0], exclude)
    finally:
        for _, block in blocks:
            unwrap_block_(block)
    return max(0.0, total - sum(probe[fqn]["full"] for fqn, _ in blocks))


def _numbering_matches(block: nn.Module, ops: list[dict[str, Any]], x: torch.Tensor, rest: list, kwargs: dict) -> bool:
    """Whether selective checkpointing's caching mode sees the block's ops in the order `record_block_ops` numbered
    them (the planned policy keeps outputs by that number)."""
    seen: list[str] = []

    def policy(ctx, op, *args, **kw):
        seen.append(str(op))
        return CheckpointPolicy.PREFER_RECOMPUTE

    with torch.enable_grad():
        out = checkpoint(block.forward, x.detach().requires_grad_(True), *rest, use_reentrant=False,
                         context_fn=lambda: create_selective_checkpoint_contexts(policy), **kwargs)
    del out
    return seen == [op["op"] for op in ops]


def _block_options(row: dict[str, Any], unit: float, cells: int, rnd=math.ceil):
    """One block's cheapest option at every capacity 0..cells (in units of `unit` bytes, sizes rounded by `rnd`):
    (cost array, kind array 0 none / 1 full / 2 selective, and a function from a capacity to the plan value)."""
    inf = float("inf")
    cost = np.full(cells + 1, inf)
    kind = np.zeros(cells + 1, dtype=np.int8)
    none_u, full_u = rnd(row["none"] / unit), rnd(row["full"] / unit)
    ops = row.get("ops")
    if ops is None:  # coarse probe: the three whole-block policies
        full_cost = row["flops"] / MATMUL_FLOPS_PER_S
        sel_u = rnd(row["selective"] / unit)
        sac = np.full(cells + 1, inf)
        if sel_u <= cells:
            sac[sel_u:] = row["selective_recompute_flops"] / MATMUL_FLOPS_PER_S + SELECTIVE_OP_OVERHEAD_S
        choose_sac = lambda c: "selective"  # noqa: E731
    else:
        stop = row["stop"]
        full_cost = sum(_op_cost(op) for op in ops[:stop])
        items = [(i, rnd(op["bytes"] / unit), _op_cost(op)) for i, op in enumerate(ops[:stop])
                 if op["fresh"] and op["bytes"] > 0]
        items = [it for it in items if it[1] <= cells]
        dp = np.full(cells + 1, full_cost + len(ops) * SELECTIVE_OP_OVERHEAD_S)  # nothing kept: all, plus the modes
        keep = np.zeros((len(items), cells + 1), dtype=bool)
        for j, (_, w, v) in enumerate(items):  # 0/1 knapsack: cache op j (w units) to skip recomputing it (v)
            cand = dp[:cells + 1 - w] - v
            better = cand < dp[w:]
            keep[j, w:] = better
            dp[w:] = np.where(better, cand, dp[w:])
        sac = np.full(cells + 1, inf)
        if full_u <= cells:
            sac[full_u:] = dp[:cells + 1 - full_u]

        def choose_sac(c: int) -> frozenset[int]:
            r, chosen = c - full_u, []
            for j in range(len(items) - 1, -1, -1):
                if keep[j, r]:
                    chosen.append(items[j][0])
                    r -= items[j][1]
            return frozenset(chosen)
    if full_u <= cells:
        cost[full_u:], kind[full_u:] = full_cost, 1
    better = sac < cost
    cost, kind = np.where(better, sac, cost), np.where(better, 2, kind)
    if none_u <= cells:
        cost[none_u:], kind[none_u:] = 0.0, 0

    def choose(c: int):
        return ("none", "full", None)[kind[c]] or choose_sac(c)

    return cost, choose


def plan_budget(probe: dict[str, dict[str, Any]], budget: float, *, cells: int = 4096) -> dict[str, Any]:
    """Per block, the checkpointing that fits the blocks' saved bytes into `budget` at the least recompute cost.

    Options per block: none (cost 0); full (recompute every op); selective with any set of the block's ops
    whose outputs are kept (probe rows with "ops", from `record_block_ops`: each op kept costs its output bytes,
    each op recomputed costs its FLOPs / MATMUL_FLOPS_PER_S + bytes moved / MEMORY_BYTES_PER_S + OP_OVERHEAD_S, and
    a selective block SELECTIVE_OP_OVERHEAD_S per op for its dispatch modes;
    ops after the last tensor backward needs are never recomputed and cost nothing), or, for rows without
    "ops", the SAVE_OPS selective policy. Solved exactly on a grid of `cells` units of budget/cells bytes (sizes
    rounded up, so the plan's bytes never exceed the budget): a 0/1 knapsack per block, then a min-plus
    combination over blocks. Returns {fqn: "none" | "full" | "selective" | frozenset of kept op numbers}."""
    if budget <= 0 and any(row["full"] > 0 for row in probe.values()):
        raise ValueError(f"budget_bytes={budget} leaves nothing for the blocks' inputs; raise the budget")
    unit = max(float(budget), 1.0) / cells
    fqns = list(probe)
    # sizes rounded to the nearest unit first (exact fits stay feasible); if that plan overshoots, rounded up
    for rnd in (round, math.ceil):
        options = [_block_options(probe[f], unit, cells, rnd) for f in fqns]
        total, choices = options[0][0], []
        for cost, _ in options[1:]:
            # min over k of total[c - k] + cost[k]; cost only steps down at a few k, and total is non-increasing,
            # so within a step the smallest k is best
            steps = [k for k in range(cells + 1) if np.isfinite(cost[k]) and (k == 0 or cost[k] < cost[k - 1])]
            best, arg = np.full(cells + 1, np.inf), np.zeros(cells + 1, dtype=np.int64)
            for k in steps:
                cand = total[:cells + 1 - k] + cost[k]
                better = cand < best[k:]
                best[k:] = np.where(better, cand, best[k:])
                arg[k:] = np.where(better, k, arg[k:])
            total = best
            choices.append(arg)
        if np.isfinite(total[cells]):
            plan = _backtrack(fqns, options, choices, cells)
            if plan_bytes(probe, plan) <= budget:
                return plan
    need = sum(probe[f]["full"] for f in fqns)
    raise ValueError(f"budget_bytes={int(budget)} is below what full checkpointing of every block needs at the "
                     f"probe shape ({int(need)} bytes); raise the budget, or lower the batch or sequence length")


def _backtrack(fqns, options, choices, cells) -> dict[str, Any]:
    plan, c = {}, cells
    for b in range(len(fqns) - 1, 0, -1):
        k = int(choices[b - 1][c])
        plan[fqns[b]] = options[b][1](k)
        c -= k
    plan[fqns[0]] = options[0][1](c)
    return {f: plan[f] for f in fqns}


def plan_bytes(probe: dict[str, dict[str, Any]], plan: dict[str, Any]) -> float:
    """The blocks' saved bytes under `plan`, by the probe."""
    total = 0.0
    for f, p in plan.items():
        row = probe[f]
        total += (row[p] if isinstance(p, str) else row["full"] + sum(row["ops"][i]["bytes"] for i in p))
    return total


def _kept(row: dict[str, Any], p) -> set[int]:
    if p == "selective":
        names = {str(o) for o in SAVE_OPS}
        return {i for i, op in enumerate(row["ops"]) if op["op"] in names}
    return set() if p == "full" else set(p)


def plan_cost(probe: dict[str, dict[str, Any]], plan: dict[str, Any]) -> float:
    """The cost model's seconds of recomputation per probe step under `plan` (rows with the per-op record)."""
    total = 0.0
    for f, p in plan.items():
        row = probe[f]
        if p == "none":
            continue
        if "ops" not in row:
            total += (row["flops"] / MATMUL_FLOPS_PER_S if p == "full"
                      else row["selective_recompute_flops"] / MATMUL_FLOPS_PER_S + SELECTIVE_OP_OVERHEAD_S)
            continue
        kept = _kept(row, p)
        total += sum(_op_cost(op) for i, op in enumerate(row["ops"][:row["stop"]]) if i not in kept)
        total += 0.0 if p == "full" else len(row["ops"]) * SELECTIVE_OP_OVERHEAD_S
    return total


def plan_recompute(probe: dict[str, dict[str, Any]], plan: dict[str, Any]) -> tuple[float, float]:
    """(recomputed FLOPs, bytes moved by recomputed ops without FLOPs) per step under `plan`, by the probe."""
    flops = moved = 0.0
    for f, p in plan.items():
        row = probe[f]
        if p == "none":
            continue
        if "ops" not in row:
            flops += row["flops"] if p == "full" else row["selective_recompute_flops"]
            continue
        stop, kept = row["stop"], _kept(row, p)
        for i, op in enumerate(row["ops"][:stop]):
            if i not in kept:
                flops += op["flops"]
                moved += 0.0 if op["flops"] else op["moved"]
    return flops, moved

# ---- the technique --------------------------------------------------------------------------------

@register(ActivationCheckpointingConfig, name="checkpointing", stage=Stage.CHECKPOINTING, workload="train")
def apply_checkpointing(model: nn.Module, config: ActivationCheckpointingConfig, *, filter_fn=None) -> ApplyReport:
    """Wrap each decoder block's forward in torch.utils.checkpoint, per the config's policy."""
    report = ApplyReport()
    select = fqn_filter(include=config.include or None)
    blocks = []
    for fqn, block in block_list(model):
        if not select(block, fqn) or (filter_fn is not None and not filter_fn(block, fqn)):
            report.skipped[fqn] = "not included"
            continue
        blocks.append((fqn, block))
    if not blocks:
        return report
    on_meta = any(p.is_meta for p in model.parameters())
    if config.policy == "budget" and on_meta:
        raise ValueError("policy='budget' measures the blocks on a probe batch, which a meta-device model cannot "
                         "run; apply it after the weights are materialized, or use policy='full'/'selective'")
    probe = None if on_meta else probe_blocks(model, blocks, config.probe_batch_size, config.probe_seq_len)
    outside = None
    if config.policy == "budget":
        outside = probe_outside_blocks(model, blocks, probe, config.probe_batch_size, config.probe_seq_len)
        blocks_budget = config.budget_bytes - (outside or 0.0)
        if blocks_budget < 0:
            raise ValueError(f"budget_bytes={config.budget_bytes} is below what the step saves outside the blocks "
                             f"({int(outside)} bytes: embedding, final norm, loss) at the probe shape; raise the "
                             "budget, or shrink the loss's activations first (fused_ops' chunked cross-entropy)")
        plan = plan_budget(probe, blocks_budget) if config.units != "parts" else None
        if config.units != "blocks":
            parts = [(f"{fqn}.{name}", child) for fqn, block in blocks for name, child in block.named_children()]
            parts_probe = probe_blocks(model, parts, config.probe_batch_size, config.probe_seq_len)
            try:
                parts_plan = plan_budget(parts_probe, blocks_budget)
            except ValueError:
                if plan is None:
                    raise
                parts_plan = None
            if parts_plan is not None and (plan is None or plan_cost(parts_probe, parts_plan) < plan_cost(probe, plan)):
                plan, probe = parts_plan, parts_probe
                blocks = [(fqn, part) for fqn, part in parts if fqn in parts_plan]
    else:
        plan = {fqn: config.policy for fqn, _ in blocks}
    for fqn, block in blocks:
        if plan[fqn] == "none":
            report.skipped[fqn] = "fits the budget without checkpointing"
            continue
        wrap_block_(block, plan[fqn])
        name = type(block).__name__
        label = plan[fqn] if isinstance(plan[fqn], str) else f"selective, {len(plan[fqn])} op outputs kept"
        report.changed[fqn] = (name, f"{name}[checkpoint {label}]")
    if probe is not None:
        before = sum(probe[f]["none"] for f in plan)
        after = plan_bytes(probe, plan)
        recompute, moved = plan_recompute(probe, plan)
        forward = sum(probe[f]["flops"] for f in plan)
        counts = {p: sum(1 for f in plan if plan[f] == p) for p in POLICIES}
        planned = sum(1 for f in plan if isinstance(plan[f], frozenset))
        kept = ", ".join(sorted({f"{len(plan[f])} of {sum(op['fresh'] for op in probe[f]['ops'])}" for f in plan
                                 if isinstance(plan[f], frozenset)}))
        units = "blocks" if plan.keys() <= dict(block_list(model)).keys() else "block parts"
        modelled = f"; modelled recompute {1e3 * plan_cost(probe, plan):.0f} ms per probe step"
        report.notes.append(
            f"probe {config.probe_batch_size}x{config.probe_seq_len} tokens: {units} save {after / 2**20:.2f} MiB for "
            f"backward instead of {before / 2**20:.2f} MiB ({counts['full']} full, {counts['selective']} selective, "
            + (f"{planned} planned selective keeping {kept} op outputs, " if planned else "")
            + f"{counts['none']} plain); recompute +{recompute / 1e9:.3f} GFLOP per step "
            f"(+{100 * recompute / max(3 * forward, 1):.0f}% of the blocks' forward+backward matmul FLOPs)"
            + (f" and {moved / 2**20:.0f} MiB of elementwise traffic" if moved else "")
            + (modelled if config.policy == "budget" else ""))
        if config.policy == "budget":
            if outside is None:
                report.notes.append("the model has no loss(idx, targets): the budget covered the blocks only")
            else:
                report.notes.append(f"budget {config.budget_bytes / 2**20:.2f} MiB for the step: {outside / 2**20:.2f} "
                                    f"MiB outside the blocks + {after / 2**20:.2f} MiB in them = "
                                    f"{(outside + after) / config.budget_bytes:.3f}x of the budget")
    return report


@register_revert(ActivationCheckpointingConfig)
def revert_checkpointing(model: nn.Module, report: ApplyReport) -> ApplyReport:
    restored = ApplyReport()
    for fqn, (old, new) in report.changed.items():
        unwrap_block_(model.get_submodule(fqn))
        restored.changed[fqn] = (new, old)
    return restored


__all__ = ["ActivationCheckpointingConfig", "SAVE_OPS", "apply_checkpointing", "block_list", "plan_budget", "plan_bytes",
           "plan_cost", "plan_recompute", "planned_context", "probe_blocks", "probe_outside_blocks", "record_block_ops",
           "revert_checkpointing", "selective_context", "unwrap_block_", "wrap_block_"]
