"""Every path a user gives is checked before work starts: one line per problem naming the path
and the fix, exit code 2, no traceback, and nothing written (no folder created, no file
changed). Each case runs the real CLI in a fresh process."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


def test_a_stage_folder_of_another_recipe_names_what_differs(cli, root, monkeypatch):
    """The refusal said only "a different recipe": it names the keys that differ, old -> new,
    the first three and how many more."""
    from simpo_cli.recipe import load_recipe

    monkeypatch.chdir(root)
    changes = ["preference.beta=3", "sft.data.max_length=100", "model.config.hidden_size=32",
               "preference.data.max_prompt_length=20"]  # fmt: skip
    old = load_recipe("tiny", changes)
    for stage in ("preference", "evaluate"):
        (root / "out" / stage).mkdir(parents=True)
        (root / "out" / stage / "resolved_recipe.yaml").write_text(old.to_yaml())
    result = cli("train", "tiny", "-o", "out", "--dry-run")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        f"  preference -> {Path('out/preference')} (stops: {Path('out/preference')}: holds a run "
        "of the 'preference' stage made with a different recipe (model.config.hidden_size: 32 "
        "-> 64, sft.data.max_length: 100 -> 64, preference.beta: 3.0 -> 2.0 and 1 more); pass "
        "--overwrite to start it over, or choose another --output-dir)"
    ) in lines
    assert any("holds a run of the 'evaluate' stage made with" in line for line in lines)


def test_output_dir_that_cannot_be_written(root):
    """A folder its owner may read but not write (0500), by a user who cannot override that:
    the check tries to create a folder there, which the system refuses for the real user and
    capabilities."""
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
    """What the system answers to the trial mkdir decides the line; the trial leaves nothing."""

    def refuse(code):
        def mkdtemp(prefix, dir):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)

    refuse(errno.EACCES)
    assert folder_problems(tmp_path / "run", "--output-dir") == [
        f"{tmp_path / 'run'}: --output-dir cannot be created: {tmp_path} is not writable; fix "
        "its permissions or choose another --output-dir"
    ]
    assert folder_problems(tmp_path, "-o") == [
        f"{tmp_path}: -o is not writable; fix its permissions or choose another -o"
    ]
    refuse(errno.EROFS)
    assert folder_problems(tmp_path, "-o") == [
        f"{tmp_path}: -o is on a read-only filesystem; choose another -o"
    ]
    monkeypatch.undo()
    assert folder_problems(tmp_path, "-o") == [] and list(tmp_path.iterdir()) == []


# Every command that writes, with where its output goes ({} is the place under test) and the
# flag its error names.
WRITERS = {
    "train": (("train", "tiny", "-o", "{}"), "{}", "--output-dir"),
    "sft --dry-run": (("sft", "tiny", "--dry-run", "-o", "{}"), "{}", "--output-dir"),
    "eval -o": (("eval", "model", "--pairs", "pairs.jsonl", "-o", "{}"), "{}", "--output-dir"),
    "eval --pairs-output": (
        ("eval", "model", "--pairs", "pairs.jsonl", "--pairs-output", "{}/pairs.json"),
        "{}/pairs.json",
        "--pairs-output",
    ),
    "plot -o": (("plot", ".", "-o", "{}"), "{}", "--output-dir"),
    "recipes copy": (("recipes", "copy", "tiny", "{}"), "{}", "DEST"),
}


@pytest.fixture
def writable_inputs(root):
    """What the writing commands read, present and valid, so that the output is the only
    problem: a model folder (as the path check sees one) and a pairs file."""
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "model" / "model.safetensors").write_bytes(b"")
    (root / "pairs.jsonl").write_text("{}\n")
    return root


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("place", ["/proc/nope", "/sys/x", "a_file/x"])
def test_output_that_cannot_be_created(cli, writable_inputs, monkeypatch, command, place):
    """The issue's crashes (`simpo train tiny -o /proc/nope` ended in a traceback, exit 1): a
    pseudo-filesystem that refuses the mkdir, or a file in the way, is one line naming the
    flag, exit 2, and nothing written, for every command that writes."""
    root = writable_inputs
    monkeypatch.chdir(root)
    args, shown, flag = WRITERS[command]
    shown = shown.format(place)
    before = snapshot(root)
    result = cli(*(arg.format(place) for arg in args))
    assert result.code == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert result.stderr.splitlines() == result.errors() and len(result.errors()) == 1
    [line] = result.errors()
    if place == "a_file/x":
        assert line == (
            f"error: {shown}: {flag} lies inside {root / 'a_file'}, which is a file; choose "
            f"another {flag}"
        )
    else:
        top = place.rsplit("/", 1)[0]
        assert line.startswith(f"error: {shown}: {flag} cannot be created: {top} is "), line
        assert line.endswith(f"; choose another {flag}"), line
    assert snapshot(root) == before, "something was written"


def _can_mount_read_only(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*read_only(folder), "true"], capture_output=True)
    return probe.returncode == 0


def read_only(folder: Path) -> tuple[str, ...]:
    """Run the command with `folder` read-only (a read-only bind mount of it onto itself in a
    mount namespace of the command's own, util-linux's unshare; needs root or user namespaces)."""
    return ("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder))


@pytest.mark.parametrize("command", WRITERS)
def test_output_on_a_read_only_filesystem(writable_inputs, command):
    """A read-only filesystem is named as one (not as a permission to fix)."""
    root = writable_inputs
    locked = root / "locked"
    locked.mkdir()
    if not _can_mount_read_only(locked):
        pytest.skip("no read-only bind mount here (unshare -m needs root or user namespaces)")
    args, shown, flag = WRITERS[command]
    lines = refused(root, *(arg.format("locked/x") for arg in args), prefix=read_only(locked))
    assert lines == [
        f"error: {shown.format('locked/x')}: {flag} cannot be created: {locked} is on a "
        f"read-only filesystem; choose another {flag}"
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
    lines = refused(root, "eval", "not_a_model", "--pairs", "pairs.jsonl", "--pairs-output",
                    "a_file/scores.json")  # fmt: skip
    assert lines == [
        "error: not_a_model: model to evaluate: not a model folder (no weights (*.safetensors or "
        "*.bin)); give a folder a model was saved to, e.g. outputs/tiny/preference",
        "error: pairs.jsonl: --pairs: no such data file or folder; fix the path, or give a hub "
        "dataset name (owner/name)",
        f"error: a_file/scores.json: --pairs-output lies inside {root / 'a_file'}, which is a "
        "file; choose another --pairs-output",
    ]
    assert refused(root, "eval", "no_model", "--pairs", "owner/pairs") == [
        "error: no_model: model to evaluate: no such model folder; fix the path"
    ]


def test_plot_paths(root):
    assert refused(root, "plot", "a_file") == [
        "error: a_file: is a file, not a run folder; give the folder holding it"
    ]
    assert refused(root, "plot", "no_run") == [
        "error: no_run: no such run folder; give a folder `simpo train` wrote"
    ]
    assert refused(root, "plot", ".", "-o", "a_file/plots") == [
        f"error: a_file/plots: --output-dir lies inside {root / 'a_file'}, which is a file; "
        "choose another --output-dir"
    ]


def test_plot_writes_into_the_output_folder(cli, tmp_path):
    """`simpo plot RUN -o DIR`: -o is the output folder here as in every command; the curves
    land in DIR/training_curves.png and nothing in the run folder."""
    pytest.importorskip("matplotlib")
    stage = tmp_path / "run" / "sft"
    stage.mkdir(parents=True)
    logs = [{"step": step, "loss": 3.0 / step} for step in (1, 2, 3)]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in logs))
    result = cli("plot", tmp_path / "run", "-o", tmp_path / "plots")
    png = tmp_path / "plots" / "training_curves.png"
    assert result.code == 0 and result.stdout.strip() == f"wrote {png}", result.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "run" / png.name).exists()


def test_recipes_copy_destination(root):
    assert refused(root, "recipes", "copy", "tiny", "a_file/tiny") == [
        f"error: a_file/tiny: DEST lies inside {root / 'a_file'}, which is a file; "
        "choose another DEST"
    ]
