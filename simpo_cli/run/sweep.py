"""`simpo sweep`: one training per point of a grid, phase after phase, on shared early stages.

The stages of the pipeline before the first stage a phase-1 key belongs to run once, in
DIR/<kind> as `simpo train` would run them (an SFT is trained once). Every point's stages run
in DIR/sweep/<point>/<kind>, starting from the shared folders: a point is the stage-instance
idea of the rounds (instances.py) with the recipe of the point, `--set KEY=VALUE` for each of
its values. Every point trains with DIR as its output directory, so the preference stage's
cached reference log-probs (DIR/reference_logps/, keyed by the reference model, the tokenized
pairs and the chat template) are computed once for all the points that share them, and so is
their tokenized data (DIR/tokenized/, keyed by the rows, the tokenizer and the tokenization).

Everything a sweep will do is checked before anything runs: each value against the schema, the
keys' stages, every point of phase 1 as a whole recipe, the metric, the paths, and that each
point has something to train. A point that fails is recorded with its error and the others go
on; a stop signal stops the sweep (exit 75) and the same command goes on where it stopped.

`run_unit` runs one unit (the shared stages, or one point) in this process: what a launched
process (`simpo sweep ... --point NAME` under `accelerate launch`) runs. `run_task` runs one job
of a sweep submitted to SLURM (`--task`, run/sweep_slurm.py): the shared stages, one task of a
phase's job array, or a phase's report, each as the top command would (launched where the
recipe needs it, each point recorded).

No torch at import: `--dry-run` plans the sweep without it.
"""

from __future__ import annotations

import itertools
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpo_cli import launch, progress, stops
from simpo_cli.errors import EXIT_FAILURE, Preempted, UserError
from simpo_cli.evaluate.compare import PAIR_COLUMNS
from simpo_cli.model.adapters import check_targets
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import (
    STAGES,
    TRAINING_STAGES,
    Recipe,
    StageName,
    SweepSettings,
    load_recipe,
    parse_grid,
    point_name,
    set_text,
    short_names,
    stage_identity,
    value_text,
)
from simpo_cli.redact import redact
from simpo_cli.run.command import (
    STOPPING,
    launch_children,
    leaving_the_process_group,
    output_folder,
)
from simpo_cli.run.instances import StageInstance, instance
from simpo_cli.run.paths import check_paths
from simpo_cli.run.plan import check_training, memory_lines, stage_lines
from simpo_cli.run.sweep_report import (
    best_point,
    read_record,
    write_record,
    write_report,
)

SWEEP_DIR = "sweep"  # DIR/sweep/<point>/<kind>, and the report files
SHARED = "shared"  # the unit name of the shared stages (`--point shared`)
# The held-out numbers a training stage records in stage_complete.json "eval" (Trainer's
# `eval_` and train/preference.py's preference_metrics; tests/test_sweep.py keeps them in step).
HELD_OUT = {
    "sft": ("eval_loss",),
    "preference": (
        "eval_loss", "eval_rewards/accuracies", "eval_rewards/ties", "eval_rewards/margins",
        "eval_logps/chosen", "eval_logps/rejected",
    ),
}  # fmt: skip
WITH_SFT_WEIGHT = ("eval_simpo_loss", "eval_sft_loss")


@dataclass(frozen=True)
class Point:
    """One point: its phase (from 1), folder name, values (every key set on it, those of the
    earlier phases' best first, as the recipe validated them), its recipe and the stage
    instances it runs (in DIR/sweep/<name>/<kind>)."""

    phase: int
    name: str
    values: dict[str, Any]
    recipe: Recipe
    instances: list[StageInstance]

    @property
    def folder(self) -> str:
        return f"{SWEEP_DIR}/{self.name}"


@dataclass
class Sweep:
    """A checked sweep: the recipe (the user's --set applied), its settings, where it writes,
    the shared stage instances and the short names of the keys."""

    recipe_ref: str
    sets: list[str]
    out: Path
    recipe: Recipe
    settings: SweepSettings
    from_flags: bool
    shared: list[StageInstance]
    short: dict[str, str]
    overwrite: bool = False  # start over the stage folders made with other settings
    child_args: list[str] = field(default_factory=list)  # `sweep RECIPE ...` for a launch

    @property
    def shared_kinds(self) -> list[str]:
        return [i.kind for i in self.shared]

    def where(self, phase: int, key: str) -> str:
        """How the user wrote a grid key: --grid KEY or sweep.phases[i].grid.KEY."""
        return f"--grid {key}" if self.from_flags else f"sweep.phases[{phase - 1}].grid.{key}"


