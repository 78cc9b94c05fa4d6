"""Every path a user gives, checked before any work starts: before a launcher starts processes,
before a folder is created, before a model or dataset is read.

Each problem is one line, `<path>: <what is wrong>; <fix>`, and all of them are reported at
once (a UserError: exit code 2). Strings that are not local-looking are hub names and are left to
the hub: `princeton-nlp/llama3-ultrafeedback` need not exist here.

This module must not import torch: `--dry-run` checks paths too.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from simpo_cli import launch  # no torch at import
from simpo_cli.errors import UserError
from simpo_cli.model.adapters import adapter_folder, has_model
from simpo_cli.recipe import TRAINING_STAGES, Recipe, shipped_deepspeed_configs
from simpo_cli.run.instances import ROUND_REFERENCE, StageInstance

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def looks_local(value: str, suffixes: tuple[str, ...] = ()) -> bool:
    """A path meant as a file or folder on this machine rather than a hub name. Hub names are
    `name` or `owner/name`; a path starts with / ./ ../ ~, has more than one /, or ends like
    a local file (`suffixes`)."""
    return (
        value.startswith(("/", "./", "../", "~", "\\"))
        or value in (".", "..")
        or value.count("/") > 1
        or value.lower().endswith(suffixes)
    )


def _exists(value: str) -> Path | None:
    path = Path(value).expanduser()
    return path if path.exists() else None


# --------------------------------------------------------------------------- outputs


def folder_problems(path: Path, flag: str) -> list[str]:
    """A folder we will create or write into: not a file, not under a file, and one the system
    lets us create things in (asked by trying, see `_refusal`)."""
    path = path.expanduser()
    if path.exists():
        if not path.is_dir():
            return [f"{path}: {flag} is a file, not a folder; choose another {flag}"]
        return _refusal(path, path, flag)
    return _parent_problems(path, flag)


def file_problems(path: Path, flag: str) -> list[str]:
    """A file we will write (its folder created if missing): not a folder, not under a file."""
    path = path.expanduser()
    if path.is_dir():
        return [f"{path}: {flag} is a folder; give a file path for {flag}"]
    if path.exists():
        try:  # opened to append (not waiting on a pipe), closed at once: its bytes stay
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EROFS):
                return [_refusal_line(path, path, flag, err)]
            return [f"{path}: {flag} cannot be written ({err.strerror}); choose another {flag}"]
        return []
    return _parent_problems(path, flag)


def _parent_problems(path: Path, flag: str) -> list[str]:
    """The nearest existing folder above `path` must be a folder we can create things in."""
    for parent in path.absolute().parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            return [f"{path}: {flag} lies inside {parent}, which is a file; choose another {flag}"]
        return _refusal(parent, path, flag)
    return []


def _refusal(folder: Path, path: Path, flag: str) -> list[str]:
    """Whether the system lets us create an entry in `folder`, asked by creating an empty
    scratch folder there and removing it at once. os.access cannot answer this: it says yes to
    root for /proc and /sys, which then refuse the mkdir; and its no does not tell a read-only
    filesystem from a permission."""
    try:
        probe = tempfile.mkdtemp(prefix=".simpo-write-check-", dir=folder)
    except OSError as err:
        return [_refusal_line(folder, path, flag, err)]
    os.rmdir(probe)
    return []


def _refusal_line(folder: Path, path: Path, flag: str, err: OSError) -> str:
    """One line for a refused write into `folder`, on the way to `path`."""
    what = f"{flag} is" if folder == path else f"{flag} cannot be created: {folder} is"
    if err.errno == errno.EACCES:
        return f"{path}: {what} not writable; fix its permissions or choose another {flag}"
    if err.errno == errno.EROFS:
        return f"{path}: {what} on a read-only filesystem; choose another {flag}"
    # /proc and /sys say "No such file or directory" or "Operation not permitted" to a mkdir.
    return (
        f"{path}: {what} a folder that takes no new entries (mkdir: {err.strerror}); "
        f"choose another {flag}"
    )


# --------------------------------------------------------------------------- inputs


def data_problems(value: str, role: str, where: str = "") -> list[str]:
    """A data source: a local-looking path must exist; a hub name is left to the hub."""
    if not looks_local(value, DATA_SUFFIXES) or _exists(value):
        return []
    return [
        f"{value}: {role}: no such data file or folder{where}; fix the path, or give a hub "
        "dataset name (owner/name)"
    ]


def model_folder_problems(
    value: str, role: str, hub_ok: bool = True, adapter_ok: bool = True
) -> list[str]:
    """A model: a local folder must hold config.json and weights, or (`adapter_ok`) a LoRA
    adapter, read as its merged model; a missing local-looking path (or any missing path when
    `hub_ok` is false) is an error."""
    path = _exists(value)
    if path is None:
        if hub_ok and not looks_local(value):
            return []
        fix = "fix the path, or give a hub model name (owner/name)" if hub_ok else "fix the path"
        return [f"{value}: {role}: no such model folder; {fix}"]
    if not path.is_dir():
        return [f"{value}: {role}: is a file, not a model folder; give the folder holding it"]
    if adapter_ok and adapter_folder(path) is not None and not (path / "config.json").is_file():
        return []
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(_is_weights(p.name) for p in path.iterdir()):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        return [
            f"{value}: {role}: not a model folder (no {' and no '.join(missing)}); give a "
            "folder a model was saved to, e.g. outputs/tiny/preference"
        ]
    return []


def _is_weights(name: str) -> bool:
    """model.safetensors, model-00001-of-00004.safetensors, pytorch_model.bin, their index; not
    training_args.bin, which Trainer leaves beside them."""
    return name.endswith((".safetensors", ".safetensors.index.json")) or (
        name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json"))
    )


def _tokenizer_problems(value: str, role: str) -> list[str]:
    path = _exists(value)
    if path is None:
        if not looks_local(value):
            return []
        return [f"{value}: {role}: no such tokenizer folder; fix the path, or give a hub name"]
    if not path.is_dir():
        return [f"{value}: {role}: is a file, not a tokenizer folder; give the folder holding it"]
    return []


def _deepspeed_problems(value: str) -> list[str]:
    path = Path(value).expanduser()
    if value.endswith(".json") and not path.is_file():
        what = "is a folder, not a JSON file" if path.is_dir() else "no such DeepSpeed config file"
        return [
            f"{value}: launch.deepspeed: {what}; fix the path, or use a shipped config: "
            + ", ".join(shipped_deepspeed_configs())
        ]
    try:
        launch.read_deepspeed_config(value)
    except UserError as err:
        return err.messages
    return []


# --------------------------------------------------------------------------- per command


def check_paths(
    recipe: Recipe,
    output_dir: Path | None,
    plan: list[StageInstance],
    output_flag: str = "--output-dir",
) -> None:
    """Check every path that running the stage instances `plan` of `recipe` into `output_dir`
    reads or writes (each with the recipe it sees: a round's overrides applied)."""
    problems: list[str] = []
    if output_dir is not None:
        problems += folder_problems(output_dir, output_flag)
        if not problems:
            for instance in plan:
                stage_dir = output_dir.expanduser() / instance.folder
                if stage_dir.is_dir():
                    problems += folder_problems(stage_dir, output_flag)
                elif stage_dir.exists():
                    problems.append(
                        f"{stage_dir}: is a file where the '{instance.folder}' stage folder "
                        f"goes; remove it or choose another {output_flag}"
                    )
    model = recipe.model
    # The recipe's model and tokenizer are read only by a stage with no training stage before it
    # (the others start from that stage's folder); annotate and evaluate read no recipe model.
    reads_model = [i for i in plan if i.kind not in ("annotate", "evaluate")]
    if any(instance.model_from is None for instance in reads_model):
        if model.init == "pretrained" and model.name_or_path:
            problems += model_folder_problems(model.name_or_path, "model.name_or_path")
        if model.tokenizer:
            problems += _tokenizer_problems(model.tokenizer, "model.tokenizer")
    if model.chat_template and model.chat_template.endswith(".jinja"):
        if not Path(model.chat_template).expanduser().is_file():
            problems.append(
                f"{model.chat_template}: model.chat_template: no such template file; fix the "
                "path, or give the template text itself"
            )
    where = " (looked beside the recipe and in the current folder)"
    for instance in plan:
        name, stage, seen = instance.kind, instance.settings, instance.recipe
        if name == "generate":
            for key in ("prompts", "eval_prompts"):
                source = getattr(stage, key)
                if source is not None:
                    problems += data_problems(source.path, f"{name}.{key}", where)
            continue
        if name == "annotate":
            problems += _reward_problems(
                stage.reward, "annotate.reward.model", "annotate.reward.function", where
            )
            continue
        if name == "evaluate":
            problems += _evaluate_problems(seen, where)
            continue
        for split in ("train", "eval"):
            source = getattr(stage.data, split)
            # The annotate stage's pairs do not exist before it has run.
            if source is not None and seen.origin((name, "data", split)) != "annotate stage":
                problems += data_problems(source.path, f"{name}.data.{split}", where)
        reference = getattr(stage, "reference", None)
        # A round's reference set by rounds.reference is a stage folder, made before it runs.
        made = seen.origin((name, "reference", "model")) == ROUND_REFERENCE
        if reference is not None and reference.model and not made:
            problems += model_folder_problems(reference.model, f"{name}.reference.model")
    if recipe.launch.deepspeed is not None:
        problems += _deepspeed_problems(recipe.launch.deepspeed)
    if problems:
        raise UserError(list(dict.fromkeys(problems)))  # rounds repeat their stages' paths


def _reward_problems(reward, model_key: str, function_key: str, where: str) -> list[str]:
    if reward.model is not None:
        return model_folder_problems(reward.model, model_key, adapter_ok=False)
    target, _, _ = reward.function.rpartition(":")
    if target.endswith(".py") and not Path(target).is_file():
        return [
            f"{target}: {function_key}: no such file{where}; fix the path, or name an importable "
            "module as package.module:name"
        ]
    return []


def _evaluation_problems(settings, key, where: str) -> list[str]:
    """The paths an evaluation reads besides its checkpoints and pairs, for the evaluate stage
    and `simpo eval` alike; key(name, index) is how the user wrote the setting (recipe key or
    flag). A training stage's name as reference stands for its future folder."""
    problems = []
    if settings.reference is not None and settings.reference not in TRAINING_STAGES:
        problems += model_folder_problems(settings.reference, key("reference"), hub_ok=False)
    for i, bench in enumerate(settings.benchmarks):
        if bench.questions is not None:
            problems += data_problems(bench.questions, key("questions", i), where)
    if settings.reward is not None:
        problems += _reward_problems(
            settings.reward, key("reward.model"), key("reward.function"), where
        )
    include = settings.lm_eval.include_path if settings.lm_eval is not None else None
    if include is not None and not Path(include).is_dir():
        problems.append(
            f"{include}: {key('lm_eval.include_path')}: no such folder; give the folder holding "
            "the task YAML files"
        )
    return problems


def _evaluate_problems(recipe: Recipe, where: str) -> list[str]:
    """The evaluate stage's inputs; a training stage's name stands for its future folder."""
    stage = recipe.stage("evaluate")
    problems = []
    for _, entry in recipe.evaluate_checkpoints():
        if entry not in TRAINING_STAGES:
            problems += model_folder_problems(entry, "evaluate.checkpoints", hub_ok=False)
    pairs = recipe.evaluate_pairs()
    from_annotate = stage.pairs is None and (
        recipe.origin(("preference", "data", "eval")) == "annotate stage"
    )
    if pairs is not None and not from_annotate:
        pairs_key = "evaluate.pairs" if stage.pairs is not None else "preference.data.eval"
        problems += data_problems(pairs.path, pairs_key, where)

    def key(name: str, index: int | None = None) -> str:
        return f"evaluate.benchmarks.{index}.{name}" if index is not None else f"evaluate.{name}"

    return problems + _evaluation_problems(stage, key, where)


EVAL_FLAGS = {
    "reference": "--reference",
    "questions": "--questions",
    "reward.model": "--reward-model",
    "reward.function": "--reward-function",
    "lm_eval.include_path": "--lm-eval-include-path",
}


def check_evaluate_paths(models: list[str], settings, pairs_output: str | None, output_dir) -> None:
    """`simpo eval MODELS... [--pairs P] [--benchmark B --questions Q] [--reference R]
    [--reward-model M | --reward-function F] [--pairs-output FILE] [--output-dir DIR]`."""
    problems = []
    for model in models:
        folder = Path(model)
        if folder.is_dir() and not has_model(folder) and _run_or_stage_folder(folder):
            continue  # its finished stages' models, or why it has none (evaluate/checkpoints.py)
        if folder.is_dir() and not has_model(folder):
            problems.append(
                f"{model}: neither a model folder (no config.json), nor an adapter folder (no "
                "adapter_config.json), nor a run folder (no sft/ or preference/ stage); give a "
                "folder a model was saved to, or the folder `simpo train -o` wrote"
            )
            continue
        problems += model_folder_problems(model, "model to evaluate", hub_ok=False)
    if settings.pairs is not None:
        problems += data_problems(settings.pairs.path, "--pairs")
    problems += _evaluation_problems(settings, lambda name, index=None: EVAL_FLAGS[name], "")
    if pairs_output is not None:
        problems += file_problems(Path(pairs_output), "--pairs-output")
    if output_dir is not None:
        problems += folder_problems(Path(output_dir), "--output-dir")
    if problems:
        raise UserError(problems)


def _run_or_stage_folder(folder: Path) -> bool:
    """A folder `simpo train` wrote: a run folder (stage folders inside) or a stage's folder
    (its recipe, or its checkpoints while it trains)."""
    return (
        any((folder / stage).is_dir() for stage in TRAINING_STAGES)
        or (folder / "resolved_recipe.yaml").is_file()
        or any(folder.glob("checkpoint-*"))
    )


def check_plot_paths(run_dir: Path, output_dir: Path | None) -> None:
    """`simpo plot RUN_DIR [-o DIR]`."""
    problems = []
    if not run_dir.exists():
        problems.append(f"{run_dir}: no such run folder; give a folder `simpo train` wrote")
    elif not run_dir.is_dir():
        problems.append(f"{run_dir}: is a file, not a run folder; give the folder holding it")
    if output_dir is not None:
        problems += folder_problems(output_dir, "--output-dir")
    if problems:
        raise UserError(problems)


def check_copy_destination(dest: Path) -> None:
    """`simpo recipes copy NAME DEST`."""
    problems = folder_problems(dest, "DEST")
    if problems:
        raise UserError(problems)
