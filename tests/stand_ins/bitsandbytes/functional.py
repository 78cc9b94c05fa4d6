"""Quantization of the bitsandbytes stand-in."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The NF4 code of QLoRA (Dettmers et al. 2023, appendix E): 16 quantiles of N(0, 1) in [-1, 1].
NF4 = torch.tensor(
    [
        -1.0,
        -0.6962,
        -0.5251,
        -0.3949,
        -0.2844,
        -0.1848,
        -0.0911,
        0.0,
        0.0796,
        0.1609,
        0.2461,
        0.3379,
        0.4407,
        0.5626,
        0.7230,
        1.0,
    ]
)

CALLS = {
    "quantize_4bit": 0,
    "dequantize_4bit": 0,
    "quantize_int8": 0,
}  # for tests/gpu_stand_in.py's report


@dataclass
class QuantState:
    absmax: torch.Tensor  # [blocks]
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    quant_type: str

    def to(self, device) -> None:
        self.absmax, self.code = self.absmax.to(device), self.code.to(device)


def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """(packed uint8 [n / 2, 1], QuantState): each block of `blocksize` values scaled by its
    absmax and rounded to the nearest of the 16 NF4 levels, two 4-bit codes per byte."""
    CALLS["quantize_4bit"] += 1
    flat = weight.detach().float().flatten()
    blocks = F.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1).clamp(min=1e-12)
    code = NF4.to(weight.device)
    codes = ((blocks / absmax[:, None]).unsqueeze(-1) - code).abs().argmin(-1).flatten()
    packed = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8).unsqueeze(1)
    return packed, QuantState(absmax, weight.shape, weight.dtype, blocksize, code, quant_type)


def dequantize_4bit(packed: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    CALLS["dequantize_4bit"] += 1
    flat = packed.flatten().long()
    codes = torch.stack([flat >> 4, flat & 15], dim=1).flatten()
    values = quant_state.code[codes].view(-1, quant_state.blocksize) * quant_state.absmax[:, None]
    count = math.prod(quant_state.shape)
    return values.flatten()[:count].view(quant_state.shape).to(quant_state.dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, per-row scales): each row scaled by its absmax to [-127, 127]."""
    CALLS["quantize_int8"] += 1
    weight = weight.detach().float()
    scales = weight.abs().amax(1).clamp(min=1e-12)
    return torch.round(weight / scales[:, None] * 127).to(torch.int8), scales


def int8_vectorwise_dequant(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return weight.float() * scales.view(-1, 1) / 127
