"""Runs stage instances (instances.py; their kinds: stages.py): each into its own folder under
the output directory, resuming from its last complete checkpoint, skipping it when it has
finished. The stage kinds build the trainer, or make their data, and add their own work before
and after training; this module does what every stage shares around them and knows nothing of
any one kind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from simpo_cli.data import (
    TOKENIZED_DIR,
    fingerprint,
    load_source,
    load_tokenizer,
    prepare,
    prepare_reused,
    with_lengths,
)
from simpo_cli.distributed import barrier, is_main_process, say, world_size
from simpo_cli.errors import UserError
from simpo_cli.faults import StepGuard
from simpo_cli.launch import LAUNCH_ID, zero_stage
from simpo_cli.model import adapters
from simpo_cli.model.load import check_vocab, full_model_folder, load_model, load_model_from
from simpo_cli.outputs import StageDir, reproducibility_record
from simpo_cli.recipe import ROUND_STAGES, Recipe, settings_table, stage_identity
from simpo_cli.redact import redact, redact_args, redact_text
from simpo_cli.run import card, stages
from simpo_cli.run.instances import StageInstance, instance, stage_command
from simpo_cli.train import console, schedule
from simpo_cli.train.trainer import MetricsFile, training_arguments


def stage_start(instance: StageInstance, output_dir: Path) -> str | None:
    """Where an instance's model starts (or, for generate, what it samples from): the folder of
    the training instance it follows, or None for the recipe's model. Also checks that every
    instance it needs has finished: the one whose model it takes, and those whose outputs it
    reads (generate's samples for annotate, annotate's pairs for a preference stage without
    data of its own, the checkpoints an evaluate stage scores)."""
    for kind, folder in instance.requires():
        previous_dir = StageDir(output_dir / folder)
        if not previous_dir.is_complete():
            what = {"generate": "samples", "annotate": "pairs"}.get(kind, "model")
            command = stage_command(folder)
            raise UserError(
                f"stage '{instance.folder}' starts from the '{folder}' stage's {what}, which is "
                f"not finished in {previous_dir.path}; run `simpo train` (all stages) or "
                f"`simpo {command}` first"
            )
    if instance.model_from is None:
        return None
    return str(StageDir(output_dir / instance.model_from).path)


def run_stage(recipe: Recipe, name: str, output_dir: Path, overwrite: bool = False) -> Path:
    """Run the recipe's stage `name` (its instance in DIR/<name>); see run_instance. A stage
    that rounds repeat has an instance per round: run those (instances.instances)."""
    if recipe.rounds is not None and name in ROUND_STAGES:
        raise ValueError(f"{name}: recipe '{recipe.name}' runs it in rounds; run its instances")
    return run_instance(instance(recipe, name), output_dir, overwrite)


def run_instance(instance: StageInstance, output_dir: Path, overwrite: bool = False) -> Path:
    """Run one stage instance into its folder under output_dir: resume it if a checkpoint is
    there, skip it if it has finished. Every process of a launch runs this; only the main process
    writes files. Returns the stage folder, which holds the trained model."""
    recipe, name, kind = instance.recipe, instance.folder, instance.kind
    stage = instance.settings
    stage_dir = StageDir(output_dir / instance.folder)
    # resolved_recipe.yaml is written redacted; compare like with like.
    identity = stage_identity(redact(recipe.dump()), kind, instance.round)
    if stage_dir.is_complete() and not overwrite:
        stage_dir.check(identity, kind, instance.round)
        say(f"[{name}] already finished in {stage_dir.path}; skipping (--overwrite reruns it)")
        return stage_dir.path
    start_from = stage_start(instance, output_dir)
    if not overwrite:
        stage_dir.check(identity, kind, instance.round)
    how = stages.KINDS[kind]
    if isinstance(how, stages.DataKind):
        return _run_data_stage(instance, how, stage_dir, start_from, output_dir, overwrite)
    prepare_trackers(recipe)
    adapters.check_combination(recipe)
    checkpoint = None if overwrite else stage_dir.last_checkpoint()
    has_eval = stage.data.eval is not None
    args = training_arguments(
        recipe, kind, stage_dir.path, eval_on_start=how.eval_before and has_eval and not checkpoint
    )
    _start_processes(args, recipe)
    if is_main_process():
        stage_dir.create(recipe.to_yaml(), overwrite)
        stage_dir.stopped_file.unlink(missing_ok=True)  # this run's own stop, if any, is next
    barrier()
    if is_main_process():
        _print_settings(instance, start_from)

    tokenizer = load_tokenizer(recipe.model, start_from)
    max_prompt = getattr(stage.data, "max_prompt_length", 0)
    tokenization = getattr(stage.data, "tokenization", "default")
    datasets_, fingerprints, report_lines = {}, {}, []
    for split in ("train", "eval"):
        source = getattr(stage.data, split)
        if source is None:
            continue
        role = f"{kind}.data.{split} ({source.path})"
        raw = load_source(source, role)
        if instance.sweep_point:
            datasets_[split], report, kept = prepare_reused(
                source, raw, tokenizer, kind, role, stage.data.max_length, max_prompt,
                tokenization, output_dir / TOKENIZED_DIR, write=is_main_process(),
            )  # fmt: skip
            if kept is not None:
                say(f"[{name}] {split} data tokenized as before: read from {kept}")
        else:
            datasets_[split], report = prepare(
                raw, tokenizer, kind, role, stage.data.max_length, max_prompt, tokenization
            )
        if how.rows is not None:
            datasets_[split] = how.rows(stage, datasets_[split])
        if split == "train" and stage.training.balanced_batches:
            datasets_[split] = with_lengths(datasets_[split])
        fingerprints[f"{kind}.data.{split}"] = fingerprint(source, raw)
        report_lines += report.lines()
    say("\n".join(["data report:", *("  " + line for line in report_lines)]))
    if is_main_process():
        (stage_dir.path / "data_report.txt").write_text("\n".join(report_lines) + "\n")

    model, base, load_base = _starting_model(instance, start_from, stage_dir)
    check_vocab(model, tokenizer)
    common = {
        "model": model,
        "args": args,
        "train_dataset": datasets_["train"],
        "eval_dataset": datasets_.get("eval"),
        "processing_class": tokenizer,
        "callbacks": [MetricsFile(stage_dir)],
    }
    trainer = how.build_trainer(recipe, kind, stage, common, start_from, output_dir, checkpoint)
    console.install(trainer, name)  # one line of numbers per log, not Trainer's dicts
    # Signals and non-finite steps: stop after the step (or skip it) on every process at once.
    guard = StepGuard(trainer, name, stage.training.on_nonfinite, str(stage.data.train.path))
    trainer.add_callback(guard)
    # Nothing to train (fewer examples than one step, a learning rate of 0 at every step): one
    # line now rather than a stage that reports success.
    schedule.check_trainer(recipe, kind, trainer, str(stage.data.train.path))
    watch = schedule.WeightsWatch(trainer.model)
    trainer.add_callback(watch)
    if how.before_training is not None:
        how.before_training(recipe, name, trainer, tokenizer, stage_dir, checkpoint is not None)

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
    unchanged = watch.unchanged(trainer.state.global_step)
    if unchanged is not None:
        say(f"[{name}] {unchanged}")
        summary["warnings"] = [unchanged]
    if has_eval:
        summary["eval"] = trainer.evaluate()
    if how.after_training is not None:
        how.after_training(recipe, name, trainer, tokenizer, stage_dir, summary)
    if adapters.is_adapted(trainer.model):
        merge = adapters.writes_merged(recipe, kind)
        adapters.save(trainer.model, stage_dir.path, tokenizer, base, merge, load_base)
        if not merge:
            say(f"[{name}] adapter only (model.lora.merge): the next stage, generate and "
                f"evaluate merge it into its base as they load it")  # fmt: skip
    else:
        # Under ZeRO-3 every process takes part in gathering the sharded weights; Trainer
        # writes the consolidated 16-bit state dict from the main process only.
        trainer.save_model(str(stage_dir.path))
    if is_main_process():
        tokenizer.save_pretrained(str(stage_dir.path))
        # The model card (README.md) before the stage counts as finished: a crash never leaves
        # a finished stage without one.
        card.write_cards(recipe, kind, stage_dir.path, instance.model_from)
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


def _starting_model(instance: StageInstance, start_from: str | None, stage_dir: StageDir):
    """(model, base record, base loader) of a training stage: the model it trains and, with
    LoRA, the base record of its adapter and how to load that base whole in full precision
    (for the merge at the end). Fresh adapters on the starting model, or
    (model.lora.continue_adapter) the previous stage's adapter, trainable, on its own base."""
    recipe, name = instance.recipe, instance.folder
    t = instance.settings.training
    lora = recipe.model.lora
    previous = adapters.adapter_folder(start_from)
    if lora is not None and lora.continue_adapter and previous is not None:
        recorded, base_from, seed = adapters.read_base(previous)
        settings = recipe.model.model_copy(
            update={"name_or_path": recorded.name_or_path, "init": recorded.init,
                    "config": recorded.config, "tokenizer": recorded.tokenizer}
        )  # fmt: skip
        model = load_model_from(settings, base_from, seed, quantized=True)
        model = adapters.continue_adapters(model, previous, recipe.model, t.gradient_checkpointing)
        record = previous / adapters.BASE_RECORD
        base = (
            json.loads(record.read_text())
            if record.is_file()
            else adapters.base_record(settings, base_from, None, seed)
        )
        say(f"[{name}] LoRA: continuing the adapter of {previous}")
        load_base = partial(load_model_from, settings, base_from, seed)
    else:
        # An adapter-only start is merged into files first where the weights are read from
        # files as they are loaded: to be quantized, or partitioned by ZeRO-3.
        source = nullcontext(start_from)
        from_files = recipe.model.quantization is not None or zero_stage(recipe) == 3
        if from_files and adapters.adapter_only(start_from):
            scratch = stage_dir.path / "start_model"
            merge = partial(load_model, recipe, start_from, t.seed)
            source = full_model_folder(start_from, scratch, merge)
        with source as folder:
            model = load_model(recipe, folder, t.seed, quantized=True)
        if lora is None:
            return model, None, None
        model = adapters.add_adapters(model, recipe.model, t.gradient_checkpointing, t.seed)
        base = adapters.base_record(recipe.model, start_from, instance.model_from, t.seed)
        load_base = partial(load_model, recipe, start_from, t.seed)
    trainable, frozen = adapters.trainable_parameters(model)
    say(f"[{name}] LoRA r={lora.r}: {trainable:,} trainable adapter "
        f"parameters on {frozen:,} frozen ({trainable / frozen:.2%})")  # fmt: skip
    return model, base, load_base


