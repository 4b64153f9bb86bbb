"""Peers: other libraries doing the same job, run as extra columns of a bench (kind "peer").

A peer is a function `module:function` that takes the same keyword arguments as the workload function
of its workload (`llmopt.measure.workloads.run_train`, `run_generate`, `run_eval`) and returns the same
figures, so its row lines up with the baseline's. It runs in a fresh subprocess per repeat like every
other run. A peer whose packages are not installed becomes a skipped row with the reason, never an
error.

    register_peer("transformers", "train", "llmopt.measure.bench_peers:transformers_train",
                  requires=["transformers"])

`requires` names importable modules (`galore_torch`, `torch_optimizer`, not the distribution names).
`techniques`, when given, limits the peer to benches of those techniques (a peft LoRA column belongs
next to `lora`, not next to `compile`); without it the peer joins every bench of its workload.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from typing import Any

import torch

from llmopt.core.registry import WORKLOADS


@dataclass(frozen=True)
class Peer:
    """One registered peer."""

    name: str
    """Column name in the report, e.g. "transformers"."""
    workload: str
    """"train", "generate" or "eval"."""
    fn: str
    """`module:function` called in the subprocess with the workload's keyword arguments."""
    requires: tuple[str, ...] = ("transformers",)
    """Modules that must be importable; a missing one skips the peer with the reason."""
    description: str = ""
    """One line for the report."""
    techniques: tuple[str, ...] = ()
    """Technique names this peer is a counterpart of; empty: every bench of the workload."""

    def missing(self) -> str | None:
        """Why the peer cannot run here ("peft is not installed (pip install peft)"), or None."""
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return f"{module} is not installed (pip install {module.replace('_', '-')})"
        return None


_PEERS: dict[tuple[str, str], Peer] = {}


def register_peer(name: str, workload: str, fn: str, *, requires: list[str] | tuple[str, ...] = ("transformers",),
                  description: str = "", techniques: list[str] | tuple[str, ...] = ()) -> Peer:
    """Register `fn` ("module:function") as the peer `name` of `workload`; registering twice raises."""
    if workload not in WORKLOADS:
        raise ValueError(f"peer workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if ":" not in fn:
        raise ValueError(f"peer fn must look like 'package.module:function', got {fn!r}")
    if (name, workload) in _PEERS:
        raise ValueError(f"a peer {name!r} for the {workload} workload is already registered "
                         f"({_PEERS[name, workload].fn})")
    peer = Peer(name=name, workload=workload, fn=fn, requires=tuple(requires), description=description,
                techniques=tuple(techniques))
    _PEERS[name, workload] = peer
    return peer


def unregister_peer(name: str, workload: str) -> None:
    """Remove a peer (tests register throwaway ones)."""
    _PEERS.pop((name, workload), None)


def registered_peers(workload: str | None = None) -> list[Peer]:
    """Every peer, or those of one workload, in registration order."""
    return [p for (_, w), p in _PEERS.items() if workload is None or w == workload]


def select_peers(selection: str, workload: str, techniques: set[str]) -> list[Peer]:
    """Peers of `workload` for a bench of `techniques`: `selection` is "all", "none" or "a,b".

    Naming a peer that has no function for this workload is a ValueError (exit status 2 at the CLI).
    """
    if selection == "none":
        return []
    if selection == "all":
        return [p for p in registered_peers(workload) if not p.techniques or set(p.techniques) & techniques]
    chosen = []
    for name in [s.strip() for s in selection.split(",") if s.strip()]:
        if (name, workload) not in _PEERS:
            known = sorted({n for n, _ in _PEERS})
            if name not in known:
                raise ValueError(f"--peers {name!r}: no such peer; registered: {', '.join(known) or 'none'}")
            can = sorted(w for n, w in _PEERS if n == name)
            raise ValueError(f"--peers {name!r} cannot run the {workload} workload (it has: {', '.join(can)}); "
                             "drop it or pick another --workload")
        chosen.append(_PEERS[name, workload])
    return chosen


# ---- transformers ------------------------------------------------------------------------------
class HFCausalLM(torch.nn.Module):
    """A `transformers` causal LM behind llmopt's `loss(idx, targets) -> (loss sum, tokens)`.

    The loss is computed by transformers itself, `model(input_ids, labels=targets, shift_labels=targets)`
    (targets are already shifted, as in llmopt), and turned back into a sum so that gradient
    accumulation and evaluation are the same lines as for llmopt models.
    """

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx).logits

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
        count = (targets != ignore_index).sum()
        mean = self.hf(input_ids=idx, labels=targets, shift_labels=targets).loss
        return mean * count, count


