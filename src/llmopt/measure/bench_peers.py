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
