"""What the orchestrator runs: stage instances, and the registry of the stage kinds they are
instances of.

A stage instance is a folder under the run's output directory, the kind of stage that runs in
it, the recipe as that instance sees it (its section is `recipe.stage(kind)`), the training
instance whose model it starts from, and the instances whose outputs it reads. `instances`
builds them from a recipe's pipeline: today one per kind, in a folder named after the kind
(DIR/sft, DIR/preference, ...). Repeating a kind (DIR/round-2/preference) or running many
preference instances off one SFT is a matter of building more instances, with their own
folders and recipes; pipeline.py runs whatever it is given.

The kinds: training kinds (sft, preference) build a Trainer through the same call
(TrainerBuilder, with `common` the Trainer arguments every kind shares) and may add work before
and after training (the preference stage's held-out and greedy numbers); data kinds (generate,
annotate, evaluate) run through a StageRunner. A new kind is a module and an entry in KINDS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformers import Trainer

from simpo_cli.distributed import is_main_process
from simpo_cli.evaluate import checkpoints
from simpo_cli.onpolicy import annotate, generate
from simpo_cli.onpolicy.sampling import resolve_backend
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import TRAINING_STAGES, Recipe, StageName
from simpo_cli.run import card
from simpo_cli.train import preference, sft


@dataclass(frozen=True)
class StageInstance:
    """One stage of a run. `folder` is relative to the run's output directory and labels the
    stage's console lines; `model_from` is the folder of the training instance whose model this
    one starts from (or, for generate, samples from), None for the recipe's model; `reads` maps
    the kind of each other instance whose output this one reads to its folder."""

    folder: str
    kind: StageName
    recipe: Recipe
    model_from: str | None = None
    reads: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> Any:
        """The instance's section of its recipe (SFTStage, PreferenceStage, ...)."""
        return self.recipe.stage(self.kind)

    def requires(self) -> list[tuple[str, str]]:
        """(kind, folder) of every instance that must have finished before this one starts:
        the one whose model it takes, then those whose outputs it reads."""
        model = [("model", self.model_from)] if self.model_from is not None else []
        return model + list(self.reads.items())


def instances(recipe: Recipe) -> list[StageInstance]:
    """The recipe's pipeline as stage instances, in order."""
    return [instance(recipe, kind) for kind in recipe.pipeline]


def instance(recipe: Recipe, kind: StageName) -> StageInstance:
    """The instance of `kind` in the recipe's pipeline, in DIR/<kind>."""
    model_from = None
    if kind not in ("annotate", "evaluate"):
        model_from = recipe.model_stage_before(kind)
    reads: dict[str, str] = {}
    if kind == "annotate":
        reads["generate"] = "generate"
    if kind == "preference" and recipe.origin(("preference", "data", "train")) == "annotate stage":
        reads["annotate"] = "annotate"
    if kind == "evaluate":
        stage = recipe.stage("evaluate")
        entries = [entry for _, entry in recipe.evaluate_checkpoints()] + [stage.reference]
        reads.update({entry: entry for entry in entries if entry in TRAINING_STAGES})
        if (
            stage.pairs is None
            and recipe.origin(("preference", "data", "eval")) == "annotate stage"
        ):
            reads["annotate"] = "annotate"
    return StageInstance(kind, kind, recipe, model_from, reads)


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
    return generate.run(instance.recipe, instance.settings, stage_dir, start_from)


def _annotate(instance, stage_dir, start_from, output_dir):
    samples = output_dir / instance.reads["generate"]
    return annotate.run(instance.recipe, instance.settings, stage_dir, samples)


def _evaluate(instance, stage_dir, start_from, output_dir):
    summary = checkpoints.run(instance.recipe, instance.settings, stage_dir, output_dir)
    if is_main_process():
        _cards_with_table(instance.recipe, stage_dir, output_dir)
    return summary


def _cards_with_table(recipe: Recipe, stage_dir: StageDir, output_dir: Path) -> None:
    """The comparison table into the model card of each of this run's stages the evaluate
    stage scored (model folders from elsewhere are left as they are)."""
    table = (stage_dir.path / "comparison.md").read_text()
    for _, entry in recipe.evaluate_checkpoints():
        if entry not in TRAINING_STAGES:
            continue
        folder = output_dir / entry
        if not (folder / card.CARD).is_file():  # a stage finished before cards were written
            card.write_cards(recipe, entry, folder, recipe.model_stage_before(entry))
        card.add_evaluation(folder, table, f"{recipe.name}-{entry}")


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
