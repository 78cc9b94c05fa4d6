"""The training console: one line of numbers per log step with the authors' metric names, in
place of the Python dicts transformers' ProgressCallback prints; tqdm's training bar stays, and
the bars of work that takes less than a second (simpo_cli/progress.py) are gone."""

import os
import subprocess
import sys

import pytest

from simpo_cli.train.console import format_log

SHORT_RUN = [
    "--set", "pipeline=[preference]",
    "--set", "preference.data.train.max_rows=300",  # tokenized in a blink: no bar
    "--set", "preference.data.eval.max_rows=16",
    "--set", "preference.training.per_device_train_batch_size=4",
    "--set", "preference.training.total_batch_size=null",
    "--set", "preference.training.max_steps=4",
    "--set", "preference.training.logging_steps=2",
    "--set", "preference.training.eval_steps=2",
]  # fmt: skip
AUTHORS_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
)  # fmt: skip


def test_format_log_prints_numbers_as_numbers():
    """transformers 5 hands some values over as strings ('0.2172'): read back as numbers."""
    logs = {"loss": "0.2172", "grad_norm": 0.5, "learning_rate": 1e-06, "rewards/margins": 0.12,
            "epoch": 0.25, "total_flos": 12.0}  # fmt: skip
    assert format_log("preference", logs, 10, 40) == (
        "[preference] step 10/40  loss 0.2172  rewards/margins 0.12  lr 1e-06  grad_norm 0.5  "
        "epoch 0.25"
    )
    evaluation = {"eval_loss": 1.2449, "eval_rewards/accuracies": 0.75, "eval_runtime": 0.0135,
                  "eval_samples_per_second": 1187.0, "epoch": 0.1667}  # fmt: skip
    assert format_log("preference", evaluation, 20, 40) == (
        "[preference] eval at step 20/40  loss 1.245  rewards/accuracies 0.75  runtime 0.0135"
    )
    summary = {"train_runtime": 12.34, "train_samples_per_second": 81.3, "train_loss": 1.0}
    assert format_log("sft", summary, 40, 40) == (
        "[sft] trained to step 40/40  train_runtime 12.34  train_loss 1"
    )


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, start_model):
    """Four SimPO steps from a saved tiny model: its weights are loaded (from_pretrained) and
    the trained model written (save_pretrained), as in any real run."""
    out = tmp_path_factory.mktemp("console") / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = ["--set", "model.init=pretrained", "--set", f"model.name_or_path={start_model}"]
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", "preference", "tiny", "-o", str(out), *start,
         *SHORT_RUN],
        capture_output=True,
        text=True,
        env=env,
    )  # fmt: skip


def _fields(line: str) -> dict[str, float]:
    """`[stage] step 2/4  loss 1.161  lr 0.001` -> {'loss': 1.161, 'lr': 0.001}; every value
    must parse as a number."""
    head, *parts = line.split("  ")
    fields = {}
    for part in parts:
        name, value = part.split(" ")
        fields[name] = float(value)
    return fields


def test_one_line_of_numbers_per_logging_step(short_run):
    assert short_run.returncode == 0, short_run.stderr[-3000:]
    out = short_run.stdout
    assert "{'" not in out and "{'" not in short_run.stderr, "a log dict was printed"
    # DeepSpeed (installed in the dev environment) no longer says on stdout, in every CPU run,
    # that it is setting its accelerator to the CPU.
    assert "Setting accelerator to CPU" not in out + short_run.stderr
    # The settings table lists what the recipe and --set give, and counts the defaults.
    assert ["preference.training.max_steps", "4", "--set"] in [x.split() for x in out.splitlines()]
    assert "preference.loss_type" not in out
    assert "more at their defaults: --all-settings prints them;" in out
    steps = [line for line in out.splitlines() if line.startswith("[preference] step ")]
    # logging_first_step, then every 2 steps of 4.
    assert [line.split("  ")[0] for line in steps] == [
        "[preference] step 1/4",
        "[preference] step 2/4",
        "[preference] step 4/4",
    ]
    for line in steps:
        fields = _fields(line)
        assert set(AUTHORS_NAMES) <= set(fields), line
        assert {"lr", "grad_norm", "epoch"} <= set(fields), line
    evals = [line for line in out.splitlines() if line.startswith("[preference] eval at step ")]
    # Before training (held-out numbers before), at steps 2 and 4, and the final evaluation.
    assert [line.split("  ")[0] for line in evals] == [
        "[preference] eval at step 0/4",
        "[preference] eval at step 2/4",
        "[preference] eval at step 4/4",
        "[preference] eval at step 4/4",
    ]
    for line in evals:
        assert {"loss", "rewards/accuracies", "rewards/margins"} <= set(_fields(line)), line
    # The progress bar is still tqdm's, on stderr.
    assert "4/4 [" in short_run.stderr


def test_no_bar_for_work_of_less_than_a_second(short_run, start_model):
    """transformers drew "Loading weights 20/20" on every load and "Writing model shards 1/1" on
    every save, datasets a map and a filter bar over the 300 rows; only the training bar is
    left (an evaluation pass's bar shows only if it runs over a second, so it is not counted)."""
    assert short_run.returncode == 0, short_run.stderr[-3000:]
    assert f"[preference] start model: {start_model}" in short_run.stdout  # its weights loaded
    for bar in ("Loading weights", "Writing model shards", "Tokenizing", "Dropping from"):
        assert bar not in short_run.stderr, bar
    assert "4/4 [" in short_run.stderr
