"""The shipped recipes as `simpo recipes` shows them (recipe_summary) and copies them out to
edit (copy_recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simpo_cli.errors import RecipeError
from simpo_cli.recipe.common import STAGES, TRAINING_STAGES
from simpo_cli.recipe.evaluate import EvaluateStage
from simpo_cli.recipe.load import read_yaml
from simpo_cli.recipe.onpolicy import AnnotateStage, GenerateStage
from simpo_cli.recipe.schema import Recipe
from simpo_cli.recipe.shipped import RECIPES_DIR, shipped_recipe_dir
from simpo_cli.recipe.train import LOSS_DEFAULTS, PreferenceStage


def recipe_summary(recipe: Recipe) -> tuple[str, str, str]:
    """(model, method, key hyperparameters) of a recipe, one entry per stage of its pipeline, for
    `simpo recipes list`: e.g. ("meta-llama/...", "simpo", "beta=2.5 gamma/beta=0.55 lr=1e-06")."""
    model = (
        recipe.model.name_or_path
        or f"{recipe.model.init} ({(recipe.model.config or {}).get('model_type')})"
    )
    methods, settings = [], []
    for name in recipe.pipeline:
        stage = recipe.stage(name)
        shown: list[str] = []
        if isinstance(stage, PreferenceStage):
            methods.append(stage.loss)
            for key, default in LOSS_DEFAULTS[stage.loss].items():
                value = getattr(stage, "lambda_" if key == "lambda" else key)
                if key == "gamma_beta_ratio":
                    shown.append(
                        f"gamma={stage.gamma:g}"
                        if stage.gamma is not None
                        else f"gamma/beta={value:g}"
                    )
                elif key == "reference":
                    shown.append(f"ref={value.mode}")
                elif key in ("beta", "tau", "alpha", "lambda", "delta") or value != default:
                    shown.append(
                        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    )
        elif isinstance(stage, GenerateStage):
            methods.append("generate")
            shown.append(f"samples={len(stage.sample_seeds)} T={stage.temperature:g}")
        elif isinstance(stage, AnnotateStage):
            methods.append("annotate")
            shown.append(f"reward={_as_written(stage.reward.model or stage.reward.function)}")
        elif isinstance(stage, EvaluateStage):
            methods.append("evaluate")
        else:
            methods.append("sft")
        if name in TRAINING_STAGES:
            shown.append(f"lr={stage.training.learning_rate:g}")
        if shown:
            settings.append(" ".join(shown))
    lora = recipe.model.lora
    if lora is not None:
        quantized = f" {recipe.model.quantization}" if recipe.model.quantization else ""
        settings.append(f"lora r={lora.r}{quantized}")
    return model, " -> ".join(methods), "; ".join(settings)


def _as_written(value: str) -> str:
    """A path the loader made absolute (a reward file beside a shipped recipe), shown relative to
    the shipped recipes' folder as `recipes copy` lays it out, not as this machine's path; a
    `file.py:name` keeps its name. Anything else as it is."""
    target, colon, name = value.rpartition(":") if ".py:" in value else (value, "", "")
    path = Path(target)
    if path.is_absolute() and path.is_relative_to(RECIPES_DIR):
        return f"{path.relative_to(RECIPES_DIR)}{colon}{name}"
    return value


def copy_recipe(name: str, dest: Path) -> list[tuple[Path, str | None]]:
    """Copy a shipped recipe's folder into `dest` to edit it. A file or folder the recipe names
    outside its folder (the Gemma-2 recipes share one chat template; tiny-onpolicy uses tiny's
    tokenizer and data) is copied beside it and recipe.yaml rewritten to point there. Nothing
    is overwritten: if any target exists, RecipeError and nothing is written. Returns (file
    written, where it came from when outside the folder)."""
    source = shipped_recipe_dir(name)
    plan: dict[Path, tuple[Path, str | None]] = {
        dest / path.relative_to(source): (path, None)
        for path in sorted(source.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }
    text = (source / "recipe.yaml").read_text()
    for ref in _outside_references(read_yaml(source / "recipe.yaml"), source):
        outside = (source / ref).resolve()
        if outside.is_dir():  # a tokenizer folder shared with another recipe
            for path in sorted(outside.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    plan[dest / outside.name / path.relative_to(outside)] = (path, ref)
        else:
            plan[dest / outside.name] = (outside, ref)
        # Rewrite the value, not the header comments that describe the shipped layout.
        text = "\n".join(
            line if line.lstrip().startswith("#") else line.replace(ref, outside.name)
            for line in text.split("\n")
        )
    if dest.exists() and not dest.is_dir():
        raise RecipeError([f"{dest}: exists and is not a folder; give a folder to copy into"])
    existing = next((target for target in plan if target.exists()), None)
    if existing is not None:
        raise RecipeError(
            [f"{existing}: already exists; nothing was copied (choose a new folder or remove it)"]
        )
    for target, (path, _) in plan.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        if target == dest / "recipe.yaml":
            target.write_text(text)
        else:
            target.write_bytes(path.read_bytes())
    return [(target, origin) for target, (_, origin) in plan.items()]


def _outside_references(raw: dict[str, Any], folder: Path) -> list[str]:
    """Relative paths in a raw recipe that name an existing file or folder outside `folder`."""
    model = raw.get("model") or {}
    values = [model.get(key) for key in ("name_or_path", "tokenizer", "chat_template")]
    for stage in STAGES:
        section = raw.get(stage) or {}
        data = section.get("data") or {}
        for source in (data.get("train"), data.get("eval"), *_prompt_sources(section)):
            values.append(source.get("path") if isinstance(source, dict) else source)
    evaluate = raw.get("evaluate") or {}
    if isinstance(evaluate, dict):
        pairs = evaluate.get("pairs")
        values.append(pairs.get("path") if isinstance(pairs, dict) else pairs)
        values += [
            b.get("questions") for b in evaluate.get("benchmarks") or [] if isinstance(b, dict)
        ]
        values.append((evaluate.get("lm_eval") or {}).get("include_path"))
    for section in (raw.get("annotate") or {}, evaluate):
        function = ((section if isinstance(section, dict) else {}).get("reward") or {}).get(
            "function"
        )
        if isinstance(function, str) and function.rpartition(":")[0].endswith(".py"):
            values.append(function.rpartition(":")[0])
    inside = folder.resolve()
    refs = []
    for value in values:
        if not isinstance(value, str) or Path(value).is_absolute() or "\n" in value:
            continue
        target = (folder / value).resolve()
        if target.exists() and inside not in target.parents and value not in refs:
            refs.append(value)
    return refs


def _prompt_sources(section: Any) -> list[Any]:
    if not isinstance(section, dict):
        return []
    return [section.get("prompts"), section.get("eval_prompts")]
