"""Per-sequence log-probs of a training batch under the model, without the [tokens, V] logits.

The batch comes from collate_sequences (data/collate.py): packed into one row (padding-free) or
padded, with the trained positions of the flattened batch listed (token_index, token_targets,
token_seq). Two savings, each turned off by its own recipe key:

- training.padding_free: the packed row holds only real tokens. Attention stays within each
  sequence: with attention_mask=None, use_cache=False and restarting position_ids, transformers
  builds a block-diagonal causal mask on sdpa and eager (masking_utils, since 4.53.1), and
  flash-attention gets the sequence boundaries as cu_seq_lens / max_length.
- training.logps_chunk_size: the vocabulary projection runs on trained positions only (prompt
  positions are skipped), a chunk of that many tokens at a time, each chunk recomputed in
  backward; the fp32 logits held at once are [chunk, V], not [tokens, V].

Log-probs are summed per sequence with index_add over token_seq, never re-padded. The padded
full-logits path (both keys off) computes what losses.sequence_logps does on model(...).logits;
tests/test_logps.py checks every combination against it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from simpo_cli.distributed import say

# Config keys of models that rescale the logits after lm_head in ways the chunked projection
# does not reproduce (Cohere's logit_scale, Granite's logits_scaling): these use full logits.
UNCHUNKED_LOGIT_KEYS = ("logit_scale", "logits_scaling")


class SequenceScores(NamedTuple):
    """Per-sequence results for S sequences, each [S]."""

    sums: torch.Tensor  # summed log-prob of the trained tokens, fp32, with grad
    counts: torch.Tensor  # trained tokens, int64
    mean_logits: torch.Tensor  # mean raw logit over trained positions and vocabulary, no grad


def packing_problem(model) -> str | None:
    """Why the model cannot take packed sequences (None: it can): position_ids are what keeps
    packed sequences apart, so a model without them (ALiBi) or with positions of another shape
    (multimodal rotary) would let them attend to each other."""
    if hasattr(model, "get_base_model"):  # peft: its forward passes position_ids on
        model = model.get_base_model()
    config = model.config
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__} takes no position_ids"
    if getattr(config, "alibi", False):
        return f"{config.model_type} uses ALiBi positions"
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("rope_type") == "mrope"):
        return f"{config.model_type} uses multimodal rotary positions"
    return None


def chunking_problem(model) -> str | None:
    """Why the chunked projection would not reproduce the model's logits (None: it does)."""
    config = model.config
    for key in UNCHUNKED_LOGIT_KEYS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            return f"{config.model_type} rescales its logits ({key}={value})"
    if model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no output embeddings (lm_head)"
    return None


class Layout(NamedTuple):
    """How a stage's batches are built and scored (the recipe's keys, as the model allows)."""

    padding_free: bool  # packed rows, no padding within them
    one_row: bool  # every sequence in one row (flash-attention's variable-length kernel)
    chunk_size: int  # trained tokens per chunk of the vocabulary projection; 0: full logits


def batch_layout(model, training, stage: str) -> Layout:
    """The Layout of a stage's model: the recipe's settings, each turned off with a printed
    reason where the model cannot take it."""
    padding_free, chunk_size = training.padding_free, training.logps_chunk_size
    if padding_free and (reason := packing_problem(model)):
        say(f"[{stage}] padding_free off: {reason}, so packed sequences would attend to each "
            "other; batches are padded")  # fmt: skip
        padding_free = False
    if chunk_size and (reason := chunking_problem(model)):
        say(f"[{stage}] logps_chunk_size off: {reason}; log-probs come from full logits")
        chunk_size = 0
    return Layout(padding_free, padding_free and _is_flash(model), chunk_size)


def _is_flash(model) -> bool:
    return model.config._attn_implementation.startswith(("flash", "kernels-community/flash"))


