"""LoRA and QLoRA: adapters (peft) on the frozen, optionally quantized (bitsandbytes) weights.

A stage with `model.lora` trains only the adapters. It saves them under DIR/<stage>/adapter/ and
the model with the adapters merged into its weights at DIR/<stage>/, which every later stage,
from_pretrained and vLLM load as a plain model; the next training stage puts fresh adapters on
that merged model. peft and bitsandbytes are optional extras, imported here only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simpo_cli.errors import UserError
from simpo_cli.recipe import ModelSettings

ADAPTER_DIR = "adapter"


def check_combination(recipe) -> None:
    """Refuse, before anything starts, what adapters are not built for here: ZeRO-3 (the
    adapters' weights would be partitioned and the merge needs them whole)."""
    from simpo_cli.launch import zero_stage

    if recipe.model.lora is not None and zero_stage(recipe) == 3:
        raise UserError(
            f"model.lora with launch.deepspeed {recipe.launch.deepspeed} (ZeRO-3) is not "
            "supported; adapters are small enough for --deepspeed zero2 or plain data parallel "
            "(no --deepspeed)"
        )


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError(
            "model.lora: peft is not installed; pip install 'simpo-cli[lora]' (or peft), or "
            "remove model.lora to train every weight"
        ) from None
    return peft


def quantization_config(settings: ModelSettings):
    """bitsandbytes settings for from_pretrained (QLoRA: NF4 with bf16 compute and double
    quantization, as in Dettmers et al. 2023), or None without model.quantization."""
    if settings.quantization is None:
        return None
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"model.quantization: {settings.quantization} needs a CUDA GPU (bitsandbytes); on "
            "this machine remove it and train the LoRA adapters on full-precision weights"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "model.quantization: bitsandbytes is not installed; pip install "
            "'simpo-cli[qlora]' (or bitsandbytes)"
        ) from None
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def add_adapters(model, settings: ModelSettings, gradient_checkpointing: bool, seed: int):
    """The model with fresh LoRA adapters, only they trainable (peft's PeftModel). Their
    random initialisation is seeded: a rerun, or a resumed run, starts from the same ones."""
    from transformers import set_seed

    peft = _peft()
    lora = settings.lora
    if settings.quantization:
        # Casts norms to fp32 and makes the (frozen) embeddings' output require grad, so
        # checkpointed layers still pass gradients to the adapters.
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    set_seed(seed)
    return peft.get_peft_model(model, config)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, frozen) parameters of a model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters() if not p.requires_grad)


def is_adapted(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def save(model, folder: Path, tokenizer: Any, full_precision_base) -> None:
    """The adapters into folder/adapter/, and the merged model into folder. The adapters are
    merged into the model's own weights, in place (call this last), or, when those are
    quantized, into `full_precision_base()`: merging into 4- or 8-bit weights would round."""
    model.save_pretrained(folder / ADAPTER_DIR)
    tokenizer.save_pretrained(folder / ADAPTER_DIR)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        peft = _peft()
        model = peft.PeftModel.from_pretrained(full_precision_base(), folder / ADAPTER_DIR)
    model.merge_and_unload().save_pretrained(folder)
