"""The `simpo` command line: each command parses, loads the recipe, calls one package function.

Known user errors end with one line per problem on stderr and exit code 2. Commands that only
read a recipe (validate, config show, --dry-run) never import torch.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from simpo_cli import stops
from simpo_cli.cli_recipes import recipes_app
from simpo_cli.cli_sweep import sweep
from simpo_cli.environment import environment_report, report_text, version_line
from simpo_cli.errors import EXIT_ABORTED, Preempted, UserError
from simpo_cli.flags import (
    As,
    check_choices,
    command_line_again,
    option_values,
    schema_options,
    validated,
    with_options,
    with_plain_help_types,
)
from simpo_cli.recipe import TRAINING_STAGES, EvaluateStage, LaunchSettings, load_recipe
from simpo_cli.run.command import output_folder, run_stages
from simpo_cli.run.curves import plot_run
from simpo_cli.run.evaluation import evaluate_models
from simpo_cli.run.instances import ROUND_STAGES
from simpo_cli.run.paths import check_plot_paths
from simpo_cli.run.validate import validate_recipes

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
app.add_typer(recipes_app, name="recipes")


def _print_version(given: bool) -> None:
    if given:
        print(version_line())
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print simpo's version (and git commit, in a checkout) and exit.",
        ),
    ] = False,
) -> None:
    pass  # the options of `simpo` itself; the commands do the work


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
AllSettings = Annotated[bool, typer.Option("--all-settings", help="Print default settings too.")]


# Each given launch option is the `--set launch.KEY=VALUE` it stands for.
LAUNCH = schema_options(
    LaunchSettings, skip=("rdzv_backend", "gpu_memory_gb"), panel="Launch", optional=True
)


def _run_command(name: str, stages: list[str] | None, doc: str) -> Callable[..., None]:
    """A command that runs `stages` (None: the whole pipeline) with the shared options; a stage
    that rounds repeat takes --round."""
    rounds = stages is not None and stages[0] in ROUND_STAGES

    @with_options(
        "recipe", "output_dir", "set_", *(["round_"] if rounds else []), "dry_run", "overwrite",
        "all_settings", LAUNCH, "mixed_precision", omit=() if rounds else ("round_",),
    )  # fmt: skip
    def command(
        recipe: RecipeArg,
        output_dir: OutputDir = None,
        set_: SetOption = None,
        round_: Annotated[
            int | None,
            typer.Option("--round", help="Which round's stage to run (1 to rounds.count)."),
        ] = None,
        dry_run: DryRun = False,
        overwrite: Overwrite = False,
        all_settings: AllSettings = False,
        mixed_precision: Annotated[
            Literal["no", "bf16", "fp16"] | None,
            typer.Option(help="Precision of every stage.", rich_help_panel="Launch"),
        ] = None,
        **launch: Any,
    ) -> None:
        given = option_values(LAUNCH, launch).items()
        sets = [*(set_ or []), *(f"launch.{k}={v}" for k, v in given if v is not None)]
        sets += ["logging.all_settings=true"] if all_settings else []
        run_stages(
            name, recipe, stages, output_dir, sets, mixed_precision, dry_run, overwrite, round_
        )

    command.__doc__ = doc
    return command


STAGE_COMMANDS = {
    "train": (
        None,
        "Run every stage of the recipe's pipeline in order (e.g. SFT then SimPO).\n\n"
        "Each stage writes DIR/<stage>/ and the next starts from its model. Running the same "
        "command again resumes from the last checkpoint and skips finished stages. More than "
        "one process, or DeepSpeed, re-launches through `accelerate launch`.",
    ),
    "sft": (
        ["sft"],
        "Run only the SFT stage: causal-LM loss on every assistant turn, into DIR/sft/.",
    ),
    "generate": (
        ["generate"],
        "Run only the generate stage: sample replies to generate.prompts, into DIR/generate/.\n\n"
        "Samples from the model of the training stage before it (else the recipe's model), one "
        "reply per seed per prompt, on vLLM (GPUs) or transformers. Results are written as they "
        "come: the same command resumes after a kill.",
    ),
    "annotate": (
        ["annotate"],
        "Run only the annotate stage: score the generate stage's samples with annotate.reward "
        "(a reward model or a Python function) and write best-vs-worst pairs into "
        "DIR/annotate/dataset/ (save_to_disk folder and JSONL) with a report.",
    ),
    "preference": (
        ["preference"],
        "Run only the preference (SimPO) stage into DIR/preference/.\n\n"
        "It starts from the model of the training stage before it (e.g. SFT), and trains on the "
        "annotate stage's pairs when preference.data.train is not given.",
    ),
    "evaluate": (
        ["evaluate"],
        "Run only the evaluate stage: compare the recipe's checkpoints (its training stages' "
        "models, or evaluate.checkpoints) on held-out pairs, benchmark answer files and lm-eval "
        "tasks, into DIR/evaluate/ (comparison.md/.csv/.json and comparison.png).",
    ),
}
for _name, (_stages, _doc) in STAGE_COMMANDS.items():
    app.command(_name)(_run_command(_name, _stages, _doc))
app.command("sweep")(sweep)


@app.command()
def validate(
    recipes: Annotated[list[str], typer.Argument(help="Recipe files or shipped names.")],
    set_: SetOption = None,
) -> None:
    """Check recipes and their JSON data files' rows; print every problem. Exit 0 if all valid."""
    if not validate_recipes(recipes, set_):
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
        str, typer.Option(help=f"Stage whose data to show: {', '.join(TRAINING_STAGES)}.")
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
    from simpo_cli.data.inspect import inspect_row

    loaded = load_recipe(recipe, set_)
    if stage not in TRAINING_STAGES:
        raise UserError(
            f"--stage {stage}: no training data to show; use one of {', '.join(TRAINING_STAGES)}"
        )
    loaded.connect_stages(output_folder(loaded, None))
    use_color = sys.stdout.isatty() if color is None else color
    print(inspect_row(loaded, stage, row, use_color))


