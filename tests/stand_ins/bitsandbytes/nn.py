"""Layers of the bitsandbytes stand-in: Linear4bit and Linear8bitLt, whose weights (Params4bit,
Int8Params) quantize on their first move to a device, as bitsandbytes' do."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitsandbytes.functional import (
    dequantize_4bit,
    int8_vectorwise_dequant,
    quantize_4bit,
    quantize_int8,
)


def _device(*args, **kwargs):
    return torch._C._nn._parse_to(*args, **kwargs)[0]


class Params4bit(torch.nn.Parameter):
    def __new__(
        cls,
        data=None,
        requires_grad=False,
        quant_state=None,
        blocksize=64,
        compress_statistics=True,
        quant_type="fp4",
        quant_storage=torch.uint8,
        module=None,
        bnb_quantized=False,
        **ignored,
    ):
        self = torch.Tensor._make_subclass(
            cls, torch.empty(0) if data is None else data, requires_grad
        )
        self.quant_state, self.blocksize = quant_state, blocksize
        self.compress_statistics, self.quant_type = compress_statistics, quant_type
        self.quant_storage, self.module, self.bnb_quantized = quant_storage, module, bnb_quantized
        return self

    def _like(self, data, **changes):
        keep = {
            "requires_grad": self.requires_grad,
            "quant_state": self.quant_state,
            "blocksize": self.blocksize,
            "compress_statistics": self.compress_statistics,
            "quant_type": self.quant_type,
            "quant_storage": self.quant_storage,
            "module": self.module,
            "bnb_quantized": self.bnb_quantized,
        }
        return Params4bit(data, **{**keep, **changes})

    def to(self, *args, **kwargs):
        device = _device(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            packed, state = quantize_4bit(self.data.to(device), self.blocksize, self.quant_type)
            if self.module is not None:
                self.module.quant_state = state
            return self._like(packed, quant_state=state, bnb_quantized=True)
        if self.quant_state is not None and device is not None:
            self.quant_state.to(device)
        return self._like(self.data.to(device) if device is not None else self.data)


class Linear4bit(torch.nn.Linear):
    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_type="fp4",
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            quant_type=quant_type,
            compress_statistics=compress_statistics,
            quant_storage=quant_storage,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.quant_state = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        weight = self.weight
        if weight.bnb_quantized:
            weight = dequantize_4bit(weight.data, weight.quant_state)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), weight.to(dtype), bias).to(x.dtype)


class Int8Params(torch.nn.Parameter):
    def __new__(
        cls, data=None, requires_grad=False, has_fp16_weights=False, CB=None, SCB=None, **ignored
    ):
        self = torch.Tensor._make_subclass(
            cls, torch.empty(0) if data is None else data, requires_grad
        )
        self.has_fp16_weights, self.CB, self.SCB = has_fp16_weights, CB, SCB
        return self

    def to(self, *args, **kwargs):
        device = _device(*args, **kwargs)
        if device is not None and device.type != "meta" and self.dtype != torch.int8:
            codes, scales = quantize_int8(self.data.to(device))
            return Int8Params(codes, self.requires_grad, self.has_fp16_weights, codes, scales)
        scales = self.SCB.to(device) if self.SCB is not None and device is not None else self.SCB
        data = self.data.to(device) if device is not None else self.data
        return Int8Params(data, self.requires_grad, self.has_fp16_weights, self.CB, scales)


class MatmulLtState:
    def __init__(self, threshold: float = 0.0, has_fp16_weights: bool = True):
        self.threshold, self.has_fp16_weights = threshold, has_fp16_weights
        self.SCB = None


class Linear8bitLt(torch.nn.Linear):
    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        has_fp16_weights=True,
        threshold=0.0,
        index=None,
        device=None,
    ):
        super().__init__(input_features, output_features, bias, device)
        self.state = MatmulLtState(threshold, has_fp16_weights)
        self.index = index
        self.weight = Int8Params(
            self.weight.data, requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.SCB is not None:
            weight = int8_vectorwise_dequant(weight.data, weight.SCB)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)