def _run_data_stage(
    instance: StageInstance,
    kind: stages.DataKind,
    stage_dir: StageDir,
    start_from: str | None,
    output_dir: Path,
    overwrite: bool,
) -> Path:
    """A stage that makes data rather than a model (generate, annotate, evaluate): the same
    folder, resume and completion rules as a training stage, without a Trainer."""
    recipe, name = instance.recipe, instance.folder
    own_processes = kind.own_processes(instance.settings)
    if not own_processes:  # a vLLM engine starts its own process group (onpolicy/generate.py)
        start_process_group()
        _check_world(recipe)
    if is_main_process():
        stage_dir.create(recipe.to_yaml(), overwrite)
        stage_dir.stopped_file.unlink(missing_ok=True)
    if not own_processes:
        barrier()
    else:
        _folder_ready(stage_dir)
    if is_main_process():
        _print_settings(instance, start_from)
    summary = kind.run(instance, stage_dir, start_from, output_dir)
    if is_main_process():
        record = reproducibility_record(
            recipe.first_stage_seed(), {}, recipe.launch.world_size,
            start_from or str(recipe.model.name_or_path),
        )  # fmt: skip
        stage_dir.write_json("reproducibility.json", record)
        stage_dir.mark_complete(summary)
    if not own_processes:
        barrier()
    say(f"[{name}] finished: output in {stage_dir.path}")
    return stage_dir.path