# simpo eval's options, generated from recipe.EvaluateStage: the schema gives each its name,
# type, default, bounds and help. `As` renames an option, words its help for the command line
# where the recipe's speaks of stages, or places it in another help panel.
EVAL_PAIRS = schema_options(
    EvaluateStage, "pairs", only=("path", "split"), panel="Pairs",
    fields={"path": As("pairs", "Preference pairs to score: file, saved folder or hub name.")},
)  # fmt: skip
EVAL_TOP = schema_options(
    EvaluateStage, skip=("checkpoints",), panel="Pairs",  # checkpoints: the MODELS argument
    fields={
        "reference": As(help="Reference model folder: DPO's implicit reward accuracy on --pairs."),
        "tokenization": As(choices="parse"),
        "dtype": As(panel=None),
        "backend": As(panel="Benchmarks"),
    },
)  # fmt: skip
EVAL_BENCHMARK = schema_options(
    EvaluateStage, "benchmarks", panel="Benchmarks",
    fields={
        "name": As("benchmark", "The benchmark whose answer file to write.", choices="schema"),
        "family": As(choices="schema"),
        "against": As(
            help="Reward-model win rate of the answers against: reference (AlpacaEval's "
            "reference outputs), an answer file or folder, or another checkpoint's name."
        ),
    },
)  # fmt: skip
EVAL_REWARD = schema_options(
    EvaluateStage, "reward", prefix="reward-", only=("model", "function"), panel="Benchmarks"
)
EVAL_LM_EVAL = schema_options(
    EvaluateStage, "lm_eval", prefix="lm-eval-", skip=("batch_size", "apply_chat_template"),
    panel="lm-eval", fields={"tasks": As("lm-eval")},
)  # fmt: skip
EVAL = EVAL_PAIRS + EVAL_TOP + EVAL_BENCHMARK + EVAL_REWARD + EVAL_LM_EVAL
EVAL_LAUNCH = [option for option in LAUNCH if option.field != "deepspeed"]


