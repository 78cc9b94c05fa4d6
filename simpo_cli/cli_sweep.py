"""`simpo sweep`: train a recipe once per point of a grid, phase after phase, and report which
point is best (run/sweep.py does the work; run/sweep_slurm.py submits it to SLURM with --slurm)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from simpo_cli import launch, stops
from simpo_cli.errors import UserError
from simpo_cli.flags import option_values, schema_options, with_options
from simpo_cli.recipe import LaunchSettings
from simpo_cli.run.sweep import plan_sweep, print_sweep_plan, run_sweep, run_task, run_unit
from simpo_cli.run.sweep_slurm import check_sbatch, print_slurm_plan, slurm_jobs, submit_sweep

# The launch options of `simpo train` (--num-processes, ...): what scripts/slurm/simpo.sbatch
# gives each job; each given is the `--set launch.KEY=VALUE` it stands for.
LAUNCH = schema_options(
    LaunchSettings, skip=("rdzv_backend", "gpu_memory_gb"), panel="Launch", optional=True
)


@with_options(
    "recipe", "output_dir", "grid", "metric", "mode", "max_rows", "set_", "dry_run", "slurm",
    "max_parallel", "sbatch_arg", "overwrite", "point", "task", LAUNCH,
)  # fmt: skip
def sweep(
    recipe: Annotated[
        str, typer.Argument(help="Recipe file, folder, or shipped name (e.g. tiny).")
    ],
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Where the sweep writes; default: the recipe's."),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help="A key and the values to try: --grid preference.beta=2,2.5,3 (repeatable: "
            "every combination is a point). Replaces the recipe's sweep.phases with one phase.",
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            help="What picks the best point (sweep.metric): a held-out number of the last "
            "training stage or an evaluate-table column. Default: eval_rewards/accuracies."
        ),
    ] = None,
    mode: Annotated[
        Literal["max", "min"] | None,
        typer.Option(help="Best is the highest or lowest; default: min for a *loss, else max."),
    ] = None,
    max_rows: Annotated[
        int | None,
        typer.Option(
            min=1, help="Train each point on at most this many rows (sweep.max_rows): a quick scan."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key for every point (repeatable)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; start nothing.")
    ] = False,
    slurm: Annotated[
        bool,
        typer.Option(
            "--slurm",
            help="Submit the sweep to SLURM with sbatch: a job for the shared stages, one job "
            "array per phase (a task per point) and a report job after each.",
        ),
    ] = False,
    max_parallel: Annotated[
        int | None,
        typer.Option(min=1, help="With --slurm: at most this many points run at once (%K)."),
    ] = None,
    sbatch_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--sbatch-arg",
            help="With --slurm: an sbatch option for every job, e.g. --sbatch-arg=--time=4:00:00 "
            "(repeatable).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start over the stage folders (shared or a point's) made with other settings, "
            "e.g. another --max-rows; those made with this sweep's settings are kept.",
        ),
    ] = False,
    point: Annotated[
        str | None,
        typer.Option(hidden=True, help="Run one unit (a point, or 'shared') in this process."),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            hidden=True,
            help="Run one job of a --slurm sweep: shared, PHASE:INDEX, PHASE (INDEX from "
            "SLURM_ARRAY_TASK_ID) or report:PHASE (run/sweep.py run_task).",
        ),
    ] = None,
    **launch_given: Any,
) -> None:
    """Train the recipe once per point of a grid and report the best point.

    The stages before the first swept key's stage run once in DIR/<stage> (e.g. the SFT); each
    point's stages run in DIR/sweep/<point>/ from them, reading what the first point kept:
    tokenized data, cached reference log-probs, the shared models' benchmark answers
    (DIR/tokenized/, DIR/reference_logps/, DIR/evaluated/). A recipe's sweep: section may hold
    several phases, each on top of the best point of the one before. Running the same command
    again skips finished points and resumes a stopped one; a failed point is recorded and the
    others go on (exit 1). The report: DIR/sweep/report.md/.csv/.json/.png, and the command
    that trains the best point on the full data. A sweep never pushes to the hub.

    With --slurm it is submitted with sbatch instead: a job for the shared stages, per phase one
    job array (a task per point, at most --max-parallel at once) through
    scripts/slurm/simpo.sbatch and a report job after it; the next phase waits for that report.
    Job ids: DIR/sweep/slurm.json; logs: DIR/sweep/slurm/."""
    if not slurm:
        for flag, value in (("--max-parallel", max_parallel), ("--sbatch-arg", sbatch_arg)):
            if value:
                raise UserError(f"{flag}: only with --slurm; add --slurm, or drop {flag}")
    elif not dry_run:
        check_sbatch()  # before anything else: nothing is planned or written without it
    launch_sets = option_values(LAUNCH, launch_given).items()
    sets = [*(set_ or []), *(f"launch.{k}={v}" for k, v in launch_sets if v is not None)]
    planned = plan_sweep(
        recipe, sets, list(grid or []), metric, mode, max_rows, output_dir, overwrite
    )
    # What each launched process runs (with --point UNIT): this command line, as given.
    given = sys.argv[1:]
    given = given[given.index("sweep") + 1 :] if "sweep" in given else [recipe]
    planned.child_args = _without(["sweep", *given], ("--point", "--task", "--machine-rank"))
    if slurm and point is None and task is None:
        args = _job_args(set_, grid, metric, mode, max_rows, overwrite, launch_given)
        jobs = slurm_jobs(planned, args, max_parallel, list(sbatch_arg or []))
        if dry_run:
            print_sweep_plan(planned)
            print_slurm_plan(planned, jobs)
            return
        stops.stop_now("sweep", "nothing was submitted")
        submit_sweep(planned, jobs)
        return
    if dry_run:
        print_sweep_plan(planned)
        stops.stop_now("sweep", "the plan is above")
        return
    if point is not None or launch.inside_launch():
        run_unit(planned, point or "shared")
        return
    if task is not None:
        code = run_task(planned, task, os.environ.get("SLURM_ARRAY_TASK_ID"))
    else:
        code = run_sweep(planned)
    if code:
        raise typer.Exit(code)


def _without(args: list[str], options: tuple[str, ...]) -> list[str]:
    """The command line less these options and their values (the sweep adds each unit's own;
    the machine rank is the launcher's)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in options)):
            kept.append(arg)
    return kept


def _job_args(
    sets: list[str] | None,
    grid: list[str] | None,
    metric: str | None,
    mode: str | None,
    max_rows: int | None,
    overwrite: bool,
    launch_given: dict[str, Any],
) -> list[str]:
    """The options each SLURM job of the sweep gets (the script adds the recipe, -o, the launch
    options of its allocation and --task): the user's, less --slurm and its options."""
    args = [arg for s in sets or [] for arg in ("--set", s)]
    args += [arg for g in grid or [] for arg in ("--grid", g)]
    for flag, value in (("--metric", metric), ("--mode", mode), ("--max-rows", max_rows)):
        args += [flag, str(value)] if value is not None else []
    args += ["--overwrite"] if overwrite else []  # removes only folders of other settings
    for option in LAUNCH:  # given ones win over the script's (they come after)
        value = launch_given[option.name]
        if value is not None and option.name != "machine_rank":
            args += ["--" + option.name.replace("_", "-"), str(value)]
    return args
