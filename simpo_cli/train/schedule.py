"""Whether a training stage can learn anything, checked before its first step: enough examples
for one optimizer step, and a learning-rate schedule that is not 0 at every step; and after its
last step, whether its trained weights changed at all.

The learning rates come from the scheduler Trainer builds (transformers' get_scheduler with the
stage's TrainingArguments: schedule type, warmup, kwargs), stepped on a one-number optimizer,
so they cannot drift from what training uses. Two places ask: the command, before any stage
starts, from the row counts of local data files (and `--dry-run`, which prints the plan), and
each training stage, from the Trainer's own dataloader once its data is tokenized.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import TrainerCallback, TrainingArguments, get_scheduler

from simpo_cli.distributed import world_size
from simpo_cli.errors import UserError
from simpo_cli.recipe import Recipe, StageName
from simpo_cli.train.trainer import schedule_settings


def learning_rates(args: TrainingArguments, steps: int) -> Iterator[float]:
    """The learning rate of optimizer steps 1..steps, in order, as Trainer's scheduler sets
    them (Trainer.create_scheduler: the same call and arguments)."""
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    for _ in range(steps):
        yield optimizer.param_groups[0]["lr"]
        optimizer.step()  # no gradient: nothing moves; keeps the scheduler's order check quiet
        scheduler.step()


def planned_arguments(recipe: Recipe, name: StageName) -> TrainingArguments:
    """The schedule part of a stage's TrainingArguments, without the rest (no DeepSpeed, no
    process group): what the command checks before anything starts."""
    return TrainingArguments(
        output_dir="unused", report_to="none", use_cpu=True,
        **schedule_settings(recipe.stage(name).training),
    )  # fmt: skip


def schedule_problem(
    recipe: Recipe,
    name: StageName,
    args: TrainingArguments,
    examples: int,
    steps: int,
    counted: str,
) -> str | None:
    """One line when stage `name` would train nothing: `examples` (counted as `counted` says:
    rows of a file before dropped rows, or pairs after) fewer than one optimizer step, or a
    learning rate of 0 at each of its `steps` optimizer steps. None when it would train."""
    t = recipe.stage(name).training
    unit = "pairs" if name == "preference" else "examples"
    per_step = recipe.total_batch(name)
    if examples < per_step:
        if t.total_batch_size is not None:
            size = f"{name}.training.total_batch_size {per_step}"
            fix = (
                f"set {name}.training.total_batch_size (with per_device_train_batch_size) to "
                f"{examples} or less"
            )
        else:
            size = (
                f"per_device_train_batch_size {t.per_device_train_batch_size} x "
                f"{recipe.launch.world_size} process(es) x gradient_accumulation_steps "
                f"{recipe.accumulation_steps(name)} = {per_step}"
            )
            fix = (
                f"lower {name}.training.per_device_train_batch_size or gradient_accumulation_steps"
            )
        return (
            f"{name}.data.train: {examples} {unit} ({counted}), fewer than one optimizer step "
            f"({size}); give at least {per_step} {unit}, or {fix}"
        )
    if any(rate > 0 for rate in learning_rates(args, steps)):
        return None
    warmup = args.get_warmup_steps(steps)
    if warmup >= steps:
        return (
            f"{name}.training.warmup_ratio: {t.warmup_ratio:g} of {steps} optimizer step(s) is "
            f"{warmup} warmup step(s), and warmup starts at learning rate 0, so every step would "
            f"train at learning rate 0 and nothing would be learned; set "
            f"{name}.training.warmup_ratio=0, or train more steps (more data, num_train_epochs "
            "or max_steps)"
        )
    return (
        f"{name}.training.lr_scheduler_type: {t.lr_scheduler_type} gives each of the {steps} "
        f"optimizer step(s) learning rate 0, so nothing would be learned; choose another "
        "schedule, or train more steps"
    )


def check_trainer(recipe: Recipe, name: StageName, trainer, source: str) -> None:
    """Before the first step: the stage's tokenized examples (after dropped rows) against one
    optimizer step, and the learning rate of every step Trainer will take (its dataloader, its
    step count and its scheduler). Raises UserError."""
    dataloader = trainer.get_train_dataloader()
    *_, steps = trainer.set_initial_training_values(trainer.args, dataloader)
    examples = len(trainer.train_dataset)
    counted = f"{source}, after dropped rows"
    problem = schedule_problem(recipe, name, trainer.args, examples, steps, counted)
    if problem is not None:
        raise UserError(problem)


# --------------------------------------------------------------------------- after training


INTEGER_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def weights_checksum(model) -> torch.Tensor:
    """Two integer sums over the bit patterns of every trainable weight (under ZeRO-3 this
    process's shard): [sum of bits, sum of squared bits], int64, wrapping on overflow. A weight
    that changes by even one unit in the last place changes them (both staying equal by chance
    would take changes that cancel in both sums at once)."""
    total = None
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        data = getattr(parameter, "ds_tensor", parameter).detach().reshape(-1)
        bits = data.view(INTEGER_OF_SIZE[data.element_size()]).long()
        part = torch.stack([bits.sum(), (bits * bits).sum()])
        total = part if total is None else total + part
    return torch.zeros(2, dtype=torch.long) if total is None else total


class WeightsWatch(TrainerCallback):
    """Notes the trained weights' checksum before the first step of this run (after a resumed
    checkpoint is loaded), for `unchanged` to compare after the last."""

    def __init__(self, model):
        self.model = model
        self.start: torch.Tensor | None = None
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = weights_checksum(self.model)
        self.start_step = state.global_step

    def unchanged(self, end_step: int) -> str | None:
        """A warning line when this run took optimizer steps and no trained weight changed on
        any process; None otherwise. Every process calls it (a collective when launched)."""
        if self.start is None or end_step == self.start_step:
            return None
        changed = (weights_checksum(self.model) != self.start).any().to(torch.float32)
        if world_size() > 1:
            torch.distributed.all_reduce(changed, op=torch.distributed.ReduceOp.MAX)
        if changed.item():
            return None
        steps = end_step - self.start_step
        return (
            f"WARNING: the trained weights are exactly as they were before the {steps} "
            "optimizer step(s) of this run: nothing was learned; look at lr and grad_norm in "
            "metrics.jsonl (a learning rate too small for the precision, gradients of 0, "
            "skipped steps)"
        )
