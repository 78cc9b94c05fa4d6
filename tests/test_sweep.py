"""`simpo sweep`: every bad input is one line and exit 2 with nothing written (--slurm without
sbatch on PATH too), the --dry-run plan (shared stages, each phase's points and their cost; with
--slurm the sbatch commands and the script), point names, the held-out
metric names kept in step with the preference stage, and one small two-phase sweep of the tiny
recipe through the real CLI (the SFT trained once and shared, a point that fails at run time
recorded while the others finish, phase 2 on phase 1's best, the report and its order, the best
point's command, and the rerun that skips finished points); points launched on 2 processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from simpo_cli.recipe import SBATCH_SCRIPT, point_name, short_names
from simpo_cli.run.sweep import HELD_OUT, WITH_SFT_WEIGHT
from simpo_cli.run.sweep_slurm import _ranges

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LR = "preference.training.learning_rate"
GBR = "preference.gamma_beta_ratio"
TWO_PHASES = (
    f"sweep.phases=[{{grid: {{{LR}: [1.0e-3, 1.0e+30]}}}}, {{grid: {{{GBR}: [0.3, 0.5]}}}}]"
)
# The tiny recipe, small: SFT on 64 rows (2 steps), 32 held-out rows each, no evaluate stage.
SMALL = [
    "--set", "sft.data.train.max_rows=64",
    "--set", "sft.data.eval.max_rows=32",
    "--set", "preference.data.eval.max_rows=32",
    "--set", "pipeline=[sft, preference]",
]  # fmt: skip


@pytest.mark.parametrize(
    "args, expected",
    [
        # an unknown key: the did-you-mean of --set, named by the --grid flag
        (
            ["--grid", "preference.training.learning_rat=1e-3,2e-3"],
            "--grid preference.training.learning_rat=1e-3: preference.training.learning_rat: "
            "unknown key; did you mean 'learning_rate'?",
        ),
        # a value of the wrong type
        (
            ["--grid", "preference.beta=2,abc"],
            "--grid preference.beta=abc: preference.beta = 'abc': input should be a valid number",
        ),
        # an empty grid, and none at all
        (["--grid", "preference.beta="], "--grid preference.beta=: no values"),
        ([], "simpo sweep: no grid; give --grid KEY=V1,V2,..."),
        (["--grid", "preference.beta=2,2"], "--grid: preference.beta: [2, 2] lists a value twice"),
        # a stage the pipeline does not run; a section that is no stage
        (
            ["--grid", "generate.temperature=0.5,0.7"],
            "--grid generate.temperature: the pipeline [sft, preference, evaluate] has no "
            "generate stage",
        ),
        (["--grid", "logging.project=a,b"], "--grid logging.project: logging is not a stage"),
        # a later phase sweeping a key of a stage the sweep shares (run once, before phase 1's)
        (
            [
                "--set",
                f"sweep.phases=[{{grid: {{{LR}: [1.0e-3]}}}}, "
                "{grid: {sft.training.learning_rate: [1.0e-3, 3.0e-3]}}]",
            ],
            "sweep.phases[1].grid.sft.training.learning_rate: sft runs once, shared by every "
            "point (phase 1 sweeps keys of preference and later); sweep it in phase 1",
        ),  # fmt: skip
        # a metric the evaluation does not produce
        (
            ["--grid", "preference.beta=2,3", "--metric", "eval_reward"],
            "--metric eval_reward: not a number the sweep's evaluation produces",
        ),
        # the options of --slurm without it
        (
            ["--grid", "preference.beta=2,3", "--max-parallel", "2"],
            "--max-parallel: only with --slurm; add --slurm, or drop --max-parallel",
        ),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_2(cli, tmp_path, args, expected):
    result = cli("sweep", "tiny", "-o", tmp_path / "run", *args)
    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.errors() == [f"error: {expected}"] or (
        len(result.errors()) == 1 and expected in result.errors()[0]
    ), result.errors()
    assert not (tmp_path / "run").exists()


def test_a_recipe_with_rounds_is_refused(cli, tmp_path):
    result = cli("sweep", "tiny-onpolicy", "-o", tmp_path / "run", "--set", "rounds.count=2",
                 "--grid", "preference.beta=2,3")  # fmt: skip
    assert result.code == 2
    assert "sweeps of iterative rounds are not supported yet" in result.errors()[0]


def test_point_names_are_short_readable_and_unique():
    short = short_names([LR, GBR, "preference.beta"])
    assert short == {LR: "lr", GBR: "gbr", "preference.beta": "beta"}
    assert point_name({LR: 5e-7, GBR: 0.5}, short) == "lr=5e-07_gbr=0.5"
    both = short_names(["sft.training.learning_rate", LR])
    assert both == {"sft.training.learning_rate": "sft.lr", LR: "preference.lr"}
    assert point_name({"model.lora.target_modules": ["q_proj", "v proj"]}, {
        "model.lora.target_modules": "tm"
    }) == 'tm=--q_proj-,-v-proj--'  # fmt: skip


def test_held_out_names_are_those_the_preference_stage_records():
    """The sweep checks a metric against these names before anything runs; the preference
    stage's metrics (Trainer prefixes eval_) are the truth."""
    import numpy as np

    from simpo_cli.train.preference import preference_metrics

    class Prediction:
        predictions = np.array([[0.5, 1.0, 0.0, -1.0, -2.0], [0.7, 0.0, 1.0, -1.5, -1.0]])

    plain = {f"eval_{k}" for k in preference_metrics(Prediction())}
    assert plain == set(HELD_OUT["preference"])
    weighted = {f"eval_{k}" for k in preference_metrics(Prediction(), sft_weight=1.0)}
    assert weighted == set(HELD_OUT["preference"]) | set(WITH_SFT_WEIGHT)


