"""Building pieces of a training stage: TrainingArguments from the recipe, the starting model,
the check that it fits the tokenizer, and the callback that writes metrics.jsonl."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from simpo_cli import adapters
from simpo_cli.data import LENGTH_COLUMN
from simpo_cli.distributed import is_main_process
from simpo_cli.errors import UserError
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import ModelSettings, Recipe


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


def training_arguments(
    recipe: Recipe, name: str, out: Path, eval_on_start: bool
) -> TrainingArguments:
    """TrainingArguments for a stage. Under a launcher this also sets up torch.distributed and,
    with a DeepSpeed config, registers it so that ZeRO-3 models are created sharded."""
    stage = recipe.stage(name)
    t = stage.training
    has_eval = stage.data.eval is not None
    report_to = list(recipe.logging.report_to) or "none"
    deepspeed = None
    if recipe.launch.deepspeed is not None:
        from simpo_cli.launch import read_deepspeed_config

        deepspeed = read_deepspeed_config(recipe.launch.deepspeed)
    return TrainingArguments(
        output_dir=str(out),
        run_name=recipe.logging.run_name or f"{recipe.name}-{name}",
        report_to=report_to,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        # transformers 5 takes a ratio in [0, 1) through warmup_steps.
        warmup_steps=t.warmup_ratio,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=recipe.accumulation_steps(name),
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name
        bf16=t.bf16,
        fp16=t.fp16,
        seed=t.seed,
        optim=t.optim,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        eval_on_start=eval_on_start,
        deepspeed=deepspeed,
        dataloader_num_workers=t.dataloader_num_workers,
        train_sampling_strategy="batch_rebalance" if t.balanced_batches else "random",
        length_column_name=LENGTH_COLUMN,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every parameter takes part in every step
        use_cpu=not torch.cuda.is_available(),
    )


def load_model(recipe: Recipe, start_from: str | None, seed: int, quantized: bool = False):
    """The stage's starting model: a previous stage's output, the recipe's pretrained model, or
    a fresh model built from model.config (seeded, so every run builds the same weights).
    quantized: as model.quantization says (the base weights of QLoRA)."""
    return load_model_from(recipe.model, start_from, seed, quantized)


def load_model_from(
    settings: ModelSettings | None, start_from: str | None, seed: int, quantized: bool = False
):
    """load_model for model settings. A folder holding only an adapter (a stage's, or a bare
    peft one) loads as its base, loaded the same way, with the adapter merged in. Settings None:
    a folder's own dtype, or an adapter's recorded base settings."""
    source = start_from
    if source is None and settings is not None and settings.init == "pretrained":
        source = settings.name_or_path
    adapter = adapters.adapter_only(source)
    if adapter is not None:
        if quantized and settings is not None and settings.quantization:
            # the caller writes the merged model first (adapters.full_model_folder)
            raise ValueError(f"{source}: an adapter-only folder cannot be loaded quantized")
        recorded, base, base_seed = adapters.read_base(adapter)
        how = settings or recorded
        base_settings = recorded.model_copy(
            update={
                "dtype": how.dtype,
                "attn_implementation": how.attn_implementation,
                "trust_remote_code": how.trust_remote_code,
            }
        )
        with whole_weights():  # merged whole, even where ZeRO-3 would partition the base
            return adapters.merged(adapter, load_model_from(base_settings, base, base_seed))
    if settings is None:
        settings = ModelSettings(name_or_path=source)
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        settings.dtype, torch.float16
    )
    kwargs: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    if quantized and (config := adapters.quantization_config(settings)) is not None:
        kwargs["quantization_config"] = config
    if source is None:  # init: from_config
        if "quantization_config" in kwargs:
            raise UserError(
                "model.quantization: a model built from model.config has no pretrained weights "
                "to quantize; remove quantization or use init: pretrained"
            )
        set_seed(seed)
        config = dict(settings.config or {})
        model_type = config.pop("model_type")
        model_config = AutoConfig.for_model(model_type, **config)
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        raise UserError(
            f"model.name_or_path: cannot load '{source}': {str(err).splitlines()[0]}; give a "
            "local model folder or a reachable hub name"
        ) from None


class SeededBatches:
    """Trainer mixin: the balanced_batches sampler shuffles with training.seed (transformers
    builds it with a fixed seed of 42)."""

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if hasattr(sampler, "seed"):
            sampler.seed = self.args.seed
        return sampler


def check_vocab(model, tokenizer) -> None:
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps the full shape here
    if rows < len(tokenizer):
        raise UserError(
            f"model.config.vocab_size: the model has {rows} embedding rows but the tokenizer "
            f"has {len(tokenizer)} tokens; set vocab_size to at least {len(tokenizer)}"
        )


class MetricsFile(TrainerCallback):
    """Writes every log (training and evaluation) to metrics.jsonl, one JSON object per line,
    and the evaluation before the first step (eval_on_start) to eval_before.json."""

    def __init__(self, stage_dir: StageDir):
        self.stage_dir = stage_dir

    def on_log(self, args, state, control, logs=None, **kwargs):
        if is_main_process() and logs:
            self.stage_dir.append_metrics({"step": state.global_step, **logs})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if is_main_process() and metrics and state.global_step == 0:
            self.stage_dir.write_json("eval_before.json", metrics)
