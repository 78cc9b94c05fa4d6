"""What the GPU checks share: the device and process-group backend they use, the skip for a
missing optional package, what a check found, Llama-architecture models built from a config,
random token sequences, and `simpo` run as a command."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Where every check puts its models and batches, and the backend of its process group.
# tests/gpu_stand_in.py sets "cpu" and "gloo" to run every check's body on a CPU.
DEVICE = "cuda"
DIST_BACKEND = "nccl"


class Skip(Exception):
    """The check cannot run here: an optional package it needs is not installed."""


def need(module: str, install: str) -> None:
    """Skip unless `module` can be imported; the reason names the command that installs it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None (imports of it fail)
        found = False
    if not found:
        raise Skip(f"{module} not installed ({install})")


@dataclass
class Context:
    work: Path  # the check's own folder: models, runs and their outputs
    tiny: bool  # the smallest shapes: the check's code runs, its numbers mean little


@dataclass
class Findings:
    """What a check found: the parts of its one-line summary, its key numbers for the report,
    and what failed (none: the check passed)."""

    summary: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def expect(self, ok: bool, what: str) -> bool:
        """Record `what` as a failure unless ok; return ok."""
        if not ok:
            self.failures.append(what)
        return bool(ok)

    def note(self, text: str) -> None:
        print(text, flush=True)  # the check's log
        self.summary.append(text)


def llama(size: dict, dtype: torch.dtype, attn: str, seed: int = 0):
    """A seeded Llama-architecture causal LM of `size` (vocab, hidden, intermediate, layers,
    heads, kv_heads, max_positions), on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=size["max_positions"],
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)


def sequences(vocab: int, lengths: list[int], seed: int = 1) -> tuple[list, list]:
    """Random token ids of the given lengths, and their labels: the first quarter of each (the
    prompt) untrained (-100)."""
    from simpo_cli.losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    labels = [
        [IGNORE_INDEX] * (n // 4) + row[n // 4 :] for row, n in zip(ids, lengths, strict=True)
    ]
    return ids, labels


def to_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}


def simpo(*args) -> subprocess.CompletedProcess:
    """`python -m simpo_cli ARGS` (the entry point a user runs), its output captured and echoed
    to the check's log."""
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "simpo_cli", *map(str, args)], capture_output=True, text=True
    )
    print(
        f"simpo {' '.join(map(str, args))}: exit {result.returncode} in {time.time() - start:.1f}s",
        flush=True,
    )
    print(result.stdout[-3000:] + result.stderr[-3000:], flush=True)
    return result


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
