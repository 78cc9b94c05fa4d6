"""The `simpo` command line: each command parses, loads the recipe, calls one package function.

Known user errors end with one line per problem on stderr and exit code 2. Commands that only
read a recipe (validate, config show, --dry-run) never import torch.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from simpo_cli.errors import EXIT_ABORTED, Preempted, UserError
from simpo_cli.recipe import (
    TRAINING_STAGES,
    EvaluateStage,
    LaunchSettings,
    copy_recipe,
    load_recipe,
    recipe_summary,
    shipped_recipe_dir,
    shipped_recipes,
)
from simpo_cli.run.command import LaunchFlags, output_folder, run_stages
from simpo_cli.run.curves import plot_run
from simpo_cli.run.evaluation import evaluate_models
from simpo_cli.run.paths import check_copy_destination, check_plot_paths

app = typer.Typer(
    help="Align language models with SimPO from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect how a recipe's data is tokenized.", no_args_is_help=True)
recipes_app = typer.Typer(
    help="The shipped recipes: the paper's settings and the tiny demo.", no_args_is_help=True
)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(recipes_app, name="recipes")

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


class Tokenization(str, Enum):
    default = "default"
    authors = "authors"


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


def _run_command(name: str, stages: list[str] | None, doc: str):
    """A command that runs `stages` (None: the whole pipeline) with the shared options."""

    def command(
        recipe: RecipeArg,
        output_dir: OutputDir = None,
        set_: SetOption = None,
        dry_run: DryRun = False,
        overwrite: Overwrite = False,
        num_processes: Annotated[
            int | None,
            typer.Option(min=1, help="Processes (GPUs) per machine.", rich_help_panel="Launch"),
        ] = None,
        num_machines: Annotated[
            int | None, typer.Option(min=1, help="Machines in the run.", rich_help_panel="Launch")
        ] = None,
        machine_rank: Annotated[
            int | None, typer.Option(min=0, help="This machine's rank.", rich_help_panel="Launch")
        ] = None,
        main_process_ip: Annotated[
            str | None, typer.Option(help="Address of machine 0.", rich_help_panel="Launch")
        ] = None,
        main_process_port: Annotated[
            int | None,
            typer.Option(min=1, max=65535, help="Rendezvous port.", rich_help_panel="Launch"),
        ] = None,
        deepspeed: Annotated[
            str | None,
            typer.Option(
                help="zero1, zero2, zero3, zero3_offload or a JSON path.", rich_help_panel="Launch"
            ),
        ] = None,
        mixed_precision: Annotated[
            Precision | None,
            typer.Option(help="Precision of every stage.", rich_help_panel="Launch"),
        ] = None,
    ) -> None:
        flags = LaunchFlags(
            num_processes, num_machines, machine_rank, main_process_ip, main_process_port,
            deepspeed, mixed_precision.value if mixed_precision else None,
        )  # fmt: skip
        run_stages(name, recipe, stages, output_dir, set_, flags, dry_run, overwrite)

    command.__doc__ = doc
    return command


app.command("train")(
    _run_command(
        "train",
        None,
        "Run every stage of the recipe's pipeline in order (e.g. SFT then SimPO).\n\n"
        "Each stage writes DIR/<stage>/ and the next starts from its model. Running the same "
        "command again resumes from the last checkpoint and skips finished stages. More than "
        "one process, or DeepSpeed, re-launches through `accelerate launch`.",
    )
)
app.command("sft")(
    _run_command(
        "sft",
        ["sft"],
        "Run only the SFT stage: causal-LM loss on every assistant turn, into DIR/sft/.",
    )
)
app.command("generate")(
    _run_command(
        "generate",
        ["generate"],
        "Run only the generate stage: sample replies to generate.prompts, into DIR/generate/.\n\n"
        "Samples from the model of the training stage before it (else the recipe's model), one "
        "reply per seed per prompt, on vLLM (GPUs) or transformers. Results are written as they "
        "come: the same command resumes after a kill.",
    )
)
app.command("annotate")(
    _run_command(
        "annotate",
        ["annotate"],
        "Run only the annotate stage: score the generate stage's samples with annotate.reward "
        "(a reward model or a Python function) and write best-vs-worst pairs into "
        "DIR/annotate/dataset/ (save_to_disk folder and JSONL) with a report.",
    )
)
app.command("preference")(
    _run_command(
        "preference",
        ["preference"],
        "Run only the preference (SimPO) stage into DIR/preference/.\n\n"
        "It starts from the model of the training stage before it (e.g. SFT), and trains on the "
        "annotate stage's pairs when preference.data.train is not given.",
    )
)
app.command("evaluate")(
    _run_command(
        "evaluate",
        ["evaluate"],
        "Run only the evaluate stage: compare the recipe's checkpoints (its training stages' "
        "models, or evaluate.checkpoints) on held-out pairs, benchmark answer files and lm-eval "
        "tasks, into DIR/evaluate/ (comparison.md/.csv/.json and comparison.png).",
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
    from simpo_cli.data import inspect_row

    loaded = load_recipe(recipe, set_)
    if stage not in TRAINING_STAGES:
        raise UserError(
            f"--stage {stage}: no training data to show; use one of {', '.join(TRAINING_STAGES)}"
        )
    loaded.connect_stages(output_folder(loaded, None))
    use_color = sys.stdout.isatty() if color is None else color
    print(inspect_row(loaded, stage, row, use_color))


ShippedName = Annotated[str, typer.Argument(help="A shipped recipe's name (simpo recipes list).")]


@recipes_app.command("list")
def recipes_list() -> None:
    """List the shipped recipes: model, method (the preference loss, or sft) and key settings."""
    rows, failed = [("NAME", "MODEL", "METHOD", "HYPERPARAMETERS")], []
    for name in shipped_recipes():
        try:
            rows.append((name, *recipe_summary(load_recipe(name))))
        except UserError as err:
            failed += err.messages
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, model, method, settings in rows:
        print(f"{name:<{width[0]}}  {model:<{width[1]}}  {method:<{width[2]}}  {settings}")
    if failed:
        raise UserError(failed)


@recipes_app.command("show")
def recipes_show(name: ShippedName) -> None:
    """Print a shipped recipe file as written, comments included."""
    print((shipped_recipe_dir(name) / "recipe.yaml").read_text(), end="")


@recipes_app.command("copy")
def recipes_copy(
    name: ShippedName,
    dest: Annotated[Path, typer.Argument(help="Folder to copy into (created if missing).")],
) -> None:
    """Copy a shipped recipe's files into DEST to edit them; never overwrites a file."""
    check_copy_destination(dest)
    for target, origin in copy_recipe(name, dest):
        print(f"wrote {target}" + (f" (from {origin}; recipe.yaml points at it)" if origin else ""))
    print(f"edit {dest / 'recipe.yaml'}, then: simpo train {dest}")


