"""`simpo sweep --slurm`: a sweep as SLURM jobs, submitted with sbatch.

The jobs, each phase waiting for the one before (sbatch --dependency):

- `shared`: the shared stages (`simpo sweep ... --task shared`), unless they have finished;
- per phase, ONE job array, one task per point (`--array=0-(n-1)%K`, K: --max-parallel), task I
  running `simpo sweep ... --task PHASE`: run/sweep.py's run_task takes I from
  SLURM_ARRAY_TASK_ID and resolves it, when the task starts, to the I-th point of the phase on
  the best point of the phase before (known only once that phase has run);
- per phase, a report job (`--task report:PHASE`) once every task of the array has ended, in
  whatever state (afterany: a point that failed or was cancelled does not hold the report up).
  It writes DIR/sweep/report.* of the phases so far, as the local sweep does, and exits 0 when
  the phase has a best point, else 1;
- the next phase's array waits for that report job to succeed (afterok), and SLURM cancels it
  when the report failed (--kill-on-invalid-dep=yes): phase k+1 starts on phase k's best, or
  not at all, instead of pending forever. The first array waits for the shared job the same way.

The shared job and every array task run scripts/slurm/simpo.sbatch with SIMPO_COMMAND=sweep: the
same signal traps, requeue on exit 75 (a point stopped before the time limit resumes from its
checkpoint in the requeued task), MAX_REQUEUES and appended logs as a `simpo train` job. A
report is one CPU's work, submitted with --wrap. Job ids go to DIR/sweep/slurm.json, logs to
DIR/sweep/slurm/ (`phase1-<array id>_<task>.out`).

A rerun submits only what is left: not the shared stages once they have finished, no phase whose
points have all finished (the next one starts on its best), in the first unfinished phase only
the points that have not finished; nothing when every point has finished; and nothing while jobs
it submitted before are still in the queue (one line naming them).

No torch here.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from simpo_cli.errors import UserError
from simpo_cli.recipe import SBATCH_SCRIPT
from simpo_cli.run.sweep import (
    SHARED,
    SWEEP_DIR,
    Point,
    Sweep,
    finished_as_planned,
    points,
)
from simpo_cli.run.sweep_report import REPORT, best_point, read_record

RECORD = "slurm.json"  # DIR/sweep/slurm.json: what each `--slurm` submitted
LOGS = "slurm"  # DIR/sweep/slurm/<job>-<id>.out


@dataclass
class Job:
    """One sbatch submission: `key` names its id in the later jobs' dependencies."""

    key: str  # shared, phase1, report1
    what: str  # as printed: "shared stages (sft)", "phase 1", "report of phase 1"
    flags: list[str]  # sbatch's, before the script; $key in a dependency stands for its id
    script: list[str]  # the script and its arguments, or --wrap COMMAND
    log: str
    array: str | None = None  # 0-2%2
    names: list[str] = field(default_factory=list)  # the array's points, where known

    def command(self, ids: dict[str, str]) -> list[str]:
        flags = [_with_ids(flag, ids) for flag in self.flags]
        return ["sbatch", "--parsable", *flags, *self.script]


def _with_ids(text: str, ids: dict[str, str]) -> str:
    for key, job_id in ids.items():
        text = text.replace(f"${key}", job_id)
    return text


def check_sbatch() -> None:
    """`--slurm` needs sbatch on PATH: one line otherwise, before anything is planned."""
    if shutil.which("sbatch") is None:
        raise UserError(
            "--slurm: sbatch is not on PATH; run this on a SLURM login node (or where sbatch "
            "is installed), or drop --slurm to run the sweep on this machine"
        )


def simpo_executable() -> str:
    """The `simpo` beside this Python (the same environment runs the jobs), else on PATH."""
    beside = Path(sys.executable).parent / "simpo"
    found = str(beside) if beside.is_file() else shutil.which("simpo")
    if found is None:
        raise UserError(
            f"--slurm: no `simpo` executable beside {sys.executable} or on PATH for the jobs to "
            "run; install simpo-cli into this environment"
        )
    return found


