"""Buffer reuse against allocator fragmentation: sequence-length bucketing, allocator settings, heap trimming.

Variable-length batches ask the allocator for a different set of sizes every step; a caching
allocator (CUDA) or malloc arenas (CPU) keep the odd-sized free blocks, and the resident memory
creeps above what the step needs. What this technique does, and only that:
- bucketing (`BufferReuseHook.before_forward`): each batch is padded on the right to the next of a few
  bucket lengths (`llmopt.techniques.compile.bucket_pad`: inputs with `pad_id`, targets with -100, so
  the loss sum and the token count are unchanged), so the step only ever allocates a handful of sizes
  and a freed block fits the next step's request;
- allocator settings, reported: on CUDA, `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (segments grow
  in place instead of fragmenting; pytorch PR #96995) is set if CUDA is not initialized yet, and the
  report says when it is too late; on CPU with glibc, `mallopt(M_ARENA_MAX, arenas)` caps the malloc
  arenas (the runtime form of `MALLOC_ARENA_MAX`) and `malloc_trim(0)` after every `trim_every`
  optimizer steps returns freed heap pages to the OS;
- a preallocated logits workspace (`loss_chunks`, default on): the loss becomes the chunked linear +
  cross-entropy of `llmopt.kernels.cross_entropy` writing every chunk's fp32 logits into one
  `LogitsWorkspace` buffer (chunk rows x vocab, allocated once, reused by every chunk of every step), so
  the step never allocates the (tokens, vocab) logits, their log-softmax and their gradient: at a
  variable length those are the largest and the most variably sized blocks of the step. When `fused_ops`
  has already replaced the loss it is left alone (its chunked loss, without the shared buffer);
- measurement: the hook logs the resident set (`rss_bytes`) per step; `benchmarks/bench_buffer_reuse.py`
  compares peak RSS with variable-length batches, default vs this technique, at equal step time.
The KV cache (`llmopt.inference.KVCache`) is already allocated once at its full size; it is not duplicated.

- a caching CPU allocator (`allocator="auto"`, `llmopt.kernels.cpu_allocator`): PyTorch uses the system
  malloc on CPU, which either unmaps a large freed block (and the next step faults fresh pages in) or keeps
  it on the heap (where the next batch's other shapes fragment it); the caching allocator keeps freed
  pages mapped and carves later blocks of any size out of them, as the CUDA caching allocator does on a GPU.

Numerics contract: bucketing is exact (padding is masked out of the loss; logits of the real positions are
those of the unpadded batch, causal attention never looks right); the chunked loss equals the reference
up to float reordering (1e-5 relative, tests/kernels/test_cross_entropy.py). No module changes: the
technique adds a hook and replaces `model.loss_fn` (restored by `revert_`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from llmopt.core import ApplyReport, Hook, Stage, TechniqueConfig, register, register_revert
from llmopt.kernels.cross_entropy import LogitsWorkspace, default_chunk_size, fused_linear_cross_entropy
from llmopt.models.loss import linear_cross_entropy
from llmopt.techniques.compile import bucket_lengths, bucket_pad

M_ARENA_MAX = -8
"""glibc's mallopt parameter number for the arena cap (malloc.h)."""
M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number for the mmap threshold (malloc.h)."""


@dataclass(frozen=True, kw_only=True)
class BufferReuseConfig(TechniqueConfig):
    """Buffer reuse: pad variable-length batches to a few bucket lengths, tune and trim the allocator."""

    bucketing: Literal["pow2", "multiple", "none"] = "multiple"
    """Bucket lengths: powers of two, or multiples of `bucket_multiple`; "none" pads nothing (the caching
    allocator serves any size from its arena, so bucketing only costs the padded positions' compute)."""
    bucket_multiple: int = 16
    """Bucket step for bucketing="multiple"."""
    max_len: int | None = None
    """Longest bucket; None means the model's max_seq_len."""
    pad_id: int = 0
    """Token id the inputs are padded with (targets get -100)."""
    trim_every: int = 0
    """CPU/glibc: call malloc_trim(0) after every this many optimizer steps (0: never; with the caching
    allocator only small blocks are left on the heap, and a trim costs CPU time: measured +29% with the
    fixed mmap threshold)."""
    malloc_arenas: int | None = 2
    """CPU/glibc: cap malloc arenas at this number (mallopt M_ARENA_MAX); None leaves glibc's default."""
    mmap_threshold: int | None = None
    """CPU/glibc: serve every allocation of at least this many bytes with its own mmap, returned to the OS
    on free (mallopt M_MMAP_THRESHOLD). Setting it also freezes it: by default glibc raises the threshold
    to the size of each mmap'ed block freed (up to 32 MiB), after which freed activations of a few MiB
    stay in the heap and the resident set grows. None (default) leaves glibc's dynamic threshold: with the
    caching allocator large blocks never reach malloc, and without it 256 KiB gives 0.80x of the peak for
    +34-64% CPU time per step (page faults), measured in docs/techniques/buffer_reuse.md."""

    allocator: Literal["auto", "caching", "system"] = "auto"
    """CPU: "caching" installs llmopt's caching CPU allocator (`llmopt.kernels.cpu_allocator`: blocks of at
    least `allocator_min_bytes` are carved best-fit out of one arena whose freed pages stay mapped, so a step
    neither faults in fresh pages nor keeps odd-sized free blocks); "system" keeps malloc; "auto" is "caching"
    where it builds (a C++ compiler and torch's headers), else "system". Process-wide, like the glibc settings."""
    allocator_min_bytes: int = 64 * 1024
    """Smallest request the caching allocator serves (smaller ones go to the system malloc)."""

    trim_before_backward: bool = False
    """CPU/glibc: also call malloc_trim(0) right after the loss is computed (the forward is done, its
    temporaries are freed, and the step is about to reach its peak in the backward)."""

    loss_chunks: bool = True
    """Replace the full-logits loss with the chunked linear + cross-entropy over one preallocated logits buffer."""
    loss_chunk_rows: int = 0
    """Rows per loss chunk (0: 4 MiB of fp32 logits, at least 16 rows: the workspace and the chunk's
    gradient are live at the step's peak, and 4 MiB chunks cost no measurable time against 16 MiB ones)."""

    def __post_init__(self) -> None:
        if self.loss_chunk_rows < 0:
            raise ValueError(f"loss_chunk_rows must be >= 0 (0: automatic), got {self.loss_chunk_rows}")
        if self.bucket_multiple <= 0 or self.trim_every < 0:
            raise ValueError("bucket_multiple must be positive and trim_every >= 0")
        if self.malloc_arenas is not None and self.malloc_arenas <= 0:
            raise ValueError("malloc_arenas must be positive or None")
        if self.allocator not in ("auto", "caching", "system"):
            raise ValueError(f"allocator must be auto, caching or system, got {self.allocator!r}")
        if self.allocator_min_bytes < 4096:
            raise ValueError(f"allocator_min_bytes must be >= 4096, got {self.allocator_min_bytes}")
        if self.mmap_threshold is not None and not 0 < self.mmap_threshold <= 32 * 2**20:
            raise ValueError(f"mmap_threshold must be in (0, 32 MiB] (glibc's limit) or None, got {self.mmap_threshold}")


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc), 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class BufferReuseHook(Hook):
    """Pads each batch to its bucket; trims the glibc heap every `trim_every` steps; logs RSS."""

    def __init__(self, buckets: tuple[int, ...], *, pad_id: int = 0, trim_every: int = 1) -> None:
        self.buckets, self.pad_id, self.trim_every = tuple(buckets), pad_id, trim_every
        self._libc = _libc() if trim_every else None

    def before_forward(self, state: Any, batch: Any) -> Any:
        return bucket_pad(batch, self.buckets, pad_id=self.pad_id) if self.buckets else batch

    def after_optimizer_step(self, state: Any) -> None:
        if self._libc is not None and (state.step + 1) % self.trim_every == 0:
            self._libc.malloc_trim(0)
        state.metrics["rss_bytes"] = rss_bytes()


