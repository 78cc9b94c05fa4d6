"""lora: QLoRA on the GPU (bitsandbytes needs CUDA; the CPU tests cover LoRA on full-precision
weights only).

On a Llama-architecture model built from a config (seeded, saved to a folder), through
simpo_cli's own loading, adapter and saving code:
  1. model.quantization 4bit: the linear layers but the output head load as bitsandbytes 4-bit
     layers, whose weights take under 0.3x their bf16 bytes (the whole model's ratio, with its
     bf16 embeddings and head, is reported);
  2. k-bit preparation with gradient checkpointing: 8 optimizer steps of SimPO on a fixed
     packed batch lower the loss; every lora_B moves and the 4-bit weights stay bitwise the same;
  3. the save: the adapter merged into the base reloaded in bf16 (not into the 4-bit weights)
     scores like that bf16 base with the adapter on it (per-token mean log-probs within 0.02);
     its gap to the 4-bit adapted model (the quantization error) is reported;
  4. model.quantization 8bit: int8 layers, 2 finite SimPO steps.
"""

from __future__ import annotations

import torch

from gpu_checks import common
from gpu_checks.common import Context, Findings

LIMIT_S = 45
FULL = {
    "vocab": 32000,
    "hidden": 1024,
    "intermediate": 2816,
    "layers": 4,
    "heads": 8,
    "kv_heads": 4,
    "max_positions": 1024,
    "lengths": [300, 120, 260, 90],
    "chunk": 256,
    "steps": 8,
}
TINY = {
    "vocab": 512,
    "hidden": 64,
    "intermediate": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "max_positions": 128,
    "lengths": [40, 16, 32, 12],
    "chunk": 16,
    "steps": 4,
}
# lengths: chosen, chosen, rejected, rejected; steps: of the 4-bit model (the 8-bit one takes 2)


