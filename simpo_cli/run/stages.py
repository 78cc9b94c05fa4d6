"""The registry of the stage kinds that stage instances (instances.py) are instances of.

instances.py builds the instances from a recipe's pipeline: one per kind in DIR/<kind>, and
with rounds one per round of generate, annotate and preference in DIR/round-<r>/<kind>;
running many preference instances off one SFT would be more instances, with their own folders
and recipes. pipeline.py runs whatever it is given.

The kinds: training kinds (sft, preference) build a Trainer through the same call
(TrainerBuilder, with `common` the Trainer arguments every kind shares) and may add work before
and after training (the preference stage's held-out and greedy numbers); data kinds (generate,
annotate, evaluate) run through a StageRunner. A new kind is a module and an entry in KINDS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transformers import Trainer

from simpo_cli.distributed import is_main_process
from simpo_cli.evaluate import checkpoints
from simpo_cli.onpolicy import annotate, generate
from simpo_cli.onpolicy.sampling import resolve_backend
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import Recipe
from simpo_cli.run import card
from simpo_cli.run.instances import StageInstance
from simpo_cli.train import preference, sft

# --------------------------------------------------------------------------- training kinds


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


# (recipe, label, trainer, tokenizer, stage folder, resuming) before the first step, and
# (recipe, label, trainer, tokenizer, stage folder, summary) after the last.
BeforeTraining = Callable[[Recipe, str, Trainer, Any, StageDir, bool], None]
AfterTraining = Callable[[Recipe, str, Trainer, Any, StageDir, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainingKind:
    build_trainer: TrainerBuilder
    eval_before: bool = False  # score the held-out data before the first step (eval_on_start)
    rows: Callable[[Any, Any], Any] | None = None  # (stage, tokenized dataset) -> dataset
    before_training: BeforeTraining | None = None
    after_training: AfterTraining | None = None


# --------------------------------------------------------------------------- data kinds


class StageRunner(Protocol):
    """A stage that makes data, not a model (generate, annotate, evaluate): runs inside the folder
    that pipeline.py has prepared and returns the summary for stage_complete.json."""

    def __call__(
        self,
        instance: StageInstance,
        stage_dir: StageDir,
        start_from: str | None,
        output_dir: Path,
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DataKind:
    run: StageRunner
    # True where the stage's processes start their own process group (a vLLM engine), so the
    # orchestrator must not start one or wait at its barriers.
    own_processes: Callable[[Any], bool] = lambda stage: False


def _generate(instance, stage_dir, start_from, output_dir):
    return generate.run(
        instance.recipe, instance.settings, stage_dir, start_from, instance.prompt_split
    )


def _annotate(instance, stage_dir, start_from, output_dir):
    samples = output_dir / instance.reads["generate"]
    return annotate.run(instance.recipe, instance.settings, stage_dir, samples)


def _evaluate(instance, stage_dir, start_from, output_dir):
    # A sweep's point evaluates the shared models as every other point does: sampled once.
    shared = output_dir / checkpoints.EVALUATED_DIR if instance.sweep_point else None
    summary = checkpoints.run(instance.recipe, instance.settings, stage_dir, output_dir, shared)
    if is_main_process():
        _cards_with_table(instance.recipe, stage_dir, output_dir)
    return summary


def _cards_with_table(recipe: Recipe, stage_dir: StageDir, output_dir: Path) -> None:
    """The comparison table into the model card of each of this run's stages the evaluate
    stage scored (model folders from elsewhere are left as they are)."""
    table = (stage_dir.path / "comparison.md").read_text()
    for name, where, stage in recipe.evaluate_rows():  # with rounds, every round's model
        if not stage:
            continue
        folder = output_dir / where
        if not (folder / card.CARD).is_file():  # a stage finished before cards were written
            if where != name:
                continue  # a round's stage writes its card when it finishes
            card.write_cards(recipe, name, folder, recipe.model_stage_before(name))
        card.add_evaluation(folder, table, f"{recipe.name}-{name}")


KINDS: dict[str, TrainingKind | DataKind] = {
    "sft": TrainingKind(sft.build_trainer),
    "preference": TrainingKind(
        preference.build_trainer,
        eval_before=True,
        rows=preference.training_rows,
        before_training=preference.before_training,
        after_training=preference.after_training,
    ),
    "generate": DataKind(
        _generate, lambda stage: resolve_backend(stage.backend, "generate.backend") == "vllm"
    ),
    "annotate": DataKind(_annotate),
    "evaluate": DataKind(_evaluate),
}
