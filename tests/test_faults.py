"""Stopping well, through the real CLI on the tiny model: SIGUSR1, a single Ctrl-C and SIGTERM
mid-run each save a checkpoint and exit 75, and the reruns resume from that step and end with the
weights of a run never stopped; a second Ctrl-C aborts at once with 130; resume skips a checkpoint
left incomplete by a kill; a row whose loss is NaN stops the stage with 3, naming the step and the
row, or (on_nonfinite: skip) its step is dropped and counted; the SLURM script passes the warning
signal on and requeues on 75."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from simpo_cli.errors import EXIT_ABORTED, EXIT_NONFINITE, EXIT_PREEMPTED
from simpo_cli.launch import free_port, run_exit_code
from simpo_cli.outputs import CHECKPOINT_DONE, StageDir
from simpo_cli.recipe import RECIPES_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm" / "simpo.sbatch"

# 30 optimizer steps of 8 pairs from a model folder: ZeRO-3 creates a from_config model sharded,
# with other random numbers, but loads a folder's weights exactly.
SETS = [
    "pipeline=[preference]",
    "model.init=pretrained",
    "model.config=null",
    "preference.data.eval=null",
    "preference.data.train.max_rows=240",
    "preference.training.total_batch_size=8",
    "preference.training.logging_steps=1",
    "preference.training.save_steps=20",
]
ONE_PROCESS = ["preference.training.per_device_train_batch_size=8"]
ZERO3 = ["preference.training.per_device_train_batch_size=2"]  # x 2 processes x 2 accumulation


def command(out: Path, start: Path, sets: list[str], *flags: str) -> list[str]:
    sets = [*SETS, f"model.name_or_path={start}", *sets]
    args = [arg for s in sets for arg in ("--set", s)]
    return [sys.executable, "-m", "simpo_cli", "preference", "tiny", "-o", str(out), *args,
            *flags]  # fmt: skip


def zero3_flags() -> list[str]:
    # A port of its own: other runs on this machine may hold the default one.
    return ["--num-processes", "2", "--deepspeed", "zero3", "--main-process-port", str(free_port())]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def logged_steps(stage: Path) -> list[dict]:
    if not (stage / "metrics.jsonl").is_file():
        return []
    lines = (stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.endswith("}") and '"loss"' in x]


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Poll for observable progress (a file, a line) rather than sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit code {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.02)


def end(process: subprocess.Popen) -> None:
    """Leave nothing running, whatever happened: the launcher's workers run in sessions of their
    own, so they are found as its children."""
    if process.poll() is None:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
    process.wait()


def stop_with(signum: int, args: list[str], stage: Path, after_step: int = 3) -> tuple[int, str]:
    """Start a run, send it `signum` once `after_step` steps are logged in the stage's metrics,
    and wait for it to end; (exit code, stderr). Its stdout is left in `stdout_of(stage)`."""
    stdout, stderr = stdout_of(stage), stage.parent.parent / f"{stage.parent.name}.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(args, stdout=out, stderr=err)
        try:
            wait_until(lambda: len(logged_steps(stage)) >= after_step, process, "logged steps")
            process.send_signal(signum)
            process.wait(timeout=300)
        finally:
            end(process)
    return process.returncode, stderr.read_text()


def stdout_of(stage: Path) -> Path:
    return stage.parent.parent / f"{stage.parent.name}.out"


def assert_same_weights(got: dict, expected: dict, tolerance: float) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (got[name] - tensor).abs().max() <= tolerance, name


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """The tiny recipe's seeded model, saved as a folder."""
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("start") / "model")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, start_model) -> Path:
    """The stage folder of a 1-process run never stopped."""
    out = tmp_path_factory.mktemp("straight") / "out"
    result = run(command(out, start_model, ONE_PROCESS))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "preference"


def final_weights(stage: Path) -> dict:
    return load_file(stage / "model.safetensors")


# --------------------------------------------------------------------------- signals