def run(ctx: Context) -> Findings:
    common.need("bitsandbytes", "pip install 'simpo-cli[gpu]'")
    common.need("peft", "pip install 'simpo-cli[gpu]'")
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from simpo_cli.data import collate_sequences, load_tokenizer
    from simpo_cli.model import adapters
    from simpo_cli.model.load import load_model_from
    from simpo_cli.recipe import load_recipe

    size = TINY if ctx.tiny else FULL
    linear = 7 * size["layers"]  # q, k, v, o, gate, up, down per layer
    found = Findings()
    ids, labels = common.sequences(size["vocab"], size["lengths"])
    inputs = common.to_device(collate_sequences(ids, labels, pad_token_id=0, padding_free=True))
    base = ctx.work / "base"
    common.llama(size, torch.bfloat16, "sdpa").save_pretrained(base)
    full_bytes = load_model_from(settings(base, None), None, 0).get_memory_footprint()

    # 1. 4-bit loading
    s4 = settings(base, "4bit")
    model = load_model_from(s4, None, 0, quantized=True)
    n4 = sum(type(m) is bnb.nn.Linear4bit for m in model.modules())
    head = type(model.get_output_embeddings())
    found.expect(
        n4 == linear and head is torch.nn.Linear,
        f"4bit: {n4} Linear4bit layers (expected {linear}), output head {head.__name__}",
    )
    # The embeddings and the output head stay in bf16: the 4-bit layers are judged on their own.
    layers = [m for m in model.modules() if type(m) is bnb.nn.Linear4bit]
    packed = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    layer_ratio = packed / sum(2 * m.in_features * m.out_features for m in layers)
    found.expect(
        layer_ratio < 0.3,
        f"4bit: the layers' weights take {layer_ratio:.2f}x their bf16 bytes (limit 0.3)",
    )
    ratio = model.get_memory_footprint() / full_bytes

    # 2. k-bit preparation, gradient checkpointing, training
    model = adapters.add_adapters(model, s4, gradient_checkpointing=True, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    losses = train(model, inputs, size["chunk"], steps=size["steps"])
    found.expect(
        all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0],
        f"4bit SimPO loss {losses[0]:.4f} -> {losses[-1]:.4f}: not lower",
    )
    params = dict(model.named_parameters())
    moved = sum(not torch.equal(params[n], before) for n, before in lora_b.items())
    found.expect(moved == linear, f"4bit: {moved} of {linear} lora_B moved")
    same = all(torch.equal(params[n], before) for n, before in frozen.items())
    found.expect(same, "4bit: the frozen (quantized) weights changed")

    # 3. save: merged into the base reloaded in bf16
    model.eval()
    with torch.no_grad():
        adapted_4bit = mean_logps(model, inputs, size["chunk"])
    out = ctx.work / "stage"
    out.mkdir()
    record = adapters.base_record(s4, None, None, 0)
    tokenizer = load_tokenizer(load_recipe("tiny").model)
    adapters.save(
        model, out, tokenizer, record, True, lambda: load_model_from(settings(base, None), None, 0)
    )
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    merged = merged.to(common.DEVICE).eval()
    bf16 = load_model_from(settings(base, None), None, 0).to(common.DEVICE)
    on_bf16 = PeftModel.from_pretrained(bf16, out / "adapter").eval()
    with torch.no_grad():
        m, a = mean_logps(merged, inputs, size["chunk"]), mean_logps(on_bf16, inputs, size["chunk"])
    gap = (m - a).abs().max().item()
    quantization_gap = (m - adapted_4bit).abs().max().item()
    found.expect(gap < 0.02, f"merged (bf16) vs adapter on the bf16 base: {gap:.4f} (limit 0.02)")
    plain = merged.dtype == torch.bfloat16 and not any(
        "lora" in n for n, _ in merged.named_parameters()
    )
    found.expect(plain, "merged: not a plain bf16 model without adapters")
    del model, merged, bf16, on_bf16
    torch.cuda.empty_cache()

    # 4. 8-bit
    s8 = settings(base, "8bit")
    model = load_model_from(s8, None, 0, quantized=True)
    n8 = sum(type(m) is bnb.nn.Linear8bitLt for m in model.modules())
    found.expect(n8 == linear, f"8bit: {n8} Linear8bitLt layers (expected {linear})")
    model = adapters.add_adapters(model, s8, gradient_checkpointing=True, seed=0)
    losses8 = train(model, inputs, size["chunk"], steps=2)
    found.expect(all(map(torch.isfinite, torch.tensor(losses8))), f"8bit: losses {losses8}")

    found.note(
        f"4bit: {n4} layers at {layer_ratio:.2f}x their bf16 bytes (model {ratio:.2f}x), "
        f"SimPO loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps; merged into "
        f"the bf16 base vs adapter on it {gap:.4f} (vs 4bit {quantization_gap:.3f}); 8bit: {n8} "
        "layers"
    )
    found.numbers.update(
        linear_4bit=n4,
        layer_memory_ratio_4bit=layer_ratio,
        model_memory_ratio_4bit=ratio,
        loss_first=losses[0],
        loss_last=losses[-1],
        lora_b_moved=moved,
        merged_vs_adapter=gap,
        merged_vs_4bit=quantization_gap,
        linear_8bit=n8,
        losses_8bit=losses8,
    )
    return found


def settings(folder, quantization: str | None):
    from simpo_cli.recipe import LoraSettings, ModelSettings

    return ModelSettings(
        name_or_path=str(folder),
        dtype="bfloat16",
        attn_implementation="sdpa",
        lora=LoraSettings(r=16, alpha=32, dropout=0.0),
        quantization=quantization,
    )


def mean_logps(model, inputs, chunk: int) -> torch.Tensor:
    from simpo_cli.train.logps import sequence_scores

    scores = sequence_scores(model, inputs, chunk)
    return scores.sums / scores.counts


def train(model, inputs, chunk: int, steps: int) -> list[float]:
    """AdamW steps on the adapters, SimPO on one fixed batch (2 chosen, then 2 rejected)."""
    from simpo_cli.losses import simpo_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        avg = mean_logps(model, inputs, chunk)
        loss = simpo_loss(avg[:2], avg[2:], beta=2.0, gamma=1.0).losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