# --------------------------------------------------------------------------- planning


def plan_sweep(
    recipe_ref: str,
    sets: list[str],
    grid: list[str],
    metric: str | None,
    mode: str | None,
    max_rows: int | None,
    output_dir: Path | None,
    overwrite: bool = False,
) -> Sweep:
    """Check the sweep whole (UserError: one line per problem) and return it; writes nothing."""
    recipe = load_recipe(recipe_ref, sets)
    settings = _settings(recipe, grid, metric, mode, max_rows)
    if recipe.rounds is not None:
        raise UserError(
            f"simpo sweep: recipe '{recipe.name}' has a rounds: section; sweeps of iterative "
            "rounds are not supported yet (remove rounds:, or sweep with --set rounds=null)"
        )
    keys = list(dict.fromkeys(k for phase in settings.phases for k in phase.grid))
    out = output_folder(recipe, output_dir)
    sweep = Sweep(
        recipe_ref, sets, out, recipe, settings, bool(grid), [], short_names(keys), overwrite
    )
    shared, refused = _shared_kinds(sweep)
    problems = list(refused.values())
    for number, phase in enumerate(settings.phases, 1):
        for key, values in phase.grid.items():
            for value in [] if (number, key) in refused else values:
                found = _load_problems(sweep, [(key, value)], number)
                problems += found
                if found:
                    break  # one line per key: its other values would say the same
    if problems:
        raise UserError(problems)
    sweep.shared = [instance(recipe, kind) for kind in shared]
    # Every point of phase 1 as a whole recipe; a later phase's on the recipe's own values of
    # the keys before it (its real base, phase k-1's best, is known once that phase has run).
    every = [p for n in range(1, len(settings.phases) + 1) for p in points(sweep, n, {})]
    _check_metric(sweep, every[0])
    plan = sweep.shared + [i for point in every for i in point.instances]
    check_paths(recipe, out, plan, "--output-dir" if output_dir is not None else "output_dir")
    if not launch.inside_launch() and any(i.kind in TRAINING_STAGES for i in plan):
        check_targets(recipe)
    if not overwrite:
        _check_folders(plan, out)
    check_training(plan, out, overwrite)
    return sweep


def _check_folders(plan: list[StageInstance], out: Path) -> None:
    """One line (UserError) for each stage folder of the plan made with other settings (another
    --max-rows, a changed recipe): it would fail its point halfway through the sweep."""
    problems = [problem for seen in plan if (problem := _other_settings(seen, out)) is not None]
    if problems:
        raise UserError(problems)  # each says: pass --overwrite, or choose another --output-dir


def _other_settings(seen: StageInstance, out: Path) -> str | None:
    """Why the instance's folder holds a run made with other settings, or None when it does
    not (no folder, or one of this sweep's)."""
    identity = stage_identity(redact(seen.recipe.dump()), seen.kind)
    try:
        StageDir(out / seen.folder).check(identity, seen.kind)
    except UserError as err:
        return err.messages[0]
    return None


def _settings(
    recipe: Recipe, grid: list[str], metric: str | None, mode: str | None, max_rows: int | None
) -> SweepSettings:
    """The recipe's sweep: section, with what the flags give: --grid replaces its phases with
    one phase, --metric, --mode and --max-rows their keys."""
    section = recipe.sweep.model_dump() if recipe.sweep is not None else {}
    if grid:
        section["phases"] = [{"grid": parse_grid(grid)}]
    given = {"metric": metric, "mode": mode, "max_rows": max_rows}
    section |= {key: value for key, value in given.items() if value is not None}
    if not section.get("phases"):
        raise UserError(
            f"simpo sweep: no grid; give --grid KEY=V1,V2,... (e.g. --grid "
            f"preference.training.learning_rate=3e-7,5e-7,1e-6) or a sweep: section in "
            f"recipe '{recipe.name}'"
        )
    try:
        return SweepSettings.model_validate(section)
    except ValueError as err:
        where = "--grid" if grid else "sweep"
        lines = [e["msg"].removeprefix("Value error, ") for e in err.errors()]
        raise UserError([f"{where}: {line}" for line in lines]) from None


