"""Every path a user gives is checked before work starts: one line per problem naming the path
and the fix, exit code 2, no traceback, and nothing written (no folder created, no file
changed). Each case runs the real CLI in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simpo_cli.run.paths import folder_problems, looks_local

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def simpo(*args: str, cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "simpo_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
    )


# Root writes anywhere through its capability to override file permissions (CAP_DAC_OVERRIDE):
# setpriv (util-linux) runs the command as root without it, so permissions bite as they do for
# any other user. As another user, the command runs as it is.
WITHOUT_OVERRIDE = (
    ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--") if os.geteuid() == 0 else ()
)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under root."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def refused(root: Path, *args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    """Run `simpo ARGS` in root (after `prefix`); it must stop with exit 2, only `error:` lines
    on stderr, and leave root exactly as it was. Returns the error lines."""
    before = snapshot(root)
    result = simpo(*args, cwd=root, prefix=prefix)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    assert "launching:" not in result.stdout
    assert snapshot(root) == before, "something was written"
    return lines


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("keep me\n")
    return tmp_path


# --------------------------------------------------------------------------- output folder


def test_output_dir_that_is_a_file(root):
    """The bug report: `simpo train tiny -o some_existing_file` ended in NotADirectoryError."""
    lines = refused(root, "train", "tiny", "-o", "a_file")
    assert lines == [
        "error: a_file: --output-dir is a file, not a folder; choose another --output-dir"
    ]


def test_output_dir_inside_a_file(root):
    lines = refused(root, "sft", "tiny", "-o", "a_file/run")
    assert lines == [
        f"error: a_file/run: --output-dir lies inside {root / 'a_file'}, which is a file; "
        "choose another --output-dir"
    ]


def test_output_dir_from_the_recipe_is_named_as_the_recipe_key(root):
    lines = refused(root, "train", "tiny", "--set", "output_dir=a_file")
    assert lines == ["error: a_file: output_dir is a file, not a folder; choose another output_dir"]


def test_stage_folder_that_is_a_file(root):
    (root / "out").mkdir()
    (root / "out" / "preference").write_text("not a folder\n")
    lines = refused(root, "train", "tiny", "-o", "out")
    assert lines == [
        f"error: {Path('out/preference')}: is a file where the 'preference' stage folder goes; "
        "remove it or choose another --output-dir"
    ]


def test_output_dir_that_cannot_be_written(root):
    """A folder its owner may read but not write (0500), by a user who cannot override that:
    the check asks the system (os.access), which answers for the real user and capabilities."""
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        denied = subprocess.run(
            [*WITHOUT_OVERRIDE, "mkdir", str(locked / "probe")], capture_output=True
        )
        assert denied.returncode != 0, "the test's user can write into a 0500 folder"
        lines = refused(root, "train", "tiny", "-o", "locked/run", prefix=WITHOUT_OVERRIDE)
    finally:
        locked.chmod(0o700)
    assert lines == [
        f"error: locked/run: --output-dir cannot be created: {locked} is not writable; fix its "
        "permissions or choose another --output-dir"
    ]


def test_unwritable_folders_are_reported(tmp_path, monkeypatch):
    """The same check without needing a non-root user: os.access says no."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert folder_problems(tmp_path / "run", "--output-dir") == [
        f"{tmp_path / 'run'}: --output-dir cannot be created: {tmp_path} is not writable; fix "
        "its permissions or choose another --output-dir"
    ]
    assert folder_problems(tmp_path, "-o") == [
        f"{tmp_path}: -o is not writable; fix its permissions or choose another -o"
    ]


# --------------------------------------------------------------------------- recipe inputs


@pytest.mark.parametrize(
    "path",
    ["missing.jsonl", "./missing", "data/pairs/v2", "/no/such/pairs.parquet", "~/no-such.json"],
)
def test_missing_local_data(root, path):
    lines = refused(
        root, "preference", "tiny", "-o", "out", "--set", f"preference.data.eval={path}"
    )
    assert lines == [
        f"error: {path.replace('~', str(Path.home()))}: preference.data.eval: no such data file "
        "or folder (looked beside the recipe and in the current folder); fix the path, or give "
        "a hub dataset name (owner/name)"
    ]


def test_hub_dataset_names_are_not_local_paths(root):
    """owner/name that does not exist here is a hub name: accepted. Every problem is reported
    at once, so the run below names its output folder alone."""
    assert not looks_local("princeton-nlp/llama3-ultrafeedback")
    assert not looks_local("HuggingFaceH4/ultrafeedback_binarized", (".jsonl",))
    assert looks_local("data/pairs.jsonl", (".jsonl",)) and looks_local("./pairs")
    hub = "princeton-nlp/llama3-ultrafeedback"
    lines = refused(root, "train", "tiny", "-o", "a_file", "--set", f"preference.data.train={hub}",
                    "--set", "sft.data.eval=missing.jsonl")  # fmt: skip
    assert [line.split(":")[1].strip() for line in lines] == ["a_file", "missing.jsonl"]