def configure_allocator(device_type: str, malloc_arenas: int | None, mmap_threshold: int | None = None) -> list[str]:
    """Apply the allocator settings that matter on this device; one note per setting (what was done or why not)."""
    notes = []
    if device_type == "cuda" or torch.cuda.is_available():
        current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        if "expandable_segments" in current:
            notes.append(f"PYTORCH_CUDA_ALLOC_CONF={current} (already set)")
        elif torch.cuda.is_initialized():
            notes.append("CUDA is already initialized: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the "
                         "environment before the process starts (too late to change it now)")
        else:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(filter(None, [current, "expandable_segments:True"]))
            notes.append("set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA init")
    libc = _libc()
    if libc is None:
        notes.append("no glibc: malloc arenas and trimming left to the system allocator")
    elif malloc_arenas is not None:
        ok = libc.mallopt(M_ARENA_MAX, malloc_arenas)
        notes.append(f"glibc mallopt(M_ARENA_MAX, {malloc_arenas}) {'set' if ok else 'refused'}")
    if libc is not None and mmap_threshold is not None:
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        notes.append(f"glibc mallopt(M_MMAP_THRESHOLD, {mmap_threshold}) {'set' if ok else 'refused'} (fixed: "
                     "blocks of that size and more go back to the OS when freed)")
    return notes


