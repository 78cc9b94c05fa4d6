"""`simpo sweep`: train a recipe once per point of a grid, phase after phase, and report which
point is best (run/sweep.py does the work)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from simpo_cli import launch, stops
from simpo_cli.run.sweep import plan_sweep, print_sweep_plan, run_sweep, run_unit


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
    point: Annotated[
        str | None,
        typer.Option(hidden=True, help="Run one unit (a point, or 'shared') in this process."),
    ] = None,
) -> None:
    """Train the recipe once per point of a grid and report the best point.

    The stages before the first swept key's stage run once in DIR/<stage> (e.g. the SFT); each
    point's stages run in DIR/sweep/<point>/ from them. A recipe's sweep: section may hold several
    phases, each on top of the best point of the one before. Running the same command again
    skips finished points and resumes a stopped one; a failed point is recorded and the others go
    on (exit 1). The report: DIR/sweep/report.md/.csv/.json/.png, and the command that trains the
    best point on the full data. A sweep never pushes to the hub."""
    sets = list(set_ or [])
    planned = plan_sweep(recipe, sets, list(grid or []), metric, mode, max_rows, output_dir)
    # What each launched process runs (with --point UNIT): this command line, as given.
    given = sys.argv[1:]
    given = given[given.index("sweep") + 1 :] if "sweep" in given else [recipe]
    planned.child_args = _without_point(["sweep", *given])
    if dry_run:
        print_sweep_plan(planned)
        stops.stop_now("sweep", "the plan is above")
        return
    if point is not None or launch.inside_launch():
        run_unit(planned, point or "shared")
        return
    code = run_sweep(planned)
    if code:
        raise typer.Exit(code)


def _without_point(args: list[str]) -> list[str]:
    """The command line less --point NAME (the sweep adds each unit's own)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--point":
            skip = True
        elif not arg.startswith("--point="):
            kept.append(arg)
    return kept