def test_dry_run_prints_the_shared_stages_each_phase_and_costs(cli, tmp_path):
    done = cli("sweep", "tiny", "-o", tmp_path / "run", "--set", TWO_PHASES, "--max-rows", "48",
               *SMALL, "--dry-run")  # fmt: skip
    assert done.code == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout.replace(str(tmp_path / "run"), "DIR")
    assert "preference.gamma_beta_ratio=0.3 (with phase 1's best values" in out
    assert "each point trains on at most 48 rows per training stage" in out
    assert (
        "shared (run once; every point starts from them):\n  sft -> DIR/sft (starts fresh)" in out
    )
    assert "  tokenized data of preference: kept by the first point that tokenizes it, read by " \
           "the others (DIR/tokenized)" in out  # fmt: skip
    assert "reference log-probs" not in out  # SimPO has no reference
    assert f"phase 1: 2 point(s): {LR} (2)" in out
    assert "  lr=0.001:\n    sweep/lr=0.001/preference -> DIR/sweep/lr=0.001/preference" in out
    assert "      start model: sft (DIR/sft)" in out
    assert "optimizer steps: 3 per epoch (48 rows, before dropped rows); 3 in all" in out
    assert f"phase 2: 2 point(s), each on top of phase 1's best point: {GBR} (2)" in out
    assert "memory per GPU for model states" in out
    assert not (tmp_path / "run").exists()


def without_sbatch(monkeypatch) -> None:
    """PATH less every folder that holds an sbatch (this machine may have SLURM installed)."""
    kept = [d for d in os.environ["PATH"].split(os.pathsep) if not (shutil.which("sbatch", path=d))]
    monkeypatch.setenv("PATH", os.pathsep.join(kept))
    assert shutil.which("sbatch") is None


