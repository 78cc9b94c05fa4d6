"""Stopping well: on a signal, on a non-finite step, and (in outputs.py) resuming only from a
complete checkpoint.

Signals (taken in stops.py). In a training process, a stop request makes it finish the optimizer
step it is in, save a checkpoint through Trainer, write stopped.json into the stage folder and
exit 75; the same command resumes. All processes of a launch stop after the same step: at each
step they agree, in one all-reduce, on whether any of them was asked to, because a ZeRO-3 save is
a collective that every process must join.

Non-finite steps. A step whose loss (in any micro-batch, on any process) or gradient norm is NaN or
infinite stops the stage with exit code 3, naming the step and the data rows of the micro-batch
(of the whole step when only the gradient norm was), and keeps the last good checkpoint (no
checkpoint of the bad state is written); with `training.on_nonfinite: skip` the step's update is
dropped instead, the learning-rate schedule does not move on, and the step is counted in the
metric `nonfinite_skipped`.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from simpo_cli.data import SOURCE_ROW
from simpo_cli.distributed import barrier, is_main_process
from simpo_cli.errors import NonFiniteError, Preempted
from simpo_cli.outputs import StageDir
from simpo_cli.stops import REQUEST

ROWS = "source_rows"  # the batch key that carries the micro-batch's rows (training batches only)
SHOWN_ROWS = 10  # rows named in a message; stopped.json holds them all


# --------------------------------------------------------------------------- processes


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def agree(flags: list[int], device: torch.device) -> list[int]:
    """The largest value of each flag over all processes: what every process then acts on."""
    if not _distributed():
        return flags
    tensor = torch.tensor(flags, dtype=torch.long, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def _gather(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


# --------------------------------------------------------------------------- the trainer side


@dataclass
class SourceRows:
    """A collator whose batches also carry their rows' places in the data source (ROWS: "line
    12"), so that a bad step can name them."""

    collator: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        batch[ROWS] = [f.get(SOURCE_ROW) for f in features]
        return batch


