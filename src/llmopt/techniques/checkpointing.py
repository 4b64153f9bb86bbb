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
the bytes each block saves for backward under no / selective / full checkpointing (saved-tensor hooks,
unique storages, parameters excluded), then picks per block, greedily: selective first (it costs
almost no matmul FLOPs), then full, until the step's saved bytes fit `budget_bytes`. The budget is for the
whole step: what the model saves outside the blocks (embedding, final norm, loss; measured once with every
block fully checkpointed) is subtracted first. Saved bytes scale with batch x sequence, so give the probe
the shape you train with.

With a KV cache (inference) or under `torch.no_grad()` the block runs plainly.

Numerics contract: exact. The recomputation repeats the same ops on the same inputs (RNG state is
restored by `checkpoint`), so logits, loss and gradients are bitwise those of the unwrapped model
(tests/test_checkpointing.py checks gradient equality in fp32). Cost: the report notes the recomputed
matmul FLOPs per probe step (as counted by `torch.utils.flop_counter`; elementwise ops are not counted).
Stage CHECKPOINTING: after surgery (LoRA, quantization), before compile. Reversible.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

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
    "budget": choose per block (none / selective / full) so that saved activations fit budget_bytes."""
    budget_bytes: int | None = None
    """policy="budget": bytes the whole training step may save for backward at the probe shape: the blocks
    plus what lies outside them (embedding, final norm, loss), which checkpointing the blocks cannot reduce."""
    probe_batch_size: int = 8
    """policy="budget": batch size of the probe that measures each block's saved bytes."""
    probe_seq_len: int = 128
    """policy="budget": sequence length of the probe (capped at model.config.max_seq_len)."""
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


def _checkpointed_forward(original, policy: str, *args: Any, **kwargs: Any):
    if policy == "none" or kwargs.get("cache") is not None or not torch.is_grad_enabled():
        return original(*args, **kwargs)
    context = {"context_fn": selective_context} if policy == "selective" else {}
    return checkpoint(original, *args, use_reentrant=False, **context, **kwargs)


def block_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(fqn, block) of the model's repeated block list: the children of the largest nn.ModuleList."""
    best: list[tuple[str, nn.Module]] = []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            best = [(f"{fqn}.{i}" if fqn else str(i), m) for i, m in enumerate(module)]
    return best


def wrap_block_(block: nn.Module, policy: str) -> None:
    """Run `block` under checkpointing `policy` ("none", "selective", "full"), in place (instance forward)."""
    if "forward" in block.__dict__:
        raise ValueError(f"{type(block).__name__} already has an instance forward (checkpointed or compiled); "
                         "revert_ that technique first")
    original = block.forward
    block.forward = functools.partial(_checkpointed_forward, original, policy)
    block._llmopt_checkpoint_policy = policy


def unwrap_block_(block: nn.Module) -> None:
    block.__dict__.pop("forward", None)
    block.__dict__.pop("_llmopt_checkpoint_policy", None)


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
    "selective_recompute_flops": FLOPs recomputed under selective}} at a (batch_size, seq_len) probe."""
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


def plan_budget(probe: dict[str, dict[str, float]], budget: int) -> dict[str, str]:
    """Greedy per-block policy: selective where needed (cheapest recompute), then full, until saved bytes fit."""
    plan = {fqn: "none" for fqn in probe}

    def total() -> float:
        return sum(probe[f][plan[f]] for f in plan)

    for target in ("selective", "full"):
        for fqn in plan:
            if total() <= budget:
                return plan
            if probe[fqn][target] < probe[fqn][plan[fqn]]:
                plan[fqn] = target
    if total() > budget:
        raise ValueError(f"budget_bytes={budget} is below what full checkpointing of every block needs at the probe "
                         f"shape ({int(total())} bytes); raise the budget, or lower the batch or sequence length")
    return plan


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
        plan = plan_budget(probe, blocks_budget)
    else:
        plan = {fqn: config.policy for fqn, _ in blocks}
    for fqn, block in blocks:
        if plan[fqn] == "none":
            report.skipped[fqn] = "fits the budget without checkpointing"
            continue
        wrap_block_(block, plan[fqn])
        name = type(block).__name__
        report.changed[fqn] = (name, f"{name}[checkpoint {plan[fqn]}]")
    if probe is not None:
        before = sum(probe[f]["none"] for f in plan)
        after = sum(probe[f][plan[f]] for f in plan)
        recompute = sum(probe[f]["flops"] if plan[f] == "full" else probe[f]["selective_recompute_flops"]
                        for f in plan if plan[f] != "none")
        forward = sum(probe[f]["flops"] for f in plan)
        counts = {p: sum(1 for f in plan if plan[f] == p) for p in POLICIES}
        report.notes.append(
            f"probe {config.probe_batch_size}x{config.probe_seq_len} tokens: blocks save {after / 2**20:.2f} MiB for "
            f"backward instead of {before / 2**20:.2f} MiB ({counts['full']} full, {counts['selective']} selective, "
            f"{counts['none']} plain); recompute +{recompute / 1e9:.3f} GFLOP per step "
            f"(+{100 * recompute / max(3 * forward, 1):.0f}% of the blocks' forward+backward matmul FLOPs)")
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


__all__ = ["ActivationCheckpointingConfig", "SAVE_OPS", "apply_checkpointing", "block_list", "plan_budget",
           "probe_blocks", "revert_checkpointing", "selective_context", "unwrap_block_", "wrap_block_"]
