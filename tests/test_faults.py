"""Stopping well, through the real CLI on the tiny model: SIGUSR1, a single Ctrl-C and SIGTERM
mid-run each save a checkpoint and exit 75, and the reruns resume from that step and end with the
weights of a run never stopped; a signal while simpo starts stops it before anything starts; a
second Ctrl-C aborts at once with 130; resume skips a checkpoint left incomplete by a kill; an
evaluation due at the step a signal stops after is skipped; a row whose loss is NaN stops the
stage with 3, naming the step and the row, and a rerun with on_nonfinite=skip resumes and ends as
a run that skipped from the start; a row whose gradient (not loss) is not finite stops naming the
step's rows; under skip a bad step's update is dropped, the learning rate held, and the step
counted; the SLURM script passes the warning signal on and requeues on 75 (tests/test_slurm.py
runs it on a real cluster)."""

import json
import math
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
from conftest import simpo_executable
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
    """SIGUSR1 (what SLURM sends before the time limit), then a single Ctrl-C, one per start,
    the second a few steps after the first: each saves a checkpoint of the step it was in and
    exits 75; the next start resumes from exactly that step (its log says so, and the metrics
    hold every step once), and the run ends with the weights of a run never stopped. (SIGTERM,
    the same handler: test_an_evaluation_due_at_the_step_a_signal_stops_is_skipped and the
    SLURM tests.)"""
    out = tmp_path / "out"
    stage = out / "preference"
    args = command(out, start_model, ONE_PROCESS)
    previous = None
    for signum, after in ((signal.SIGUSR1, 3), (signal.SIGINT, 9)):
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
STEPS = 8  # of the non-finite runs below


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, start_model) -> tuple[Path, Path, int]:
    """A real row whose loss is NaN: 16 pairs where only line 10 holds a "~", and a model whose
    input embedding of that token is NaN (untied from the output layer, so other sequences never
    touch it). (model folder, data file, the token). The seeded data order puts line 10 in step
    5, after good steps."""
    from transformers import AutoTokenizer

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

    def nan(embeddings: torch.Tensor) -> None:
        embeddings[token] = float("nan")

    return save_with_embeddings(start_model, folder / "model", nan), data, token


@pytest.fixture(scope="module")
def exploding(tmp_path_factory, start_model, poisoned) -> Path:
    """A model whose gradient is not finite on the poisoned row while every loss stays finite: the
    "~" embedding shrunk 1e15 times, and RMSNorm without its epsilon. RMSNorm scales its input to
    unit size, so the forward pass (and the loss) is as before; but the derivative of its 1/rms
    grows as 1/rms^3, which overflows float32 to inf in the backward pass (the epsilon of 1e-6
    would bound 1/rms at 1e3). Other rows, whose embeddings are of the usual size, train
    normally; the padding embedding, all zeros (0/0 without the epsilon), is made as large as
    the others (padding is masked out: its value changes no loss). Same data as `poisoned`."""
    _, _, token = poisoned

    def shrink(embeddings: torch.Tensor) -> None:
        embeddings[token] *= 1e-15
        embeddings[PAD] = embeddings.abs().mean()

    folder = tmp_path_factory.mktemp("exploding") / "model"
    return save_with_embeddings(start_model, folder, shrink, rms_norm_eps=0.0)


PAD = 5  # the tiny recipe's pad_token_id