Panel = "Benchmarks"


def _opt(help_: str, panel: str | None = None, **kwargs):
    return typer.Option(help=help_, rich_help_panel=panel, **kwargs)


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model folders (e.g. outputs/tiny/preference), LoRA adapter folders (read as "
            "the merged model) or run folders (outputs/tiny: each finished stage's model)."
        ),
    ],
    pairs: Annotated[
        str | None, _opt("Preference pairs to score: file, saved folder or hub name.", "Pairs")
    ] = None,
    split: Annotated[str, _opt("Split of --pairs to read.", "Pairs")] = "train",
    output: Annotated[
        str | None, _opt("One checkpoint: write its per-pair results as JSON here.", "Pairs")
    ] = None,
    beta: Annotated[float | None, _opt("Default: the stage's recipe, else 2.0.", "Pairs")] = None,
    gamma: Annotated[float | None, _opt("Absolute margin; default: the recipe's.", "Pairs")] = None,
    max_length: Annotated[int | None, _opt("Tokens of prompt + response.", "Pairs", min=1)] = None,
    max_prompt_length: Annotated[int | None, _opt("Prompt tokens kept.", "Pairs", min=1)] = None,
    batch_tokens: Annotated[
        int, _opt("Padded tokens per forward pass when scoring pairs.", "Pairs", min=1)
    ] = 8192,
    tokenization: Annotated[
        Tokenization | None,
        _opt("default or authors; default: the stage's recipe, else default.", "Pairs"),
    ] = None,
    reference: Annotated[
        str | None,
        _opt("Reference model folder: DPO's implicit reward accuracy on --pairs.", "Pairs"),
    ] = None,
    benchmark: Annotated[
        str | None, _opt("alpaca_eval, arena_hard or mt_bench: write its answer file.", Panel)
    ] = None,
    questions: Annotated[
        str | None,
        _opt("The benchmark's questions: a file in its official format (or hub name).", Panel),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Where the answer files and the comparison go."),
    ] = None,
    model_id: Annotated[
        str | None, _opt("One checkpoint's name in the answer files; default: the folder's.", Panel)
    ] = None,
    family: Annotated[
        str,
        _opt(
            "The SimPO authors' AlpacaEval decoding for: llama3, mistral-base, "
            "mistral-instruct, gemma2.",
            Panel,
        ),
    ] = "llama3",
    arena_layout: Annotated[
        str, _opt("Arena-Hard answer layout: v0.1 (the paper's) or current.", Panel)
    ] = "v0.1",
    temperature: Annotated[
        float | None, _opt("Override the benchmark's temperature(s).", Panel, min=0)
    ] = None,
    max_new_tokens: Annotated[
        int | None, _opt("Override the benchmark's answer length cap.", Panel, min=1)
    ] = None,
    backend: Annotated[str, _opt("auto, vllm or transformers.", Panel)] = "auto",
    against: Annotated[
        str | None,
        _opt(
            "Reward-model win rate of the answers against: reference (AlpacaEval's reference "
            "outputs), an answer file or folder, or another checkpoint's name.",
            Panel,
        ),
    ] = None,
    reward_model: Annotated[
        str | None, _opt("Reward model (folder or hub name) for --against.", Panel)
    ] = None,
    reward_function: Annotated[
        str | None, _opt("Or a reward function 'file.py:name' for --against.", Panel)
    ] = None,
    lm_eval: Annotated[
        str | None,
        _opt("lm-evaluation-harness tasks, comma-separated (extra: lm-eval).", "lm-eval"),
    ] = None,
    lm_eval_include_path: Annotated[
        str | None, _opt("Folder of extra lm-eval task YAML files.", "lm-eval")
    ] = None,
    lm_eval_limit: Annotated[
        int | None, _opt("Examples per lm-eval task.", "lm-eval", min=1)
    ] = None,
    lm_eval_num_fewshot: Annotated[
        int | None, _opt("Few-shot examples per lm-eval question.", "lm-eval", min=0)
    ] = None,
    lm_eval_no_chat_template: Annotated[
        bool,
        typer.Option(
            "--lm-eval-no-chat-template",
            help="Give lm-eval the raw prompts (base models).",
            rich_help_panel="lm-eval",
        ),
    ] = False,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU), float32, bfloat16.")] = "auto",
    num_processes: Annotated[
        int | None, _opt("Processes (GPUs) per machine.", "Launch", min=1)
    ] = None,
    num_machines: Annotated[int | None, _opt("Machines in the run.", "Launch", min=1)] = None,
    machine_rank: Annotated[int | None, _opt("This machine's rank.", "Launch", min=0)] = None,
    main_process_ip: Annotated[str | None, _opt("Address of machine 0.", "Launch")] = None,
    main_process_port: Annotated[
        int | None, _opt("Rendezvous port.", "Launch", min=1, max=65535)
    ] = None,
) -> None:
    """Evaluate checkpoints: score preference pairs (--pairs: reward accuracy, margin, SimPO
    loss, the length / log-prob Spearman, with --reference DPO's implicit reward), write their
    answers to a benchmark (--benchmark: the files AlpacaEval 2, Arena-Hard or MT-Bench's judges
    read, judge-free proxies, --against: reward-model win rates) and run lm-eval tasks
    (--lm-eval). Several checkpoints give one comparison table and plots in --output-dir."""
    if pairs is None and benchmark is None and lm_eval is None:
        raise UserError(
            "simpo eval: give --pairs (score pairs), --benchmark (write answers) or --lm-eval "
            "(run tasks)"
        )
    launch_keys = {
        "num_processes": num_processes, "num_machines": num_machines,
        "machine_rank": machine_rank, "main_process_ip": main_process_ip,
        "main_process_port": main_process_port,
    }  # fmt: skip
    launch_settings = _settings(LaunchSettings, {k: v for k, v in launch_keys.items() if v})
    settings = _eval_settings(
        pairs, split, beta, gamma, max_length, max_prompt_length, batch_tokens, tokenization,
        reference, benchmark, questions, family, arena_layout, temperature, max_new_tokens,
        backend, against, reward_model, reward_function, lm_eval, lm_eval_include_path,
        lm_eval_limit, lm_eval_num_fewshot, lm_eval_no_chat_template, dtype,
    )  # fmt: skip
    child_args = ["eval", *_command_line_again(ctx)]
    evaluate_models(
        models, settings, launch_settings, output, output_dir, model_id, reference, child_args
    )