def _stage_of(recipe: Recipe, key: str) -> StageName | None:
    """The pipeline stage a key belongs to: its section's; model keys belong to the first."""
    section = key.split(".")[0]
    if section == "model":
        return recipe.pipeline[0]
    return section if section in STAGES else None  # type: ignore[return-value]


def _shared_kinds(sweep: Sweep) -> tuple[list[str], dict[tuple[int, str], str]]:
    """The stages that run once (those before the first stage a phase-1 key belongs to), and
    one line for each (phase, key) refused: a key of a section that is no stage, of a stage
    not in the pipeline, or (in a later phase) of a stage that runs once. A key of no section
    at all is left to the schema, which names the section it meant."""
    recipe, pipeline = sweep.recipe, sweep.recipe.pipeline
    refused, first = {}, len(pipeline)
    for number, phase in enumerate(sweep.settings.phases, 1):
        for key in phase.grid:
            stage = _stage_of(recipe, key)
            where = sweep.where(number, key)
            section = key.split(".")[0]
            if stage is None and section in type(recipe).model_fields:
                refused[number, key] = (
                    f"{where}: {section} is not a stage; sweep keys of model or of a stage "
                    f"({', '.join(STAGES)})"
                )
            elif stage is None:
                continue
            elif stage not in pipeline:
                refused[number, key] = (
                    f"{where}: the pipeline [{', '.join(pipeline)}] has no {stage} stage; sweep "
                    "keys of the stages it runs"
                )
            elif number == 1:
                first = min(first, pipeline.index(stage))
            elif pipeline.index(stage) < first:
                refused[number, key] = (
                    f"{where}: {stage} runs once, shared by every point (phase 1 sweeps keys of "
                    f"{pipeline[first]} and later); sweep it in phase 1"
                )
    return list(pipeline[:first]), refused


def _load_problems(sweep: Sweep, values: list[tuple[str, Any]], phase: int) -> list[str]:
    """The problems of the recipe with these values set, each named by the grid key that gave
    its value (the did-you-mean of --set included)."""
    texts = [set_text(key, value) for key, value in values]
    try:
        load_recipe(sweep.recipe_ref, [*sweep.sets, *texts])
    except UserError as err:
        lines = []
        for line in err.messages:
            for (key, value), text in zip(values, texts, strict=True):
                prefix = f"--set {text}: "
                if line.startswith(prefix):
                    head = f"{sweep.where(phase, key)}={value_text(value)}"
                    line = f"{head}: {line.removeprefix(prefix)}"
            lines.append(line)
        return lines
    return []


def points(sweep: Sweep, phase: int, base: dict[str, Any]) -> list[Point]:
    """The points of phase `phase` on top of `base` (the best values of the phase before), in
    grid order: the last key varies fastest."""
    grid = sweep.settings.phases[phase - 1].grid
    found = []
    for combination in itertools.product(*grid.values()):
        values = {**base, **dict(zip(grid, combination, strict=True))}
        found.append(make_point(sweep, phase, values))
    return found


