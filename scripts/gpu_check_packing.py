"""Check packed batches and chunked log-probs on a GPU (the CPU tests cover sdpa and eager in
float32 only).

    python scripts/gpu_check_packing.py

On a Llama-architecture model built from a config (seeded; no network), for a batch of eight
sequences of different lengths it compares the per-sequence summed log-probs and the gradients
of the packed, chunked path (simpo_cli.train.logps) against padded full logits on sdpa:
  1. float32 on sdpa: within 1e-4 (the CPU tests hold 1e-5; GPU kernels sum in other orders);
  2. bfloat16 on sdpa, and on flash_attention_2 when flash-attn is installed (the packed row is
     handed to its variable-length kernel with cu_seq_lens): per-token mean log-probs within
     0.02 of the float32 padded numbers;
  3. peak GPU memory of the forward and backward, packed + chunked against padded full logits,
     printed as a ratio (reported, not failed).
Exit codes: 0 all checks passed, 1 a check failed, 77 skipped (no GPU).
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from simpo_cli.data import collate_sequences
from simpo_cli.losses import IGNORE_INDEX
from simpo_cli.train.logps import sequence_scores

SKIPPED = 77
VOCAB = 32000
LENGTHS = [700, 35, 260, 128, 512, 64, 300, 90]


def build(dtype: torch.dtype, attn: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).cuda()


def sequences() -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    labels = [
        [IGNORE_INDEX] * (n // 4) + row[n // 4 :] for row, n in zip(ids, LENGTHS, strict=True)
    ]
    return ids, labels


def run(model, padding_free: bool, chunk: int):
    """Summed log-probs [S], token counts, gradients and the peak memory of fwd + bwd."""
    ids, labels = sequences()
    batch = collate_sequences(ids, labels, pad_token_id=0, padding_free=padding_free)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    model.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    scores = sequence_scores(model, batch, chunk)
    (scores.sums / scores.counts).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    return scores.sums.detach().float(), scores.counts, grads, peak


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no GPU")
        return SKIPPED
    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAILED") + f" {what}")
        if not ok:
            failures.append(what)

    model = build(torch.float32, "sdpa")
    ref_sums, counts, ref_grads, ref_peak = run(model, padding_free=False, chunk=0)
    sums, _, grads, peak = run(model, padding_free=True, chunk=256)
    diff = (sums - ref_sums).abs().max().item()
    grad_diff = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    check(diff < 1e-4 and grad_diff < 1e-4,
          f"float32 sdpa: packed + chunked vs padded: log-prob diff {diff:.2e}, "
          f"gradient diff {grad_diff:.2e}")  # fmt: skip
    print(f"       peak memory of fwd + bwd: {peak / 2**20:.0f} MiB packed + chunked, "
          f"{ref_peak / 2**20:.0f} MiB padded full logits ({peak / ref_peak:.2f}x)")  # fmt: skip
    ref_avg = ref_sums / counts

    kernels = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        kernels.append("flash_attention_2")
    except ImportError:
        print("       flash-attn not installed: its variable-length path not checked")
    for attn in kernels:
        model = build(torch.bfloat16, attn)
        sums, counts_bf16, _, _ = run(model, padding_free=True, chunk=256)
        diff = (sums / counts_bf16 - ref_avg).abs().max().item()
        check(diff < 0.02, f"bfloat16 {attn}: packed + chunked mean log-probs within {diff:.4f} "
              "of float32 padded")  # fmt: skip
    print("passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
