"""The `simpo` command line: each command parses, loads the recipe, calls one package function.

Known user errors end with one line per problem on stderr and exit code 2. Commands that only
read a recipe (validate, config show, --dry-run) never import torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from simpo_cli.errors import UserError
from simpo_cli.recipe import STAGES, Recipe, load_recipe

app = typer.Typer(
    help="Align language models with SimPO from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect how a recipe's data is tokenized.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

RecipeArg = Annotated[str, typer.Argument(help="Recipe file, folder, or shipped name (e.g. tiny).")]
OutputDir = Annotated[
    Path | None,
    typer.Option("--output-dir", "-o", help="Where stages write; default: the recipe's."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: --set preference.beta=2.5 (repeatable)."),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan; start nothing.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Delete the stage folders and start over.")
]


def _output_dir(recipe: Recipe, flag: Path | None) -> Path:
    if flag is not None:
        return flag
    return Path(recipe.output_dir or f"outputs/{recipe.name}")


def _run(recipe_ref: str, stages: list[str] | None, output_dir, sets, dry_run, overwrite) -> None:
    recipe = load_recipe(recipe_ref, sets)
    out = _output_dir(recipe, output_dir)
    names = list(recipe.pipeline) if stages is None else stages
    for name in names:
        recipe.stage(name)  # a missing section is an error before anything starts
    if dry_run:
        _print_plan(recipe, names, out)
        return
    from simpo_cli.trainer import run_stage

    final = out
    for name in names:
        final = run_stage(recipe, name, out, overwrite)
    print(f"final model: {final}")


def _print_plan(recipe: Recipe, names: list[str], out: Path) -> None:
    from simpo_cli.outputs import StageDir

    print(recipe.to_yaml().rstrip())
    print("\nplan:")
    for name in names:
        stage_dir = StageDir(out / name)
        checkpoint = stage_dir.last_checkpoint()
        if stage_dir.is_complete():
            state = "finished (skipped; --overwrite reruns it)"
        elif checkpoint is not None:
            state = f"resumes from {checkpoint.name}"
        else:
            state = "starts fresh"
        stage = recipe.stage(name)
        extra = f", gamma {stage.resolved_gamma:g}" if name == "preference" else ""
        print(f"  {name}: -> {stage_dir.path} ({state}){extra}")


@app.command()
def train(
    recipe: RecipeArg,
    output_dir: OutputDir = None,
    set_: SetOption = None,
    dry_run: DryRun = False,
    overwrite: Overwrite = False,
) -> None:
    """Run every stage of the recipe's pipeline in order (e.g. SFT then SimPO).

    Each stage writes DIR/<stage>/ and the next starts from its model. Running the same command
    again resumes from the last checkpoint and skips finished stages.
    """
    _run(recipe, None, output_dir, set_, dry_run, overwrite)


def _stage_command(stage: str, doc: str):
    def command(
        recipe: RecipeArg,
        output_dir: OutputDir = None,
        set_: SetOption = None,
        dry_run: DryRun = False,
        overwrite: Overwrite = False,
    ) -> None:
        _run(recipe, [stage], output_dir, set_, dry_run, overwrite)

    command.__doc__ = doc
    return command


app.command("sft")(
    _stage_command(
        "sft",
        "Run only the SFT stage: causal-LM loss on every assistant turn, into DIR/sft/.",
    )
)
app.command("preference")(
    _stage_command(
        "preference",
        "Run only the preference (SimPO) stage into DIR/preference/.\n\n"
        "When the pipeline has an SFT stage first, it starts from that stage's finished model.",
    )
)


@app.command()
def validate(
    recipes: Annotated[list[str], typer.Argument(help="Recipe files or shipped names.")],
    set_: SetOption = None,
) -> None:
    """Check recipes against the schema; print every problem. Exit 0 if all are valid, else 2."""
    failed = False
    for ref in recipes:
        try:
            recipe = load_recipe(ref, set_)
        except UserError as err:
            failed = True
            for line in err.messages:
                print(f"error: {line}", file=sys.stderr)
            continue
        print(f"ok: {ref} ({recipe.name}: {' -> '.join(recipe.pipeline)})")
    if failed:
        raise typer.Exit(2)


@config_app.command("show")
def config_show(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Print the fully resolved recipe (defaults filled, paths resolved) as YAML."""
    loaded = load_recipe(recipe, set_)
    print(loaded.to_yaml().rstrip())
    if loaded.preference is not None:
        stage = loaded.preference
        print(f"# resolved gamma = {stage.resolved_gamma:g}")


@data_app.command("inspect")
def data_inspect(
    recipe: RecipeArg,
    stage: Annotated[
        str, typer.Option(help=f"Stage whose data to show: {', '.join(STAGES)}.")
    ] = "preference",
    row: Annotated[int, typer.Option(min=0, help="Row of the training data to show.")] = 0,
    set_: SetOption = None,
    color: Annotated[
        bool | None,
        typer.Option("--color/--no-color", help="Default: when printing to a terminal."),
    ] = None,
) -> None:
    """Print one rendered example token by token with the trained tokens marked.

    Prompt, padding and template tokens are masked (not trained); a misplaced mask, a double BOS
    or a missing EOS is visible at a glance.
    """
    from simpo_cli.data import inspect_row

    loaded = load_recipe(recipe, set_)
    if stage not in STAGES:
        raise UserError(f"--stage {stage}: no such stage; use one of {', '.join(STAGES)}")
    use_color = sys.stdout.isatty() if color is None else color
    print(inspect_row(loaded, stage, row, use_color))


@app.command("eval")
def evaluate(
    model_dir: Annotated[str, typer.Argument(help="A model folder, e.g. outputs/tiny/preference.")],
    pairs: Annotated[str, typer.Option(help="Preference pairs: file, saved folder or hub name.")],
    split: Annotated[str, typer.Option(help="Split of --pairs to read.")] = "train",
    output: Annotated[str | None, typer.Option(help="Write the results as JSON here.")] = None,
    beta: Annotated[
        float | None, typer.Option(help="Default: the stage's recipe, else 2.0.")
    ] = None,
    gamma: Annotated[
        float | None, typer.Option(help="Absolute margin; default: the recipe's.")
    ] = None,
    max_length: Annotated[int | None, typer.Option(min=1)] = None,
    max_prompt_length: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Score preference pairs under a model: per-pair average log-probs, reward accuracy, mean
    margin and SimPO loss."""
    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: no such model folder")
    from simpo_cli.eval import evaluate_model_dir

    result = evaluate_model_dir(
        model_dir, pairs, split, output, beta, gamma, max_length, max_prompt_length, batch_size
    )
    s = result["summary"]
    print(
        f"pairs {s['pairs']}: reward accuracy {s['reward_accuracy']:.4f}, mean margin "
        f"{s['reward_margin']:.4f}, SimPO loss {s['loss']:.4f} (beta {s['beta']:g}, "
        f"gamma {s['gamma']:g})"
    )
    if output:
        print(f"wrote {output}")


def main() -> None:
    try:
        app()
    except UserError as err:
        for line in err.messages:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
