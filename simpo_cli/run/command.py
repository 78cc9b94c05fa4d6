"""What the stage commands (`simpo train`, `sft`, `generate`, `annotate`, `preference`,
`evaluate`) do once their flags are parsed: check every path, then print the plan, run the
stages in this process, run them one command each, or re-launch through `accelerate launch`.

Loads torch only when it runs or launches a stage: a dry run and the path checks never do.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simpo_cli import launch, progress, stops
from simpo_cli.errors import NonFiniteError, Preempted
from simpo_cli.launch import LAUNCH_ID
from simpo_cli.model.adapters import check_combination, check_targets
from simpo_cli.recipe import TRAINING_STAGES, Recipe, load_recipe
from simpo_cli.redact import redact_args
from simpo_cli.run import hub
from simpo_cli.run.curves import plot_run
from simpo_cli.run.instances import StageInstance, instances, selected
from simpo_cli.run.paths import check_paths
from simpo_cli.run.plan import check_training, print_plan
from simpo_cli.run.rounds import summary_lines, write_records

# Set for the stage commands `_run_alone` starts: the command that started them pushes to the
# hub once they have all run (run/hub.py), so that a pushed card carries the evaluate table.
PUSHED_BY_PARENT = "SIMPO_PUSHED_BY_PARENT"

# What a stop signal does during each kind of stage: training stages stop after the optimizer
# step in hand (faults.StepGuard); generate and annotate where their work is kept.
STOPPING = {
    "training": "finishing this optimizer step, then saving a checkpoint and stopping",
    "generate": "finishing the prompts in hand, then stopping (the samples written are kept)",
    "annotate": "finishing the batch in hand, then stopping (scoring starts over on the rerun)",
    "evaluate": "the evaluation runs to its end first",
}


def output_folder(recipe: Recipe, flag: Path | None) -> Path:
    """Where the stages write: --output-dir, else the recipe's output_dir, else outputs/NAME."""
    if flag is not None:
        return flag
    return Path(recipe.output_dir or f"outputs/{recipe.name}")


def precision_sets(recipe: Recipe, precision: str) -> list[str]:
    """One precision for every stage, so the launcher, the Trainer and DeepSpeed's "auto"
    values cannot disagree."""
    return [
        f"{name}.training.{key}={precision == key}"
        for name in TRAINING_STAGES
        if getattr(recipe, name) is not None
        for key in ("bf16", "fp16")
    ]


def run_stages(
    command: str,
    recipe_ref: str,
    stages: list[str] | None,
    output_dir: Path | None,
    sets: list[str],
    mixed_precision: str | None,
    dry_run: bool,
    overwrite: bool,
    round_: int | None = None,
) -> None:
    """Run `stages` of the recipe (None: its whole pipeline; with `round_`, that round's
    instance of the stage) as `simpo COMMAND` does; `sets`: the --set overrides, the launch
    options' among them."""
    sets = list(sets)
    recipe = load_recipe(recipe_ref, sets)
    if mixed_precision is not None:
        sets += precision_sets(recipe, mixed_precision)
        recipe = load_recipe(recipe_ref, sets)
    out = output_folder(recipe, output_dir)
    recipe.connect_stages(out)  # a preference stage without data reads the annotate stage's
    names = list(recipe.pipeline) if stages is None else stages
    for name in names:
        recipe.stage(name)  # a missing section is an error before anything starts
    every = instances(recipe, out)  # with rounds, each round's stages, connected to its folders
    plan = selected(every, names, round_, recipe)

    # Every path, before a process is launched or a folder created.
    check_paths(recipe, out, plan, "--output-dir" if output_dir is not None else "output_dir")
    if not launch.inside_launch() and any(name in TRAINING_STAGES for name in names):
        # model.lora.target_modules, on the model built on the meta device; once, by the
        # command (the launched processes' stages check the model they load: add_adapters).
        check_targets(recipe)
    # Data smaller than one optimizer step, or a learning rate of 0 at every step: nothing
    # would be trained. Checked here where the data files' rows can be counted.
    check_training(plan, out, overwrite)

    child_args = [command, recipe_ref, "--output-dir", str(out)]
    child_args += ["--round", str(round_)] if round_ is not None else []
    # The launcher, not the training processes, needs the machine's rank: leaving it out keeps
    # one command line for every machine but --machine_rank.
    child_sets = [s for s in sets if not s.startswith("launch.machine_rank=")]
    child_args += [arg for s in child_sets for arg in ("--set", s)]
    child_args += ["--overwrite"] if overwrite else []
    relaunch = launch.needs_launch(recipe.launch) and not launch.inside_launch()
    # A stop signal that came while this process started (stops.py) ends it here, at the
    # latest: nothing has been started that a rerun would not redo.
    if dry_run:
        print_plan(recipe, plan, out, child_args if relaunch else None, overwrite)
        stops.stop_now("dry-run", "the plan is above")
        return
    pushes = _pushes_here(recipe)
    if pushes and not hub.token_found():
        print(f"hub: no Hugging Face token found here; the stages run, and the push at the end "
              f"fails unless one is set by then: {hub.LOGIN_FIX}", flush=True)  # fmt: skip
    if not launch.inside_launch() and len(plan) > 1 and _vllm_generate(recipe, names):
        # A vLLM engine keeps its GPUs and its own process group until its process ends: the
        # stages run one command each (see stages/generate.py).
        for instance in plan:
            stops.stop_now(instance.folder, "it was not started")
            code = _run_alone(recipe, instance, child_args, relaunch)
            if code != 0:
                sys.exit(code)
        _round_summary(recipe, every, plan, out)
        if pushes:
            hub.push_finished_stages(recipe, out)
        return
    if relaunch:
        stops.stop_now(plan[0].folder, "no training process was started")
        code = launch_children(recipe, child_args)
        if code == 0 and pushes:
            hub.push_finished_stages(recipe, out)
        sys.exit(code)
    from simpo_cli.distributed import is_main_process, say
    from simpo_cli.run.pipeline import run_instance

    progress.install()  # in every process that runs stages, launched ones included
    folders = {}
    with leaving_the_process_group():
        for instance in plan:
            if not launch.inside_launch():
                # Between stages (in several processes, the stop is agreed on at the start of
                # the next training stage instead: they may see the signal at different times).
                stops.stop_now(instance.folder, "it was not started")
            # What a stop signal does from here, in this stage's words (stops.py).
            stops.take(STOPPING.get(instance.kind, STOPPING["training"]))
            folders[instance.folder] = run_instance(instance, out, overwrite)
            if instance.round is not None and is_main_process():
                write_records(recipe, every, out)  # the round's record, as far as it has got
        trained = [i.folder for i in plan if i.kind in TRAINING_STAGES]
        if trained:
            say(f"final model: {folders[trained[-1]]}")
        last = plan[-1]
        if last.kind not in TRAINING_STAGES:
            say(f"{'evaluation' if last.kind == 'evaluate' else 'output'}: {folders[last.folder]}")
        if is_main_process():
            _round_summary(recipe, every, plan, out)
    if trained:
        _plot_when_possible(out)
    if pushes:
        hub.push_finished_stages(recipe, out)