def save_with_embeddings(start: Path, folder: Path, change, **config) -> Path:
    """The start model, untied, its input embeddings changed in place by `change`, `config`
    set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(start, **config)
    assert model.config.pad_token_id == PAD
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        change(model.get_input_embeddings().weight)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(start).save_pretrained(folder)
    return folder


def nonfinite_sets(data: Path, mode: str) -> list[str]:
    # Micro-batches of one pair, two per step: 8 steps, a checkpoint after each; a learning rate
    # that changes at every step (see expected_learning_rates).
    return [f"preference.data.train={data}", "preference.training.per_device_train_batch_size=1",
            "preference.training.total_batch_size=null",
            "preference.training.gradient_accumulation_steps=2",
            "preference.training.save_steps=1", "preference.training.save_total_limit=null",
            "preference.training.learning_rate=1e-3",
            "preference.training.lr_scheduler_type=linear",
            "preference.training.warmup_ratio=0.25",
            f"preference.training.on_nonfinite={mode}"]  # fmt: skip


def expected_learning_rates(skipped: list[int]) -> list[float]:
    """The learning rate of each of the 8 steps of nonfinite_sets, worked out by hand: a linear
    schedule with ceil(0.25 * 8) = 2 warmup steps from 0 to 1e-3, then down to 0 at step 8. Update
    u (counting from 0) uses 1e-3 * u / 2 while u < 2, else 1e-3 * (8 - u) / 6. A skipped step is
    no update, so the schedule does not move on: with step 5 skipped the steps use
    0, 0.5, 1, 5/6, 4/6, 4/6, 3/6, 2/6 (x 1e-3), where a schedule that moved on would give
    0, 0.5, 1, 5/6, 4/6, 3/6, 2/6, 1/6."""
    rates = []
    for step in range(1, STEPS + 1):
        update = step - 1 - sum(1 for s in skipped if s < step)
        rates.append(1e-3 * update / 2 if update < 2 else 1e-3 * (STEPS - update) / 6)
    return rates


def assert_learning_rates(logs: list[dict], skipped: list[int]) -> None:
    assert len(skipped) == 1 and skipped[0] < STEPS, "a later step shows whether the rate moved"
    got = [m["learning_rate"] for m in logs]
    assert got == pytest.approx(expected_learning_rates(skipped), rel=1e-6, abs=0)


def checkpoint_weights(stage: Path, step: int) -> dict:
    return load_file(stage / f"checkpoint-{step}" / "model.safetensors")


def assert_equal_weights(got: dict, expected: dict) -> None:
    """Bitwise, the poisoned embedding's NaNs included."""
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, equal_nan=True)


def assert_skipped_update(stage: Path, step: int) -> None:
    """The checkpoint after the skipped step holds the weights, optimizer state and learning-rate
    schedule of the one before; the next step changes the weights again."""
    before, after = stage / f"checkpoint-{step - 1}", stage / f"checkpoint-{step}"
    assert_equal_weights(checkpoint_weights(stage, step), checkpoint_weights(stage, step - 1))
    assert_equal_weights(optimizer_state(after), optimizer_state(before))
    assert scheduler_state(after) == scheduler_state(before)
    later, weights = checkpoint_weights(stage, step + 1), checkpoint_weights(stage, step)
    assert any(not torch.equal(later[name], weights[name]) for name in weights)


def optimizer_state(checkpoint: Path) -> dict:
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return {f"{param}.{key}": value for param, kept in state.items() for key, value in kept.items()}


def scheduler_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "scheduler.pt", weights_only=True)


def stopped_by_a_bad_step(result: subprocess.CompletedProcess, stage: Path) -> tuple[dict, str]:
    """Exit 3 with one error line and no checkpoint of the bad step: (stopped.json, the line)."""
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    note = json.loads((stage / "stopped.json").read_text())
    step = note["step"]
    assert step > 1, f"the seeded data order puts line {BAD_LINE} after the first step"
    assert "on_nonfinite=skip" in errors[0]
    assert StageDir(stage).last_checkpoint() == stage / f"checkpoint-{step - 1}"
    assert not (stage / f"checkpoint-{step}").exists(), "no checkpoint of the bad state"
    assert not (stage / "stage_complete.json").exists()
    return note, errors[0]


