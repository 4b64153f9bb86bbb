"""Block-wise dynamic 8-bit quantization of optimizer state (Dettmers et al. 2022, arXiv 2110.02861).

A tensor is cut into blocks of `block_size` elements; each block keeps its absolute maximum in fp32
and every element becomes the index (uint8) of the nearest entry of a fixed 256-value codebook
applied to `x / absmax`. The codebook is the paper's *dynamic* (dynamic-tree) map: a sign bit, a
decimal exponent given by the number of leading zero bits, and linear fraction bits, so it covers
seven orders of magnitude (5.5e-7 .. 1). `dynamic_map(signed=True)` quantizes Adam's first moment;
`dynamic_map(signed=False)` (the sign bit reused for one more fraction bit) quantizes the second
moment, which is never negative. The maps are value-for-value those of bitsandbytes'
`create_dynamic_map` (tested).

Vectorized, no per-block Python loop:
- dequantize is one `index_select` into the 256-entry codebook and one multiply by the block scales;
- quantize is a lookup too: the top 19 bits of the fp32 pattern of `x / absmax` (sign, exponent, 10
  mantissa bits) index a 2**19-entry table holding the nearest code of each bucket's centre. That is
  eager-mode fast where `bucketize` over the 255 decision points is ~50x slower per element on CPU.

Numerics contract: a value gets the nearest code, except inside a band of relative width 2**-10 around
a decision point between two codes, where it may get the neighbour; so the error is at most half the
gap between neighbouring codes plus 2**-10 |x| (tested against exact `argmin` nearest rounding).
Zero blocks stay exactly zero; a block's absmax element is exact (codes hold +1.0; -1.0 maps to the
most negative code, -0.993, as in bitsandbytes).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BLOCK_SIZE", "QuantMap", "dequantize_blockwise", "dynamic_map", "quantize_blockwise",
           "restore_state_dtypes_"]

BLOCK_SIZE = 256
"""Default elements per quantization block (the paper's and bitsandbytes' block size)."""

_LUT_SHIFT = 13
"""fp32 bit patterns are bucketed by their top 32 - 13 = 19 bits (sign, 8 exponent, 10 mantissa bits)."""


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The sorted 256-entry dynamic-tree codebook of Dettmers et al. (fp32, values in [-1, 1]).

    For exponent group i = 0..6 the codes are 10**(i - 6) times the midpoints of `2**i + 1`
    (signed) or `2**(i + 1) + 1` (unsigned) evenly spaced points in [0.1, 1]; 0 and 1 are added.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        edges = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2.0) * (10 ** (-(max_exponent_bits - 1) + i))
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:  # not reached for 8 bits with 7 exponent bits; kept for other widths
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2.0).tolist()
        data += means + ([-m for m in means] if signed else [])
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


class QuantMap:
    """A codebook and its fp32-bits -> nearest-code lookup table (built once per map, cached)."""

    def __init__(self, code: torch.Tensor) -> None:
        if code.numel() != 256 or not bool((code[1:] >= code[:-1]).all()):
            raise ValueError("a QuantMap needs 256 sorted codes")
        self.code = code.float().contiguous()
        bits = 32 - _LUT_SHIFT
        offset = 1 << (bits - 1)
        # bucket k holds the fp32 patterns whose arithmetic right shift by _LUT_SHIFT is k - offset
        top = torch.arange(1 << bits, dtype=torch.int64) - offset
        centre = ((top << _LUT_SHIFT) + (1 << (_LUT_SHIFT - 1))).to(torch.int32).view(torch.float32)
        mids = (self.code[1:] + self.code[:-1]) / 2
        nearest = torch.bucketize(centre, mids).clamp_(0, 255)
        nearest[torch.isnan(centre)] = int(torch.argmin(self.code.abs()))
        self.lut = nearest.to(torch.uint8)
        self.offset = offset

    def encode_(self, normalized: torch.Tensor, index_buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write into uint8 `out` the nearest code of each value of fp32 `normalized` (same numel).

        `index_buf` is int64 scratch of the same numel (reused so that a step allocates nothing)."""
        torch.bitwise_right_shift(normalized.view(torch.int32), _LUT_SHIFT, out=index_buf)
        index_buf.add_(self.offset)
        return torch.index_select(self.lut, 0, index_buf.view(-1), out=out.view(-1))

    def decode_(self, codes: torch.Tensor, index_buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write into fp32 `out` the codebook value of each uint8 code (before block scaling)."""
        index_buf.copy_(codes.view(-1))
        return torch.index_select(self.code, 0, index_buf, out=out.view(-1))


@functools.cache
def _cached_map(signed: bool) -> QuantMap:
    return QuantMap(dynamic_map(signed))


def quant_map(signed: bool) -> QuantMap:
    """The shared QuantMap of the signed (first moment) or unsigned (second moment) dynamic map."""
    return _cached_map(bool(signed))


def padded_numel(numel: int, block_size: int) -> int:
    return -(-numel // block_size) * block_size


def quantize_into_(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, qmap: QuantMap,
                   block_size: int, index_buf: torch.Tensor, *, nonnegative: bool = False) -> None:
    """Quantize fp32 `x` (numel a multiple of block_size; overwritten with x / absmax) in place into
    uint8 `codes` (same numel) and fp32 `absmax` (one per block). `nonnegative=True` promises x >= 0
    (Adam's second moment) and skips the abs."""
    blocks = x.view(-1, block_size)
    torch.amax(blocks if nonnegative else blocks.abs(), dim=1, out=absmax)
    blocks.div_(absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1))
    qmap.encode_(x, index_buf, codes)


def dequantize_into_(codes: torch.Tensor, absmax: torch.Tensor, qmap: QuantMap, block_size: int,
                     index_buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """fp32 `out` (numel of codes) = codebook[codes] * absmax of each block."""
    qmap.decode_(codes, index_buf, out)
    out.view(-1, block_size).mul_(absmax.unsqueeze(1))
    return out


def quantize_blockwise(x: torch.Tensor, *, signed: bool = True,
                       block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes padded to whole blocks, fp32 absmax per block) of any float tensor."""
    flat = x.detach().reshape(-1).float()
    n = padded_numel(flat.numel(), block_size)
    work = torch.zeros(n, dtype=torch.float32, device=x.device)
    work[:flat.numel()] = flat
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n // block_size, dtype=torch.float32, device=x.device)
    index_buf = torch.empty(n, dtype=torch.int64, device=x.device)
    quantize_into_(work, codes, absmax, quant_map(signed), block_size, index_buf)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], *,
                         signed: bool = True, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The fp32 tensor of `shape` that `quantize_blockwise` encoded."""
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    index_buf = torch.empty(codes.numel(), dtype=torch.int64, device=codes.device)
    dequantize_into_(codes, absmax, quant_map(signed), block_size, index_buf, out)
    numel = 1
    for s in shape:
        numel *= s
    return out[:numel].view(shape)


def restore_state_dtypes_(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Undo `Optimizer.load_state_dict`'s cast of every state tensor to its parameter's dtype: uint8 codes
    (and fp32 scales of lower-precision parameters) are put back exactly as saved."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, saved in state_dict["state"].items():
        p = params[int(index)]
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and optimizer.state[p][key].dtype != value.dtype:
                optimizer.state[p][key] = value.to(device=p.device, copy=True)