def make_point(sweep: Sweep, phase: int, values: dict[str, Any]) -> Point:
    """The point with these values: its recipe (UserError if the combination is invalid) and
    its stage instances, connected to the shared folders."""
    problems = _load_problems(sweep, list(values.items()), phase)
    if problems:
        raise UserError(problems)
    recipe = load_recipe(
        sweep.recipe_ref, [*sweep.sets, *(set_text(k, v) for k, v in values.items())]
    )
    shown = {key: _value_at(recipe.dump(), key, value) for key, value in values.items()}
    name = point_name(shown, sweep.short)
    folders = {
        kind: kind if kind in sweep.shared_kinds else f"{SWEEP_DIR}/{name}/{kind}"
        for kind in recipe.pipeline
    }
    recipe._folders = {kind: where for kind, where in folders.items() if where != kind}
    recipe.connect_stages(sweep.out)  # a point's own annotate stage's pairs, or the shared one's
    max_rows = sweep.settings.max_rows
    own = [kind for kind in recipe.pipeline if kind not in sweep.shared_kinds]
    if max_rows is not None:
        for kind in own:
            if kind in TRAINING_STAGES:
                source = recipe.stage(kind).data.train
                source.max_rows = min(source.max_rows or max_rows, max_rows)
                recipe._origins[(kind, "data", "train", "max_rows")] = "--max-rows"
    made = []
    for kind in own:
        seen = instance(recipe, kind)
        model_from = folders.get(seen.model_from) if seen.model_from is not None else None
        reads = {k: folders.get(v, v) for k, v in seen.reads.items()}
        # The points tokenize the same rows and evaluate the shared models: the first point
        # keeps what it computes (DIR/tokenized/, DIR/evaluated/) for the rest.
        made.append(StageInstance(folders[kind], kind, recipe, model_from, reads, sweep_point=True))
    return Point(phase, name, shown, recipe, made)


def _value_at(dumped: dict[str, Any], key: str, given: Any) -> Any:
    """The value at a dotted key of a dumped recipe (as validated: 3e-7 given as text is the
    number 3e-07), else as given."""
    node: Any = dumped
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return given
    return node


def metric_names(sweep: Sweep, point: Point) -> list[str] | None:
    """The metrics a point's evaluation produces, as far as they are known before it runs; None
    where some are known only then (lm-eval tasks)."""
    recipe = point.recipe
    trained = [k for k in recipe.pipeline if k in TRAINING_STAGES]
    names: list[str] = []
    if trained:
        last = recipe.stage(trained[-1])
        if last.data.eval is not None:
            names += HELD_OUT[trained[-1]]
            if trained[-1] == "preference" and last.sft_weight:
                names += WITH_SFT_WEIGHT
    evaluate = recipe.evaluate if "evaluate" in recipe.pipeline else None
    if evaluate is not None:
        if recipe.evaluate_pairs() is not None:
            names += [key for key, _ in PAIR_COLUMNS]
        for bench in evaluate.benchmarks:
            names += [f"{bench.name}/{k}" for k in ("mean_characters", "mean_tokens")]
            names += [f"{bench.name}/cut_at_max_new_tokens"]
            names += [f"{bench.name}/exact_match"] if bench.exact_match else []
            if bench.against:
                names += [f"{bench.name}/{k} vs " for k in ("win_rate", "soft_win_rate")]
        if evaluate.lm_eval is not None:
            return None
    return names


def _check_metric(sweep: Sweep, point: Point) -> None:
    metric = sweep.settings.metric
    names = metric_names(sweep, point)
    if (
        names is None
        or metric in names
        or any(n.endswith(" vs ") and metric.startswith(n) for n in names)
    ):
        return
    shown = ", ".join(n + "<opponent>" if n.endswith(" vs ") else n for n in names) or "none"
    raise UserError(
        f"--metric {metric}: not a number the sweep's evaluation produces (the held-out numbers "
        f"of the last training stage and the evaluate stage's columns: {shown})"
    )


# --------------------------------------------------------------------------- dry run