@app.command("eval")
@with_options(
    "ctx", "models", EVAL_PAIRS, "pairs_output", EVAL_TOP, "output_dir", EVAL_BENCHMARK, "model_id",
    EVAL_REWARD, EVAL_LM_EVAL, "lm_eval_no_chat_template", EVAL_LAUNCH,
)  # fmt: skip
def evaluate(
    ctx: typer.Context,
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model folders (e.g. outputs/tiny/preference), LoRA adapter folders (read as "
            "the merged model) or run folders (outputs/tiny: each finished stage's model)."
        ),
    ],
    pairs_output: Annotated[
        str | None,
        typer.Option(
            help="One checkpoint's per-pair results (JSON file).", rich_help_panel="Pairs"
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Output folder: answer files, comparison table."),
    ] = None,
    model_id: Annotated[
        str | None,
        typer.Option(
            help="One checkpoint's name in the answer files; default: the folder's.",
            rich_help_panel="Benchmarks",
        ),
    ] = None,
    lm_eval_no_chat_template: Annotated[
        bool,
        typer.Option(
            "--lm-eval-no-chat-template",
            help="Give lm-eval the raw prompts (base models).",
            rich_help_panel="lm-eval",
        ),
    ] = False,
    **given: Any,
) -> None:
    """Evaluate checkpoints: score preference pairs, write benchmark answers, run lm-eval tasks.

    --pairs: reward accuracy, margin, SimPO loss, the length / log-prob Spearman, with
    --reference DPO's implicit reward. --benchmark: the answer files AlpacaEval 2, Arena-Hard or
    MT-Bench's judges read, judge-free proxies, --against: reward-model win rates. --lm-eval:
    lm-eval tasks. Several checkpoints give one comparison table; -o writes it with plots."""
    if given["pairs"] is None and given["benchmark"] is None and given["lm_eval"] is None:
        raise UserError(
            "simpo eval: give --pairs (score pairs), --benchmark (write answers) or --lm-eval "
            "(run tasks)"
        )
    launch = {key: value for key, value in option_values(EVAL_LAUNCH, given).items() if value}
    launching = validated(LaunchSettings, launch, "simpo eval")
    settings = _eval_settings(given, lm_eval_no_chat_template)
    child_args = ["eval", *command_line_again(ctx)]
    evaluate_models(models, settings, launching, pairs_output, output_dir, model_id, child_args)


def _eval_settings(given: dict[str, Any], no_chat_template: bool) -> EvaluateStage:
    """The evaluate stage's settings (recipe.EvaluateStage) from simpo eval's options."""
    if given["benchmark"] is not None:
        from simpo_cli.evaluate.benchmarks import check_benchmark

        check_benchmark(given["benchmark"])
    check_choices(EVAL, given)
    against, scorers = given["against"], (given["reward_model"], given["reward_function"])
    if (against is None) != (scorers == (None, None)):
        raise UserError(
            "--against needs a scorer: --reward-model FOLDER or --reward-function "
            "file.py:name (and a scorer needs --against)"
        )
    if against is not None and given["benchmark"] is None:
        raise UserError("--against: scores benchmark answers; add --benchmark")
    values = option_values(EVAL, given)
    if "lm_eval" in values:
        values["lm_eval"]["apply_chat_template"] = not no_chat_template
    return validated(EvaluateStage, values, "simpo eval")


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (e.g. outputs/tiny) or a stage's.")],
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Output folder; default: RUN_DIR.")
    ] = None,
) -> None:
    """Draw the training curves of a run (loss, reward accuracy, margin; training and held-out)
    into OUTPUT_DIR/training_curves.png. Needs matplotlib."""
    check_plot_paths(run_dir, output_dir)
    print(f"wrote {plot_run(run_dir, output_dir and output_dir / 'training_curves.png')}")


@app.command("env")
def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print this machine's versions and GPUs, to paste into a bug report.

    simpo's version and commit, Python, torch with its CUDA, cuDNN and NCCL, the GPUs, and the
    libraries a run uses ("not installed" where absent).
    """
    report = environment_report()
    print(json.dumps(report, indent=2) if as_json else report_text(report))


def main() -> None:
    """Exit codes (errors.py, README "Exit codes"): 2 user error, 3 non-finite step, 75 stopped
    on a signal after saving (rerun to resume), 130 aborted by Ctrl-C."""
    # Every process of a launch meets the same error or stop; one of them says it.
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        # Stage commands and sweeps stop well on a signal from the moment they start
        # (stops.py); the others get the signals' defaults back.
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if command not in STAGE_COMMANDS and command != "sweep":
            stops.release()
        with_plain_help_types(app)()  # no `<bool>` beside a flag in --help
    except UserError as err:
        if speaks:
            for line in err.messages:
                print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except Preempted as err:
        stops.ignore()
        if speaks:
            print(str(err), file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(EXIT_ABORTED)


if __name__ == "__main__":
    main()
