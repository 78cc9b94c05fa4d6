"""The console while a stage trains: tqdm's progress bar, and one line per log with numbers
printed as numbers.

transformers' ProgressCallback writes every log as a Python dict, its values turned into
strings (`{'loss': '0.2172', 'grad_norm': '3.21', ...}`). StepLines keeps its bars and writes
instead, through tqdm.write (which lifts the bar, prints, and redraws it):

    [preference] step 10/40  loss 0.6931  rewards/chosen -11.6  rewards/accuracies 0.625 ...
        lr 0.001  grad_norm 4.609  epoch 0.25
    [preference] eval at step 20/40  loss 1.245  rewards/accuracies 0.75 ...
    [preference] trained to step 40/40  train_loss 1.241  train_runtime 12.3

The metric names are the ones written to metrics.jsonl (the SimPO authors'), less the `eval_`
prefix on evaluation lines; `learning_rate` is shown as `lr`. The training bar shows from the first
step; an evaluation's bar only once it has taken progress.SECONDS (a pass over a few batches shows
none).
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import has_length

from simpo_cli import progress

# Throughput and FLOP counts: in metrics.jsonl, not worth a place on the line.
HIDDEN = ("total_flos", "samples_per_second", "steps_per_second")
LAST = ("learning_rate", "grad_norm", "epoch")
SHORT = {"learning_rate": "lr"}


def number(value: Any) -> str:
    """A metric as a number: floats to 4 significant digits, integers whole. Strings holding numbers
    (transformers 5 pre-formats some) are read back as numbers."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float):
        return f"{value:.4g}"  # 0.6931, 1e-06, 2 (not 2.0), nan
    return str(value)


def format_log(stage: str, logs: dict[str, Any], step: int, max_steps: int) -> str:
    """One console line for one Trainer log: training, evaluation, or the end-of-training
    summary (train_loss, train_runtime)."""
    where = f"step {step}/{max_steps}"
    if any(key.startswith("eval_") for key in logs):
        head = f"eval at {where}"
        values = {k.removeprefix("eval_"): v for k, v in logs.items() if k != "epoch"}
    elif "train_runtime" in logs:
        head = f"trained to {where}"
        values = {k: v for k, v in logs.items() if k != "epoch"}
    else:
        head = where
        values = dict(logs)
    shown = [k for k in values if not k.endswith(HIDDEN) and k not in LAST]
    shown = sorted(shown, key=lambda k: k != "loss") + [k for k in LAST if k in values]
    parts = [f"{SHORT.get(k, k)} {number(values[k])}" for k in shown]
    return "  ".join([f"[{stage}] {head}", *parts])


class StepLines(ProgressCallback):
    """ProgressCallback with its bars, printing `format_log` lines instead of dicts. Logs after
    training (the final evaluation) are printed too; an evaluation's bar waits
    progress.SECONDS."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if (
            state.is_world_process_zero
            and self.prediction_bar is None
            and has_length(eval_dataloader)
        ):
            self.prediction_bar = tqdm(
                total=len(eval_dataloader),
                leave=self.training_bar is None,
                dynamic_ncols=True,
                delay=progress.SECONDS,
            )
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.prediction_bar is not None:
            # An evaluation logs its numbers before on_evaluate closes its bar, and tqdm.write
            # redraws every open bar: closed first, a bar still waiting is never drawn.
            self.prediction_bar.close()
            self.prediction_bar = None
        if state.is_world_process_zero and logs:
            tqdm.write(format_log(self.stage, logs, state.global_step, state.max_steps))


def install(trainer, stage: str) -> None:
    """Put StepLines in place of the Trainer's progress (or, with disable_tqdm, printer)
    callback."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StepLines(stage))