def print_sweep_plan(sweep: Sweep) -> None:
    """What the sweep would run, and what each point costs, as `--dry-run` prints it."""
    settings, out = sweep.settings, sweep.out
    best = "highest" if settings.goal == "max" else "lowest"
    lines = [
        f"sweep of recipe '{sweep.recipe.name}' into {out}; best point: {best} {settings.metric}"
    ]
    if settings.max_rows is not None:
        lines.append(
            f"each point trains on at most {settings.max_rows} rows per training stage "
            "(max_rows); the best point's command trains on all of them"
        )
    lines += ["", "shared (run once; every point starts from them):"]
    if not sweep.shared:
        lines.append("  none: phase 1 sweeps a key of the pipeline's first stage")
    for shared in sweep.shared:
        lines += stage_lines(shared, out, _starts_over(sweep, shared), in_sweep=True)
    lines += _reused_lines(sweep)
    for number, phase in enumerate(settings.phases, 1):
        grid = " x ".join(f"{key} ({len(values)})" for key, values in phase.grid.items())
        found = points(sweep, number, {})
        on = "" if number == 1 else f", each on top of phase {number - 1}'s best point"
        lines += ["", f"phase {number}: {len(found)} point(s){on}: {grid}"]
        for point in found:
            if number == 1:
                lines.append(f"  {point.name}:")
            else:
                values = ", ".join(f"{k}={value_text(point.values[k])}" for k in phase.grid)
                lines.append(f"  {values} (with phase {number - 1}'s best values; shown here on "
                             "the recipe's own)")  # fmt: skip
            for seen in point.instances:
                shown = stage_lines(seen, out, _starts_over(sweep, seen), in_sweep=True)
                if number > 1:  # its folder is named once phase 1's best is known
                    shown = [f"  {seen.kind} (in DIR/{SWEEP_DIR}/<point>/{seen.kind})", *shown[1:]]
                lines += ["  " + line for line in shown]
    names = list(dict.fromkeys([*sweep.shared_kinds, *sweep.recipe.pipeline]))
    lines += ["", *memory_lines(sweep.recipe, names)]
    print("\n".join(lines))


def _reused_lines(sweep: Sweep) -> list[str]:
    """What the points compute once and read after: their tokenized data, the benchmark
    answers of the models they evaluate, and a cached reference's log-probs."""
    trained = [
        k for k in sweep.recipe.pipeline if k in TRAINING_STAGES and k not in sweep.shared_kinds
    ]
    if not trained:
        return []
    lines = [
        f"  tokenized data of {', '.join(trained)}: kept by the first point that tokenizes it, "
        f"read by the others ({sweep.out / 'tokenized'})"
    ]
    if "evaluate" in sweep.recipe.pipeline:
        lines.append(
            "  benchmark answers of each model evaluated (the shared ones at every point): "
            f"sampled once, read after ({sweep.out / 'evaluated'})"
        )
    stage = sweep.recipe.preference
    if "preference" in trained and stage is not None and stage.uses_reference:
        if stage.reference.mode == "cached":
            lines.append(
                "  reference log-probs: computed by the first point with that reference and data, "
                f"read by the others ({sweep.out / 'reference_logps'})"
            )
    return lines


def _starts_over(sweep: Sweep, seen: StageInstance) -> bool:
    """Whether --overwrite starts this instance over: its folder was made with other settings."""
    return sweep.overwrite and _other_settings(seen, sweep.out) is not None


# --------------------------------------------------------------------------- running


def run_sweep(sweep: Sweep) -> int:
    """Run the shared stages, then each phase's points one after another; write the report.
    Returns the exit code: 0 when every point finished, 1 when one failed. A stop signal
    raises Preempted (exit 75) after recording the point it stopped."""
    if not launch.needs_launch(sweep.recipe.launch):
        import simpo_cli.run.pipeline  # noqa: F401  (torch loads now, not in the first point's time)

    code = _run(sweep, SHARED, sweep.shared)
    if code != 0:
        raise UserError(
            f"simpo sweep: the shared stages ({', '.join(sweep.shared_kinds)}) failed (exit "
            f"{code}); no point can start from them. Fix that and run the same command again"
        )
    base: dict[str, Any] = {}
    done: list[Point] = []
    for number in range(1, len(sweep.settings.phases) + 1):
        phase_points = points(sweep, number, base)
        for point in phase_points:
            _run_point(sweep, point)
        done += phase_points
        best = best_point(sweep, phase_points)
        if best is None:
            write_report(sweep, done)
            print(f"[sweep] phase {number}: no point finished with {sweep.settings.metric}; "
                  "the phases after it cannot start", flush=True)  # fmt: skip
            return EXIT_FAILURE
        base = dict(best.values)
    failed = write_report(sweep, done)
    return EXIT_FAILURE if failed else 0


