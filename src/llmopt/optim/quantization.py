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
- dequantize is one `index_select` into the 256-entry codebook (int32 indices) and one multiply by the
  block scales;
- quantize is a lookup too: `x * 2**14 / absmax` is written as fp16 (one multiply with an fp16 output),
  and the 16-bit pattern of that half indexes a 65,536-entry table holding the nearest code of each
  half value. The 2**14 scale keeps every value down to 2**-24 of the block's max a normal half, far below
  the map's smallest decision point (1.6e-7). That is eager-mode fast where `bucketize` over the 255
  decision points is ~50x slower per element on CPU, and the 64 KB table stays in cache (an earlier
  fp32-top-19-bits table was 512 KB and needed an int64 shift and an offset add).

Numerics contract: a value gets the nearest code, except inside a band of relative width 2**-10 around
a decision point between two codes (the half's rounding), where it may get the neighbour; so the error
is at most half the gap between neighbouring codes plus 2**-10 |x| (tested against exact `argmin`
nearest rounding). Zero blocks stay exactly zero; a block's absmax element is exact (codes hold +1.0;
-1.0 maps to the most negative code, -0.993, as in bitsandbytes).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BLOCK_SIZE", "HALF_SCALE", "QuantMap", "block_absmax_", "dequantize_blockwise", "dynamic_map",
           "encode_blocks_", "quantize_blockwise", "restore_state_dtypes_"]

BLOCK_SIZE = 256
"""Default elements per quantization block (the paper's and bitsandbytes' block size)."""

HALF_SCALE = 2.0 ** 14
"""Normalized values (in [-1, 1]) are multiplied by this before the fp16 cast: |x| <= 16384 < 65504, and
values down to 2**-24 stay normal halves (11 significant bits)."""

_TINY_ABSMAX = 2.0 ** -100
"""Block maxima are clamped to this before dividing, so a zero block scales by a finite number (codes 0)."""


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
    """A codebook and its fp16-bits -> nearest-code lookup table (built once per map, cached)."""

    def __init__(self, code: torch.Tensor) -> None:
        if code.numel() != 256 or not bool((code[1:] >= code[:-1]).all()):
            raise ValueError("a QuantMap needs 256 sorted codes")
        self.code = code.float().contiguous()
        # entry k: the nearest code of the half whose bit pattern is k, divided by HALF_SCALE
        halves = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(torch.float16).float()
        values = halves / HALF_SCALE
        mids = (self.code[1:] + self.code[:-1]) / 2
        nearest = torch.bucketize(values, mids).clamp_(0, 255)
        nearest[torch.isnan(values)] = int(torch.argmin(self.code.abs()))
        self.lut = nearest.to(torch.uint8)

    def encode_(self, scaled_half: torch.Tensor, index_buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write into uint8 `out` the nearest code of each value of fp16 `scaled_half` (= x * HALF_SCALE
        / absmax, same numel). `index_buf`: int32 scratch of that numel (reused: a step allocates nothing)."""
        index_buf.copy_(scaled_half.view(-1).view(torch.uint16))
        return torch.index_select(self.lut, 0, index_buf, out=out.view(-1))

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


def block_absmax_(blocks: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor, *,
                  nonnegative: bool = False) -> torch.Tensor:
    """out[i] = max |blocks[i, :]| without materializing |blocks| (an amax and an amin pass when signed).
    `scratch`: fp32, one element per block."""
    torch.amax(blocks, dim=1, out=out)
    if not nonnegative:
        torch.amin(blocks, dim=1, out=scratch)
        torch.maximum(out, scratch.neg_(), out=out)
    return out


def encode_blocks_(blocks: torch.Tensor, block_max: torch.Tensor, qmap: QuantMap, codes: torch.Tensor,
                   index_buf: torch.Tensor, half_buf: torch.Tensor, scratch: torch.Tensor) -> None:
    """uint8 `codes` of fp32 `blocks` (n_blocks, block_size; scaled in place, its values are lost) whose
    per-block max |.| is `block_max`; `half_buf` (fp16) and `index_buf` (int32) have the numel of blocks,
    `scratch` (fp32) one per block."""
    torch.div(HALF_SCALE, block_max.clamp_min(_TINY_ABSMAX), out=scratch)
    blocks.mul_(scratch.unsqueeze(1))  # in place, then a cast: mul with an fp16 out= allocates a temporary
    half_buf.view_as(blocks).copy_(blocks)
    qmap.encode_(half_buf, index_buf, codes)


def quantize_into_(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, qmap: QuantMap,
                   block_size: int, index_buf: torch.Tensor, half_buf: torch.Tensor, scratch: torch.Tensor, *,
                   nonnegative: bool = False) -> None:
    """Quantize fp32 `x` (numel a multiple of block_size; overwritten) into uint8 `codes` (same numel)
    and fp32 `absmax` (one per block). Scratch: int32 `index_buf` and fp16 `half_buf` of x's numel, fp32
    `scratch` of one per block. `nonnegative=True` promises x >= 0 (Adam's second moment): one pass less."""
    blocks = x.view(-1, block_size)
    block_absmax_(blocks, absmax, scratch, nonnegative=nonnegative)
    encode_blocks_(blocks, absmax, qmap, codes, index_buf, half_buf, scratch)


def dequantize_into_(codes: torch.Tensor, absmax: torch.Tensor, qmap: QuantMap, block_size: int,
                     index_buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """fp32 `out` (numel of codes) = codebook[codes] * absmax of each block. `index_buf`: int32 scratch."""
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
    index_buf = torch.empty(n, dtype=torch.int32, device=x.device)
    half_buf = torch.empty(n, dtype=torch.float16, device=x.device)
    scratch = torch.empty(n // block_size, dtype=torch.float32, device=x.device)
    quantize_into_(work, codes, absmax, quant_map(signed), block_size, index_buf, half_buf, scratch)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], *,
                         signed: bool = True, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The fp32 tensor of `shape` that `quantize_blockwise` encoded."""
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    index_buf = torch.empty(codes.numel(), dtype=torch.int32, device=codes.device)
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