def slurm_jobs(
    sweep: Sweep, args: list[str], max_parallel: int | None, sbatch_args: list[str]
) -> list[Job]:
    """The jobs that are left to submit, in order (empty: every point has finished). `args`:
    the sweep's options for each job (its --set, --grid, ...; not the recipe, -o or --slurm)."""
    out = sweep.out
    logs = out / SWEEP_DIR / LOGS
    jobs: list[Job] = []
    script = [str(SBATCH_SCRIPT), *args, "--task"]
    after: str | None = None  # the key of the job the next array waits for
    if sweep.shared and not finished_as_planned(sweep, sweep.shared):
        log = str(logs / "shared-%j.out")
        flags = [f"--job-name={sweep.recipe.name}-shared", f"--output={log}", *sbatch_args]
        kinds = ", ".join(sweep.shared_kinds)
        jobs.append(Job(SHARED, f"shared stages ({kinds})", flags, [*script, SHARED], log))
        after = SHARED
    first, left = _first_unfinished(sweep)
    if first is None:
        return []
    for number in range(first, len(sweep.settings.phases) + 1):
        found = points(sweep, number, {})  # their count; their values may wait for a best
        indices = left if number == first else list(range(len(found)))
        limit = f"%{max_parallel}" if max_parallel is not None else ""
        array = _ranges(indices) + limit
        log = str(logs / f"phase{number}-%A_%a.out")
        flags = [f"--job-name={sweep.recipe.name}-phase{number}", f"--array={array}",
                 f"--output={log}"]  # fmt: skip
        if after is not None:
            flags += [f"--dependency=afterok:${after}", "--kill-on-invalid-dep=yes"]
        names = []
        if number == first:
            known = _phase_now(sweep, number)
            names = [known[i].name for i in indices]
        key = f"phase{number}"
        jobs.append(Job(key, f"phase {number}", [*flags, *sbatch_args],
                        [*script, str(number)], log, array, names))  # fmt: skip
        report = f"report{number}"
        log = str(logs / f"{report}-%j.out")
        command = [simpo_executable(), "sweep", sweep.recipe_ref, "-o", str(out), *args,
                   "--task", f"report:{number}"]  # fmt: skip
        flags = [f"--job-name={sweep.recipe.name}-{report}", f"--output={log}",
                 f"--dependency=afterany:${key}", *sbatch_args,
                 # one CPU's work, whatever the training jobs ask for
                 "--nodes=1", "--ntasks=1", "--gres=none"]  # fmt: skip
        jobs.append(Job(report, f"report of phase {number}", flags,
                        ["--wrap", shlex.join(command)], log))  # fmt: skip
        after = report
    return jobs


def _first_unfinished(sweep: Sweep) -> tuple[int | None, list[int]]:
    """The first phase with a point that has not finished (as far as the records say now), and
    the indices of those points; (None, []) when every phase has finished."""
    base: dict = {}
    for number in range(1, len(sweep.settings.phases) + 1):
        found = points(sweep, number, base)
        left = [i for i, point in enumerate(found) if not _done(sweep, point)]
        if left:
            return number, left
        best = best_point(sweep, found)
        if best is None:
            raise UserError(
                f"--slurm: every point of phase {number} has finished, none with "
                f"{sweep.settings.metric}; the phases after it cannot start (see "
                f"{sweep.out / SWEEP_DIR / REPORT}.md)"
            )
        base = dict(best.values)
    return None, []


def _phase_now(sweep: Sweep, number: int) -> list[Point]:
    base: dict = {}
    for earlier in range(1, number):
        best = best_point(sweep, points(sweep, earlier, base))
        base = dict(best.values) if best is not None else base
    return points(sweep, number, base)


def _done(sweep: Sweep, point: Point) -> bool:
    return read_record(sweep.out, point).get("status") == "finished" and finished_as_planned(
        sweep, point.instances
    )


