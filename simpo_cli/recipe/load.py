"""From a recipe reference to a validated `Recipe`: find the file, read its YAML, apply `--set`
overrides, validate, and make local paths absolute."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from simpo_cli.errors import RecipeError
from simpo_cli.recipe.common import STAGES, TRAINING_STAGES, DataSource
from simpo_cli.recipe.evaluate import EvaluateStage
from simpo_cli.recipe.onpolicy import GenerateStage
from simpo_cli.recipe.problems import format_errors
from simpo_cli.recipe.rounds import expand_override, key_paths, merge_into
from simpo_cli.recipe.schema import Recipe
from simpo_cli.recipe.shipped import RECIPES_DIR, shipped_recipes


def find_recipe(ref: str) -> Path:
    """A recipe path as given, a folder holding recipe.yaml, or a shipped recipe's name."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / "recipe.yaml").is_file():
        return path / "recipe.yaml"
    shipped = RECIPES_DIR / ref / "recipe.yaml"
    if "/" not in ref and shipped.is_file():
        return shipped
    names = ", ".join(shipped_recipes()) or "none"
    raise RecipeError(
        [f"{ref}: no such recipe file, and no shipped recipe of that name (shipped: {names})"]
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value), the value parsed as YAML (so 2.5 is a float)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise RecipeError(
            [f"--set {text}: expected KEY.PATH=VALUE, e.g. --set preference.beta=2.5"]
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[tuple[str, ...], str]:
    """Set each override into `raw` in place; return {key path: the --set text} for messages."""
    origins: dict[tuple[str, ...], str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list):  # evaluate.benchmarks.0.max_new_tokens: an item by index
                node = node[_list_index(node, key, text, ".".join(keys[:i]))]
                continue
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if isinstance(child, str) and key in ("train", "eval", "prompts", "eval_prompts"):
                # A data source written as a bare path: `--set sft.data.train.max_rows=100`.
                child = node[key] = {"path": child}
            if not isinstance(child, (dict, list)):
                where = ".".join(keys[: i + 1])
                raise RecipeError([f"--set {text}: {where} is a value, not a section"])
            node = child
        if isinstance(node, list):
            node[_list_index(node, keys[-1], text, ".".join(keys[:-1]))] = value
        else:
            node[keys[-1]] = value
        origins[tuple(keys)] = f"--set {text}"
    return origins


def _list_index(items: list, key: str, text: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        last = len(items) - 1
        raise RecipeError([f"--set {text}: {where} is a list of {len(items)}; index 0 to {last}"])
    return int(key)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise RecipeError([f"{path}: cannot read the recipe: {err.strerror}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError([f"{path}:{where}: invalid YAML: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            [f"{path}: a recipe is a mapping of keys (model:, sft:, ...), not a list"]
        )
    return raw


def load_recipe(ref: str, overrides: list[str] | None = None) -> Recipe:
    """Find, read, override, validate and resolve a recipe; RecipeError lists every problem."""
    path = find_recipe(ref)
    raw = read_yaml(path)
    in_file = set(_key_paths(raw))
    origins = apply_overrides(raw, list(overrides or []))
    raw.setdefault("name", path.parent.name if path.name == "recipe.yaml" else path.stem)
    written = copy.deepcopy(raw)  # validation fills in a copy; the rounds start from this
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_errors(err, str(path), origins)) from None
    recipe._origins = {key: "recipe" for key in in_file} | {key: "--set" for key in origins}
    recipe = resolve_paths(recipe, path.parent)
    if recipe.rounds is not None:
        recipe._rounds = _round_recipes(recipe, written, path, origins)
    return recipe


def _round_recipes(
    recipe: Recipe, raw: dict[str, Any], path: Path, origins: dict[tuple[str, ...], str]
) -> list[Recipe]:
    """The recipe of each round: the raw recipe with that round's rounds.overrides entry merged
    in, validated like the recipe itself (a problem is named as the override's key path). Every
    entry is checked, those past rounds.count too (they are not used)."""
    rounds = recipe.rounds
    assert rounds is not None
    problems: list[str] = []
    built = []
    for index in range(max(rounds.count, len(rounds.overrides))):
        where = f"rounds.overrides[{index}]"
        entry = rounds.overrides[index] if index < len(rounds.overrides) else {}
        nested, found = expand_override(entry, where)
        # A --set that wrote this entry, or into it (--set rounds.overrides.1.preference.beta=3).
        given = ("rounds", "overrides", str(index))
        whole = next((text for key, text in origins.items() if given[: len(key)] == key), None)
        problems += [f"{whole or path}: {line}" for line in found]
        if found:
            continue
        merged = copy.deepcopy(raw)
        merge_into(merged, nested)
        set_here = {key: whole for key in key_paths(nested)} if whole else {}
        set_here |= {key[3:]: text for key, text in origins.items() if key[:3] == given}
        try:
            round_recipe = Recipe.model_validate(merged)
        except ValidationError as err:
            problems += format_errors(err, str(path), set_here, prefix=where)
            continue
        round_recipe._origins = recipe._origins | {key: where for key in key_paths(nested)}
        built.append(resolve_paths(round_recipe, path.parent))
    if problems:
        raise RecipeError(problems)
    return built[: rounds.count]


def _key_paths(raw: Any, prefix: tuple[str, ...] = ()):
    """The key path of every value (not section) written in a raw YAML mapping."""
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from _key_paths(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key))


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make local paths absolute: a relative path names a file beside the recipe, else in the
    current folder. Strings that are neither stay as they are: hub model or dataset names."""

    def local(value: str | None) -> str | None:
        if value is not None and value.startswith("~"):
            value = str(Path(value).expanduser())
        if value is None or Path(value).is_absolute():
            return value
        for candidate in (base / value, Path.cwd() / value):
            if candidate.exists():
                return str(candidate.resolve())
        return value

    model = recipe.model
    model.name_or_path = local(model.name_or_path)
    model.tokenizer = local(model.tokenizer)
    if model.chat_template and model.chat_template.endswith(".jinja"):
        model.chat_template = local(model.chat_template)
    for source in data_sources(recipe):
        source.path = local(source.path)
    rewards = [recipe.annotate.reward if recipe.annotate is not None else None]
    evaluate = recipe.evaluate
    if evaluate is not None:
        rewards.append(evaluate.reward)
        # A training stage's name stands for its output folder; anything else is a path.
        if evaluate.checkpoints is not None:
            evaluate.checkpoints = [
                e if e in TRAINING_STAGES else local(e) for e in evaluate.checkpoints
            ]
        if evaluate.reference not in TRAINING_STAGES:
            evaluate.reference = local(evaluate.reference)
        labels = [label for label, _ in recipe.evaluate_checkpoints()]
        labels += [name for name, _, _ in recipe.evaluate_rows()]  # round-1, ... with rounds
        for bench in evaluate.benchmarks:
            bench.questions = local(bench.questions)
            if bench.against not in ("reference", *labels):
                bench.against = local(bench.against)
        if evaluate.lm_eval is not None:
            evaluate.lm_eval.include_path = local(evaluate.lm_eval.include_path)
    for reward in rewards:
        if reward is None:
            continue
        reward.model = local(reward.model)
        if reward.function is not None:
            # "file.py:name": the file beside the recipe; "package.module:name" stays.
            target, sep, attribute = reward.function.rpartition(":")
            if sep and target.endswith(".py"):
                reward.function = f"{local(target)}:{attribute}"
    return recipe


def data_sources(recipe: Recipe) -> list[DataSource]:
    """Every data source of the recipe's stages (prompts included), in stage order."""
    sources: list[DataSource | None] = []
    for name in STAGES:
        stage = getattr(recipe, name)
        if isinstance(stage, GenerateStage):
            sources += [stage.prompts, stage.eval_prompts]
        elif isinstance(stage, EvaluateStage):
            sources.append(stage.pairs)
        elif stage is not None and hasattr(stage, "data"):
            sources += [stage.data.train, stage.data.eval]
    return [source for source in sources if source is not None]