def _settings(kind, values: dict):
    """A schema section from flag values; a value out of range is one line naming the flag."""
    try:
        return kind(**values)
    except ValidationError as err:
        first = err.errors()[0]
        flag = "--" + "-".join(str(p) for p in first["loc"]).replace("_", "-")
        raise UserError(f"simpo eval: {flag}: {first['msg']}") from None


def _eval_settings(
    pairs, split, beta, gamma, max_length, max_prompt_length, batch_tokens, tokenization,
    reference, benchmark, questions, family, arena_layout, temperature, max_new_tokens,
    backend, against, reward_model, reward_function, lm_eval, lm_eval_include_path,
    lm_eval_limit, lm_eval_num_fewshot, lm_eval_no_chat_template, dtype,
):  # fmt: skip
    """The evaluate stage's settings (recipe.EvaluateStage) from the flags."""
    from simpo_cli.evaluate.benchmarks import check_benchmark

    if benchmark is not None:
        check_benchmark(benchmark)
    for flag, value, allowed in (
        ("--backend", backend, ("auto", "vllm", "transformers")),
        ("--dtype", dtype, ("auto", "float32", "bfloat16", "float16")),
        ("--arena-layout", arena_layout, ("v0.1", "current")),
    ):
        if value not in allowed:
            raise UserError(f"{flag} {value}: use one of {', '.join(allowed)}")
    if (against is None) != (reward_model is None and reward_function is None):
        raise UserError(
            "--against needs a scorer: --reward-model FOLDER or --reward-function "
            "file.py:name (and a scorer needs --against)"
        )
    if against is not None and benchmark is None:
        raise UserError("--against: scores benchmark answers; add --benchmark")
    values: dict[str, Any] = {"batch_tokens": batch_tokens, "dtype": dtype, "backend": backend}
    values |= {"beta": beta, "gamma": gamma, "reference": reference}
    values |= {"max_length": max_length, "max_prompt_length": max_prompt_length}
    values["tokenization"] = tokenization.value if tokenization else None
    if pairs is not None:
        values["pairs"] = {"path": pairs, "split": split}
    if benchmark is not None:
        bench = {"name": benchmark, "questions": questions, "family": family}
        bench |= {"arena_layout": arena_layout, "temperature": temperature}
        bench |= {"max_new_tokens": max_new_tokens, "against": against}
        values["benchmarks"] = [bench]
    if reward_model is not None or reward_function is not None:
        values["reward"] = {"model": reward_model, "function": reward_function}
    if lm_eval is not None:
        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()]
        values["lm_eval"] = {"tasks": tasks, "include_path": lm_eval_include_path}
        values["lm_eval"] |= {"limit": lm_eval_limit, "num_fewshot": lm_eval_num_fewshot}
        values["lm_eval"]["apply_chat_template"] = not lm_eval_no_chat_template
    settings = _settings(EvaluateStage, values)
    return settings


