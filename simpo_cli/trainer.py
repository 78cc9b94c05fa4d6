"""The training stages: SFT and SimPO on transformers' Trainer, and the pipeline that chains them.

Trainer runs the loop, checkpointing, resume and (later) DeepSpeed; this module adds what is
SimPO-specific: the paired forward pass, the loss, the authors' metric names, the stage folders.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from simpo_cli.data import (
    PreferenceCollator,
    SFTCollator,
    fingerprint,
    load_source,
    load_tokenizer,
    prepare,
)
from simpo_cli.errors import UserError
from simpo_cli.eval import summarize
from simpo_cli.losses import IGNORE_INDEX, sequence_logps, simpo_loss
from simpo_cli.outputs import StageDir, reproducibility_record
from simpo_cli.recipe import PreferenceStage, Recipe, SFTStage, settings_table, stage_identity


class SimPOTrainer(Trainer):
    """Trainer whose loss is SimPO on pairs stacked [chosen; rejected] by PreferenceCollator."""

    def __init__(self, *args, stage: PreferenceStage, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        # Our loss is a mean over this micro-batch's pairs: Trainer must divide it by the number
        # of accumulation steps (and must not pass num_items_in_batch, a token count, to it).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        ).logits
        logps, _ = sequence_logps(logits, labels, average=True)
        half = labels.shape[0] // 2
        chosen_logps, rejected_logps = logps[:half], logps[half:]
        stage = self.stage
        out = simpo_loss(
            chosen_logps,
            rejected_logps,
            beta=stage.beta,
            gamma=stage.resolved_gamma,
            label_smoothing=stage.label_smoothing,
            loss_type=stage.loss_type,
        )
        loss = out.losses.mean()
        if stage.sft_weight > 0:
            # The authors' added term: the chosen responses' per-token cross-entropy.
            sft_loss = -chosen_logps.mean()
            loss = loss + stage.sft_weight * sft_loss
            self._store("sft_loss", sft_loss)
        self._store_pair_metrics(out, chosen_logps, rejected_logps, logits, labels, half)
        return (loss, {"logits": logits}) if return_outputs else loss

    @torch.no_grad()
    def _store_pair_metrics(self, out, chosen_logps, rejected_logps, logits, labels, half):
        margins = out.chosen_rewards - out.rejected_rewards
        self._store("rewards/chosen", out.chosen_rewards.mean())
        self._store("rewards/rejected", out.rejected_rewards.mean())
        self._store("rewards/accuracies", (margins > 0).float().mean())
        self._store("rewards/margins", margins.mean())
        self._store("logps/chosen", chosen_logps.mean())
        self._store("logps/rejected", rejected_logps.mean())
        # Mean raw logit over response positions (the ones that predict a trained token).
        mask = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)
        per_row = (logits[:, :-1] * mask).sum((1, 2)) / (mask.sum((1, 2)) * logits.shape[-1])
        self._store("logits/chosen", per_row[:half].mean())
        self._store("logits/rejected", per_row[half:].mean())

    def _store(self, name: str, value: torch.Tensor) -> None:
        self._metrics[name].append(value.detach().float().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs get the mean of each SimPO metric since the previous log.
        if "loss" in logs:
            for name, values in self._metrics.items():
                logs[name] = sum(values) / len(values)
            self._metrics.clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Per-pair scores for Trainer's evaluation loop, which shards the eval set over the
        processes, runs DeepSpeed's inference set-up when needed, and gathers the results."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
            ).logits
            logps, n_tokens = sequence_logps(logits, inputs["labels"])
        half = logps.shape[0] // 2
        scores = torch.stack(
            [logps[:half], logps[half:], n_tokens[:half].float(), n_tokens[half:].float()], dim=1
        )
        return None, scores, torch.zeros(half, device=scores.device)


def preference_metrics(stage: PreferenceStage, prediction) -> dict[str, float]:
    """Held-out metrics from the gathered per-pair scores [N, 4] of prediction_step."""
    scores = prediction.predictions
    summary = summarize(
        {"chosen_logps": scores[:, 0].tolist(), "rejected_logps": scores[:, 1].tolist()}, stage
    )
    return {
        "loss": summary["loss"],
        "rewards/accuracies": summary["reward_accuracy"],
        "rewards/margins": summary["reward_margin"],
        "logps/chosen": float(scores[:, 0].mean()),
        "logps/rejected": float(scores[:, 1].mean()),
    }


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


# --------------------------------------------------------------------------- processes
# Ranks come from torch.distributed when it is up, else from the launcher's environment: under
# DeepSpeed on CPU, accelerate has reported one process while torch.distributed had two.


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


def say(message: str) -> None:
    """Print once per run, not once per process."""
    if is_main_process():
        print(message, flush=True)


# --------------------------------------------------------------------------- building pieces


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
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every parameter takes part in every step
        use_cpu=not torch.cuda.is_available(),
    )


def prepare_trackers(recipe: Recipe) -> None:
    """Fail early if a tracker the recipe asks for is missing; keep wandb from prompting."""
    if "tensorboard" in recipe.logging.report_to:
        _require("tensorboard", "tensorboard")
    if "wandb" in recipe.logging.report_to:
        _require("wandb", "wandb")
        os.environ.setdefault("WANDB_PROJECT", recipe.logging.project)
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            # Never an interactive login prompt in the middle of a launch: log offline.
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no WANDB_API_KEY set; logging offline (sync later with `wandb sync`)")


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"logging.report_to: {extra} is not installed; pip install 'simpo-cli[{extra}]' or "
            f"remove {extra} from logging.report_to"
        )


def load_model(recipe: Recipe, start_from: str | None, seed: int):
    """The stage's starting model: a previous stage's output, the recipe's pretrained model, or
    a fresh model built from model.config (seeded, so every run builds the same weights)."""
    settings = recipe.model
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        settings.dtype, torch.float16
    )
    kwargs: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    if start_from is None and settings.init == "from_config":
        set_seed(seed)
        config = dict(settings.config or {})
        model_type = config.pop("model_type")
        model_config = AutoConfig.for_model(model_type, **config)
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    source = start_from or settings.name_or_path
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        raise UserError(
            f"model.name_or_path: cannot load '{source}': {str(err).splitlines()[0]}; give a "
            "local model folder or a reachable hub name"
        ) from None


# --------------------------------------------------------------------------- stages


def stage_start(recipe: Recipe, name: str, output_dir: Path) -> str | None:
    """Where a stage's model starts: the previous stage's output folder, or None for the recipe's
    model when it is the pipeline's first stage."""
    if name not in recipe.pipeline or recipe.pipeline.index(name) == 0:
        return None
    previous = recipe.pipeline[recipe.pipeline.index(name) - 1]
    previous_dir = StageDir(output_dir / previous)
    if not previous_dir.is_complete():
        raise UserError(
            f"stage '{name}' starts from the '{previous}' stage's model, which is not finished "
            f"in {previous_dir.path}; run `simpo train` (all stages) or `simpo {previous}` first"
        )
    return str(previous_dir.path)


