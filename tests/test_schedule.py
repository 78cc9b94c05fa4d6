"""A training stage that would train nothing stops before its first step: data smaller than one
optimizer step, or a learning rate of 0 at every step (from the scheduler Trainer builds); and
a stage whose weights did not change says so."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Trainer, TrainingArguments

from simpo_cli.recipe import RECIPES_DIR, load_recipe
from simpo_cli.run.pipeline import run_stage
from simpo_cli.train.schedule import learning_rates

PAIRS = [
    {"prompt": f"Sort: {a} {b}", "chosen": f"{min(a, b)} {max(a, b)}", "rejected": f"{a} {a}"}
    for a, b in ((2, 1), (7, 3), (9, 5), (4, 8))
]


def copied_tiny(folder: Path, pairs: list[dict]) -> Path:
    """The tiny recipe's settings, copied, with its preference data replaced by `pairs`."""
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    tiny = RECIPES_DIR / "tiny"
    settings = yaml.safe_load((tiny / "recipe.yaml").read_text())
    settings["model"]["tokenizer"] = str(tiny / "tokenizer")
    settings["sft"]["data"]["train"] = str(tiny / "data/sft_train.jsonl")
    settings["sft"]["data"]["eval"] = str(tiny / "data/sft_eval.jsonl")
    settings["preference"]["data"]["train"] = str(data)
    settings["preference"]["data"]["eval"] = None
    for benchmark in settings["evaluate"]["benchmarks"]:
        benchmark["questions"] = str(tiny / benchmark["questions"])
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(settings, sort_keys=False))
    return recipe


def test_three_pairs_stop_the_run_before_any_stage(tmp_path, cli):
    """3 pairs against the tiny recipe's 16 pairs per optimizer step: `simpo train` stops with
    one line and exit 2 before any stage starts (SFT, which has data enough, included), and
    writes nothing; --dry-run stops the same way."""
    recipe = copied_tiny(tmp_path, PAIRS[:3])
    out = tmp_path / "out"
    expected = (
        f"error: preference.data.train: 3 pairs ({tmp_path / 'pairs.jsonl'}, rows before "
        "dropped rows), fewer than one optimizer step (preference.training.total_batch_size "
        "16); give at least 16 pairs, or set preference.training.total_batch_size (with "
        "per_device_train_batch_size) to 3 or less"
    )
    for command in (["train", recipe, "-o", out], ["train", recipe, "-o", out, "--dry-run"],
                    ["preference", recipe, "-o", out]):  # fmt: skip
        result = cli(*command)
        assert result.code == 2, (command, result.stdout[-2000:], result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert result.errors() == [expected], command
        assert not out.exists(), "something was written"


def test_a_schedule_at_learning_rate_0_stops_before_training(tmp_path, cli):
    """3 pairs in one optimizer step of 3, warmup 0.1: the only step is the warmup's first, at
    learning rate 0 (the issue's `step 1/1 ... lr 0`)."""
    recipe = copied_tiny(tmp_path, PAIRS[:3])
    sets = ["--set", "preference.training.total_batch_size=3",
            "--set", "preference.training.per_device_train_batch_size=3"]  # fmt: skip
    expected = (
        "error: preference.training.warmup_ratio: 0.1 of 1 optimizer step(s) is 1 warmup "
        "step(s), and warmup starts at learning rate 0, so every step would train at learning "
        "rate 0 and nothing would be learned; set preference.training.warmup_ratio=0, or train "
        "more steps (more data, num_train_epochs or max_steps)"
    )
    result = cli("train", recipe, "-o", tmp_path / "out", "--dry-run", *sets)
    assert result.code == 2 and result.errors() == [expected]
    result = cli("train", recipe, "-o", tmp_path / "out", "--dry-run", *sets,
                 "--set", "preference.training.warmup_ratio=0")  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert "optimizer steps: 1 per epoch (3 rows, before dropped rows); 1 in all" in result.stdout


def test_pairs_dropped_while_tokenizing_are_counted_before_the_first_step(tmp_path, cli):
    """4 rows, one of them a pair whose chosen and rejected are the same (dropped while
    tokenizing): the command's count (4 rows) passes, the stage's (3 pairs) stops it before
    the first step, with one line."""
    same = {"prompt": "Sort: 5 6", "chosen": "5 6", "rejected": "5 6"}
    recipe = copied_tiny(tmp_path, [*PAIRS[:3], same])
    out = tmp_path / "out"
    result = cli("preference", recipe, "-o", out, "--set", "pipeline=[preference]",
                 "--set", "preference.training.total_batch_size=4",
                 "--set", "preference.training.per_device_train_batch_size=4",
                 "--set", "preference.training.warmup_ratio=0")  # fmt: skip
    assert result.code == 2, result.stderr[-2000:]
    assert result.errors() == [
        f"error: preference.data.train: 3 pairs ({tmp_path / 'pairs.jsonl'}, after dropped "
        "rows), fewer than one optimizer step (preference.training.total_batch_size 4); give "
        "at least 4 pairs, or set preference.training.total_batch_size (with "
        "per_device_train_batch_size) to 3 or less"
    ]
    assert not (out / "preference" / "model.safetensors").exists()
    assert not list((out / "preference").glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("scheduler", "warmup", "steps"),
    [("cosine", 0.1, 10), ("linear", 0.5, 4), ("constant_with_warmup", 0.3, 5), ("cosine", 0.1, 1)],
)
def test_learning_rates_are_those_of_the_scheduler_trainer_builds(tmp_path, scheduler, warmup,
                                                                   steps):  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=0.01,
        lr_scheduler_type=scheduler, warmup_steps=warmup,
    )  # fmt: skip
    trainer = Trainer(model=torch.nn.Linear(2, 1), args=args)
    trainer.create_optimizer_and_scheduler(steps)
    expected = []
    for _ in range(steps):
        expected.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert list(learning_rates(args, steps)) == expected
    assert expected[0] == 0.0 and (steps == 1 or max(expected) > 0)


def test_a_stage_whose_weights_did_not_change_says_so(tmp_path, monkeypatch, capsys):
    """Optimizer steps that move nothing (SGD's step made a no-op): the stage finishes with a
    warning line, kept in stage_complete.json."""
    recipe = load_recipe(
        "tiny",
        [
            "pipeline=[preference]",
            "preference.data.train.max_rows=8",
            "preference.data.eval=null",
            "preference.training.max_steps=2",
            "preference.training.optim=sgd",
            "preference.training.warmup_ratio=0",
            "preference.training.per_device_train_batch_size=4",
            "preference.training.total_batch_size=4",
        ],
    )
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: None)
    stage_dir = run_stage(recipe, "preference", tmp_path / "run")
    summary = json.loads((stage_dir / "stage_complete.json").read_text())
    warning = (
        "WARNING: the trained weights are exactly as they were before the 2 optimizer step(s) "
        "of this run: nothing was learned"
    )
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith(warning)
    assert f"[preference] {warning}" in capsys.readouterr().out
