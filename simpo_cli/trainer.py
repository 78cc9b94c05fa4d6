"""The training stages: SFT and SimPO on transformers' Trainer, and the pipeline that chains them.

Trainer runs the loop, checkpointing, resume and (later) DeepSpeed; this module adds what is
SimPO-specific: the paired forward pass, the loss, the authors' metric names, the stage folders.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
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

from simpo_cli import console
from simpo_cli.data import (
    PreferenceCollator,
    SFTCollator,
    add_mismatched_pairs,
    fingerprint,
    load_source,
    load_tokenizer,
    prepare,
)
from simpo_cli.errors import UserError
from simpo_cli.faults import GuardedTrainer, StepGuard
from simpo_cli.losses import IGNORE_INDEX, sequence_logps
from simpo_cli.objectives import PairScores, preference_objective
from simpo_cli.outputs import StageDir, reproducibility_record
from simpo_cli.recipe import PreferenceStage, Recipe, SFTStage, settings_table, stage_identity
from simpo_cli.redact import redact

SFT_TERM_LOSSES = ("cpo", "orpo", "rrhf", "slic")


class PreferenceTrainer(GuardedTrainer):
    """Trainer for preference losses on pairs stacked [chosen; rejected] by PreferenceCollator:
    one forward pass of the policy over both. Reference log-probs, for the losses that need
    them, come with the batch (cached pre-pass) or from `ref_model` (live)."""

    def __init__(self, *args, stage: PreferenceStage, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.ref_model = None if ref_model is None else self._prepare_reference(ref_model)
        self.scoring_reference = False  # prediction_step returns summed log-probs when set
        # Our loss is a mean over this micro-batch's pairs: Trainer must divide it by the number
        # of accumulation steps (and must not pass num_items_in_batch, a token count, to it).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def _pair_scores(self, model, inputs) -> tuple[PairScores, torch.Tensor]:
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        ).logits
        sums, counts = sequence_logps(logits, inputs["labels"], average=False)
        if self.stage.loss == "kto":  # [chosen; rejected; mismatched] from the collator
            b = sums.shape[0] // 3
            scores = PairScores(
                sums[:b], sums[b : 2 * b], counts[:b], counts[b : 2 * b], sums[2 * b :]
            )
            return scores, logits
        half = sums.shape[0] // 2
        return PairScores(sums[:half], sums[half:], counts[:half], counts[half:]), logits

    def _reference_scores(self, inputs, policy: PairScores) -> PairScores | None:
        if not self.stage.uses_reference:
            return None
        if "ref_chosen_logps" in inputs:
            return policy._replace(
                chosen_sum=inputs["ref_chosen_logps"],
                rejected_sum=inputs["ref_rejected_logps"],
                kl_sum=inputs.get("ref_kl_logps"),
            )
        with torch.no_grad():
            reference, _ = self._pair_scores(self.ref_model, inputs)
        return reference

    def _objective(self, policy: PairScores, reference: PairScores | None):
        if self.stage.loss == "kto" and world_size() > 1:
            # KTO's reference point z0 estimates a KL over the whole batch: every process's
            # mismatched completions, as one process would see them (it carries no gradient).
            policy = policy._replace(kl_sum=_all_gather(policy.kl_sum.detach()))
            reference = reference._replace(kl_sum=_all_gather(reference.kl_sum))
        return preference_objective(self.stage, policy, reference)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy, logits = self._pair_scores(model, inputs)
        out = self._objective(policy, self._reference_scores(inputs, policy))
        loss = out.losses.mean()
        self._store_pair_metrics(out, policy, logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    @torch.no_grad()
    def _store_pair_metrics(self, out, policy: PairScores, logits, labels):
        margins = out.chosen_rewards - out.rejected_rewards
        self._store("rewards/chosen", out.chosen_rewards.mean())
        self._store("rewards/rejected", out.rejected_rewards.mean())
        self._store("rewards/accuracies", (margins > 0).float().mean())
        self._store("rewards/margins", margins.mean())
        self._store("logps/chosen", policy.chosen_avg.mean())
        self._store("logps/rejected", policy.rejected_avg.mean())
        if self.stage.sft_weight or self.stage.loss in SFT_TERM_LOSSES:
            self._store("sft_loss", -policy.chosen_avg.mean())
        # Mean raw logit over response positions (the ones that predict a trained token).
        half = policy.chosen_sum.shape[0]
        mask = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)
        per_row = (logits[:, :-1] * mask).sum((1, 2)) / (mask.sum((1, 2)) * logits.shape[-1])
        self._store("logits/chosen", per_row[:half].mean())
        self._store("logits/rejected", per_row[half:].mean())

    def _store(self, name: str, value: torch.Tensor) -> None:
        self._metrics[name].append(value.detach().float().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs get the mean of each pair metric since the previous log.
        if "loss" in logs:
            for name, values in self._metrics.items():
                logs[name] = sum(values) / len(values)
            self._metrics.clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Per-pair results for Trainer's evaluation loop, which shards the data over the
        processes, runs DeepSpeed's inference set-up when needed, and gathers the results:
        [loss, chosen reward, rejected reward, chosen avg logp, rejected avg logp] per pair, or
        [chosen, rejected] summed log-probs in the reference pre-pass."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            policy, _ = self._pair_scores(model, inputs)
            if self.scoring_reference:
                sums = [policy.chosen_sum, policy.rejected_sum, policy.kl_sum]
                scores = torch.stack([x for x in sums if x is not None], dim=1)
            else:
                out = self._objective(policy, self._reference_scores(inputs, policy))
                scores = torch.stack(
                    [out.losses, out.chosen_rewards, out.rejected_rewards,
                     policy.chosen_avg, policy.rejected_avg], dim=1,
                )  # fmt: skip
        return None, scores, torch.zeros(scores.shape[0], device=scores.device)

    def summed_logps(self, dataset) -> list[list[float]]:
        """Summed log-probs of every pair's sequences under this trainer's model, in dataset
        order, one list per side: chosen, rejected (and KTO's mismatched). The reference
        pre-pass."""
        self.scoring_reference, metrics = True, self.compute_metrics
        self.compute_metrics = None
        try:
            scores = self.predict(dataset).predictions
        finally:
            self.scoring_reference, self.compute_metrics = False, metrics
        return [scores[:, column].tolist() for column in range(scores.shape[1])]

    def _prepare_reference(self, ref_model):
        """The live reference model, frozen, placed like the policy: under DeepSpeed its own
        inference engine (ZeRO-3 shards it too), else on the training device."""
        ref_model.eval().requires_grad_(False)
        if not self.is_deepspeed_enabled:
            return ref_model.to(self.args.device)
        import copy

        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        if config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}  # no sharding to gain without ZeRO-3
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        engine.eval()  # DeepSpeed's eval() returns None, not the engine
        return engine


def preference_metrics(prediction) -> dict[str, float]:
    """Held-out metrics from the per-pair results [N, 5] gathered by prediction_step."""
    scores = torch.as_tensor(prediction.predictions, dtype=torch.float64)
    margins = scores[:, 1] - scores[:, 2]
    return {
        "loss": scores[:, 0].mean().item(),
        "rewards/accuracies": (margins > 0).double().mean().item(),
        "rewards/margins": margins.mean().item(),
        "logps/chosen": scores[:, 3].mean().item(),
        "logps/rejected": scores[:, 4].mean().item(),
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


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The same-shaped tensors of every process, concatenated in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


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
            say("wandb: no WANDB_API_KEY set; logging offline (sync later with `wandb sync`)")


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
    # resolved_recipe.yaml is written redacted; compare like with like.
    identity = stage_identity(redact(recipe.dump()), name)
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
        stage_dir.stopped_file.unlink(missing_ok=True)  # this run's own stop, if any, is next
    barrier()
    if is_main_process():
        _print_settings(recipe, name, start_from)

    tokenizer = load_tokenizer(recipe.model, start_from)
    max_prompt = getattr(stage.data, "max_prompt_length", 0)
    tokenization = getattr(stage.data, "tokenization", "default")
    datasets_, fingerprints, report_lines = {}, {}, []
    for split in ("train", "eval"):
        source = getattr(stage.data, split)
        if source is None:
            continue
        role = f"{name}.data.{split} ({source.path})"
        raw = load_source(source, role)
        datasets_[split], report = prepare(
            raw, tokenizer, kind, role, stage.data.max_length, max_prompt, tokenization
        )
        if getattr(stage, "loss", None) == "kto":
            datasets_[split] = add_mismatched_pairs(datasets_[split], stage.data.max_length)
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
        trainer = GuardedTrainer(data_collator=SFTCollator(tokenizer.pad_token_id), **common)
    else:
        trainer = PreferenceTrainer(
            data_collator=PreferenceCollator(tokenizer.pad_token_id),
            compute_metrics=preference_metrics,
            stage=stage,
            ref_model=_live_reference(recipe, stage, start_from),
            **common,
        )
        if stage.uses_reference and stage.reference.mode == "cached":
            trainer.add_callback(
                CachedReference(
                    trainer, recipe, stage, start_from, output_dir, checkpoint is not None
                )
            )
    console.install(trainer, name)  # one line of numbers per log, not Trainer's dicts
    # Signals and non-finite steps: stop after the step (or skip it) on every process at once.
    guard = StepGuard(trainer, name, stage.training.on_nonfinite, str(stage.data.train.path))
    trainer.add_callback(guard)

    for line in [] if overwrite else stage_dir.skipped_checkpoints():
        say(f"[{name}] {line}")
    step = 0
    if checkpoint is not None:
        step = int(checkpoint.name.split("-")[1])
        say(f"[{name}] resuming from {checkpoint} (step {step})")
        if is_main_process():
            stage_dir.trim_metrics(step)
    guard.before_training(stage_dir, step)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    guard.finish(stage_dir)  # raises when training stopped early

    summary: dict[str, Any] = {"global_step": trainer.state.global_step}
    if has_eval:
        summary["eval"] = trainer.evaluate()
        if kind == "preference":
            _print_before_after(
                name,
                stage.loss if stage.loss != "simpo" else "SimPO",
                _read_json(stage_dir.path / "eval_before.json"),
                summary["eval"],
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


# --------------------------------------------------------------------------- reference model


def _reference_source(recipe: Recipe, stage: PreferenceStage, start_from: str | None) -> str | None:
    """The reference model's folder or hub name; None: the recipe's seeded from_config model."""
    if stage.reference.model:
        return stage.reference.model
    if start_from is None and recipe.model.init == "from_config":
        return None
    return start_from or recipe.model.name_or_path


def _live_reference(recipe: Recipe, stage: PreferenceStage, start_from: str | None):
    if not stage.uses_reference or stage.reference.mode != "live":
        return None
    source = _reference_source(recipe, stage, start_from)
    return load_model(recipe, source, stage.training.seed)


class CachedReference(TrainerCallback):
    """Reference log-probs computed once and kept on disk under output_dir/reference_logps/,
    keyed by the reference model, the tokenized pairs and the tokenization. They ride along in
    the batches (PreferenceCollator looks them up by pair_id), so training holds one model.

    When the reference is the stage's starting model, the pass runs at the start of training:
    through Trainer's prediction loop, inside the DeepSpeed engine that training uses (ZeRO-3
    included), sharded over the processes and gathered in order. A separate reference model
    is scored before training by a trainer of its own."""

    def __init__(self, trainer, recipe, stage, start_from, output_dir: Path, resuming: bool):
        self.trainer = trainer
        self.table: list[tuple[float, float] | None] = []
        self.todo: list[tuple[str, Any, Path]] = []
        source = _reference_source(recipe, stage, start_from)
        identity = _model_identity(source, recipe)
        for attr in ("train_dataset", "eval_dataset"):
            dataset = getattr(trainer, attr)
            if dataset is None:
                continue
            first = len(self.table)
            dataset = dataset.add_column("pair_id", list(range(first, first + len(dataset))))
            setattr(trainer, attr, dataset)
            self.table += [None] * len(dataset)
            key = _reference_key(identity, dataset, trainer.processing_class)
            path = output_dir / "reference_logps" / f"{key}.json"
            if path.is_file():
                self._fill(first, json.loads(path.read_text())["sides"])
                say(f"[preference] reference log-probs of {len(dataset)} pairs from {path}")
            elif resuming and not stage.reference.model:
                raise UserError(
                    f"{path}: the cached reference log-probs of this run are gone and the model "
                    "has moved on since; pass --overwrite to start the stage over"
                )
            else:
                self.todo.append((attr, first, path))
        trainer.data_collator.reference = self.table
        if stage.reference.model and self.todo:
            scorer = PreferenceTrainer(
                model=load_model(recipe, source, stage.training.seed),
                args=trainer.args,
                data_collator=trainer.data_collator,
                processing_class=trainer.processing_class,
                stage=stage,
            )
            self._score(scorer)

    def on_train_begin(self, args, state, control, **kwargs):
        self._score(self.trainer)

    def _score(self, scorer: PreferenceTrainer) -> None:
        for attr, first, path in self.todo:
            dataset = getattr(self.trainer, attr)
            say(f"[preference] computing reference log-probs of {len(dataset)} pairs")
            sides = scorer.summed_logps(dataset)
            self._fill(first, sides)
            if is_main_process():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"sides": sides}))
        self.todo = []
        barrier()

    def _fill(self, first: int, sides: list[list[float]]) -> None:
        for offset, pair in enumerate(zip(*sides, strict=True)):
            self.table[first + offset] = pair


def _model_identity(source: str | None, recipe: Recipe) -> dict[str, Any]:
    """What decides the reference model's weights, cheaply: a folder's weight files (name, size,
    modification time), a hub name, or the seeded config of a from_config model."""
    if source is None:
        return {"from_config": recipe.model.config, "seed": recipe.first_stage_seed()}
    folder = Path(source)
    if not folder.is_dir():
        return {"name": source}
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
    )
    return {"folder": str(folder.resolve()), "files": files}


def _reference_key(identity: dict[str, Any], dataset, tokenizer) -> str:
    """sha256 of the model identity, the chat template and every pair's token ids (which fix
    the data, the truncation and the tokenization)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    digest.update((tokenizer.chat_template or "").encode())
    columns = [c for c in dataset.column_names if c.endswith(("_ids", "_labels"))]
    for column in sorted(columns):
        for row in dataset[column]:
            digest.update(np.asarray(row, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:32]


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


def _print_before_after(name: str, loss: str, before: dict | None, after: dict) -> None:
    if not before:
        return
    lines = [f"[{name}] held-out pairs        before     after"]
    rows = (("reward accuracy", "eval_rewards/accuracies"), (f"{loss} loss", "eval_loss"))
    for label, key in rows:
        lines.append(f"[{name}]   {label:<18} {before[key]:>8.4f}  {after[key]:>8.4f}")
    say("\n".join(lines))
