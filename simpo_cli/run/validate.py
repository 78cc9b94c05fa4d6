"""What `simpo validate` checks of a recipe's data, without a model or a tokenizer: each data
source its stages read exists, and a local JSON/JSONL file's rows have the columns, types and
message shapes training reads (data.check_rows, the code training reads them with). A parquet
file, a saved folder or a hub dataset is named as not read here: `simpo data inspect` reads it.

No torch: validate only reads config and data files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simpo_cli.data.rows import check_rows
from simpo_cli.errors import DataError, UserError
from simpo_cli.recipe import ROUND_STAGES, Recipe, load_recipe
from simpo_cli.run import hub
from simpo_cli.run.paths import data_problems

WHERE = " (looked beside the recipe and in the current folder)"


def validate_recipes(refs: list[str], sets: list[str] | None) -> bool:
    """`simpo validate REFS`: each recipe's schema (load_recipe) and data (check_data), `ok:`
    and what was checked on stdout, else one `error:` line per problem on stderr. Whether all
    are valid."""
    valid = True
    for ref in refs:
        try:
            recipe = load_recipe(ref, sets)
            checked = check_data(recipe, ref)
        except UserError as err:
            valid = False
            for line in err.messages:
                print(f"error: {line}", file=sys.stderr)
            continue
        pushes = [f"hub: {line}" for line in hub.plan_lines(recipe)]
        print(f"ok: {ref} ({recipe.name}: {_pipeline(recipe)})", *checked, *pushes,
              sep="\n  ")  # fmt: skip
    return valid


def check_data(recipe: Recipe, ref: str) -> list[str]:
    """One line per data source of the recipe's training and evaluate stages: what was checked,
    or why it was not read. Every problem at once as a UserError (one line each)."""
    lines, problems = [], []
    for role, source, kind in _sources(recipe):
        missing = data_problems(source.path, role, WHERE)
        if missing:
            problems += missing
            continue
        try:
            checked = check_rows(source, kind, role)
        except DataError as err:
            problems += err.messages
            continue
        if checked is None:
            stage = role.split(".")[0]
            reader = (
                f"`simpo data inspect {ref} --stage {stage}` reads it"
                if stage in ("sft", "preference")
                else "the evaluate stage reads it"
            )
            what = "a hub dataset" if not Path(source.path).exists() else "not a JSON file"
            checked = f"{role}: not read here ({what}: {source.path}); {reader}"
        lines.append(checked)
    if problems:
        raise UserError(problems)
    return lines


def _sources(recipe: Recipe):
    """(role, source, row kind) of each source the pipeline reads, less the annotate stage's
    pairs (made by the run)."""
    for name in recipe.pipeline:
        if name in ("sft", "preference"):
            data = recipe.stage(name).data
            for split in ("train", "eval"):
                source = getattr(data, split)
                if source is not None and recipe.origin((name, "data", split)) != "annotate stage":
                    yield f"{name}.data.{split}", source, name
        elif name == "evaluate" and recipe.stage("evaluate").pairs is not None:
            yield "evaluate.pairs", recipe.stage("evaluate").pairs, "preference"


def _pipeline(recipe: Recipe) -> str:
    """sft -> generate -> annotate -> preference, with rounds sft -> 3 x (generate -> ...)."""
    names = list(recipe.pipeline)
    if recipe.rounds is not None:
        loop = [name for name in names if name in ROUND_STAGES]
        at = names.index(loop[0])
        names[at : at + len(loop)] = [f"{recipe.rounds.count} x ({' -> '.join(loop)})"]
    return " -> ".join(names)