def run_stage(recipe: Recipe, name: str, output_dir: Path, overwrite: bool = False) -> Path:
    """Run one stage into output_dir/<name>: resume it if a checkpoint is there, skip it if it
    has finished. Every process of a launch runs this; only the main process writes files.
    Returns the stage folder, which holds the trained model."""
    stage = recipe.stage(name)
    stage_dir = StageDir(output_dir / name)
    identity = stage_identity(recipe.dump(), name)
    if stage_dir.is_complete() and not overwrite:
        stage_dir.check(identity, name)
        say(f"[{name}] already finished in {stage_dir.path}; skipping (--overwrite reruns it)")
        return stage_dir.path
    start_from = stage_start(recipe, name, output_dir)
    if not overwrite:
        stage_dir.check(identity, name)
    prepare_trackers(recipe)
    kind = "sft" if isinstance(stage, SFTStage) else "preference"
    checkpoint = None if overwrite else stage_dir.last_checkpoint()
    has_eval = stage.data.eval is not None
    args = training_arguments(
        recipe,
        name,
        stage_dir.path,
        eval_on_start=kind == "preference" and has_eval and not checkpoint,
    )
    _start_processes(args, recipe)
    if is_main_process():
        stage_dir.create(recipe.to_yaml(), overwrite)
    barrier()
    if is_main_process():
        _print_settings(recipe, name, start_from)

    tokenizer = load_tokenizer(recipe.model, start_from)
    max_prompt = getattr(stage.data, "max_prompt_length", 0)
    datasets_, fingerprints, report_lines = {}, {}, []
    for split in ("train", "eval"):
        source = getattr(stage.data, split)
        if source is None:
            continue
        role = f"{name}.data.{split} ({source.path})"
        raw = load_source(source, role)
        datasets_[split], report = prepare(
            raw, tokenizer, kind, role, stage.data.max_length, max_prompt
        )
        fingerprints[f"{name}.data.{split}"] = fingerprint(source, raw)
        report_lines += report.lines()
    say("\n".join(["data report:", *("  " + line for line in report_lines)]))
    if is_main_process():
        (stage_dir.path / "data_report.txt").write_text("\n".join(report_lines) + "\n")

    model = load_model(recipe, start_from, stage.training.seed)
    _check_vocab(model, tokenizer)
    common = {
        "model": model,
        "args": args,
        "train_dataset": datasets_["train"],
        "eval_dataset": datasets_.get("eval"),
        "processing_class": tokenizer,
        "callbacks": [MetricsFile(stage_dir)],
    }
    if kind == "sft":
        trainer = Trainer(data_collator=SFTCollator(tokenizer.pad_token_id), **common)
    else:
        trainer = SimPOTrainer(
            data_collator=PreferenceCollator(tokenizer.pad_token_id),
            compute_metrics=partial(preference_metrics, stage),
            stage=stage,
            **common,
        )

    if checkpoint is not None:
        step = int(checkpoint.name.split("-")[1])
        say(f"[{name}] resuming from {checkpoint} (step {step})")
        if is_main_process():
            stage_dir.trim_metrics(step)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    summary: dict[str, Any] = {"global_step": trainer.state.global_step}
    if has_eval:
        summary["eval"] = trainer.evaluate()
        if kind == "preference":
            _print_before_after(
                name, _read_json(stage_dir.path / "eval_before.json"), summary["eval"]
            )
    # Under ZeRO-3 every process takes part in gathering the sharded weights; Trainer writes
    # the consolidated 16-bit state dict from the main process only.
    trainer.save_model(str(stage_dir.path))
    if is_main_process():
        tokenizer.save_pretrained(str(stage_dir.path))
        record = reproducibility_record(
            stage.training.seed,
            fingerprints,
            world_size(),
            start_from or str(recipe.model.name_or_path),
        )
        stage_dir.write_json("reproducibility.json", record)
        stage_dir.mark_complete(summary)
    barrier()
    say(f"[{name}] finished: model in {stage_dir.path}")
    return stage_dir.path