def test_each_stop_signal_saves_and_the_reruns_end_like_a_run_never_stopped(
    tmp_path, start_model, straight
):
    """SIGUSR1 (what SLURM sends before the time limit), a single Ctrl-C and SIGTERM, one per
    start, each a few steps after the last: each saves a checkpoint of the step it was in and
    exits 75; the next start resumes from exactly that step (its log says so, and the metrics
    hold every step once), and the run ends with the weights of a run never stopped."""
    out = tmp_path / "out"
    stage = out / "preference"
    args = command(out, start_model, ONE_PROCESS)
    previous = None
    for signum, after in ((signal.SIGUSR1, 3), (signal.SIGINT, 9), (signal.SIGTERM, 15)):
        code, stderr = stop_with(signum, args, stage, after_step=after)
        assert code == EXIT_PREEMPTED, stderr[-3000:]
        if previous is not None:
            resumed = f"resuming from {stage / f'checkpoint-{previous}'} (step {previous})"
            assert resumed in stdout_of(stage).read_text()
        note = json.loads((stage / "stopped.json").read_text())
        step = note["step"]
        assert note["reason"] == "signal" and note["signal"] == signum.name
        assert after <= step < 30, "stopped after the step it was in, well before the end"
        assert note["checkpoint"] == f"checkpoint-{step}"
        assert StageDir(stage).last_checkpoint() == stage / f"checkpoint-{step}"
        assert not (stage / "stage_complete.json").exists()
        assert [m["step"] for m in logged_steps(stage)] == list(range(1, step + 1))
        again = " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""
        said = (
            f"{signum.name}: finishing this optimizer step, then saving a checkpoint and stopping"
        )
        assert said + again in stderr
        last = stderr.rstrip().splitlines()[-1]
        assert last.startswith(f"[preference] stopped by {signum.name} after step {step}: saved ")
        assert last.endswith(
            f"run the same command again to resume (why: {stage / 'stopped.json'})"
        )
        previous = step

    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {stage / f'checkpoint-{previous}'} (step {previous})" in result.stdout
    assert not (stage / "stopped.json").exists(), "the note of the earlier stop is gone"
    assert [m["step"] for m in logged_steps(stage)] == list(range(1, 31)), "each step once"
    # Same data order, optimizer, scheduler and RNG state: the same arithmetic exactly.
    assert_same_weights(final_weights(stage), final_weights(straight), 0.0)


def simpo_executable() -> str:
    """The installed `simpo` command, beside this Python (SIMPO overrides it)."""
    return os.environ.get("SIMPO") or str(Path(sys.executable).parent / "simpo")


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize(
    ("signum", "flags", "said"),
    [
        (signal.SIGUSR1, [], "[preference] stopped by SIGUSR1; it was not started"),
        (signal.SIGTERM, ["--dry-run"], "[dry-run] stopped by SIGTERM; the plan is above"),
    ],
)
def test_a_stop_signal_while_simpo_starts_stops_it_before_anything_starts(
    tmp_path, start_model, signum, flags, said
):
    """The real `simpo` command, signalled the moment its handler is in place (while it imports),
    stops with 75 and a line that says so; nothing was written."""
    out = tmp_path / "out"
    args = [simpo_executable(), *command(out, start_model, ONE_PROCESS)[3:], *flags]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: catches(process.pid, signum), process, "the signals taken", 60)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        end(process)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == f"{said}; run the same command again to go on"
    assert not out.exists()
    if flags:
        assert "preference ->" in stdout, "the dry run printed its plan"


