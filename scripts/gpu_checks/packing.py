"""packing: packed batches and chunked log-probs on the GPU, bf16 on flash-attention's
variable-length kernel against padded batches (the CPU tests hold sdpa and eager in float32).

On a Llama-architecture model built from a config, for eight sequences of different lengths:
  1. float32 on sdpa: the packed, chunked path (simpo_cli.train.logps) gives the per-token mean
     log-probs and the gradients of padded full logits within 1e-4;
  2. bfloat16 on flash_attention_2, every sequence in one row with its boundaries as
     cu_seq_lens (what training does on flash-attention): the logits stay as close to the
     float32 padded ones as bf16 on padded sdpa does (max difference at most 2x that, + 0.01: a
     token attending across a boundary would be far off), the per-token mean log-probs within
     0.02 of float32 padded, and the backward through the kernel gives finite gradients;
  3. the peak memory of forward and backward, packed + chunked against padded full logits
     (float32 sdpa), reported.
"""

from __future__ import annotations

import torch

from gpu_checks import common
from gpu_checks.common import Context, Findings

LIMIT_S = 45
FULL = {
    "vocab": 32000,
    "hidden": 512,
    "intermediate": 1536,
    "layers": 4,
    "heads": 8,
    "kv_heads": 4,
    "max_positions": 1024,
    "lengths": [700, 35, 260, 128, 512, 64, 300, 90],
    "chunk": 256,
}
TINY = {
    "vocab": 512,
    "hidden": 64,
    "intermediate": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "max_positions": 128,
    "lengths": [70, 5, 26, 13, 51, 6, 30, 9],
    "chunk": 16,
}


def run(ctx: Context) -> Findings:
    common.need("flash_attn", "pip install flash-attn --no-build-isolation")
    size = TINY if ctx.tiny else FULL
    ids, labels = common.sequences(size["vocab"], size["lengths"])
    found = Findings()

    # 1. float32 sdpa: packed + chunked against padded full logits, and their memory
    model = common.llama(size, torch.float32, "sdpa").to(common.DEVICE)
    ref_sums, counts, ref_grads, ref_peak = score(model, ids, labels, chunk=0, padding_free=False)
    sums, _, grads, peak = score(model, ids, labels, chunk=size["chunk"], padding_free=True)
    # Per-token means: a sum over 700 tokens of log-probs near -10 has float32 steps of 5e-4.
    ref_mean = ref_sums / counts
    diff = (sums / counts - ref_mean).abs().max().item()
    grad_diff = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    found.expect(
        diff < 1e-4 and grad_diff < 1e-4,
        f"float32 packed + chunked vs padded: mean log-prob diff {diff:.1e}, gradient diff "
        f"{grad_diff:.1e} (limit 1e-4)",
    )
    found.note(f"fp32 packed vs padded: mean log-prob diff {diff:.1e}, grad diff {grad_diff:.1e}")
    ref_logits = logits(model, ids, flash=False)
    del model

    # 2. bf16: padded sdpa (the precision's own error) and flash-attention's varlen kernel
    model = common.llama(size, torch.bfloat16, "sdpa").to(common.DEVICE)
    sdpa_gap = max_gap(logits(model, ids, flash=False), ref_logits)
    del model
    model = common.llama(size, torch.bfloat16, "flash_attention_2").to(common.DEVICE)
    kernel = model.config._attn_implementation
    found.expect(kernel == "flash_attention_2", f"the model runs {kernel}, not flash_attention_2")
    flash_gap = max_gap(logits(model, ids, flash=True), ref_logits)
    sums, flash_counts, grads, _ = score(
        model, ids, labels, chunk=size["chunk"], padding_free=True, one_row=True
    )
    mean_gap = (sums / flash_counts - ref_mean).abs().max().item()
    finite = all(torch.isfinite(g).all() for g in grads.values())
    found.expect(
        flash_gap <= 2 * sdpa_gap + 0.01,
        f"bf16 flash varlen logits {flash_gap:.3f} from float32 padded, more than 2x "
        f"bf16 padded sdpa's {sdpa_gap:.3f} + 0.01",
    )
    found.expect(
        mean_gap < 0.02,
        f"bf16 flash varlen mean log-probs {mean_gap:.4f} from float32 padded (limit 0.02)",
    )
    found.expect(finite, "bf16 flash varlen: non-finite gradients")
    found.note(
        f"bf16 flash varlen vs fp32 padded: max logit diff {flash_gap:.3f} (bf16 sdpa "
        f"padded {sdpa_gap:.3f}), mean log-prob diff {mean_gap:.4f}"
    )
    found.note(f"peak memory packed+chunked {peak / ref_peak:.2f}x padded")
    found.numbers.update(
        fp32_logp_diff=diff,
        fp32_grad_diff=grad_diff,
        bf16_sdpa_padded_logit_diff=sdpa_gap,
        bf16_flash_packed_logit_diff=flash_gap,
        bf16_flash_mean_logp_diff=mean_gap,
        peak_memory_packed_mib=peak / 2**20,
        peak_memory_padded_mib=ref_peak / 2**20,
    )
    return found


def score(model, ids, labels, chunk: int, padding_free: bool, one_row: bool = False):
    """Summed log-probs [S] (float), token counts [S], gradients of the summed mean log-probs
    and the peak memory of forward + backward, as training computes them."""
    from simpo_cli.data import collate_sequences
    from simpo_cli.train.logps import sequence_scores

    batch = collate_sequences(
        ids, labels, pad_token_id=0, padding_free=padding_free, one_row=one_row
    )
    batch = common.to_device(batch)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    scores = sequence_scores(model, batch, chunk)
    (scores.sums / scores.counts).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    return scores.sums.detach().float(), scores.counts, grads, peak


@torch.no_grad()
def logits(model, ids: list[list[int]], flash: bool) -> list[torch.Tensor]:
    """Each sequence's logits [L, V] in float32: from a padded batch with its attention mask,
    or (flash) from one packed row whose boundaries go to the kernel as cu_seq_lens."""
    from simpo_cli.data import collate_sequences

    lengths = [len(row) for row in ids]
    batch = common.to_device(
        collate_sequences(ids, ids, pad_token_id=0, padding_free=flash, one_row=flash)
    )
    if flash:
        cu, longest = batch["cu_seq_lens"], batch["max_length"]
        out = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=longest,
            max_length_k=longest,
            use_cache=False,
        ).logits
        return list(out[0].float().split(lengths))
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return [out[i, :n].float() for i, n in enumerate(lengths)]


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