def _start_processes(args: TrainingArguments, recipe: Recipe) -> None:
    """Join the process group now rather than at the first step, so files are written by the
    main process only from the start, and check it has the size the recipe planned."""
    _ = args.device  # sets up torch.distributed under a launcher
    if recipe.launch.deepspeed is not None and torch.distributed.is_initialized():
        import deepspeed

        # ZeRO-3 creates the model sharded (zero.Init), which sizes its partitions from
        # DeepSpeed's own process group: on CPU nothing has started it by then.
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    actual, planned = world_size(), recipe.launch.world_size
    if actual != planned:
        raise UserError(
            f"launch: the recipe plans {planned} process(es) but {actual} are running; "
            "start it with `simpo train` (which launches the right number) or set "
            "launch.num_processes / num_machines to match"
        )


# --------------------------------------------------------------------------- reporting


def _check_vocab(model, tokenizer) -> None:
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps the full shape here
    if rows < len(tokenizer):
        raise UserError(
            f"model.config.vocab_size: the model has {rows} embedding rows but the tokenizer "
            f"has {len(tokenizer)} tokens; set vocab_size to at least {len(tokenizer)}"
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _print_settings(recipe: Recipe, name: str, start_from: str | None) -> None:
    seed = recipe.stage(name).training.seed
    start = start_from or (
        f"new {recipe.model.config.get('model_type')} model from model.config (seed {seed})"
        if recipe.model.init == "from_config"
        else recipe.model.name_or_path
    )
    print(f"[{name}] start model: {start}")
    print(f"[{name}] settings (value, then where it came from):")
    print("\n".join(settings_table(recipe, name)))


def _print_before_after(name: str, before: dict | None, after: dict) -> None:
    if not before:
        return
    lines = [f"[{name}] held-out pairs        before     after"]
    for label, key in (("reward accuracy", "eval_rewards/accuracies"), ("SimPO loss", "eval_loss")):
        lines.append(f"[{name}]   {label:<18} {before[key]:>8.4f}  {after[key]:>8.4f}")
    say("\n".join(lines))