def test_the_entry_point_takes_the_stop_signals_before_it_imports_anything_else():
    """What `simpo` runs takes SIGTERM and SIGUSR1 before the first import of the command line's
    own packages (typer, pydantic, torch): Python's default would end the process at once on a
    signal sent while they load (exit -15 or -10), and a scheduler may send one then."""
    watch = """
import signal, sys
first = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if not first and name.split(".")[0] in ("typer", "pydantic", "torch", "simpo_cli"):
            if name.removeprefix("simpo_cli.") not in ("simpo_cli", "__main__", "stops", "errors"):
                first.append((name, *map(signal.getsignal, (signal.SIGTERM, signal.SIGUSR1))))
sys.meta_path.insert(0, Watch())
import simpo_cli.__main__
name, *handlers = first[0]
print(name, all(callable(h) for h in handlers))
"""
    result = subprocess.run([sys.executable, "-c", watch], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["simpo_cli.cli", "True"]


def test_a_second_ctrl_c_aborts_at_once(tmp_path, start_model):
    """The first Ctrl-C asks for a stop after the step; the second, sent while that step runs
    (2 steps of 128 pairs here), ends the process at once with 130 and nothing saved."""
    out = tmp_path / "out"
    stage = out / "preference"
    slow_steps = [
        "preference.data.train.max_rows=256",
        "preference.training.total_batch_size=null",
        "preference.training.per_device_train_batch_size=8",
        "preference.training.gradient_accumulation_steps=16",
    ]
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            command(out, start_model, slow_steps), stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            wait_until(lambda: logged_steps(stage), process, "a logged step")
            process.send_signal(signal.SIGINT)
            asked = "SIGINT: finishing this optimizer step"
            wait_until(lambda: asked in stderr.read_text(), process, "the first Ctrl-C's answer")
            process.send_signal(signal.SIGINT)
            sent = time.monotonic()
            process.wait(timeout=60)
            took = time.monotonic() - sent
        finally:
            end(process)
    assert process.returncode == EXIT_ABORTED, stderr.read_text()[-3000:]
    assert took < 10, f"took {took:.1f} s to abort"
    assert "aborted by a second Ctrl-C; nothing more was saved" in stderr.read_text()
    assert not list(stage.glob("checkpoint-*")) and not (stage / "stopped.json").exists()


# --------------------------------------------------------------------------- incomplete checkpoints


def _checkpoint(stage: StageDir, step: int, complete: bool = True) -> Path:
    folder = stage.path / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json"):  # fmt: skip
        (folder / name).write_text("x")
    if complete:
        stage.mark_checkpoint_complete(step)
    return folder


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    stage = StageDir(tmp_path)
    assert stage.last_checkpoint() is None
    _checkpoint(stage, 10)
    # Killed while Trainer rotated old checkpoints away: the folder lost files after completion.
    (_checkpoint(stage, 20) / "optimizer.pt").unlink()
    # Killed while saving: Trainer had written the weights, not yet the rest.
    (_checkpoint(stage, 30, complete=False) / "trainer_state.json").unlink()
    _checkpoint(stage, 5)
    assert stage.last_checkpoint() == tmp_path / "checkpoint-10"
    assert stage.skipped_checkpoints() == [
        f"checkpoint-30 is incomplete (no {CHECKPOINT_DONE}: the run stopped while saving it); "
        "skipped",
        "checkpoint-20 is incomplete (optimizer.pt is missing); skipped",
    ]


def test_a_truncated_newest_checkpoint_is_skipped_on_resume(tmp_path, start_model, straight):
    """The straight run's folder as a kill -9 during its last save would have left it: the
    newest checkpoint's last file, trainer_state.json, half written. The rerun says it skips
    that checkpoint (rather than crash reading it) and resumes from the one before, to the same
    weights."""
    out = tmp_path / "out"
    stage = out / "preference"
    shutil.copytree(straight, stage)
    for name in ("stage_complete.json", "model.safetensors"):
        (stage / name).unlink()
    partial = stage / "checkpoint-30"
    (partial / CHECKPOINT_DONE).unlink()
    state = (partial / "trainer_state.json").read_bytes()
    (partial / "trainer_state.json").write_bytes(state[: len(state) // 2])

    result = run(command(out, start_model, ONE_PROCESS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"[preference] checkpoint-30 is incomplete (no {CHECKPOINT_DONE}: the run stopped while "
        "saving it); skipped"
    ) in result.stdout
    assert f"resuming from {stage / 'checkpoint-20'} (step 20)" in result.stdout
    assert_same_weights(final_weights(stage), final_weights(straight), 0.0)


# --------------------------------------------------------------------------- non-finite steps


BAD_LINE = 10


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, start_model) -> tuple[Path, Path, int]:
    """A real row whose loss is NaN: 16 pairs where only line 10 holds a "~", and a model whose
    input embedding of that token is NaN (untied from the output layer, so other sequences never
    touch it). (model folder, data file, the token). The seeded data order puts line 10 in step
    5, after good steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("poisoned")
    lines = (RECIPES_DIR / "tiny" / "data" / "pref_train.jsonl").read_text().splitlines()[:16]
    rows = [json.loads(line) for line in lines]
    row = rows[BAD_LINE - 1]
    prompt = row["prompt"] + " ~"
    rows[BAD_LINE - 1] = {**row, "prompt": prompt, **{side: [{"role": "user", "content": prompt},
               row[side][1]] for side in ("chosen", "rejected")}}  # fmt: skip
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tokenizer = AutoTokenizer.from_pretrained(start_model)
    ids = [tokenizer.apply_chat_template(r["chosen"], tokenize=True)["input_ids"] for r in rows]
    (token,) = tokenizer("~", add_special_tokens=False)["input_ids"]
    assert [token in row_ids for row_ids in ids] == [n == BAD_LINE - 1 for n in range(16)]
    model = AutoModelForCausalLM.from_pretrained(start_model)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model", data, token


def nonfinite_sets(data: Path, mode: str) -> list[str]:
    # Micro-batches of one pair, two per step: 8 steps, a checkpoint after each.
    return [f"preference.data.train={data}", "preference.training.per_device_train_batch_size=1",
            "preference.training.total_batch_size=null",
            "preference.training.gradient_accumulation_steps=2",
            "preference.training.save_steps=1", "preference.training.save_total_limit=null",
            f"preference.training.on_nonfinite={mode}"]  # fmt: skip


def test_a_nonfinite_loss_stops_naming_the_step_and_the_row(tmp_path, poisoned):
    model, data, _ = poisoned
    out = tmp_path / "out"
    stage = out / "preference"
    result = run(command(out, model, nonfinite_sets(data, "stop")))
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    note = json.loads((stage / "stopped.json").read_text())
    step = note["step"]
    assert note["reason"] == "non-finite loss" and note["rows"] == [f"line {BAD_LINE}"]
    assert step > 1, f"the seeded data order puts line {BAD_LINE} after the first step"
    assert f"step {step}: non-finite loss (micro-batch: line {BAD_LINE} of {data}); the last " \
        f"good checkpoint, checkpoint-{step - 1}, is kept" in errors[0]  # fmt: skip
    assert "on_nonfinite=skip" in errors[0]
    assert StageDir(stage).last_checkpoint() == stage / f"checkpoint-{step - 1}"
    assert not (stage / f"checkpoint-{step}").exists(), "no checkpoint of the bad state"
    assert not (stage / "stage_complete.json").exists()


def test_skip_drops_the_update_of_a_nonfinite_step_and_counts_it(tmp_path, poisoned):
    model, data, token = poisoned
    out = tmp_path / "out"
    stage = out / "preference"
    result = run(command(out, model, nonfinite_sets(data, "skip")))
    assert result.returncode == 0, result.stderr[-3000:]
    logs = logged_steps(stage)
    assert [m["step"] for m in logs] == list(range(1, 9))
    skipped = [m["step"] for m in logs if m["nonfinite_skipped"]]
    assert len(skipped) == 1 and sum(m["nonfinite_skipped"] for m in logs) == 1
    step = skipped[0]
    assert (
        f"step {step}: non-finite loss (micro-batch: line {BAD_LINE} of {data}); update skipped"
    ) in result.stdout

    def weights(at: int) -> dict:
        folder = stage / f"checkpoint-{at}" if at else model
        return load_file(folder / "model.safetensors")

    before, after = weights(step - 1), weights(step)
    for name, tensor in before.items():  # the poisoned embedding row stays NaN: equal_nan
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, equal_nan=True)
    if step < 8:
        later = weights(step + 1)
        assert any(not torch.equal(later[name], after[name]) for name in after)
    final = final_weights(stage)
    embeddings = final.pop("model.embed_tokens.weight")
    others = torch.ones(len(embeddings), dtype=torch.bool)
    others[token] = False
    assert embeddings[token].isnan().all() and embeddings[others].isfinite().all()
    assert all(tensor.isfinite().all() for tensor in final.values())


# --------------------------------------------------------------------------- exit codes


def test_launcher_exit_code_from_the_training_processes():
    assert run_exit_code([75, 75], stopping=True) == EXIT_PREEMPTED
    assert run_exit_code([75], stopping=False) == EXIT_PREEMPTED  # signalled directly (SLURM)
    assert run_exit_code([3, 3], stopping=False) == EXIT_NONFINITE
    assert run_exit_code([2, 2], stopping=False) == 2
    assert run_exit_code([130], stopping=False) == EXIT_ABORTED
    # Killed by the forwarded SIGTERM before it could handle it: nothing was trained yet.
    assert run_exit_code([75, -15], stopping=True) == EXIT_PREEMPTED
    assert run_exit_code([75, -15], stopping=False) is None  # a crash, not a stop
    assert run_exit_code([1, 75], stopping=True) is None


# --------------------------------------------------------------------------- SLURM


def _fake_cluster(tmp_path: Path) -> dict[str, str]:
    """The script's own logic only, in the default suite (tests/test_slurm.py runs it on a real
    cluster with the real simpo): stand-ins for scontrol and srun (which starts the task in
    place, so a signal to it reaches the task as srun's forwarding would) and a `simpo` that
    exits 75 when signalled, as the real one does after saving."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    scripts = {
        "scontrol": f'if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> {log}; fi',
        "srun": 'while [ "${1#-}" != "$1" ]; do shift; done; export SLURM_NODEID=0; exec "$@"',
        "simpo": f"""case " $* " in *" --dry-run "*) exit 0;; esac
echo "simpo $*" >> {log}
trap 'echo "simpo got USR1" >> {log}; exit 75' USR1
touch {tmp_path}/started
while :; do sleep 0.05; done""",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "RECIPE": "recipe.yaml",
        "SIMPO": str(bin_dir / "simpo"),
    }  # fmt: skip


@pytest.mark.parametrize(("restarts", "requeued"), [(0, True), (20, False)])
def test_sbatch_passes_the_warning_on_and_requeues_after_a_save(tmp_path, restarts, requeued):
    env = {**_fake_cluster(tmp_path), "SLURM_RESTART_COUNT": str(restarts)}
    process = subprocess.Popen(
        ["bash", str(SBATCH)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        wait_until((tmp_path / "started").is_file, process, "the training task", timeout=30)
        process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
        stdout, _ = process.communicate(timeout=30)
    finally:
        end(process)
    assert process.returncode == EXIT_PREEMPTED, stdout
    log = (tmp_path / "log").read_text()
    assert "simpo got USR1" in log
    assert "--machine-rank 0" in log.splitlines()[0]
    assert ("scontrol requeue 4242" in log) == requeued
    assert "simpo exited with status 75" in stdout
