"""NF4: 4-bit NormalFloat with block-wise absmax scales and double quantization (Dettmers et al. 2023,
QLoRA, arXiv:2305.14314). Pure functions; CPU and GPU alike.

Layout (the same as bitsandbytes' `quantize_4bit(quant_type="nf4")` without double quantization, so
codes and first-level scales compare byte for byte):
- the weight is flattened (row-major) and padded with zeros to a multiple of `block_size` (64);
- each block of 64 values is divided by its absmax and rounded to the nearest of the 16 NF4 levels
  (a tie goes to the lower level);
- two 4-bit indices per byte, the first value in the high nibble.

Double quantization (QLoRA §3): the fp32 absmax scales (one per 64 values, 0.5 bits/param) are
themselves quantized: their mean is subtracted (one fp32 offset per tensor), and the centered values
are stored as symmetric int8 in blocks of `dq_block_size` (256) with one fp32 scale per block. That
costs 8/64 + 32/(64*256) = 0.127 bits/param, so NF4 with double quantization stores
4 + 0.127 + (offset, padding) ~= 4.13 bits per parameter (`bits_per_parameter` computes it exactly).
bitsandbytes stores the centered absmax with its 8-bit "dynamic" float map instead of linear int8;
both are 8 bits per scale, and the codes are chosen with the exact absmax in both.

Block scale (`scale=`): "absmax" (bitsandbytes' choice, byte for byte) divides each block by its
absmax. "mse" tries `MSE_SCALE_MULTIPLIERS` x absmax per block and keeps the one with the smallest
squared error of the block (codes re-chosen by nearest level for each candidate; values beyond the
scale go to the +-1 level). The storage format, the decoding and the bit budget are the same; only
the stored scale values differ. On SmolLM2-135M's Linear weights a search over 11 multipliers in
[0.8, 1] lowered the squared weight error by ~16% (relative MSE 0.00874 -> 0.0073), at ~8x the
quantization time, yet raised the model's held-out loss (it clips the large weights, which matter more
than their share of the squared error): absmax stays the default (docs/techniques/qlora.md).

Error bound: an element of a block whose scale was `s0` is off by at most max(half the widest gap
between neighbouring levels times s0 (0.1519 s0, between -1 and -0.6962), absmax - s0) (the second
when the scale is below the absmax and the value is clipped to +-1), plus, with double quantization,
the error of its stored scale (at most half an int8 step of its scale block): `nf4_error_bound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
"""The 16 NF4 values: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero (QLoRA appendix E)."""

NF4_MAX_HALF_GAP = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)
"""Largest rounding error in units of a block's absmax (0.1519, between -1 and -0.6962)."""

_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
MSE_SCALE_MULTIPLIERS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8, 0.76, 0.72)
"""Candidate block scales for scale="mse", as multiples of the block's absmax (1.0 first: ties keep absmax)."""
_PAIR_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