@contextmanager
def leaving_the_process_group() -> Iterator[None]:
    """Run a process's stages, then leave the process group (distributed.shutdown): at their
    end, and at a stop that every process met after the same step (a signal, a non-finite
    step). Not on an error one process met alone: destroying a group others still use can
    hang."""
    from simpo_cli.distributed import shutdown

    try:
        yield
    except (Preempted, NonFiniteError):
        shutdown()
        raise
    shutdown()


def _pushes_here(recipe: Recipe) -> bool:
    """Whether this process pushes to the hub at the end: the command itself (not a training
    process it launched, nor a stage command it started one by one), on machine 0."""
    return (
        recipe.hub is not None
        and not launch.inside_launch()
        and not os.environ.get(PUSHED_BY_PARENT)
        and recipe.launch.machine_rank == 0
    )


def _vllm_generate(recipe: Recipe, names: list[str]) -> bool:
    """Whether a stage to run samples with vLLM: generate, or evaluate's benchmark answers."""
    from simpo_cli.onpolicy.sampling import resolve_backend

    if "generate" in names and recipe.generate is not None:
        if resolve_backend(recipe.generate.backend, "generate.backend") == "vllm":
            return True
    evaluate = recipe.evaluate
    if "evaluate" in names and evaluate is not None and evaluate.benchmarks:
        return resolve_backend(evaluate.backend, "evaluate.backend") == "vllm"
    return False


def _round_summary(
    recipe: Recipe, every: list[StageInstance], plan: list[StageInstance], out: Path
) -> None:
    """The rounds' records side by side, once a command has run a round's stage."""
    if any(instance.round is not None for instance in plan):
        records = write_records(recipe, every, out)
        if records:
            print("\n".join(summary_lines(records, out)), flush=True)


def _run_alone(
    recipe: Recipe, instance: StageInstance, child_args: list[str], launched: bool
) -> int:
    """Run one stage instance as its own command (through the launcher when `launched`)."""
    args = [instance.kind, *child_args[1:]]
    args += ["--round", str(instance.round)] if instance.round is not None else []
    if launched:
        return launch_children(recipe, args)
    env = {**os.environ, PUSHED_BY_PARENT: "1"}
    return subprocess.run([sys.executable, "-m", "simpo_cli", *args], env=env).returncode


def _plot_when_possible(out: Path) -> None:
    """Leave a picture of the run beside it when matplotlib is installed."""
    from simpo_cli.distributed import is_main_process

    if is_main_process() and importlib.util.find_spec("matplotlib") is not None:
        print(f"training curves: {plot_run(out)}")


def launch_children(recipe: Recipe, child_args: list[str]) -> int:
    """Re-run this command on every process through `accelerate launch`; wait for them."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    launch.preflight(recipe.launch, gpus)
    check_combination(recipe)
    command = launch.launch_command(recipe, child_args)

    os.environ[LAUNCH_ID] = uuid.uuid4().hex  # names this launch's marker files
    print("launching: " + shlex.join(redact_args(command)), flush=True)
    if gpus == 0:
        print(f"no GPU here: running {recipe.launch.world_size} processes on the CPU", flush=True)
    return launch.run(command)
