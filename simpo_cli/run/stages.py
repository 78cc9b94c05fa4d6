"""The stage kinds, one module each. Training kinds (sft, preference) build a Trainer through
the same call (TrainerBuilder); `common` holds the Trainer arguments that every kind shares
(model, args, datasets, tokenizer, callbacks), and the kind adds its collator and the rest.
Data kinds (generate, annotate, evaluate) run through StageRunner. A new kind is a new module
here and an entry in BUILDERS or RUNNERS."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from transformers import Trainer

from simpo_cli.evaluate import checkpoints as evaluate
from simpo_cli.onpolicy import annotate, generate
from simpo_cli.onpolicy.sampling import resolve_backend
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import Recipe
from simpo_cli.train import preference, sft


class TrainerBuilder(Protocol):
    def __call__(
        self,
        recipe: Recipe,
        name: str,
        stage: Any,
        common: dict[str, Any],
        start_from: str | None,
        output_dir: Path,
        checkpoint: Path | None,
    ) -> Trainer: ...


BUILDERS: dict[str, TrainerBuilder] = {
    "sft": sft.build_trainer,
    "preference": preference.build_trainer,
}


class StageRunner(Protocol):
    """A stage that makes data, not a model (generate, annotate, evaluate): runs inside the folder
    that pipeline.py has prepared and returns the summary for stage_complete.json."""

    def __call__(
        self,
        recipe: Recipe,
        name: str,
        stage: Any,
        stage_dir: StageDir,
        start_from: str | None,
        output_dir: Path,
    ) -> dict[str, Any]: ...


def _generate(recipe, name, stage, stage_dir, start_from, output_dir):
    return generate.run(recipe, stage, stage_dir, start_from)


def _annotate(recipe, name, stage, stage_dir, start_from, output_dir):
    return annotate.run(recipe, stage, stage_dir, output_dir)


def _evaluate(recipe, name, stage, stage_dir, start_from, output_dir):
    return evaluate.run(recipe, stage, stage_dir, output_dir)


RUNNERS: dict[str, StageRunner] = {
    "generate": _generate,
    "annotate": _annotate,
    "evaluate": _evaluate,
}


def generate_backend(stage: Any) -> str:
    """The backend a generate stage will use: "vllm" or "transformers"."""
    return resolve_backend(stage.backend)