@dataclass(frozen=True)
class NF4Weight:
    """A weight stored as NF4. All tensors are plain tensors (a module registers them as buffers)."""

    codes: torch.Tensor
    """uint8 (padded_numel // 2,): two NF4 indices per byte, first value in the high nibble."""
    absmax: torch.Tensor
    """Per-block scales: fp32 (n_blocks,) without double quantization; with it, int8 (n_blocks,) codes
    of (absmax - absmax_offset), in groups of dq_block_size sharing one absmax_scale."""
    absmax_scale: torch.Tensor | None
    """fp32 (n_dq_blocks,): the int8 step of each group of dq_block_size scales; None without double quant."""
    absmax_offset: torch.Tensor | None
    """fp32 scalar: the mean absmax subtracted before int8 quantization; None without double quant."""
    shape: tuple[int, ...]
    """Shape of the original weight."""
    block_size: int = 64
    """Values per absmax block."""
    dq_block_size: int = 256
    """Absmax values per second-level scale (double quantization)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor that stores this weight (what its memory costs)."""
        return [t for t in (self.codes, self.absmax, self.absmax_scale, self.absmax_offset) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def quantize_nf4(weight: torch.Tensor, *, block_size: int = 64, double_quant: bool = True,
                 dq_block_size: int = 256, scale: str = "absmax") -> NF4Weight:
    """Quantize `weight` (any shape, any float dtype) to NF4 with per-block scales, optionally double-quantized.

    `scale="absmax"` (bitsandbytes' codes byte for byte) or `"mse"` (per block, the multiple of the absmax in
    `MSE_SCALE_MULTIPLIERS` with the smallest squared error; same format and size)."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}; use 64")
    if dq_block_size <= 0:
        raise ValueError(f"dq_block_size must be positive, got {dq_block_size}; use 256")
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 takes a floating-point weight, got {weight.dtype}")
    if scale not in ("absmax", "mse"):
        raise ValueError(f"scale must be 'absmax' or 'mse', got {scale!r}")
    shape = tuple(weight.shape)
    flat = weight.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = F.pad(flat, (0, pad))
    blocks = flat.view(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    midpoints = _MIDPOINTS.to(flat.device)
    idx = torch.bucketize(blocks / safe[:, None], midpoints)  # nearest level; ties go down
    if scale == "mse":
        levels = NF4_LEVELS.to(flat.device)
        best = (blocks - levels[idx] * safe[:, None]).square_().sum(dim=1)
        for mult in MSE_SCALE_MULTIPLIERS[1:]:
            cand_scale = safe * mult
            cand = torch.bucketize(blocks / cand_scale[:, None], midpoints)
            err = (blocks - levels[cand] * cand_scale[:, None]).square_().sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            idx = torch.where(better[:, None], cand, idx)
            absmax = torch.where(better, cand_scale, absmax)  # the stored scale (zero blocks keep 0)
    idx = idx.to(torch.uint8).view(-1, 2)
    codes = (idx[:, 0] << 4) | idx[:, 1]
    if not double_quant:
        return NF4Weight(codes=codes, absmax=absmax, absmax_scale=None, absmax_offset=None, shape=shape,
                         block_size=block_size, dq_block_size=dq_block_size)
    absmax_q, absmax_scale, absmax_offset = _quantize_scales(absmax, dq_block_size)
    return NF4Weight(codes=codes, absmax=absmax_q, absmax_scale=absmax_scale, absmax_offset=absmax_offset,
                     shape=shape, block_size=block_size, dq_block_size=dq_block_size)


def _quantize_scales(absmax: torch.Tensor, dq_block_size: int):
    """(int8 codes, fp32 scale per dq block, fp32 offset) of the centered absmax values."""
    offset = absmax.mean()
    centered = absmax - offset
    pad = (-centered.numel()) % dq_block_size
    if pad:
        centered = F.pad(centered, (0, pad))
    groups = centered.view(-1, dq_block_size)
    scale = groups.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1)[:absmax.numel()].clone(), scale, offset  # the padding is not stored


def dequantize_absmax(q: NF4Weight) -> torch.Tensor:
    """The fp32 per-block scales (n_blocks,), undoing the double quantization if there is one."""
    n_blocks = -(-q.numel // q.block_size)
    if not q.double_quant:
        return q.absmax.float()[:n_blocks]
    codes = q.absmax.float()
    pad = (-codes.numel()) % q.dq_block_size
    groups = F.pad(codes, (0, pad)).view(-1, q.dq_block_size) * q.absmax_scale[:, None]
    return groups.view(-1)[:n_blocks] + q.absmax_offset


def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 2) table: byte -> its two NF4 levels, so that one gather decodes two values."""
    key = (dtype, device)
    table = _PAIR_TABLES.get(key)
    if table is None:
        byte = torch.arange(256)
        table = torch.stack((NF4_LEVELS[byte >> 4], NF4_LEVELS[byte & 15]), dim=1).to(device=device, dtype=dtype)
        _PAIR_TABLES[key] = table
    return table


def dequantize_nf4_codes(codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], *,
                         block_size: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of `shape` from packed NF4 `codes` and fp32 per-block `absmax` (bitsandbytes' layout)."""
    numel = math.prod(shape)
    values = _pair_table(dtype, codes.device).index_select(0, codes.long())  # (n/2, 2)
    blocks = values.view(-1, block_size)  # (n_blocks, block_size)
    blocks = blocks * absmax.to(dtype)[:, None]
    flat = blocks.view(-1)
    return (flat if flat.numel() == numel else flat[:numel]).view(shape)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight that `q` stores, in `dtype` (decoding and scaling run in `dtype`)."""
    return dequantize_nf4_codes(q.codes, dequantize_absmax(q), q.shape, block_size=q.block_size, dtype=dtype)


def bits_per_parameter(q: NF4Weight) -> float:
    """Exact storage cost: bits of every tensor (codes, scales, second-level scales, offset) / parameters."""
    return 8 * q.nbytes / q.numel


def nf4_error_bound(weight: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """Per-element bound (weight's shape) on |weight - dequantize_nf4(q)| in fp32 arithmetic (tiny slack added).

    Holds for any block scale s0 the codes were chosen with (absmax or "mse"): an element is off by at most
    max(0.1519 s0, absmax - s0) + |s0 - stored|, where s0 is within half an int8 step of the stored scale
    (double quantization) or equal to it."""
    flat = weight.detach().reshape(-1).float()
    n_blocks = -(-flat.numel() // q.block_size)
    exact = F.pad(flat, (0, n_blocks * q.block_size - flat.numel())).view(-1, q.block_size).abs().amax(dim=1)
    stored = dequantize_absmax(q)
    if q.double_quant:  # |s0 - stored| <= half the int8 step of the scale's group
        step = q.absmax_scale[:, None].expand(-1, q.dq_block_size).reshape(-1)[:n_blocks]
        half = step / 2 * (1 + 1e-5) + 1e-7 * stored.abs()
    else:
        half = torch.zeros_like(stored)
    s_hi, s_lo = stored + half, (stored - half).clamp_min(0)
    per_block = torch.maximum(NF4_MAX_HALF_GAP * s_hi, exact - s_lo).clamp_min(0) + half  # rounding/clip + scale
    per_block = per_block * (1 + 1e-5) + 1e-7 * exact  # fp32 rounding of the multiply and divide
    bound = per_block[:, None].expand(-1, q.block_size).reshape(-1)[:flat.numel()]
    return bound.view(weight.shape)


__all__ = ["MSE_SCALE_MULTIPLIERS", "NF4_LEVELS", "NF4_MAX_HALF_GAP", "NF4Weight", "bits_per_parameter", "dequantize_absmax",
           "dequantize_nf4", "dequantize_nf4_codes", "nf4_error_bound", "quantize_nf4"]
