"""A stand-in for bitsandbytes (tests/gpu_stand_in.py puts it on sys.path with its package
metadata): 4-bit (NF4, blockwise absmax) and 8-bit (row-wise absmax) weights that quantize when
moved to a device and dequantize in forward, in plain torch on any device. Enough for
transformers' bitsandbytes loading and peft's QLoRA layers."""

from bitsandbytes import functional, nn

__version__ = "0.48.0"
supported_torch_devices = {"cpu", "cuda"}

__all__ = ["functional", "nn"]
