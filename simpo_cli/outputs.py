"""A stage's output folder: what it holds, whether it is finished, and the records written into it.

DIR/<stage>/ holds the model (safetensors + config + tokenizer with its chat template),
resolved_recipe.yaml, metrics.jsonl, reproducibility.json, data_report.txt, checkpoint-N/ folders
while training runs (each complete once it holds checkpoint_complete.json), stopped.json when
training last stopped early (a signal, a non-finite step), README.md (the model card: run/card.py),
stage_complete.json once the stage has finished, and hub_push.json once it is on the Hugging Face
Hub (run/hub.py).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from simpo_cli.environment import source_commit
from simpo_cli.errors import UserError
from simpo_cli.recipe import stage_identity
from simpo_cli.redact import redact

# Written into checkpoint-N/ once every process has saved its part: the checkpoint is complete.
CHECKPOINT_DONE = "checkpoint_complete.json"
PACKAGES = ("simpo-cli", "torch", "transformers", "datasets", "accelerate", "deepspeed", "trl")


@dataclass(frozen=True)
class StageDir:
    path: Path

    @property
    def recipe_file(self) -> Path:
        return self.path / "resolved_recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def complete_file(self) -> Path:
        return self.path / "stage_complete.json"

    def is_complete(self) -> bool:
        return self.complete_file.is_file()

    @property
    def stopped_file(self) -> Path:
        """Why training last stopped before the end (a signal, a non-finite step)."""
        return self.path / "stopped.json"

    def checkpoints(self) -> list[tuple[Path, str | None]]:
        """The checkpoint-N folders, newest first, each with what keeps it from being resumed
        (None: complete).

        Complete means CHECKPOINT_DONE is there, written once every process had finished its
        part of the save (Trainer writes trainer_state.json last, but from the main process
        only, while the others may still be writing optimizer shards and RNG states), and every
        file it lists is still there (a run killed while rotating old checkpoints away leaves
        half-deleted ones). A run killed while saving leaves a folder without it.
        """
        found = [
            (int(p.name.split("-")[1]), p)
            for p in self.path.glob("checkpoint-*")
            if p.name.split("-")[1].isdigit() and p.is_dir()
        ]
        return [(p, _checkpoint_problem(p)) for _, p in sorted(found, reverse=True)]

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint."""
        return next((p for p, problem in self.checkpoints() if problem is None), None)

    def skipped_checkpoints(self) -> list[str]:
        """One line for each incomplete checkpoint newer than last_checkpoint()."""
        lines = []
        for path, problem in self.checkpoints():
            if problem is None:
                break
            lines.append(f"{path.name} is incomplete ({problem}); skipped")
        return lines

    def mark_checkpoint_complete(self, step: int) -> None:
        folder = self.path / f"checkpoint-{step}"
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        (folder / CHECKPOINT_DONE).write_text(
            json.dumps({"step": step, "saved_at": _now(), "files": files}, indent=1) + "\n"
        )

    def check(self, identity: dict[str, Any], stage: str, round_: int | None = None) -> None:
        """Refuse a folder made by a different recipe, or one that is not a stage folder.

        `identity` is the part of the recipe that decides this stage's result (model, data, and
        settings of this stage and the ones before it; with rounds, those of the round `round_`
        and the rounds before it): a run that differs there must not resume or skip someone's
        earlier run. Read-only, so every process of a launch can run it.
        """
        if self.recipe_file.is_file():
            before = yaml.safe_load(self.recipe_file.read_text()) or {}
            earlier = stage_identity(before, stage, round_)
            if earlier != identity:
                raise UserError(
                    f"{self.path}: holds a run of the '{stage}' stage made with a different "
                    f"recipe ({recipe_changes(earlier, identity)}); pass --overwrite to start it "
                    "over, or choose another --output-dir"
                )
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise UserError(
                f"{self.path}: exists and is not a simpo stage folder; choose another "
                "--output-dir (or pass --overwrite to replace it)"
            )

    def create(self, recipe_yaml: str, overwrite: bool) -> None:
        """Make the folder (emptied first with --overwrite) and write resolved_recipe.yaml."""
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.recipe_file.write_text(recipe_yaml)

    def trim_metrics(self, after_step: int) -> None:
        """On resume, drop metric lines logged after the checkpoint: those steps run again."""
        if not self.metrics_file.is_file():
            return
        kept = [
            line
            for line in self.metrics_file.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= after_step
        ]
        self.metrics_file.write_text("".join(line + "\n" for line in kept))

    # Every record written here goes through redact(): no secret of the environment (a token
    # that ended up in a path, a run name...) reaches a file.
    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(redact(record)) + "\n")

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        text = json.dumps(redact(payload), indent=2, sort_keys=False)
        (self.path / name).write_text(text + "\n")

    def mark_complete(self, summary: dict[str, Any]) -> None:
        self.write_json(self.complete_file.name, {"finished_at": _now(), **summary})


def recipe_changes(before: dict[str, Any], now: dict[str, Any], shown: int = 3) -> str:
    """The keys whose values differ, as `key: old -> new`, the first `shown` of them and how
    many more: `preference.beta: 2.5 -> 3, sft.data.max_length: 64 -> 128 and 1 more`."""
    old, new = _flat(before), _flat(now)
    keys = [key for key in dict.fromkeys([*old, *new]) if old.get(key) != new.get(key)]
    changes = [f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}" for key in keys]
    more = f" and {len(changes) - shown} more" if len(changes) > shown else ""
    return ", ".join(changes[:shown]) + more


def _flat(value: Any, key: str = "") -> dict[str, Any]:
    """A nested recipe dict as {dotted key: value}; lists and other values are leaves."""
    if not isinstance(value, dict) or not value:
        return {key: value}
    return {
        k: v
        for name, inner in value.items()
        for k, v in _flat(inner, f"{key}.{name}".lstrip(".")).items()
    }


def _shown(value: Any) -> str:
    text = "unset" if value is None else json.dumps(redact(value), default=str)
    if isinstance(value, str):  # a path differs at its end
        text = text.strip('"')
        return text if len(text) <= 40 else "..." + text[-37:]
    return text if len(text) <= 40 else text[:37] + "..."


def _checkpoint_problem(folder: Path) -> str | None:
    done = folder / CHECKPOINT_DONE
    if not done.is_file():
        return f"no {CHECKPOINT_DONE}: the run stopped while saving it"
    try:
        files = json.loads(done.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{CHECKPOINT_DONE} is unreadable"
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"{missing[0]} is missing{more}"
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """The commit of the simpo source tree, `-dirty` appended when tracked files have changes,
    when it runs from a git checkout."""
    commit = source_commit()
    return None if commit is None else commit.sha + ("-dirty" if commit.dirty else "")


def reproducibility_record(
    seed: int, fingerprints: dict[str, str], world_size: int, start_model: str
) -> dict[str, Any]:
    return {
        "created_at": _now(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "seed": seed,
        "start_model": start_model,
        "datasets": fingerprints,
        "world_size": world_size,
        "platform": platform.platform(),
    }