def _run_point(sweep: Sweep, point: Point) -> None:
    """Run one point unless it has finished; record how it went in its point.json (on machine
    0 only, when a point spans several machines: the others run their share of it)."""
    if sweep.recipe.launch.machine_rank > 0:
        _run(sweep, point.name, point.instances)
        return
    record = read_record(sweep.out, point)
    if finished_as_planned(sweep, point.instances):
        print(f"[sweep] {point.name}: already finished; skipping", flush=True)
        if record.get("status") != "finished":
            write_record(sweep, point, "finished", None, record.get("seconds", 0.0))
        return
    stops.stop_now(point.folder, "it was not started")
    print(f"[sweep] phase {point.phase}: {point.name}", flush=True)
    earlier = record.get("seconds", 0.0) if record.get("status") != "finished" else 0.0
    start = time.monotonic()
    write_record(sweep, point, "running", None, earlier)
    try:
        code = _run(sweep, point.name, point.instances)
        error = None if code == 0 else f"exit code {code} (its output is above)"
    except Preempted:
        write_record(sweep, point, "stopped", None, earlier + time.monotonic() - start)
        raise
    except UserError as err:
        code, error = err.exit_code, err.messages[0]
        print(f"[sweep] {point.name} failed: {error}", flush=True)
    except Exception as err:  # a crash in one point: the others go on; its traceback is kept
        traceback.print_exc()
        code, error = (
            EXIT_FAILURE,
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
        )
    seconds = earlier + time.monotonic() - start
    write_record(sweep, point, "finished" if code == 0 else "failed", error, seconds)


def _run(sweep: Sweep, unit: str, plan: list[StageInstance]) -> int:
    """Run a unit's stage instances: here, or through `accelerate launch` when the recipe needs
    more processes or DeepSpeed (each process runs `simpo sweep ... --point UNIT`)."""
    _start_over(sweep, plan)
    if finished(sweep.out, plan):
        for seen in plan:
            print(f"[{seen.folder}] already finished in {sweep.out / seen.folder}; skipping")
        return 0
    if launch.needs_launch(sweep.recipe.launch) and not launch.inside_launch():
        stops.stop_now(plan[0].folder, "no training process was started")
        return launch_children(sweep.recipe, [*sweep.child_args, "--point", unit])
    _run_here(sweep.out, plan)
    return 0


def _start_over(sweep: Sweep, plan: list[StageInstance]) -> None:
    """With --overwrite, remove the folders made with other settings: here, before any process
    starts (so that all of them see the same fresh folder)."""
    if not sweep.overwrite:
        return
    for seen in plan:
        if _other_settings(seen, sweep.out) is not None:
            print(f"[{seen.folder}] made with other settings; starting it over (--overwrite)",
                  flush=True)  # fmt: skip
            shutil.rmtree(sweep.out / seen.folder)


def finished_as_planned(sweep: Sweep, plan: list[StageInstance]) -> bool:
    """Whether every instance has finished, as the sweep will see it: with --overwrite, one
    made with other settings has not (its job removes it and starts it over)."""
    if sweep.overwrite and any(_other_settings(seen, sweep.out) is not None for seen in plan):
        return False
    return finished(sweep.out, plan)


def finished(out: Path, plan: list[StageInstance]) -> bool:
    """Whether every instance has finished; one made by another recipe is refused (UserError),
    never taken as done."""
    if not all(StageDir(out / seen.folder).is_complete() for seen in plan):
        return False
    for seen in plan:
        identity = stage_identity(redact(seen.recipe.dump()), seen.kind)
        StageDir(out / seen.folder).check(identity, seen.kind)
    return True


def _run_here(out: Path, plan: list[StageInstance]) -> None:
    from simpo_cli.run.pipeline import run_instance

    progress.install()
    for seen in plan:
        if not launch.inside_launch():
            stops.stop_now(seen.folder, "it was not started")
        stops.take(STOPPING.get(seen.kind, STOPPING["training"]))
        run_instance(seen, out)


def run_unit(sweep: Sweep, unit: str) -> None:
    """Run one unit in this process: the shared stages (`shared`) or the point named `unit`
    (a later phase's after the phases before it have finished). A launched process leaves its
    process group at the end, as `simpo train`'s do."""
    with leaving_the_process_group():
        _run_unit_here(sweep, unit)