def _hf_model(run):
    """The llmopt baseline model of `run` (same seed or pretrained source), converted with `to_hf`."""
    from llmopt.measure.workloads import build_base_model
    from llmopt.models.hf import to_hf

    hf = to_hf(build_base_model(run))
    hf.generation_config.eos_token_id = None  # exactly N new tokens, as on the llmopt side
    hf.generation_config.pad_token_id = 0
    return hf


def transformers_train(*, run: dict[str, Any], techniques: list[str], data_path: str, warmup_steps: int, steps: int,
                       eval_every: int, peak_flops: float | None = None) -> dict[str, Any]:
    """The baseline's training on the same weights, optimizer and batches, through `transformers`."""
    from llmopt.measure.workloads import load_data, train_and_measure
    from llmopt.train import RunConfig

    cfg = RunConfig.from_dict(run)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train_ids, val_ids = load_data(data_path)
    model = HFCausalLM(_hf_model(cfg).train())
    figures = train_and_measure(model, cfg, train_ids, val_ids, hooks=[], warmup_steps=warmup_steps, steps=steps,
                                eval_every=eval_every, peak_flops=peak_flops)
    figures["applied"] = [f"transformers {type(model.hf).__name__}, attention {model.hf.config._attn_implementation}"]
    return figures


class _FirstTokenClock:
    """A transformers streamer that stamps the arrival of the first generated token (after the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def transformers_generate(*, run: dict[str, Any], techniques: list[str], data_path: str, prompt_len: int,
                          new_tokens: int, batch_size: int, warmup: int, steps: int) -> dict[str, Any]:
    """Greedy `hf.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` on the same weights."""
    from llmopt.measure.workloads import load_data, measure_generate, prompt_batch
    from llmopt.train import RunConfig

    cfg = RunConfig.from_dict(run)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    _, val_ids = load_data(data_path)
    hf = _hf_model(cfg).eval()
    prompt = prompt_batch(val_ids, batch_size, prompt_len).to(cfg.train.device)
    mask = torch.ones_like(prompt)
    cuda = torch.device(cfg.train.device).type == "cuda"

    def call():
        clock = _FirstTokenClock()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, streamer=clock)
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        prefill_s, decode_s = clock.first - start, end - clock.first
        return (batch_size * prompt_len / prefill_s, batch_size * (new_tokens - 1) / decode_s if decode_s else 0.0,
                out[:, prompt_len:].tolist())

    figures = measure_generate(call, warmup=warmup, steps=steps, new_tokens=new_tokens, batch_size=batch_size,
                               cuda=cuda)
    figures["applied"] = [f"transformers {type(hf).__name__}.generate, attention {hf.config._attn_implementation}"]
    return figures


register_peer("transformers", "train", "llmopt.measure.bench_peers:transformers_train",
              description="LlamaForCausalLM on the same weights (to_hf), model(input_ids, labels=...), same "
                          "optimizer and batches")
register_peer("transformers", "generate", "llmopt.measure.bench_peers:transformers_generate",
              description="LlamaForCausalLM.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N) on the "
                          "same weights")


# ---- fine-tuning and optimizer peers (issue 5) --------------------------------------------------
# Each trains the bench's own llmopt base model (same weights, data, loop and hyperparameters as the
# baseline) with one piece swapped for the other library's: PEFT's adapters instead of ours, or another
# optimizer through `llmopt.optim.register_external_optimizer`. The adapter peers use our configs'
# defaults (r=8, alpha=16, dropout 0; targets: q_proj and v_proj for LoRA, every Linear but lm_head for DoRA
# and QLoRA, as their papers do), as `llmopt bench lora dora qlora` does; the QLoRA peer quantizes what
# QLoRAConfig's default `quantize` does (every Linear but lm_head).
def _adapter_targets(model: torch.nn.Module, patterns: tuple[str, ...] | None = None) -> list[str]:
    """Full names of the nn.Linear modules our adapters take by default (or that `patterns` select)."""
    from llmopt.core import fqn_filter
    from llmopt.techniques.lora import LoRAConfig

    default = LoRAConfig()
    select = fqn_filter(include=patterns or default.target, exclude=default.exclude)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and select(m, n)]


def _nf4_linear(linear: torch.nn.Linear) -> torch.nn.Module:
    """bitsandbytes Linear4bit (NF4, double-quantized scales, fp32 compute) holding `linear`'s weight."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu", torch.float32).clone(), requires_grad=False,
                                 quant_type="nf4", compress_statistics=True)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(linear.weight.device)  # the move quantizes


