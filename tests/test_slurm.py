"""scripts/slurm/simpo.sbatch on a real one-node SLURM cluster (`make test-slurm` starts one with
scripts/slurm/local_cluster.sh): the tiny recipe submitted with sbatch, stopped by SLURM's own
time-limit warning and by signals sent with scancel at chosen moments of the job (during the
dry-run, while simpo imports, between stages, during a save), requeued by the script, resumed by
the rerun, and finished with the weights of a run never stopped; and a two-phase `simpo sweep
--slurm` run as job arrays through the same script. Skipped unless SIMPO_TEST_SLURM_CONF names
the cluster's slurm.conf."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import simpo_executable
from safetensors.torch import load_file

from simpo_cli.errors import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm" / "simpo.sbatch"
CONF = os.environ.get("SIMPO_TEST_SLURM_CONF")

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not CONF, reason="needs the local SLURM cluster: make test-slurm"),
]

# SFT (4 steps) then SimPO (120 steps of 8 pairs, a checkpoint every 20: a stop sent once
# checkpoint-20 is written lands well before the end, even on a fast machine) from a model
# folder, one process on the CPU.
SETS = [
    "pipeline=[sft,preference]",
    "model.init=pretrained",
    "model.config=null",
    "sft.data.eval=null",
    "sft.data.train.max_rows=64",
    "sft.training.total_batch_size=16",
    "preference.data.eval=null",
    "preference.data.train.max_rows=960",
    "preference.training.total_batch_size=8",
    "preference.training.per_device_train_batch_size=8",
    "preference.training.logging_steps=1",
    "preference.training.save_steps=20",
]


def simpo_args(start: Path) -> list[str]:
    sets = [*SETS, f"model.name_or_path={start}"]
    return [arg for s in sets for arg in ("--set", s)]


def slurm_env(**more: str) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": CONF, **more}


def slurm(*args: str) -> str:
    result = subprocess.run(args, env=slurm_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
    return result.stdout


def submit(folder: Path, sbatch_flags: list[str], script_args: list[str], **env: str) -> str:
    """sbatch the script from `folder` with 1 node, no GPU; the job's id."""
    flags = ["--nodes=1", "--gres=none", f"--output={folder / 'job.log'}", f"--chdir={folder}"]
    env = {"GPUS_PER_NODE": "1", "SIMPO": simpo_executable(), "RECIPE": "tiny", **env}
    command = ["sbatch", "--parsable", *flags, *sbatch_flags, str(SBATCH), *script_args]
    result = subprocess.run(command, env=slurm_env(**env), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    """scontrol's fields of the job (JobState, Restarts, ExitCode, ...)."""
    line = slurm("scontrol", "show", "job", "--oneliner", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", line))


def log(folder: Path) -> str:
    path = folder / "job.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def wait_for(condition, job_id: str, what: str, timeout: float = 300) -> None:
    """Poll for observable progress, failing early when the job has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        state = job(job_id)["JobState"]
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            if condition():
                return
            pytest.fail(f"the job ended ({state}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.05)


def wait_until_done(job_id: str, timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (fields := job(job_id))["JobState"] in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"):
        if time.monotonic() > deadline:
            slurm("scancel", job_id)
            pytest.fail(f"job {job_id} still {fields['JobState']} after {timeout} s")
        time.sleep(0.5)
    return fields


def started(folder: Path, restart: int) -> bool:
    return f"restart {restart}:" in log(folder)


def training_simpo(job_id: str) -> psutil.Process | None:
    """The job's `simpo train` that trains (not the dry-run), once it is running."""
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline, environ = process.info["cmdline"] or [], process.info["environ"] or {}
        except psutil.Error:
            continue
        if environ.get("SLURM_JOB_ID") != job_id or environ.get("SLURM_STEP_ID") is None:
            continue
        if "train" in cmdline and "--dry-run" not in cmdline and "bash" not in cmdline[0]:
            return process
    return None


def scancel_batch(job_id: str, signal: str) -> None:
    """What `--signal=B:SIG@N` does before the time limit: SIG to the batch shell only."""
    slurm("scancel", "--batch", f"--signal={signal}", job_id)


def preempt(job_id: str) -> None:
    """What a preemption does: SIGTERM to every process of the job, the batch shell too."""
    slurm("scancel", "--full", "--signal=TERM", job_id)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, start_model) -> Path:
    """The preference stage folder of the same recipe run never stopped, outside SLURM."""
    out = tmp_path_factory.mktemp("straight") / "out"
    command = [simpo_executable(), "train", "tiny", "-o", str(out), *simpo_args(start_model)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "preference"


def logged_steps(stage: Path) -> list[int]:
    lines = (stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if x.endswith("}") and '"loss"' in x]


def test_a_stop_at_any_moment_requeues_and_the_job_ends_like_a_run_never_stopped(
    tmp_path, start_model, straight
):
    """Four stops, each at another moment of the job, each followed by a requeue and a rerun
    that goes on from where the last one stopped; the fifth start finishes. (The log's checks
    go start by start.)"""
    out = tmp_path / "out"
    job_id = submit(tmp_path, ["--time=30"], simpo_args(start_model), OUTPUT_DIR=str(out))
    sft, preference = out / "sft", out / "preference"

    # Start 0, during the dry-run (it follows the start line at once and imports no torch).
    wait_for(lambda: started(tmp_path, 0), job_id, "the first start")
    scancel_batch(job_id, "USR1")
    # Start 1, while the training simpo is still importing: a preemption's SIGTERM to every
    # process of the job, this simpo too.
    wait_for(lambda: started(tmp_path, 1), job_id, "the second start")
    wait_for(lambda: training_simpo(job_id) is not None, job_id, "the training simpo", 120)
    preempt(job_id)
    # Start 2, between the stages: SFT has just finished.
    wait_for(lambda: started(tmp_path, 2), job_id, "the third start")
    wait_for((sft / "stage_complete.json").is_file, job_id, "the end of SFT")
    scancel_batch(job_id, "USR1")
    # Start 3, during the save of checkpoint-20 of the preference stage.
    wait_for(lambda: started(tmp_path, 3), job_id, "the fourth start")
    wait_for((preference / "checkpoint-20").is_dir, job_id, "checkpoint-20")
    scancel_batch(job_id, "USR1")

    fields = wait_until_done(job_id)
    text = log(tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-5000:]
    assert fields["Restarts"] == "4", text[-5000:]
    for restart in range(5):
        assert started(tmp_path, restart), f"start {restart} is not in the log"
    assert text.count("requeueing job") == 4, text[-5000:]

    # What each start did, from the log.
    starts = re.split(r"^job \d+, restart \d+: .*$", text, flags=re.M)[1:]
    assert len(starts) == 5
    during_dry_run, importing, between, saving, last = starts
    for one, signal in ((during_dry_run, "USR1"), (importing, "TERM")):
        assert f"{signal} received" in one and "requeueing job" in one
        assert "[sft]" not in one and "[preference]" not in one, "no stage started"
    # SFT ran in start 2 (its plan had it start fresh; start 3 found it finished).
    assert f"sft -> {sft} (starts fresh)" in between
    assert re.search(r"\[preference\] stopped by SIGUSR1(;| after step 0: nothing)", between)
    assert "[sft] already finished" in saving
    stopped = re.findall(r"\[preference\] stopped by SIGUSR1 after step (\d+): saved", saving)
    assert len(stopped) == 1, saving[-3000:]
    step = int(stopped[0])
    assert 20 <= step < 120, "stopped after the step in hand, after checkpoint-20, before the end"
    assert f"resuming from {preference / f'checkpoint-{step}'} (step {step})" in last
    assert "simpo exited with status 0" in last
    assert logged_steps(preference) == list(range(1, 121)), "each step logged once"
    # Same data order, optimizer, scheduler and RNG state: the same arithmetic exactly.
    got = load_file(preference / "model.safetensors")
    expected = load_file(straight / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (got[name] == tensor).all(), name


def test_the_time_limit_warning_requeues_until_max_requeues(tmp_path, start_model):
    """SLURM's own warning (`--signal=B:USR1@55` with a one-minute limit: at most 5 s after each
    start, since SLURM may send it up to a minute early) stops every start before it trains;
    with MAX_REQUEUES=1 the job requeues once, then ends with 75 and says how to go on."""
    out = tmp_path / "out"
    # A job that cannot finish in a minute, however fast the machine (thousands of steps).
    longer = ["--set", "preference.data.train.max_rows=null", "--set",
              "preference.training.num_train_epochs=100"]  # fmt: skip
    job_id = submit(
        tmp_path,
        ["--time=1", "--signal=B:USR1@55"],
        [*simpo_args(start_model), *longer],
        OUTPUT_DIR=str(out),
        MAX_REQUEUES="1",
    )
    fields = wait_until_done(job_id, timeout=300)
    text = log(tmp_path)
    assert fields["Restarts"] == "1", text
    assert fields["ExitCode"] == f"{EXIT_PREEMPTED}:0", text
    assert text.count("USR1 received") == 2, text
    assert "requeueing job" in text
    assert "not requeueing (already restarted 1 times)" in text
    assert not (out / "preference" / "stage_complete.json").exists()


# --------------------------------------------------------------------------- sweeps

LR = "preference.training.learning_rate"
GBR = "preference.gamma_beta_ratio"
# Phase 1: three learning rates, one of which diverges (its point fails); phase 2: two
# gamma/beta ratios on phase 1's best. The tiny recipe small, as tests/test_sweep.py's sweep.
SWEEP = [
    "--set", f"sweep.phases=[{{grid: {{{LR}: [1.0e-3, 3.0e-3, 1.0e+30]}}}}, "
             f"{{grid: {{{GBR}: [0.3, 0.5]}}}}]",
    "--set", "sft.data.train.max_rows=64",
    "--set", "sft.data.eval.max_rows=32",
    "--set", "preference.data.eval.max_rows=32",
    "--set", "pipeline=[sft, preference]",
    "--max-rows", "48",
    # One node, no GPU, and not the script's whole node (--exclusive): two points at once.
    "--slurm", "--max-parallel", "2",
    "--sbatch-arg=--nodes=1", "--sbatch-arg=--gres=none", "--sbatch-arg=--oversubscribe",
]  # fmt: skip


def sweep_slurm(folder: Path, out: Path) -> subprocess.CompletedProcess:
    """`simpo sweep tiny -o OUT ... --slurm` from `folder`, one process per job."""
    command = [simpo_executable(), "sweep", "tiny", "-o", str(out), *SWEEP]
    return subprocess.run(command, env=slurm_env(GPUS_PER_NODE="1"), cwd=folder,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def array_tasks(job_id: str) -> list[dict[str, str]]:
    """scontrol's records of every task of a job array."""
    text = slurm("scontrol", "show", "job", "--oneliner", job_id)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line]


def test_a_two_phase_sweep_runs_as_job_arrays_and_a_rerun_submits_only_what_is_left(tmp_path):
    """`simpo sweep --slurm`: the shared SFT as one job, each phase as one job array (a task
    per point, at most 2 at once) with a report job after it, phase 2 after phase 1's report
    and on its best point, a failed point recorded without holding phase 2 up; then a rerun
    submits only the failed point and what depends on it, and one while those are queued is
    refused."""
    out = tmp_path / "run"
    sweep = out / "sweep"
    first = sweep_slurm(tmp_path, out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    submitted = json.loads((sweep / "slurm.json").read_text())["submissions"]
    assert len(submitted) == 1
    jobs = {job["job"]: job for job in submitted[0]["jobs"]}
    assert list(jobs) == ["shared", "phase1", "report1", "phase2", "report2"]
    ids = {key: job["job_id"] for key, job in jobs.items()}
    assert jobs["phase1"]["array"] == "0-2%2" and jobs["phase2"]["array"] == "0-1%2"
    assert jobs["phase1"]["points"] == ["lr=0.001", "lr=0.003", "lr=1e+30"]
    assert jobs["phase2"]["points"] is None  # known once phase 1 has a best
    assert f"phase 1: job array {ids['phase1']}, tasks 0-2%2" in first.stdout
    assert f"report of phase 1: job {ids['report1']}, after job {ids['phase1']}" in first.stdout

    report2 = wait_until_done(ids["report2"], timeout=900)
    logs = {path.name: path.read_text() for path in (sweep / "slurm").iterdir()}
    everything = "\n".join(f"== {name}\n{text[-1500:]}" for name, text in sorted(logs.items()))
    assert report2["JobState"] == "COMPLETED", everything
    for key in ("shared", "report1"):
        assert job(ids[key])["ExitCode"] == "0:0", everything

    # Each phase was one array: a record per task, the limit of 2 at once, a log per task.
    for key, count in (("phase1", 3), ("phase2", 2)):
        tasks = array_tasks(ids[key])
        assert sorted(int(t["ArrayTaskId"]) for t in tasks) == list(range(count)), tasks
        assert {t["ArrayJobId"] for t in tasks} == {ids[key]}
        assert {t["ArrayTaskThrottle"] for t in tasks} == {"2"}
        assert {f"{key}-{ids[key]}_{i}.out" for i in range(count)} <= set(logs)
    tasks = {t["ArrayTaskId"]: t for t in array_tasks(ids["phase1"])}
    states = {i: (t["JobState"], t["ExitCode"]) for i, t in tasks.items()}
    assert states == {"0": ("COMPLETED", "0:0"), "1": ("COMPLETED", "0:0"),
                      "2": ("FAILED", "1:0")}, states  # fmt: skip
    # %2: the third task started only once one of the first two had ended.
    assert tasks["2"]["StartTime"] >= min(tasks["0"]["EndTime"], tasks["1"]["EndTime"]), tasks

    # The SFT trained once, in the shared job; every point started from it.
    trained_sft = [name for name, text in logs.items() if "[sft] step" in text]
    assert trained_sft == [f"shared-{ids['shared']}.out"], everything
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "slurm")
    # Phase 2 on phase 1's best (the best held-out reward accuracy, the first on a tie).
    report = json.loads((sweep / "report.json").read_text())
    rows = {row["point"]: row for row in report["points"]}
    phase1 = ["lr=0.001", "lr=0.003"]
    best = max(phase1, key=lambda name: (rows[name]["metric"], -phase1.index(name)))
    assert names == sorted([*phase1, "lr=1e+30", f"{best}_gbr=0.3", f"{best}_gbr=0.5"])
    assert {name for name, row in rows.items() if row["phase"] == 2} == {
        f"{best}_gbr=0.3", f"{best}_gbr=0.5"
    }  # fmt: skip
    for name in names:
        record = json.loads((sweep / name / "point.json").read_text())
        if name == "lr=1e+30":
            assert record["status"] == "failed" and "non-finite" in record["error"], record
            continue
        assert record["status"] == "finished", record
        stage = sweep / name / "preference"
        assert (stage / "stage_complete.json").is_file()
        repro = json.loads((stage / "reproducibility.json").read_text())
        assert repro["start_model"] == str(out / "sft")
        assert not (sweep / name / "sft").exists()
    # The report: every point, best first, the failed one last; the files beside it.
    assert len(rows) == 5 and report["points"][-1]["point"] == "lr=1e+30"
    assert report["best"]["point"] in names
    for suffix in ("md", "csv", "png"):
        assert (sweep / f"report.{suffix}").stat().st_size > 0
    assert "lr=1e+30" in (sweep / "report.md").read_text()

    # The rerun: no shared job (finished), phase 1's array only for the failed point, then
    # what depends on it (phase 2's tasks skip their points unless phase 1's best changes).
    again = sweep_slurm(tmp_path, out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rerun = json.loads((sweep / "slurm.json").read_text())["submissions"]
    assert len(rerun) == 2
    jobs = {job["job"]: job for job in rerun[1]["jobs"]}
    try:
        assert list(jobs) == ["phase1", "report1", "phase2", "report2"]
        assert jobs["phase1"]["array"] == "2%2" and jobs["phase1"]["points"] == ["lr=1e+30"]
        # While they are queued, another rerun submits nothing.
        refused = sweep_slurm(tmp_path, out)
        assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
        queued = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert len(queued) == 1 and "still in the queue" in queued[0], refused.stderr
        assert len(json.loads((sweep / "slurm.json").read_text())["submissions"]) == 2
    finally:
        slurm("scancel", *(job["job_id"] for job in jobs.values()))


def test_the_cluster_is_the_one_asked_for():
    assert shutil.which("sbatch"), "sbatch is not installed"
    assert "simpo-local" in slurm("scontrol", "show", "config")
