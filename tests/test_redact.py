"""Secrets never reach what simpo writes or prints: any file of a run's output folder, binary
ones and checkpoints included (config.json, training_args.bin, trainer_state.json, the model
card README.md, ...), wandb's offline run files when wandb is installed, and the console. A
secret in model.config, which transformers saves in config.json, is refused. A redacted saved
recipe still matches the same recipe run again (the stage is skipped, not refused as "a
different recipe")."""

import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from simpo_cli.redact import REDACTED, is_secret_name, redact, redact_args, secret_keys

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
    # What the recipe validation refuses in model.config: the strings redact replaces, and why.
    assert secret_keys(recipe, env) == {
        "model.config.hf_token": "is named like a secret",
        "model.config.auth.password": "is named like a secret",
        "logging.run_name": "holds the value of a secret environment variable",
        "logging.tags[0]": "holds the value of a secret environment variable",
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
    "--set", f"logging.run_name=run-{HF_TOKEN}",
    "--set", f"description=notes {HF_TOKEN}",  # shown in the model card (README.md)
    "--set", "pipeline=[preference]",
    "--set", "preference.data.train.max_rows=16",
    "--set", "preference.data.eval.max_rows=8",
    "--set", "preference.training.per_device_train_batch_size=4",
    "--set", "preference.training.total_batch_size=null",
    "--set", "preference.training.max_steps=2",
    "--set", "preference.training.logging_steps=1",
]  # fmt: skip


def simpo(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra_env}
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *args], capture_output=True, text=True, env=env
    )


def test_config_show_and_dry_run_redact(tmp_path):
    result = simpo("config", "show", "tiny", *SECRET_SETS)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["logging"]["run_name"] == f"run-{REDACTED}"
    assert shown["model"]["config"]["pad_token_id"] == 5

    # A dry run prints the resolved recipe and the accelerate command it would launch.
    plan = simpo("preference", "tiny", "-o", str(tmp_path / "out"), *SECRET_SETS, "--dry-run",
                 "--num-processes", "2")  # fmt: skip
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert f"run_name: run-{REDACTED}" in plan.stdout
    assert f"--set 'logging.run_name=run-{REDACTED}'" in plan.stdout
    assert HF_TOKEN not in plan.stdout + plan.stderr


def test_a_secret_in_model_config_is_refused(tmp_path):
    """transformers saves model.config in config.json, beside the model and in every checkpoint,
    where it cannot be redacted: a string named like a secret, or holding a secret of the
    environment, is refused in one line each (exit 2), by `config show` as by a run, and the run
    writes nothing."""
    out = tmp_path / "out"
    sets = ["--set", f"model.config.api_key={API_KEY}", "--set", f"model.config.note=n-{HF_TOKEN}"]
    for args in (["config", "show", "tiny"], ["preference", "tiny", "-o", str(out)]):
        result = simpo(*args, *sets)
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 2, result.stderr
        assert "model.config: api_key is named like a secret; " in errors[0]
        assert "model.config: note holds the value of a secret environment variable; " in errors[1]
        for line in errors:
            assert "config.json, with the model and in every checkpoint; remove it" in line
        assert "Traceback" not in result.stderr
        for secret in (HF_TOKEN, API_KEY):
            assert secret not in result.stdout + result.stderr
    assert not out.exists()


# wandb (an optional extra) logs offline when installed: its run files are scanned too.
WANDB = importlib.util.find_spec("wandb") is not None


def test_a_run_writes_and_prints_no_secret_and_reruns_as_the_same_recipe(tmp_path):
    """Every file the run leaves under tmp_path (the output folder: the model, config.json,
    training_args.bin, trainer_state.json, checkpoint-*/; wandb's offline run), read as raw
    bytes, holds no secret value of the environment, with a token in logging.run_name."""
    out = tmp_path / "out"
    sets = [*SECRET_SETS, *(["--set", "logging.report_to=[wandb]"] if WANDB else [])]
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb")}
    first = simpo("preference", "tiny", "-o", str(out), *sets, **wandb_env)
    assert first.returncode == 0, first.stderr[-3000:]
    files = [path for path in sorted(tmp_path.rglob("*")) if path.is_file()]
    names = {path.relative_to(out).as_posix() for path in files if path.is_relative_to(out)}
    # simpo's records, and what transformers writes itself, binary files included.
    stage_files = ("resolved_recipe.yaml", "reproducibility.json", "metrics.jsonl",
                   "eval_before.json", "stage_complete.json", "data_report.txt", "config.json",
                   "model.safetensors", "training_args.bin", "README.md")  # fmt: skip
    checkpoint_files = ("config.json", "trainer_state.json", "training_args.bin", "optimizer.pt")
    expected = {f"preference/{name}" for name in stage_files}
    expected |= {f"preference/checkpoint-2/{name}" for name in checkpoint_files}
    assert expected <= names, sorted(expected - names)
    if WANDB:
        assert any(path.suffix == ".wandb" for path in files), sorted(names)
    leaks = [
        f"{secret} in {path.relative_to(tmp_path)}"
        for path in files
        for secret in (HF_TOKEN, WANDB_KEY)
        if secret.encode() in path.read_bytes()
    ]
    leaks += [
        f"{secret} in {where}"
        for where, text in (("stdout", first.stdout), ("stderr", first.stderr))
        for secret in (HF_TOKEN, WANDB_KEY)
        if secret in text
    ]
    assert not leaks, leaks
    saved = yaml.safe_load((out / "preference" / "resolved_recipe.yaml").read_text())
    assert saved["logging"]["run_name"] == f"run-{REDACTED}"
    # The model card is built from the redacted recipe.
    assert f"The recipe: notes {REDACTED}" in (out / "preference" / "README.md").read_text()
    assert saved["model"]["trust_remote_code"] is False

    # The same command again: the redacted saved recipe is the same recipe, so it skips.
    again = simpo("preference", "tiny", "-o", str(out), *sets, **wandb_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[preference] already finished" in again.stdout