def _run_unit_here(sweep: Sweep, unit: str) -> None:
    if unit == SHARED:
        _run_here(sweep.out, sweep.shared)
        return
    base: dict[str, Any] = {}
    for number in range(1, len(sweep.settings.phases) + 1):
        phase_points = points(sweep, number, base)
        found = next((p for p in phase_points if p.name == unit), None)
        if found is not None:
            _run_here(sweep.out, found.instances)
            return
        best = best_point(sweep, phase_points)
        if best is None:
            break
        base = dict(best.values)
    raise UserError(f"--point {unit}: no such point of this sweep (yet); see --dry-run")


# --------------------------------------------------------------------------- SLURM jobs

TASK_FORMS = "shared, PHASE:INDEX, PHASE (INDEX from SLURM_ARRAY_TASK_ID) or report:PHASE"


def phase_points(sweep: Sweep, number: int) -> tuple[list[Point], list[Point]]:
    """The points of the phases before phase `number` and those of phase `number` as they stand
    now: each phase on the best point of the one before, read from the finished points' records.
    UserError when a phase before it has no best point (yet)."""
    base: dict[str, Any] = {}
    before: list[Point] = []
    for earlier in range(1, number):
        found = points(sweep, earlier, base)
        before += found
        best = best_point(sweep, found)
        if best is None:
            raise UserError(
                f"phase {number} cannot start: phase {earlier} has no finished point with "
                f"{sweep.settings.metric} (its report job says why); run the sweep again once "
                "it has one"
            )
        base = dict(best.values)
    return before, points(sweep, number, base)


def parse_task(sweep: Sweep, task: str, array_index: str | None) -> tuple[str, int, int]:
    """`--task` as (what, phase, index): ("shared", 0, 0), ("point", K, I) or ("report", K, 0).
    One line (UserError) for a task this sweep has not."""
    if task == SHARED:
        return SHARED, 0, 0
    what, _, rest = task.rpartition(":") if task.startswith("report:") else ("point", "", task)
    phase_text, _, index_text = rest.partition(":")
    if what == "point" and not index_text:
        index_text = array_index or ""
    count = len(sweep.settings.phases)
    try:
        phase = int(phase_text)
        index = int(index_text) if what == "point" else 0
    except ValueError:
        phase = index = -1
    if not 1 <= phase <= count or index < 0:
        raise UserError(f"--task {task}: expected {TASK_FORMS} (phases 1 to {count})")
    size = len(points(sweep, phase, {}))
    if index >= size:
        raise UserError(f"--task {task}: phase {phase} has {size} point(s), indexed from 0")
    return what, phase, index


def run_task(sweep: Sweep, task: str, array_index: str | None) -> int:
    """Run one job of a sweep on SLURM (`--task`; run/sweep_slurm.py submits them) and return
    its exit code. `shared`: the shared stages. `K:I`: the I-th point (from 0, in grid order) of
    phase K, on phase K-1's best, which is known only once that phase has run, so it is resolved
    here, when the job starts; `K` alone takes I from SLURM_ARRAY_TASK_ID (`array_index`): one
    task of phase K's job array. `report:K`: the report of phases 1 to K. A point runs as in
    the local sweep (skipped when finished, launched where the recipe needs it, recorded) and
    exits 1 when it failed; a report exits 1 when phase K has no best point, so that the next
    phase's array (which waits for this job to succeed) is cancelled rather than started on
    nothing."""
    what, phase, index = parse_task(sweep, task, array_index)
    if what == SHARED:
        return _run(sweep, SHARED, sweep.shared)
    if what == "report":
        before, found = phase_points(sweep, phase)
        write_report(sweep, [*before, *found])
        if best_point(sweep, found) is None:
            print(f"[sweep] phase {phase}: no point finished with {sweep.settings.metric}; "
                  "the phases after it cannot start", flush=True)  # fmt: skip
            return EXIT_FAILURE
        return 0
    point = phase_points(sweep, phase)[1][index]
    print(f"[sweep] task {task}: phase {phase}, point {index}: {point.name}", flush=True)
    _run_point(sweep, point)
    if sweep.recipe.launch.machine_rank > 0:
        return 0
    return 0 if read_record(sweep.out, point).get("status") == "finished" else EXIT_FAILURE
