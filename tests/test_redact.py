"""Secrets never reach what simpo writes or prints: resolved_recipe.yaml, the stage's JSON
records, metrics.jsonl, the console. A redacted saved recipe still matches the same recipe run
again (the stage is skipped, not refused as "a different recipe")."""

import os
import subprocess
import sys

import pytest
import yaml

from simpo_cli.redact import REDACTED, is_secret_name, redact, redact_args

HF_TOKEN = "hf_TestSecretValue0123456789"
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
API_KEY = "sk-live-AnotherSecret987654"
ENV = {"HF_TOKEN": HF_TOKEN, "WANDB_API_KEY": WANDB_KEY, "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True), ("HUGGING_FACE_HUB_TOKEN", True), ("WANDB_API_KEY", True),
        ("AWS_SECRET_ACCESS_KEY", True), ("PGPASSWORD", True), ("api_key", True),
        ("hf_token", True), ("wandbApiKey", True), ("password", True), ("credentials", True),
        ("TOKENIZERS_PARALLELISM", False), ("tokenizer", False), ("tokenization", False),
        ("pad_token_id", False), ("max_prompt_length", False), ("HF_HUB_OFFLINE", False),
        ("run_name", False),
    ],
)  # fmt: skip
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_redact_by_key_and_by_environment_value():
    env = {**ENV, "SHORT_TOKEN": "abc", "SSH_KEY": "/root/.ssh/id_rsa"}
    recipe = {
        "model": {
            "tokenizer": "/data/tokenizer",
            "config": {"pad_token_id": 5, "hf_token": "anything", "auth": {"password": "pw"}},
        },
        "logging": {"run_name": f"run-{HF_TOKEN}", "tags": [WANDB_KEY, "abc", "x"]},
        "paths": ["/root/.ssh/id_rsa/other"],
    }
    assert redact(recipe, env) == {
        "model": {
            "tokenizer": "/data/tokenizer",
            "config": {"pad_token_id": 5, "hf_token": REDACTED, "auth": {"password": REDACTED}},
        },
        # Short values and paths of the environment are not secrets worth mangling text for.
        "logging": {"run_name": f"run-{REDACTED}", "tags": [REDACTED, "abc", "x"]},
        "paths": ["/root/.ssh/id_rsa/other"],
    }


def test_printed_command_lines_hide_secret_overrides(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    args = ["--set", f"model.config.api_key={API_KEY}", "--set", f"logging.run_name={HF_TOKEN}",
            "--set", "preference.beta=2.5"]  # fmt: skip
    shown = ["--set", "model.config.api_key=***", "--set", "logging.run_name=***",
             "--set", "preference.beta=2.5"]  # fmt: skip
    assert redact_args(args) == shown


def test_stage_records_are_redacted(tmp_path, monkeypatch):
    """reproducibility.json and metrics.jsonl go through StageDir, which redacts: a token that
    ended up in a model path or a logged value does not reach the file."""
    from simpo_cli.outputs import StageDir, reproducibility_record

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    stage = StageDir(tmp_path)
    record = reproducibility_record(42, {"preference.data.train": "sha256:0"}, 1, HF_TOKEN)
    stage.write_json("reproducibility.json", record)
    stage.append_metrics({"step": 1, "loss": 0.5, "note": f"token {HF_TOKEN}"})
    for name in ("reproducibility.json", "metrics.jsonl"):
        text = (tmp_path / name).read_text()
        assert HF_TOKEN not in text and REDACTED in text, name


SECRET_SETS = [
    "--set", f"model.config.api_key={API_KEY}",
    "--set", f"logging.run_name=run-{HF_TOKEN}",
    "--set", "pipeline=[preference]",
    "--set", "preference.data.train.max_rows=16",
    "--set", "preference.data.eval.max_rows=8",
    "--set", "preference.training.per_device_train_batch_size=4",
    "--set", "preference.training.total_batch_size=null",
    "--set", "preference.training.max_steps=2",
    "--set", "preference.training.logging_steps=1",
]  # fmt: skip


def simpo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli.cli", *args], capture_output=True, text=True, env=env
    )


def test_config_show_redacts():
    result = simpo("config", "show", "tiny", *SECRET_SETS)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["model"]["config"]["api_key"] == REDACTED
    assert shown["logging"]["run_name"] == f"run-{REDACTED}"
    assert shown["model"]["config"]["pad_token_id"] == 5


def test_a_run_writes_and_prints_no_secret_and_reruns_as_the_same_recipe(tmp_path):
    out = tmp_path / "out"
    first = simpo("preference", "tiny", "-o", str(out), *SECRET_SETS)
    assert first.returncode == 0, first.stderr[-3000:]
    stage = out / "preference"
    written = {
        name: (stage / name).read_text()
        for name in (
            "resolved_recipe.yaml",
            "reproducibility.json",
            "metrics.jsonl",
            "eval_before.json",
            "stage_complete.json",
            "data_report.txt",
        )  # fmt: skip
    }
    written |= {"stdout": first.stdout, "stderr": first.stderr}
    for where, text in written.items():
        for secret in (HF_TOKEN, WANDB_KEY, API_KEY):
            assert secret not in text, f"{secret} in {where}"
    saved = yaml.safe_load(written["resolved_recipe.yaml"])
    assert saved["model"]["config"]["api_key"] == REDACTED
    assert saved["model"]["trust_remote_code"] is False

    # The same command again: the redacted saved recipe is the same recipe, so it skips.
    again = simpo("preference", "tiny", "-o", str(out), *SECRET_SETS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[preference] already finished" in again.stdout