class GuardedTrainer(Trainer):
    """Trainer that remembers, for StepGuard, each micro-batch of the current optimizer step: its
    rows and whether its loss was finite; and logs `nonfinite_skipped` when steps are skipped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches: list[tuple[list[str], torch.Tensor]] = []
        self.skipped_steps: int | None = None  # since the last log; None: not skipping
        self.step_grad_norm: Any = None  # this step's, from Trainer, for StepGuard

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer computes the step's gradient norm (all processes' gradients) just before
        # on_pre_optimizer_step: keep it, so StepGuard need not go over the gradients again.
        self.step_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self.step_grad_norm

    def get_train_dataloader(self):
        # Training batches only: evaluation hands its batches to the model as they are.
        collator = self.data_collator
        self.data_collator = SourceRows(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs.pop(ROWS, [])
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.micro_batches.append((rows, torch.isfinite(loss).all()))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.skipped_steps is not None:
            logs["nonfinite_skipped"] = self.skipped_steps
            self.skipped_steps = 0
        super().log(logs, start_time)


class StepGuard(TrainerCallback):
    """Ends every optimizer step, before the optimizer applies it, with one agreement between the
    processes: was any asked to stop, and was any micro-batch's loss or the gradient norm
    non-finite. Stops training after the step (saving a checkpoint for a signal, none for a bad
    step) or drops a bad step's update; `finish` then ends the stage with the matching error."""

    def __init__(self, trainer: GuardedTrainer, stage: str, on_nonfinite: str, data: str):
        self.trainer = trainer
        self.stage = stage
        self.on_nonfinite = on_nonfinite
        self.data = data  # the training data's path, for messages
        self.stop: dict[str, Any] | None = None  # why training stops; goes into stopped.json
        self.dropping = False  # this step's update is dropped (on_nonfinite: skip)
        if on_nonfinite == "skip":
            trainer.skipped_steps = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        micro, self.trainer.micro_batches = self.trainer.micro_batches, []
        finite = [flag for _, flag in micro]
        loss_ok = bool(torch.stack(finite).all()) if finite else True
        grad_ok = self._gradient_norm_finite(args, model)
        signum, bad_loss, bad_grad = agree(
            [REQUEST.signal, int(not loss_ok), int(not grad_ok)], args.device
        )
        step = state.global_step + 1
        if bad_loss or bad_grad:
            reason = "non-finite loss" if bad_loss else "non-finite gradient norm"
            rows = self._rows_to_blame(micro)
            if not self.trainer.is_deepspeed_enabled:
                # With every gradient None, torch's optimizers leave each parameter and its
                # state as they are. (DeepSpeed has already skipped a step whose gradient norm
                # is not finite, in every precision.)
                model.zero_grad(set_to_none=True)
            if self.on_nonfinite == "skip":
                self.dropping = True
                self.trainer.skipped_steps += 1
                if is_main_process():
                    print(
                        f"[{self.stage}] step {step}: {reason} ({_rows(rows, reason)} of "
                        f"{self.data}); update skipped (training.on_nonfinite: skip)",
                        flush=True,
                    )
            else:
                self.stop = {"reason": reason, "step": step, "rows": rows}
        if signum and self.stop is None:
            self.stop = {"reason": "signal", "signal": signal.Signals(signum).name, "step": step}

    def _gradient_norm_finite(self, args, model) -> bool:
        if args.fp16:
            return True  # fp16's loss scaler skips overflowing steps itself, as a matter of course
        if self.trainer.is_deepspeed_enabled:
            norm = self.trainer.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
            return norm is None or math.isfinite(norm)
        norm, self.trainer.step_grad_norm = self.trainer.step_grad_norm, None
        if norm is not None:
            return math.isfinite(float(norm))
        # A Trainer that did not hand its norm over: look at the gradients themselves (after the
        # all-reduce of data parallel, the same in every process).
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _rows_to_blame(self, micro: list[tuple[list[str], torch.Tensor]]) -> list[str]:
        """The rows of the micro-batches whose loss was not finite, over all processes; if every
        loss was finite (the gradient norm was not), the rows of the whole step."""
        bad = [row for rows, finite in micro if not finite for row in rows]
        every = [row for rows, _ in micro for row in rows]
        gathered = _gather((bad, every))
        blamed = [row for bad, _ in gathered for row in bad]
        blamed = blamed or [row for _, every in gathered for row in every]
        return [row for row in blamed if row is not None]

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.dropping and not self.trainer.is_deepspeed_enabled:
            # Trainer moves the learning-rate schedule on only after an update the optimizer made:
            # it asks accelerate whether the step was skipped, which fp16's loss scaler answers
            # on an overflow (DeepSpeed's engine holds its own schedule the same way). A dropped
            # step is such a step: the schedule goes on from where the last update left it.
            self.trainer.optimizer._is_overflow = True  # what step_was_skipped reads

    def on_step_end(self, args, state, control, **kwargs):
        if self.dropping:
            self.dropping = False
            if not self.trainer.is_deepspeed_enabled:
                self.trainer.optimizer._is_overflow = False  # without a loss scaler, never reset
        if self.stop is None:
            return
        control.should_training_stop = True
        control.should_evaluate = False  # a preempted job has little time left: save first
        # A bad step leaves the last good checkpoint as the newest one.
        control.should_save = self.stop["reason"] == "signal"

    def on_save(self, args, state, control, **kwargs):
        # Trainer has written checkpoint-N: the main process wrote trainer_state.json last, but
        # other processes may still be writing their optimizer shards and RNG states. Once all
        # are here, the checkpoint is whole and may be resumed from.
        barrier()
        if is_main_process():
            StageDir(Path(args.output_dir)).mark_checkpoint_complete(state.global_step)
        barrier()

    def before_training(self, stage_dir: StageDir, step: int) -> None:
        """A stop asked for while the stage was being set up: stop before the first step."""
        signum, _ = agree([REQUEST.signal, 0], self.trainer.args.device)
        if signum:
            self.stop = {"reason": "signal", "signal": signal.Signals(signum).name, "step": step}
            self.finish(stage_dir, saved=False)

    def finish(self, stage_dir: StageDir, saved: bool = True) -> None:
        """After trainer.train(): when it stopped early, write stopped.json and raise the error
        that ends the run with its exit code (75 after a signal, 3 after a non-finite step)."""
        stop = self.stop
        if stop is None:
            return
        checkpoint = stage_dir.last_checkpoint()
        note = {**stop, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        note["checkpoint"] = checkpoint.name if checkpoint else None
        if stop["reason"] != "signal":
            note["data"] = self.data
        if is_main_process():
            stage_dir.write_json(stage_dir.stopped_file.name, note)
        barrier()
        resume = "run the same command again to resume"
        where = f"; {resume} from {checkpoint.name}" if checkpoint else f"; {resume}"
        if stop["reason"] == "signal":
            done = f"saved {checkpoint}" if saved and checkpoint else "nothing to save yet"
            raise Preempted(
                f"[{self.stage}] stopped by {stop['signal']} after step {stop['step']}: {done}; "
                f"{resume} (why: {stage_dir.stopped_file})"
            )
        kept = (
            f"the last good checkpoint, {checkpoint.name}, is kept"
            if checkpoint
            else "no checkpoint was saved before it"
        )
        raise NonFiniteError(
            f"[{self.stage}] step {stop['step']}: {stop['reason']} "
            f"({_rows(stop['rows'], stop['reason'])} of "
            f"{self.data}); {kept}. Check that data, or set "
            # the key of the stage's kind: preference, for round-2/preference too
            f"{self.stage.rpartition('/')[2]}.training.on_nonfinite=skip to skip such "
            f"steps{where}"
        )


def _rows(rows: list[str], reason: str) -> str:
    """`micro-batch: line 7`, `the step's rows: line 7, line 12`, ... with at most SHOWN_ROWS
    named: a non-finite loss blames its micro-batches, a non-finite gradient norm (with every
    loss finite) the whole step."""
    if not rows:
        return "rows unknown"
    shown = ", ".join(rows[:SHOWN_ROWS])
    more = len(rows) - SHOWN_ROWS
    whose = "micro-batch" if reason == "non-finite loss" else "the step's rows"
    return f"{whose}: {shown}" + (f" and {more} more" if more > 0 else "")