def _peft_train(*, run, data_path, warmup_steps, steps, eval_every, peak_flops, dora=False, nf4=False):
    from peft import LoraConfig, inject_adapter_in_model

    from llmopt.measure.workloads import build_base_model, load_data, train_and_measure
    from llmopt.techniques.lora import LoRAConfig
    from llmopt.train import RunConfig

    cfg = RunConfig.from_dict(run)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train_ids, val_ids = load_data(data_path)
    model = build_base_model(cfg)
    from llmopt.techniques.dora import DoRAConfig
    from llmopt.techniques.qlora import QLoRAConfig as _QLoRAConfig

    targets = _adapter_targets(model, (DoRAConfig if dora else _QLoRAConfig if nf4 else LoRAConfig)().target)
    if nf4:
        from llmopt.techniques.qlora import QLoRAConfig

        quantized = _adapter_targets(model, QLoRAConfig().quantize)
        for name in quantized:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, _nf4_linear(getattr(owner, leaf)))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, use_dora=dora)
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():  # PEFT's own rule, stated: only the adapters train
        p.requires_grad_("lora_" in name)
    figures = train_and_measure(model, cfg, train_ids, val_ids, hooks=[], warmup_steps=warmup_steps, steps=steps,
                                eval_every=eval_every, peak_flops=peak_flops)
    what = f"bitsandbytes Linear4bit (nf4, double quant) on {len(quantized)} Linear + " if nf4 else ""
    figures["applied"] = [f"{what}peft inject_adapter_in_model LoraConfig(r=8, lora_alpha=16, use_dora={dora}) "
                          f"on {len(targets)} Linear"]
    return figures


def peft_lora_train(*, run, techniques, data_path, warmup_steps, steps, eval_every, peak_flops=None):
    """PEFT LoRA (r=8, alpha=16) on the bench's llmopt model, in place of ours."""
    return _peft_train(run=run, data_path=data_path, warmup_steps=warmup_steps, steps=steps, eval_every=eval_every,
                       peak_flops=peak_flops)


def peft_dora_train(*, run, techniques, data_path, warmup_steps, steps, eval_every, peak_flops=None):
    """PEFT DoRA (use_dora=True) on the bench's llmopt model."""
    return _peft_train(run=run, data_path=data_path, warmup_steps=warmup_steps, steps=steps, eval_every=eval_every,
                       peak_flops=peak_flops, dora=True)


def bnb_qlora_train(*, run, techniques, data_path, warmup_steps, steps, eval_every, peak_flops=None):
    """bitsandbytes Linear4bit (NF4 + double quant) base weights with PEFT LoRA on top."""
    return _peft_train(run=run, data_path=data_path, warmup_steps=warmup_steps, steps=steps, eval_every=eval_every,
                       peak_flops=peak_flops, nf4=True)


def _bnb_adamw8bit(groups, oc, model):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)


def _torchao_adamw8bit(groups, oc, model):
    from torchao.optim import AdamW8bit

    class TorchaoAdamW8bit(AdamW8bit):
        """torchao keeps each group's lr as a tensor (its compiled step reads it) and refuses a float, which
        is what llmopt's loop writes for the schedule: put the float back into the group's own tensor."""

        def step(self, closure=None):
            for group, lr in zip(self.param_groups, self._lr_tensors):
                if not isinstance(group["lr"], torch.Tensor):
                    lr.fill_(group["lr"])
                    group["lr"] = lr
            return super().step(closure)

    opt = TorchaoAdamW8bit(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)
    opt._lr_tensors = [g["lr"] if isinstance(g["lr"], torch.Tensor) else torch.tensor(float(g["lr"]))
                       for g in opt.param_groups]
    for group, lr in zip(opt.param_groups, opt._lr_tensors):
        group["lr"] = lr
    return opt


def _galore_torch(groups, oc, model):
    import galore_torch

    from llmopt.optim import galore_param_groups

    ours = galore_param_groups(model, rank=oc.rank, update_proj_gap=oc.update_proj_gap, scale=oc.scale,
                               weight_decay=oc.weight_decay)
    # galore-torch treats every group with a "rank" key as projected and reads its own key names
    peer = [{"params": g["params"], "weight_decay": g.get("weight_decay", 0.0), "rank": oc.rank,
             "update_proj_gap": oc.update_proj_gap, "scale": oc.scale, "proj_type": "std"}
            if g.get("rank") else {"params": g["params"], "weight_decay": g.get("weight_decay", 0.0)} for g in ours]
    return galore_torch.GaLoreAdamW(peer, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)