def _ranges(indices: list[int]) -> str:
    """SLURM's array index list: 0-3, or 1,3-4."""
    parts, start = [], None
    for position, index in enumerate(indices):
        start = index if start is None else start
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            parts.append(str(index) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def job_environment(sweep: Sweep) -> dict[str, str]:
    """What the jobs' environment adds to this one (sbatch passes the whole of it on): the
    script's settings for a sweep (README "Sweeps": GPUS_PER_NODE, MAX_REQUEUES ... pass on)."""
    return {
        "SIMPO_COMMAND": "sweep",
        "SIMPO": simpo_executable(),
        "RECIPE": sweep.recipe_ref,
        "OUTPUT_DIR": str(sweep.out),
        "EXTRA_ARGS": "",  # a `simpo train` job's options: the sweep's own are its arguments
    }


def print_slurm_plan(sweep: Sweep, jobs: list[Job]) -> None:
    """`--dry-run --slurm`: the sbatch commands, as a shell would run them, and the script."""
    if not jobs:
        print("\non SLURM: nothing to submit, every point has finished")
        return
    env = job_environment(sweep)
    lines = [
        "",
        "on SLURM, --slurm would submit these jobs ($shared, $phase1, ... stand for the ids "
        "sbatch prints), each with this environment added:",
        "  " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()),
    ]
    for job in jobs:
        # $phase1 in a dependency unquoted, so that a shell expands it
        words = [w if w.startswith("--dependency=") else shlex.quote(w) for w in job.command({})]
        lines.append(f"  {job.key}=$({' '.join(words)})")
    lines += ["", f"the script ({SBATCH_SCRIPT}):", SBATCH_SCRIPT.read_text().rstrip()]
    print("\n".join(lines))


def submit_sweep(sweep: Sweep, jobs: list[Job]) -> None:
    """Submit the jobs in order, print their ids and record them in DIR/sweep/slurm.json. A
    refusal by sbatch cancels the jobs submitted before it (nothing half-submitted is left)."""
    folder = sweep.out / SWEEP_DIR
    record_path = folder / RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except ValueError:
        raise UserError(
            f"{record_path}: not the JSON `--slurm` writes; move it away (the jobs it lists are "
            "then not checked) and run this again"
        ) from None
    earlier = [job["job_id"] for entry in record.get("submissions", []) for job in entry["jobs"]]
    queued = _queued(earlier)
    if queued:
        raise UserError(
            f"--slurm: jobs {', '.join(queued)} of this sweep are still in the queue "
            f"(squeue -j {','.join(queued)}); wait for them to end, or scancel them, and run "
            "this again"
        )
    if not jobs:
        print(f"nothing to submit: every point has finished; the report: "
              f"{folder / REPORT}.md")  # fmt: skip
        return
    (folder / LOGS).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **job_environment(sweep)}
    ids: dict[str, str] = {}
    for job in jobs:
        result = subprocess.run(job.command(ids), env=env, capture_output=True, text=True)
        if result.returncode != 0:
            if ids:
                subprocess.run(["scancel", *ids.values()], capture_output=True)
            why = (result.stderr.strip().splitlines() or ["no message"])[-1]
            cancelled = f"; cancelled the jobs submitted before it ({', '.join(ids.values())})"
            raise UserError(f"--slurm: sbatch refused the {job.what} job: {why}"
                            f"{cancelled if ids else ''}")  # fmt: skip
        ids[job.key] = result.stdout.strip().split(";")[0]
    entries = []
    for job in jobs:
        job_id = ids[job.key]
        entry = {"job": job.key, "job_id": job_id, "log": job.log.replace("%A", job_id)}
        if job.array is not None:
            entry |= {"array": job.array, "points": job.names or None}
        entries.append(entry)
        print(_job_line(job, job_id, ids), flush=True)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record.setdefault("submissions", []).append({"submitted_at": when, "jobs": entries})
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"job ids: {record_path}; squeue -j {','.join(ids.values())} shows them; the report: "
          f"{folder / REPORT}.md, written by each report job")  # fmt: skip


def _job_line(job: Job, job_id: str, ids: dict[str, str]) -> str:
    log = job.log.replace("%j", job_id).replace("%A", job_id).replace("%a", "<task>")
    waits = next((f.split(":", 1)[1] for f in job.flags if f.startswith("--dependency=")), None)
    after = f", after job {_with_ids(waits, ids)}" if waits else ""
    if job.array is None:
        return f"{job.what}: job {job_id}{after}; log {log}"
    points_ = ", ".join(job.names) if job.names else "on the best point of the phase before"
    return f"{job.what}: job array {job_id}, tasks {job.array} ({points_}){after}; logs {log}"


def _queued(job_ids: list[str]) -> list[str]:
    """Those of these jobs (array jobs by their id) still pending or running."""
    if not job_ids:
        return []
    command = ["squeue", "--noheader", "--format=%F", f"--user={getpass.getuser()}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"--slurm: squeue failed ({why}); it tells which jobs are still queued")
    listed = set(result.stdout.split())
    return [job_id for job_id in dict.fromkeys(job_ids) if job_id in listed]