def test_every_recipe_path_problem_at_once(root):
    """Tokenizer folder, chat template file, model folder, data of both stages: all reported
    in one run, one line each."""
    lines = refused(
        root, "train", "tiny", "-o", "out",
        "--set", "model.tokenizer=./no_tokenizer",
        "--set", "model.chat_template=templates/chat.jinja",
        "--set", "sft.data.train=sft.jsonl",
        "--set", "preference.reference={model: ./no_reference}",
        "--set", "preference.loss=dpo",
        "--set", "preference.beta=0.1",
        "--set", "preference.gamma_beta_ratio=null",
        "--set", "preference.sft_weight=null",
    )  # fmt: skip
    assert lines == [
        "error: ./no_tokenizer: model.tokenizer: no such tokenizer folder; fix the path, or "
        "give a hub name",
        "error: templates/chat.jinja: model.chat_template: no such template file; fix the path, "
        "or give the template text itself",
        "error: sft.jsonl: sft.data.train: no such data file or folder (looked beside the recipe "
        "and in the current folder); fix the path, or give a hub dataset name (owner/name)",
        "error: ./no_reference: preference.reference.model: no such model folder; fix the path, "
        "or give a hub model name (owner/name)",
    ]


def test_model_folder_without_a_model(root):
    (root / "empty_model").mkdir()
    lines = refused(root, "train", "tiny", "-o", "out", "--set", "model.init=pretrained",
                    "--set", "model.name_or_path=./empty_model")  # fmt: skip
    assert lines == [
        f"error: {root / 'empty_model'}: model.name_or_path: not a model folder (no config.json "
        "and no "
        "weights (*.safetensors or *.bin)); give a folder a model was saved to, e.g. "
        "outputs/tiny/preference"
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "no such DeepSpeed config file; fix the path, or use a shipped config: "),
        ("{broken", "line 1: invalid JSON"),
        ("[1, 2]", "not a DeepSpeed config; it holds one JSON object {...}"),
    ],
)
def test_deepspeed_config_is_read_before_the_launch(root, text, problem):
    if text is not None:
        (root / "ds.json").write_text(text)
    lines = refused(root, "train", "tiny", "-o", "out", "--deepspeed", "ds.json")
    assert len(lines) == 1 and problem in lines[0]
    assert lines[0].startswith(("error: ds.json: launch.deepspeed:", f"error: {root}/ds.json:"))


def test_path_errors_come_before_torch_is_imported(root):
    """The checks run in the parent process before anything heavy: no torch import."""
    code = (
        "import sys\n"
        "from simpo_cli import cli\n"
        "sys.argv = ['simpo', 'train', 'tiny', '-o', 'a_file']\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=ENV
    )
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- other commands


def test_eval_paths(root):
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    lines = refused(root, "eval", "not_a_model", "--pairs", "pairs.jsonl", "--output",
                    "a_file/scores.json")  # fmt: skip
    assert lines == [
        "error: not_a_model: MODEL_DIR: not a model folder (no weights (*.safetensors or "
        "*.bin)); give a folder a model was saved to, e.g. outputs/tiny/preference",
        "error: pairs.jsonl: --pairs: no such data file or folder; fix the path, or give a hub "
        "dataset name (owner/name)",
        f"error: a_file/scores.json: --output lies inside {root / 'a_file'}, which is a file; "
        "choose another --output",
    ]
    assert refused(root, "eval", "no_model", "--pairs", "owner/pairs") == [
        "error: no_model: MODEL_DIR: no such model folder; fix the path"
    ]


def test_plot_paths(root):
    assert refused(root, "plot", "a_file") == [
        "error: a_file: is a file, not a run folder; give the folder holding it"
    ]
    assert refused(root, "plot", "no_run") == [
        "error: no_run: no such run folder; give a folder `simpo train` wrote"
    ]
    assert refused(root, "plot", ".", "--output", "a_file/curves.png") == [
        f"error: a_file/curves.png: --output lies inside {root / 'a_file'}, which is a file; "
        "choose another --output"
    ]


def test_recipes_copy_destination(root):
    assert refused(root, "recipes", "copy", "tiny", "a_file/tiny") == [
        f"error: a_file/tiny: DEST lies inside {root / 'a_file'}, which is a file; "
        "choose another DEST"
    ]