def sequence_scores(model, batch: dict[str, Any], chunk_size: int) -> SequenceScores:
    """Summed log-probs of the batch's sequences under `model` (a transformers causal LM, or
    the DDP / DeepSpeed wrapper around one). chunk_size 0: full logits."""
    core = unwrap(model)
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:  # packed
        inputs["position_ids"] = batch["position_ids"]
        if _is_flash(core):
            # Flash-attention knows the boundaries only from cu_seq_lens (a one-row batch):
            # given explicitly, the varlen kernel need not infer them from position_ids (which
            # reads values, a device sync in every layer).
            if "cu_seq_lens" not in batch:
                raise ValueError("flash-attention needs packed batches in one row (one_row)")
            cu, longest = batch["cu_seq_lens"], batch["max_length"]
            inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                          max_length_k=longest)  # fmt: skip
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    index, targets = batch["token_index"], batch["token_targets"]
    if chunk_size:
        per_token = _chunked_token_logps(model, core, inputs, index, targets, chunk_size)
    else:
        logits = model(**inputs).logits
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
        per_token = _token_logps(picked, targets)
    seq, n = batch["token_seq"], batch["num_sequences"]
    zeros = per_token.new_zeros(n)
    counts = torch.bincount(seq, minlength=n)
    sums = zeros.index_add(0, seq, per_token[:, 0])
    logit_sums = zeros.index_add(0, seq, per_token[:, 1])
    vocab = core.config.get_text_config().vocab_size
    mean_logits = logit_sums / (counts.clamp(min=1) * vocab)
    return SequenceScores(sums, counts, mean_logits.detach())


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[M, 2]: each position's log-prob of its target and (no grad) its summed logit, from
    logits [M, V]. Upcast first: in bf16 the normaliser over a large vocabulary loses the
    precision that separates chosen from rejected."""
    logits = logits.float()
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return torch.stack([logps, logits.detach().sum(-1)], dim=-1)


def _project(hidden, weight, bias, targets, softcap: float | None) -> torch.Tensor:
    """One chunk: lm_head on hidden [C, H], Gemma-2's final softcap, then _token_logps."""
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return _token_logps(logits, targets)


def _chunked_token_logps(model, core, inputs, index, targets, chunk_size: int) -> torch.Tensor:
    """[M, 2] per trained position, with lm_head applied chunk by chunk.

    The projection runs inside the model's own forward, in place of lm_head's: the model's
    hooks stay in force (DeepSpeed ZeRO-3 gathers lm_head's partitioned weight before it and,
    through the hook on its output, again before backward, when the chunks are recomputed;
    accelerate's autocast applies). Tied embeddings need nothing more: lm_head holds the
    embedding matrix. The model's own softcap is switched off for the call and applied per chunk.
    """
    head = core.get_output_embeddings()
    config = core.config
    softcap = getattr(config, "final_logit_softcapping", None)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        chunks = []
        for start in range(0, hidden.shape[0], chunk_size):
            args = (hidden[start : start + chunk_size], head.weight, head.bias,
                    targets[start : start + chunk_size], softcap)  # fmt: skip
            if torch.is_grad_enabled():
                # Keep only the chunk's inputs; its [C, V] logits are recomputed in backward.
                chunks.append(checkpoint(_project, *args, use_reentrant=False))
            else:
                chunks.append(_project(*args))
        out = torch.cat(chunks) if chunks else hidden.new_zeros(0, 2, dtype=torch.float32)
        return out.unsqueeze(0)  # [1, M, 2] in the place of the logits

    with _redirected(head, project), _attribute(config, "final_logit_softcapping", None):
        out = model(**inputs)
    return out.logits.reshape(-1, 2)


def unwrap(model):
    """The transformers model inside a DDP or DeepSpeed wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def _redirected(module: torch.nn.Module, forward) -> Iterator[None]:
    """Call `forward` in place of module.forward (module(...) still runs its hooks)."""
    had_own = "forward" in module.__dict__
    original = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward


@contextlib.contextmanager
def _attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set obj.name to value for the block, if obj has that attribute."""
    if not hasattr(obj, name):
        yield
        return
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)