def _trimmed_loss(loss_fn, libc, *args, **kwargs):
    out = loss_fn(*args, **kwargs)
    if torch.is_grad_enabled():
        libc.malloc_trim(0)
    return out


@register(BufferReuseConfig, name="buffer_reuse", stage=Stage.SURGERY, workload="train")
def apply_buffer_reuse(model: nn.Module, config: BufferReuseConfig, *, filter_fn=None) -> ApplyReport:
    """Add the bucketing/trimming hook and apply the allocator settings (process-wide: listed in the notes)."""
    report = ApplyReport()
    max_len = config.max_len or getattr(getattr(model, "config", None), "max_seq_len", 2048)
    buckets = (() if config.bucketing == "none" else
               bucket_lengths(max_len, config.bucketing, multiple=config.bucket_multiple, min_len=16) + (max_len,))
    report.hooks.append(BufferReuseHook(buckets, pad_id=config.pad_id, trim_every=config.trim_every))
    device = next(model.parameters()).device.type if next(model.parameters(), None) is not None else "cpu"
    if device != "meta":
        report.notes.extend(configure_allocator(device, config.malloc_arenas, config.mmap_threshold))
    if device == "cpu" and config.allocator != "system":
        from llmopt.kernels import cpu_allocator

        if not cpu_allocator.available():
            if config.allocator == "caching":
                cpu_allocator.install()  # raises the one-line ImportError: what to install, or allocator=system
            report.skipped["allocator"] = "the caching CPU allocator does not build here (no C++ compiler or torch headers)"
        else:
            newly = cpu_allocator.install(config.allocator_min_bytes)
            report.revert_state["allocator_installed"] = newly
            report.notes.append(f"caching CPU allocator {'installed' if newly else 'already installed'} (blocks of "
                                f">= {config.allocator_min_bytes} bytes come from one arena whose freed pages are reused)")
    report.notes.append(f"{len(buckets)} bucket lengths up to {max_len} ({config.bucketing})" if buckets else
                        "no bucketing: batches keep their lengths")
    loss_fn = getattr(model, "loss_fn", None)
    if config.loss_chunks:
        vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
        if loss_fn is None:
            report.skipped["loss_fn"] = "the model has no loss_fn (the llmopt model contract) to replace"
        elif loss_fn is not linear_cross_entropy:
            report.skipped["loss_fn"] = (f"model.loss_fn is already {getattr(loss_fn, '__name__', type(loss_fn).__name__)} "
                                         "(fused_ops?): left alone")
        else:
            workspace = LogitsWorkspace()
            rows = config.loss_chunk_rows or max(16, default_chunk_size(1 << 30, max(vocab, 1)) // 4)
            model.loss_fn = functools.partial(fused_linear_cross_entropy, backend="chunked", chunk_size=rows,
                                              workspace=workspace)
            report.revert_state["loss_fn"] = loss_fn
            report.changed["loss_fn"] = ("linear_cross_entropy", f"chunked loss, one {rows} x {vocab} fp32 "
                                         f"logits buffer ({rows * vocab * 4 / 2**20:.1f} MiB) reused")
    libc = _libc() if config.trim_before_backward else None
    if config.trim_before_backward and (libc is None or loss_fn is None):
        report.skipped["trim_before_backward"] = "needs glibc and a model.loss_fn to wrap"
    elif libc is not None:
        current = model.loss_fn
        report.revert_state.setdefault("loss_fn", current)
        model.loss_fn = functools.partial(_trimmed_loss, current, libc)
        old = report.changed.get("loss_fn", ("linear_cross_entropy", "linear_cross_entropy"))
        report.changed["loss_fn"] = (old[0], old[1] + ", then malloc_trim(0) before the backward")
    return report


@register_revert(BufferReuseConfig)
def revert_buffer_reuse(model: nn.Module, report: ApplyReport) -> ApplyReport:
    """Restore the loss function (the allocator settings are process-wide and stay; the hook is the caller's)."""
    restored = ApplyReport()
    if report.revert_state.get("allocator_installed"):
        from llmopt.kernels import cpu_allocator

        cpu_allocator.uninstall()
        cpu_allocator.empty_cache()
        restored.notes.append("caching CPU allocator uninstalled (blocks still alive return to it when freed)")
    if "loss_fn" in report.revert_state:
        model.loss_fn = report.revert_state["loss_fn"]
        restored.changed["loss_fn"] = report.changed["loss_fn"][::-1]
    return restored


__all__ = ["BufferReuseConfig", "BufferReuseHook", "apply_buffer_reuse", "configure_allocator", "revert_buffer_reuse",
           "rss_bytes"]
