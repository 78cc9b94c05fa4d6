"""Which process this is, and the few collective calls the stages make.

Ranks come from torch.distributed when it is up, else from the launcher's environment: under
DeepSpeed on CPU, accelerate has reported one process while torch.distributed had two.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The same-shaped tensors of every process, concatenated in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_lists(mine: list) -> list:
    """Every process's list (picklable items), concatenated in rank order, on every process."""
    if world_size() == 1:
        return list(mine)
    parts: list = [None] * world_size()
    torch.distributed.all_gather_object(parts, mine)
    return [item for part in parts for item in part]


def say(message: str) -> None:
    """Print once per run, not once per process."""
    if is_main_process():
        print(message, flush=True)


def shutdown() -> None:
    """Leave the process group at a clean end of the run (every process gets here together).
    Left to the interpreter's exit, gloo's worker threads can abort a process that has finished
    its work ("terminate called without an active exception"), failing the whole launch. Not on
    an error that one process meets alone: destroying a group others still use can hang."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def whole_weights() -> Iterator[None]:
    """Load models whole in every process, even after a ZeRO-3 training stage in this process:
    its TrainingArguments registered the DeepSpeed config with transformers, whose from_pretrained
    would then partition the new model's weights across the processes (zero.Init), leaving each
    process a model it cannot run alone (generation, evaluation, reward scoring)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter of the object
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered
