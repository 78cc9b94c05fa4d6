"""Building pieces of a training stage: TrainingArguments from the recipe, the starting model,
the check that it fits the tokenizer, and the callback that writes metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    TrainerCallback,
    TrainingArguments,
)

from simpo_cli.data import LENGTH_COLUMN
from simpo_cli.distributed import is_main_process
from simpo_cli.launch import read_deepspeed_config
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import Recipe, TrainingSettings
from simpo_cli.redact import redact_text


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
        deepspeed = read_deepspeed_config(recipe.launch.deepspeed)
    return TrainingArguments(
        output_dir=str(out),
        # Saved in training_args.bin (with every checkpoint) and sent to the trackers.
        run_name=redact_text(recipe.logging.run_name or f"{recipe.name}-{name}"),
        report_to=report_to,
        **schedule_settings(t),
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


def schedule_settings(t: TrainingSettings) -> dict[str, Any]:
    """The TrainingArguments that set the learning rate of each optimizer step (Trainer's
    scheduler), shared with the check that some step trains (schedule.py)."""
    return {
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        # transformers 5 takes a ratio in [0, 1) through warmup_steps.
        "warmup_steps": t.warmup_ratio,
    }


class SeededBatches:
    """Trainer mixin: the balanced_batches sampler shuffles with training.seed (transformers
    builds it with a fixed seed of 42)."""

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if hasattr(sampler, "seed"):
            sampler.seed = self.args.seed
        return sampler


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