def _command_line_again(ctx: typer.Context) -> list[str]:
    """The command's arguments as given, rebuilt from the parsed values for the launched
    processes, less --machine-rank (the launcher's alone)."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            args += [str(v) for v in value]
            continue
        if value is None or value == param.default or param.name == "machine_rank":
            continue
        if getattr(param, "is_flag", False):
            args.append(param.opts[0])  # a flag given (its value differs from the default)
            continue
        value = value.value if isinstance(value, Enum) else value
        args += [param.opts[0], str(value)]
    return args


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (e.g. outputs/tiny) or a stage's.")],
    output: Annotated[
        Path | None, typer.Option(help="PNG to write; default RUN_DIR/training_curves.png.")
    ] = None,
) -> None:
    """Draw the training curves of a run (loss, reward accuracy, margin; training and held-out)
    into a PNG. Needs matplotlib."""
    check_plot_paths(run_dir, output)
    print(f"wrote {plot_run(run_dir, output)}")


def main() -> None:
    """Exit codes (errors.py, README "Exit codes"): 2 user error, 3 non-finite step, 75 stopped
    on a signal after saving (rerun to resume), 130 aborted by Ctrl-C."""
    # Every process of a launch meets the same error or stop; one of them says it.
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        app()
    except UserError as err:
        if speaks:
            for line in err.messages:
                print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except Preempted as err:
        if speaks:
            print(str(err), file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(EXIT_ABORTED)


if __name__ == "__main__":
    main()
