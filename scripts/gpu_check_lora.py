"""Check QLoRA on a GPU (bitsandbytes needs CUDA; the CPU tests cover LoRA on full-precision
weights only).

    python scripts/gpu_check_lora.py

On a Llama-architecture model built from a config (seeded, saved to a temporary folder; no
network), through simpo_cli's own loading, adapter and saving code:
  1. model.quantization 4bit: the linear layers but the output head load as bitsandbytes 4-bit
     layers, and the model's GPU memory is under 0.45x that of bf16 (printed);
  2. k-bit preparation with gradient checkpointing: 8 optimizer steps of SimPO on a fixed
     packed batch lower the loss; the adapters move and the 4-bit weights stay bitwise the same;
  3. the save: the adapter merged into the base reloaded in bf16 (not into 4-bit weights)
     scores like that bf16 base with the adapter on it (per-token log-probs within 0.02), and
     like the 4-bit adapted model to within its quantization error (printed);
  4. model.quantization 8bit: loads as int8 layers and takes finite steps.
Exit codes: 0 all checks passed, 1 a check failed, 77 skipped (no GPU, or no bitsandbytes).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from simpo_cli.data import collate_sequences, load_tokenizer
from simpo_cli.losses import IGNORE_INDEX, simpo_loss
from simpo_cli.model import adapters
from simpo_cli.model.load import load_model_from
from simpo_cli.recipe import LoraSettings, ModelSettings, load_recipe
from simpo_cli.train.logps import sequence_scores

SKIPPED = 77
VOCAB = 32000
LENGTHS = [300, 120, 260, 90]  # chosen, chosen, rejected, rejected


def save_base(folder: Path) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    labels = [[IGNORE_INDEX] * 40 + row[40:] for row in ids]
    packed = collate_sequences(ids, labels, pad_token_id=0, padding_free=True)
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}


def mean_logps(model, inputs) -> torch.Tensor:
    scores = sequence_scores(model, inputs, 256)
    return scores.sums / scores.counts


def simpo(model, inputs) -> torch.Tensor:
    avg = mean_logps(model, inputs)
    return simpo_loss(avg[:2], avg[2:], beta=2.0, gamma=1.0).losses.mean()


def train(model, inputs, steps: int) -> list[float]:
    """AdamW steps on the adapters on one fixed batch; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = simpo(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def check(ok: bool, line: str, failures: list[str]) -> None:
    print(("ok    " if ok else "FAIL  ") + line, flush=True)
    if not ok:
        failures.append(line)


def settings(folder: Path, quantization: str | None) -> ModelSettings:
    return ModelSettings(
        name_or_path=str(folder), dtype="bfloat16", attn_implementation="sdpa",
        lora=LoraSettings(r=16, alpha=32, dropout=0.0), quantization=quantization,
    )  # fmt: skip


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU")
        return SKIPPED
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("skipped: bitsandbytes is not installed (pip install 'simpo-cli[qlora]')")
        return SKIPPED
    failures: list[str] = []
    inputs = batch()
    with tempfile.TemporaryDirectory() as tmp:
        base = save_base(Path(tmp) / "base")
        full = load_model_from(settings(base, None), None, 0).cuda()
        full_bytes = full.get_memory_footprint()
        del full

        # 1. 4-bit loading
        s4 = settings(base, "4bit")
        model = load_model_from(s4, None, 0, quantized=True)
        import bitsandbytes as bnb

        kinds = [type(m) for m in model.modules()]
        n4 = sum(k is bnb.nn.Linear4bit for k in kinds)
        head = type(model.get_output_embeddings())
        check(n4 == 4 * 7 and head is torch.nn.Linear,
              f"4bit: {n4} Linear4bit layers (expected 28), output head {head.__name__}",
              failures)  # fmt: skip
        ratio = model.get_memory_footprint() / full_bytes
        check(ratio < 0.45, f"4bit: memory {ratio:.2f}x of bf16", failures)

        # 2. k-bit preparation, gradient checkpointing, training
        model = adapters.add_adapters(model, s4, gradient_checkpointing=True, seed=0)
        quantized = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        losses = train(model, inputs, steps=8)
        check(all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0],
              f"4bit + gradient checkpointing: SimPO loss {losses[0]:.4f} -> {losses[-1]:.4f}",
              failures)  # fmt: skip
        moved = sum(
            not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n
        )
        check(moved == 28, f"4bit: {moved} of 28 lora_B moved", failures)
        same = all(
            torch.equal(p, quantized[n]) for n, p in model.named_parameters() if n in quantized
        )
        check(same, "4bit: the frozen (quantized) weights are bitwise unchanged", failures)

        # 3. save: merged into the base reloaded in bf16
        model.eval()
        with torch.no_grad():
            adapted_4bit = mean_logps(model, inputs)
        tokenizer = load_tokenizer(load_recipe("tiny").model)
        out = Path(tmp) / "stage"
        out.mkdir()
        record = adapters.base_record(s4, None, None, 0)
        adapters.save(model, out, tokenizer, record, True,
                      lambda: load_model_from(settings(base, None), None, 0))  # fmt: skip
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda().eval()
        from peft import PeftModel

        bf16 = load_model_from(settings(base, None), None, 0).cuda()
        on_bf16 = PeftModel.from_pretrained(bf16, out / "adapter").eval()
        with torch.no_grad():
            m, a = mean_logps(merged, inputs), mean_logps(on_bf16, inputs)
        gap = (m - a).abs().max().item()
        check(gap < 0.02, f"merged (bf16) vs adapter on the bf16 base: {gap:.4f}", failures)
        print(f"      merged (bf16) vs the 4-bit adapted model: "
              f"{(m - adapted_4bit).abs().max().item():.4f} (quantization error)")  # fmt: skip
        check(merged.dtype == torch.bfloat16 and not any(
            "lora" in n for n, _ in merged.named_parameters()),
              "merged: a plain bf16 model without adapters", failures)  # fmt: skip
        del model, merged, bf16, on_bf16
        torch.cuda.empty_cache()

        # 4. 8-bit
        s8 = settings(base, "8bit")
        model = load_model_from(s8, None, 0, quantized=True)
        n8 = sum(type(m) is bnb.nn.Linear8bitLt for m in model.modules())
        check(n8 == 28, f"8bit: {n8} Linear8bitLt layers (expected 28)", failures)
        model = adapters.add_adapters(model, s8, gradient_checkpointing=True, seed=0)
        losses = train(model, inputs, steps=3)
        check(all(map(torch.isfinite, map(torch.tensor, losses))),
              f"8bit: finite SimPO losses {', '.join(f'{x:.4f}' for x in losses)}",
              failures)  # fmt: skip
    print(f"{len(failures)} check(s) failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