def resumed_with_skip(result: subprocess.CompletedProcess, stage: Path, step: int) -> list[dict]:
    """The rerun with on_nonfinite=skip went on from the last good checkpoint to the end, the bad
    step skipped and counted; its logs."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {stage / f'checkpoint-{step - 1}'} (step {step - 1})" in result.stdout
    assert not (stage / "stopped.json").exists()
    assert (stage / "stage_complete.json").exists()
    logs = logged_steps(stage)
    assert [m["step"] for m in logs] == list(range(1, STEPS + 1)), "each step logged once"
    assert [m["step"] for m in logs if m.get("nonfinite_skipped")] == [step]
    assert sum(m.get("nonfinite_skipped", 0) for m in logs) == 1
    return logs


@pytest.fixture(scope="module")
def skipped(tmp_path_factory, poisoned) -> tuple[Path, str]:
    """The stage folder and stdout of a run with on_nonfinite: skip from the start."""
    model, data, _ = poisoned
    out = tmp_path_factory.mktemp("skipped") / "out"
    result = run(command(out, model, nonfinite_sets(data, "skip")))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "preference", result.stdout


def test_skip_drops_the_update_of_a_nonfinite_step_and_holds_the_learning_rate(poisoned, skipped):
    model, data, token = poisoned
    stage, stdout = skipped
    logs = logged_steps(stage)
    assert [m["step"] for m in logs] == list(range(1, STEPS + 1))
    skipped_steps = [m["step"] for m in logs if m["nonfinite_skipped"]]
    assert len(skipped_steps) == 1 and sum(m["nonfinite_skipped"] for m in logs) == 1
    step = skipped_steps[0]
    assert (
        f"step {step}: non-finite loss (micro-batch: line {BAD_LINE} of {data}); update skipped"
    ) in stdout
    assert_skipped_update(stage, step)
    assert_learning_rates(logs, skipped_steps)
    final = final_weights(stage)
    embeddings = final.pop("model.embed_tokens.weight")
    others = torch.ones(len(embeddings), dtype=torch.bool)
    others[token] = False
    assert embeddings[token].isnan().all() and embeddings[others].isfinite().all()
    assert all(tensor.isfinite().all() for tensor in final.values())


def test_a_nonfinite_loss_stops_naming_the_row_and_a_rerun_with_skip_goes_on(
    tmp_path, poisoned, skipped
):
    """Stopped on the bad step, then run again with on_nonfinite=skip (not "a different recipe"):
    it resumes from the last good checkpoint and ends exactly as the run that skipped from the
    start."""
    model, data, _ = poisoned
    out = tmp_path / "out"
    stage = out / "preference"
    note, error = stopped_by_a_bad_step(
        run(command(out, model, nonfinite_sets(data, "stop"))), stage
    )
    step = note["step"]
    assert note["reason"] == "non-finite loss" and note["rows"] == [f"line {BAD_LINE}"]
    assert f"step {step}: non-finite loss (micro-batch: line {BAD_LINE} of {data}); the last " \
        f"good checkpoint, checkpoint-{step - 1}, is kept" in error  # fmt: skip

    result = run(command(out, model, nonfinite_sets(data, "skip")))
    logs = resumed_with_skip(result, stage, step)
    assert (
        f"step {step}: non-finite loss (micro-batch: line {BAD_LINE} of {data}); update skipped"
    ) in result.stdout
    assert_learning_rates(logs, [step])
    assert_equal_weights(final_weights(stage), final_weights(skipped[0]))


def test_a_nonfinite_gradient_norm_stops_naming_the_whole_step_and_skip_drops_it(
    tmp_path, poisoned, exploding
):
    """Every loss finite, the gradient norm not: the stop names the rows of both micro-batches
    of the step; the rerun with on_nonfinite=skip drops that step's update."""
    _, data, _ = poisoned
    out = tmp_path / "out"
    stage = out / "preference"
    note, error = stopped_by_a_bad_step(
        run(command(out, exploding, nonfinite_sets(data, "stop"))), stage
    )
    step, rows = note["step"], note["rows"]
    assert note["reason"] == "non-finite gradient norm"
    assert len(rows) == 2 and len(set(rows)) == 2 and f"line {BAD_LINE}" in rows, rows
    (bad,) = [m for m in logged_steps(stage) if m["step"] == step]
    assert math.isfinite(bad["loss"]) and not math.isfinite(bad["grad_norm"]), bad
    named = f"step {step}: non-finite gradient norm (the step's rows: {', '.join(rows)} of {data})"
    assert f"{named}; the last good checkpoint, checkpoint-{step - 1}, is kept" in error

    result = run(command(out, exploding, nonfinite_sets(data, "skip")))
    logs = resumed_with_skip(result, stage, step)
    assert f"{named}; update skipped" in result.stdout
    assert_skipped_update(stage, step)
    assert_learning_rates(logs, [step])
    assert all(tensor.isfinite().all() for tensor in final_weights(stage).values())


def test_an_evaluation_due_at_the_step_a_signal_stops_is_skipped(tmp_path, start_model):
    """Evaluation after every step; SIGTERM during the run: every step before the one it stops
    after is evaluated, that one is not (the checkpoint is saved first)."""
    pairs = (RECIPES_DIR / "tiny" / "data" / "pref_eval.jsonl").read_text().splitlines()[:4]
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(pairs) + "\n")
    sets = [*ONE_PROCESS, f"preference.data.eval={held_out}", "preference.training.eval_steps=1"]
    out = tmp_path / "out"
    stage = out / "preference"
    code, stderr = stop_with(signal.SIGTERM, command(out, start_model, sets), stage)
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    step = json.loads((stage / "stopped.json").read_text())["step"]
    assert (stage / f"checkpoint-{step}").is_dir()
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m["step"] for m in metrics if "eval_loss" in m and m["step"] > 0]
    assert evaluated == list(range(1, step)), f"stopped after step {step}"


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