def test_slurm_without_sbatch_on_path_is_one_line_and_exit_2(cli, tmp_path, monkeypatch):
    without_sbatch(monkeypatch)
    result = cli("sweep", "tiny", "-o", tmp_path / "run", "--grid", "preference.beta=2,3",
                 "--slurm", "--max-parallel", "2")  # fmt: skip
    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.errors() == [
        "error: --slurm: sbatch is not on PATH; run this on a SLURM login node (or where sbatch "
        "is installed), or drop --slurm to run the sweep on this machine"
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_slurm_prints_the_jobs_their_dependencies_and_the_script(
    cli, tmp_path, monkeypatch
):
    """What --slurm would submit, without sbatch (a dry run needs none): the shared job, then
    per phase one job array (a task per point, at most 2 at once) and a report job after it, the
    next phase after that report, every job with the --sbatch-arg; then the script itself."""
    without_sbatch(monkeypatch)
    run = tmp_path / "run"
    done = cli("sweep", "tiny", "-o", run, "--set", TWO_PHASES, "--max-rows", "48", *SMALL,
               "--slurm", "--max-parallel", "2", "--sbatch-arg=--time=30", "--dry-run")  # fmt: skip
    assert done.code == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert f"phase 2: 2 point(s), each on top of phase 1's best point: {GBR} (2)" in out  # the plan
    jobs = [line.strip() for line in out.splitlines() if "=$(sbatch --parsable" in line]
    assert [line.split("=$(")[0] for line in jobs] == [
        "shared", "phase1", "report1", "phase2", "report2"
    ]  # fmt: skip
    shared, phase1, report1, phase2, report2 = jobs
    logs = run / "sweep" / "slurm"
    assert f"--output={logs}/shared-%j.out" in shared and shared.endswith(" --task shared)")
    assert "--dependency" not in shared
    assert f"--array=0-1%2 --output={logs}/phase1-%A_%a.out" in phase1
    assert "--dependency=afterok:$shared --kill-on-invalid-dep=yes" in phase1
    assert phase1.endswith(" --task 1)") and phase2.endswith(" --task 2)")
    assert "--dependency=afterany:$phase1" in report1 and "--task report:1" in report1
    assert "--dependency=afterok:$report1 --kill-on-invalid-dep=yes" in phase2
    assert "--array=0-1%2" in phase2 and "--dependency=afterany:$phase2" in report2
    for job in jobs:
        assert "--time=30" in job and "--max-rows 48" in job and "--slurm" not in job
        assert "sft.data.train.max_rows=64" in job
    for job in (shared, phase1, phase2):
        assert f" {SBATCH_SCRIPT} --set " in job
    assert "--nodes=1 --ntasks=1 --gres=none --wrap" in report1
    assert "SIMPO_COMMAND=sweep SIMPO=" in out and f"RECIPE=tiny OUTPUT_DIR={run}" in out
    assert f"the script ({SBATCH_SCRIPT}):\n{SBATCH_SCRIPT.read_text()}" in out + "\n"
    assert not run.exists()


def test_slurm_array_index_lists():
    assert _ranges([0, 1, 2]) == "0-2"
    assert _ranges([1, 3, 4, 6]) == "1,3-4,6"
    assert _ranges([5]) == "5"


@pytest.mark.slow
def test_a_two_phase_sweep_shares_the_sft_records_a_failure_and_resumes(cli, tmp_path):
    out = tmp_path / "run"
    args = ["sweep", "tiny", "-o", out, "--set", TWO_PHASES, "--max-rows", "48", *SMALL]
    first = cli(*args)
    assert first.code == 1, first.stdout[-3000:] + first.stderr[-3000:]  # one point failed

    # The SFT ran once, in DIR/sft, and every point's preference stage started from it.
    sft = out / "sft" / "stage_complete.json"
    assert sft.is_file()
    trained_at = sft.stat().st_mtime_ns
    sweep = out / "sweep"
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert names == ["lr=0.001", "lr=0.001_gbr=0.3", "lr=0.001_gbr=0.5", "lr=1e+30"]
    for name in names:
        assert not (sweep / name / "sft").exists()
        resolved = (sweep / name / "preference" / "resolved_recipe.yaml").read_text()
        assert "max_rows: 48" in resolved
        if name != "lr=1e+30":  # written as a stage finishes
            repro = (sweep / name / "preference" / "reproducibility.json").read_text()
            assert json.loads(repro)["start_model"] == str(out / "sft")

    # The point that diverged is recorded with its error; the others finished.
    failed = json.loads((sweep / "lr=1e+30" / "point.json").read_text())
    assert failed["status"] == "failed" and "non-finite" in failed["error"], failed

    # Phase 2 ran on phase 1's best (the finite learning rate); the report is best first.
    report = json.loads((sweep / "report.json").read_text())
    rows = report["points"]
    assert [r["status"] for r in rows] == ["finished"] * 3 + ["failed"]
    assert rows[-1]["point"] == "lr=1e+30"
    metrics = [r["metric"] for r in rows[:3]]
    assert metrics == sorted(metrics, reverse=True) and all(0 <= m <= 1 for m in metrics)
    assert all(r["numbers"]["eval_rewards/accuracies"] == r["metric"] for r in rows[:3])
    assert {r["point"] for r in rows if r["phase"] == 2} == {"lr=0.001_gbr=0.3", "lr=0.001_gbr=0.5"}
    assert report["max_rows"] == 48 and report["shared"] == ["sft"]
    best = report["best"]
    assert best["point"] == rows[0]["point"]
    command = best["command"]
    assert command.startswith(
        f"simpo train tiny -o {out / 'best'} --set sft.data.train.max_rows=64"
    )
    assert f"--set {LR}=0.001" in command and "max_rows=48" not in command
    assert (
        f"best point: {best['point']}; to train it on the full data:\n  {command}" in first.stdout
    )
    md = (sweep / "report.md").read_text()
    assert "Each point trained on at most 48 rows per training stage" in md
    assert "failed: preference: step " in md and "non-finite" in md
    assert (sweep / "report.csv").read_text().count("\n") == 5
    assert (sweep / "report.png").stat().st_size > 0

    # The rerun skips the finished points and the SFT, tries the failed one again.
    again = cli(*args)
    assert again.code == 1
    assert sft.stat().st_mtime_ns == trained_at
    assert "[sft] already finished" in again.stdout
    for name in ("lr=0.001", "lr=0.001_gbr=0.3", "lr=0.001_gbr=0.5"):
        assert f"[sweep] {name}: already finished; skipping" in again.stdout
    assert "[sweep] phase 1: lr=1e+30" in again.stdout


@pytest.mark.slow
def test_points_with_the_same_reference_and_pairs_share_its_log_probs(cli, tmp_path):
    """A DPO sweep over the learning rate after a shared SFT: the reference (the SFT model) and
    the pairs are the same at every point, so the reference log-probs are computed by the first
    point and read from DIR/reference_logps/ by the second; so is the tokenized data
    (DIR/tokenized/), and the SFT model's benchmark answers that each point's evaluate stage
    compares with (DIR/evaluated/): sampled once, the same answers in both points' files."""
    out = tmp_path / "run"
    dpo = ["--set", "preference.loss=dpo", "--set", "preference.beta=0.1",
           "--set", "preference.gamma_beta_ratio=null", "--set", "preference.sft_weight=null",
           *SMALL[:4], "--set", "pipeline=[sft, preference, evaluate]",
           "--set", "preference.data.eval.max_rows=16",
           "--set", "evaluate.benchmarks=[{name: alpaca_eval, temperature: 0, "
                    "questions: benchmarks/alpaca_eval.json, max_new_tokens: 12}]"]  # fmt: skip
    done = cli("sweep", "tiny", "-o", out, *dpo, "--max-rows", "32",
               "--grid", f"{LR}=1.0e-3,3.0e-4")  # fmt: skip
    assert done.code == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cache = out / "reference_logps"
    files = sorted(cache.glob("*.json"))
    assert len(files) == 2, files  # the training pairs and the held-out pairs, once each
    at = done.stdout.index("[sweep] phase 1: lr=0.0003")
    first, second = done.stdout[:at], done.stdout[at:]
    assert first.count("[preference] computing reference log-probs of") == 2
    read = [line for line in second.splitlines() if "reference log-probs of" in line]
    assert len(read) == 2 and all(line.startswith("[preference] reference log-probs of ")
                                  for line in read), read  # fmt: skip
    assert {line.rsplit(" from ", 1)[1] for line in read} == {str(f) for f in files}, read
    # The same rows tokenized the same way: the first point keeps them, the second reads them.
    kept = sorted(p for p in (out / "tokenized").iterdir())
    assert len(kept) == 2 and all((p / "data_report.json").is_file() for p in kept), kept
    assert "tokenized as before" not in first
    read = [line for line in second.splitlines() if "tokenized as before" in line]
    assert {line.rsplit(" from ", 1)[1] for line in read} == {str(p) for p in kept}, read
    reports = [(out / "sweep" / name / "preference" / "data_report.txt").read_text()
               for name in ("lr=0.001", "lr=0.0003")]  # fmt: skip
    assert reports[0] == reports[1] and ": 32 rows read, 32 kept" in reports[0], reports
    # The SFT model's answers: sampled by the first point, kept, read by the second (each
    # point's own model's samples are kept too: three models in all).
    assert "samples read from" not in first
    assert len(list((out / "evaluated").iterdir())) == 3
    read = [line for line in second.splitlines() if "samples read from" in line]
    assert len(read) == 1 and read[0].startswith("[evaluate] tiny-sft: alpaca_eval samples read "
                                                 f"from {out / 'evaluated'}"), read  # fmt: skip
    answers = [
        json.loads((out / "sweep" / name / "evaluate/alpaca_eval/tiny-sft/model_outputs.json")
                   .read_text())
        for name in ("lr=0.001", "lr=0.0003")
    ]  # fmt: skip
    assert answers[0] == answers[1] and len(answers[0]) == 4

    # Another --max-rows finds the points' folders made with 32 rows: refused before anything
    # runs, a line per folder naming the change; --overwrite starts those over.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    more = [*dpo, "--max-rows", "48", "--grid", f"{LR}=1.0e-3,3.0e-4"]
    plan = cli("sweep", "tiny", "-o", out, *dpo, "--max-rows", "32",
               "--grid", f"{LR}=1.0e-3,3.0e-4", "--dry-run").stdout  # fmt: skip
    assert f"  sft -> {out / 'sft'} (finished, will be skipped)\n" in plan
    assert "--overwrite reruns it" not in plan  # a sweep's --overwrite reruns other settings only
    plan = cli("sweep", "tiny", "-o", out, *more, "--dry-run", "--overwrite").stdout
    assert plan.count("(starts over: --overwrite)") == 4 and "(finished, will be skipped)" in plan
    refused = cli("sweep", "tiny", "-o", out, *more)
    errors = [line.removeprefix("error: ") for line in refused.errors()]
    assert refused.code == 2 and len(errors) == 4, refused.stderr  # preference and evaluate
    errors = [line for line in errors if "'preference' stage" in line]
    for line, name in zip(errors, ("lr=0.001", "lr=0.0003"), strict=True):
        assert line.startswith(
            f"{out / 'sweep' / name / 'preference'}: holds a run of the "
            "'preference' stage made with a different recipe ("
        ), line
        assert "max_rows: 32 -> 48" in line and line.endswith(
            "pass --overwrite to start it over, or choose another --output-dir"
        ), line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # On SLURM the same: the SFT is done, both points are submitted again (their jobs remove
    # the folders: each job gets --overwrite).
    plan = cli("sweep", "tiny", "-o", out, *more, "--overwrite", "--slurm", "--dry-run")
    assert plan.code == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    jobs = [line.strip() for line in plan.stdout.splitlines() if "=$(sbatch --parsable" in line]
    assert [line.split("=$(")[0] for line in jobs] == ["phase1", "report1"], jobs
    assert "--array=0-1 " in jobs[0] and " --overwrite " in jobs[0], jobs[0]
    again = cli("sweep", "tiny", "-o", out, *more, "--overwrite")
    assert again.code == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("made with other settings; starting it over (--overwrite)") == 4
    assert again.stdout.count("[evaluate] tiny-sft: alpaca_eval samples read from") == 2
    for name in ("lr=0.001", "lr=0.0003"):
        report = (out / "sweep" / name / "preference" / "data_report.txt").read_text()
        assert ": 48 rows read, 48 kept" in report, report
    assert len(list((out / "tokenized").iterdir())) == 3  # 48 training rows: a new entry


@pytest.mark.slow
def test_each_point_runs_under_the_recipe_s_launch(tmp_path):
    """With 2 processes each point is `accelerate launch`ed as `simpo sweep ... --point NAME`:
    both points train on 2 processes (world size 2, each step logged once, by rank 0), the
    processes leave their process group and exit cleanly, and the report has both points."""
    from simpo_cli.launch import free_port

    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "simpo_cli", "sweep", "tiny", "-o", str(out),
        "--set", "pipeline=[preference]", "--set", "preference.data.eval.max_rows=16",
        "--set", "preference.training.total_batch_size=null",
        "--set", "preference.training.per_device_train_batch_size=4",
        "--set", "preference.training.logging_steps=1",
        "--max-rows", "16", "--grid", f"{LR}=1.0e-3,3.0e-4",
        "--num-processes", "2", "--main-process-port", str(free_port()),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    names = ("lr=0.001", "lr=0.0003")
    for name in names:
        launched = [line for line in done.stdout.splitlines() if line.startswith("launching: ")]
        assert any(
            "--num_processes 2 " in line and line.endswith(f"--point {name}") for line in launched
        ), launched
        stage = out / "sweep" / name / "preference"
        assert json.loads((stage / "reproducibility.json").read_text())["world_size"] == 2
        logged = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in logged if "loss" in m] == [1, 2], "each step once, by rank 0"
    rows = json.loads((out / "sweep" / "report.json").read_text())["points"]
    assert sorted(r["point"] for r in rows) == sorted(names)
    assert all(r["status"] == "finished" and 0 <= r["metric"] <= 1 for r in rows), rows