def _folder_ready(stage_dir: StageDir) -> None:
    """The barrier of processes without a process group (vLLM): the main process, once it has
    made (or with --overwrite emptied) the stage folder, leaves a file named after this launch
    (LAUNCH_ID, set by the command that started it); the others wait for that file."""
    ready = stage_dir.path / f".ready-{os.environ.get(LAUNCH_ID, 'local')}"
    if is_main_process():
        ready.write_text("")
        return
    while not ready.exists():
        time.sleep(1)


def start_process_group() -> None:
    """Join the launch's process group outside a Trainer (gloo on CPU, NCCL on GPUs, as
    TrainingArguments would), so a later training stage in the same process finds it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="nccl")
    else:
        torch.distributed.init_process_group(backend="gloo")


def _check_world(recipe: Recipe) -> None:
    actual, planned = world_size(), recipe.launch.world_size
    if actual != planned:
        raise UserError(
            f"launch: the recipe plans {planned} process(es) but {actual} are running; "
            "start it with `simpo train` (which launches the right number) or set "
            "launch.num_processes / num_machines to match"
        )


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
    _check_world(recipe)


def prepare_trackers(recipe: Recipe) -> None:
    """Fail early if a tracker the recipe asks for is missing; keep wandb from prompting."""
    if "tensorboard" in recipe.logging.report_to:
        _require("tensorboard", "pip install 'simpo-cli[tensorboard]'")
    if "wandb" in recipe.logging.report_to:
        _require("wandb", "pip install wandb (simpo-cli depends on it)")
        os.environ.setdefault("WANDB_PROJECT", redact_text(recipe.logging.project))
        # wandb saves this process's command line in its run files: give it the command line
        # as simpo prints it (nothing reads sys.argv once the command has been parsed).
        sys.argv[1:] = redact_args(sys.argv[1:])
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            # Never an interactive login prompt in the middle of a launch: log offline.
            os.environ["WANDB_MODE"] = "offline"
            say("wandb: no WANDB_API_KEY set; logging offline (sync later with `wandb sync`)")


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"logging.report_to: {module} is not installed; {install} or remove {module} from "
            "logging.report_to"
        )


# --------------------------------------------------------------------------- reporting


def _print_settings(instance: StageInstance, start_from: str | None) -> None:
    recipe, name, kind = instance.recipe, instance.folder, instance.kind
    seed = recipe.first_stage_seed()
    start = start_from or (
        f"new {recipe.model.config.get('model_type')} model from model.config (seed {seed})"
        if recipe.model.init == "from_config"
        else recipe.model.name_or_path
    )
    if kind not in ("annotate", "evaluate"):
        print(f"[{name}] {'samples from' if kind == 'generate' else 'start model'}: {start}")
    print(f"[{name}] settings (value, then where it came from):")
    print("\n".join(settings_table(recipe, kind)))