def _torch_optimizer_lamb(groups, oc, model):
    import torch_optimizer

    return torch_optimizer.Lamb(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)


def _torch_optimizer_novograd(groups, oc, model):
    import torch_optimizer

    return torch_optimizer.NovoGrad(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)


_OPTIMIZER_PEERS = {"bnb_adamw8bit": _bnb_adamw8bit, "torchao_adamw8bit": _torchao_adamw8bit,
                    "galore_torch": _galore_torch, "torch_optimizer_lamb": _torch_optimizer_lamb,
                    "torch_optimizer_novograd": _torch_optimizer_novograd}


def _optimizer_peer(name: str, doc: str):
    """The train-workload peer function that runs the baseline with optimizer `name` of `_OPTIMIZER_PEERS`."""
    def train(*, run, techniques, data_path, warmup_steps, steps, eval_every, peak_flops=None):
        from llmopt.measure.workloads import run_train
        from llmopt.optim import register_external_optimizer

        register_external_optimizer(name, _OPTIMIZER_PEERS[name])
        run = dict(run, optim=dict(run["optim"], name=name))
        figures = run_train(run=run, techniques=[], data_path=data_path, warmup_steps=warmup_steps, steps=steps,
                            eval_every=eval_every, peak_flops=peak_flops)
        figures["applied"] = [f"optimizer {name} (same lr, betas, eps and weight-decay groups as the baseline)"]
        return figures
    train.__name__ = train.__qualname__ = f"{name}_train"
    train.__doc__ = doc
    return train


bnb_adamw8bit_train = _optimizer_peer("bnb_adamw8bit", "bitsandbytes AdamW8bit (its CPU kernels) in llmopt's loop.")
torchao_adamw8bit_train = _optimizer_peer("torchao_adamw8bit", "torchao AdamW8bit (torch.compile per parameter "
                                                               "shape: the first step compiles) in llmopt's loop.")
galore_torch_train = _optimizer_peer("galore_torch", "galore-torch GaLoreAdamW (full SVD refresh) on the weights "
                                                     "our galore projects, same rank, gap and scale.")
torch_optimizer_lamb_train = _optimizer_peer("torch_optimizer_lamb", "torch-optimizer's Lamb in llmopt's loop.")
torch_optimizer_novograd_train = _optimizer_peer("torch_optimizer_novograd",
                                                 "torch-optimizer's NovoGrad in llmopt's loop.")


_M = "llmopt.measure.bench_peers:"
register_peer("peft_lora", "train", _M + "peft_lora_train", requires=["peft"], techniques=["lora"],
              description="PEFT LoraConfig(r=8, lora_alpha=16) injected into the same llmopt model")
register_peer("peft_dora", "train", _M + "peft_dora_train", requires=["peft"], techniques=["dora"],
              description="PEFT LoraConfig(use_dora=True) injected into the same llmopt model")
register_peer("bnb_qlora", "train", _M + "bnb_qlora_train", requires=["peft", "bitsandbytes"], techniques=["qlora"],
              description="bitsandbytes Linear4bit (nf4, double quant, fp32 compute) + PEFT LoRA r=8")
register_peer("bnb_adamw8bit", "train", _M + "bnb_adamw8bit_train", requires=["bitsandbytes"],
              techniques=["adamw8bit"], description="bitsandbytes AdamW8bit (CPU kernels)")
register_peer("torchao_adamw8bit", "train", _M + "torchao_adamw8bit_train", requires=["torchao"],
              techniques=["adamw8bit"], description="torchao AdamW8bit (compiles per parameter shape)")
register_peer("galore_torch", "train", _M + "galore_torch_train", requires=["galore_torch"], techniques=["galore"],
              description="galore-torch GaLoreAdamW, same rank, update gap, scale and projected weights")
register_peer("torch_optimizer_lamb", "train", _M + "torch_optimizer_lamb_train", requires=["torch_optimizer"],
              techniques=["lamb"], description="torch-optimizer Lamb")
register_peer("torch_optimizer_novograd", "train", _M + "torch_optimizer_novograd_train",
              requires=["torch_optimizer"], techniques=["novograd"], description="torch-optimizer NovoGrad")
