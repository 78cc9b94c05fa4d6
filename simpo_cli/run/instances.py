"""Stage instances: what the orchestrator runs, built from a recipe's pipeline.

A stage instance is a folder under the run's output directory, the kind of stage that runs in
it, the recipe as that instance sees it (its section is `recipe.stage(kind)`), the training
instance whose model it starts from, and the instances whose outputs it reads. Without rounds
there is one per kind of the pipeline, in a folder named after the kind (DIR/sft,
DIR/preference, ...). With `rounds: {count: N}` the generate -> annotate -> preference stages
are N instances each, in DIR/round-<r>/<kind>, each round with its own recipe (its entry of
rounds.overrides applied, its pairs and reference connected), starting from the previous
round's preference model.

No torch here: `--dry-run` lists the instances (stages.py holds what runs them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from simpo_cli.errors import UserError
from simpo_cli.recipe import ROUND_STAGES, TRAINING_STAGES, Recipe, StageName, round_folder

# Where a round's preference.reference.model came from when rounds.reference set it.
ROUND_REFERENCE = "rounds.reference: initial"


@dataclass(frozen=True)
class StageInstance:
    """One stage of a run. `folder` is relative to the run's output directory and labels the
    stage's console lines; `model_from` is the folder of the training instance whose model this
    one starts from (or, for generate, samples from), None for the recipe's model; `reads` maps
    the kind of each other instance whose output this one reads to its folder; `round` is the
    round it belongs to (from 1), None outside rounds; `sweep_point`: a stage of a sweep's
    point, which reads what an earlier point computed the same way (its tokenized data in
    DIR/tokenized/, an evaluated model's benchmark answers in DIR/evaluated/) and keeps there
    what it computes first."""

    folder: str
    kind: StageName
    recipe: Recipe
    model_from: str | None = None
    reads: dict[str, str] = field(default_factory=dict)
    round: int | None = None
    sweep_point: bool = False

    @property
    def settings(self):
        """The instance's section of its recipe (SFTStage, PreferenceStage, ...)."""
        return self.recipe.stage(self.kind)

    def requires(self) -> list[tuple[str, str]]:
        """(kind, folder) of every instance that must have finished before this one starts:
        the one whose model it takes, then those whose outputs it reads."""
        model = [("model", self.model_from)] if self.model_from is not None else []
        return model + list(self.reads.items())

    @property
    def prompt_split(self) -> tuple[int, int] | None:
        """(round, count) when this instance samples its round's slice of generate.prompts."""
        rounds = self.recipe.rounds
        if self.round is None or rounds is None or rounds.prompts != "split":
            return None
        return self.round, rounds.count


def instances(recipe: Recipe, output_dir: Path) -> list[StageInstance]:
    """The recipe's pipeline as stage instances, in order: with rounds, round 1's generate,
    annotate and preference, then round 2's, ..., where the pipeline has them. Connects the
    recipe (and each round's) to the pairs the annotate stages write in output_dir."""
    recipe.connect_stages(output_dir)
    found = []
    for kind in recipe.pipeline:
        if recipe.rounds is None or kind not in ROUND_STAGES:
            found.append(instance(recipe, kind))
        elif kind == ROUND_STAGES[0]:
            for round_ in range(1, recipe.rounds.count + 1):
                found += round_instances(recipe, round_, output_dir)
    return found


def instance(recipe: Recipe, kind: StageName) -> StageInstance:
    """The instance of `kind` in the recipe's pipeline (not one the rounds repeat), in
    DIR/<kind>."""
    model_from = None
    if kind not in ("annotate", "evaluate"):
        model_from = recipe.model_stage_before(kind)
    reads: dict[str, str] = {}
    if kind == "annotate":
        reads["generate"] = "generate"
    if kind == "preference" and recipe.origin(("preference", "data", "train")) == "annotate stage":
        reads["annotate"] = "annotate"
    if kind == "evaluate":
        # A stage the rounds repeat is read from its last round (recipe.final_folder).
        stage = recipe.stage("evaluate")
        entries = [entry for _, entry in recipe.evaluate_checkpoints()] + [stage.reference]
        reads.update({e: recipe.final_folder(e) for e in entries if e in TRAINING_STAGES})
        if (
            stage.pairs is None
            and recipe.origin(("preference", "data", "eval")) == "annotate stage"
        ):
            reads["annotate"] = recipe.final_folder("annotate")
    return StageInstance(kind, kind, recipe, model_from, reads)


def round_instances(recipe: Recipe, round_: int, output_dir: Path) -> list[StageInstance]:
    """Round `round_`'s generate, annotate and preference instances: its recipe reads the pairs
    of its own annotate stage and (rounds.reference: initial, a loss with a reference, from
    round 2 on) keeps round 1's start model as the reference."""
    seen = recipe.round_recipe(round_)
    seen.connect_stages(output_dir, round_folder(round_, "annotate"))
    start = round_start(recipe, round_)
    stage = seen.preference
    key = ("preference", "reference", "model")
    if (
        stage is not None
        and stage.uses_reference
        and seen.origin(key) in ("default", ROUND_REFERENCE)
    ):
        initial = recipe.rounds is not None and recipe.rounds.reference == "initial"
        if initial and round_ > 1:
            stage.reference.model = model_path(recipe, round_start(recipe, 1), output_dir)
            seen._origins[key] = ROUND_REFERENCE
    folders = {kind: round_folder(round_, kind) for kind in ROUND_STAGES}
    reads = {}
    if seen.origin(("preference", "data", "train")) == "annotate stage":
        reads["annotate"] = folders["annotate"]
    return [
        StageInstance(folders["generate"], "generate", seen, start, {}, round_),
        StageInstance(
            folders["annotate"], "annotate", seen, None, {"generate": folders["generate"]}, round_
        ),
        StageInstance(folders["preference"], "preference", seen, start, reads, round_),
    ]


def round_start(recipe: Recipe, round_: int) -> str | None:
    """The folder of the model round `round_` samples from and trains: the previous round's
    preference stage, for round 1 the training stage before the rounds (None: the recipe's
    model)."""
    if round_ == 1:
        return recipe.model_stage_before(ROUND_STAGES[0])
    return round_folder(round_ - 1, "preference")


def model_path(recipe: Recipe, folder: str | None, output_dir: Path) -> str:
    """Where the model of a stage folder (None: the recipe's model) is read from."""
    if folder is None:
        return recipe.model.name_or_path or "model.config"
    return str((output_dir / folder).resolve())


def model_label(recipe: Recipe, folder: str | None) -> str:
    """A stage folder's model as the plan and the round records name it."""
    if folder is not None:
        return folder
    if recipe.model.init == "from_config":
        return "the recipe's new model (model.config)"
    return f"the recipe's model ({recipe.model.name_or_path})"


def reference_text(instance: StageInstance) -> str:
    """The reference model of a round's preference stage, in words, with where it comes from."""
    recipe = instance.recipe
    stage = recipe.preference
    if stage is None or not stage.uses_reference:
        loss = stage.loss if stage is not None else "simpo"
        return f"none ({loss} has no reference model)"
    if recipe.origin(("preference", "reference", "model")) != ROUND_REFERENCE:
        if stage.reference.model:
            return f"{stage.reference.model} (preference.reference.model)"
    rounds = recipe.rounds
    if rounds is None:
        return f"{model_label(recipe, instance.model_from)}, the stage's start"
    if rounds.reference == "initial":
        initial = model_label(recipe, round_start(recipe, 1))
        return f"{initial}, round 1's start (rounds.reference: initial)"
    start = model_label(recipe, round_start(recipe, instance.round or 1))
    return f"{start}, the round's start (rounds.reference: previous)"


def selected(
    every: list[StageInstance], kinds: list[str], round_: int | None, recipe: Recipe
) -> list[StageInstance]:
    """The instances a command runs: every one of `kinds` (a whole pipeline, or one stage), or
    with --round only that round's. One line (UserError) for a --round the recipe does not
    have, or a stage the rounds repeat asked for without one."""
    rounds = recipe.rounds
    if round_ is not None:
        if rounds is None:
            raise UserError(
                f"--round {round_}: recipe '{recipe.name}' has no rounds: section; leave "
                "--round out"
            )
        if not 1 <= round_ <= rounds.count:
            raise UserError(
                f"--round {round_}: recipe '{recipe.name}' runs {rounds.count} round(s) "
                f"(rounds.count); give --round 1 to {rounds.count}"
            )
    elif rounds is not None and len(kinds) == 1 and kinds[0] in ROUND_STAGES:
        raise UserError(
            f"{kinds[0]}: recipe '{recipe.name}' runs it in {rounds.count} round(s); give "
            f"--round 1 to {rounds.count} (or run them all with `simpo train`)"
        )
    return [i for i in every if i.kind in kinds and (round_ is None or i.round in (None, round_))]


def stage_command(folder: str) -> str:
    """The command that runs the stage in `folder`: `sft`, or `preference --round 2` for
    round-2/preference."""
    head, _, kind = folder.rpartition("/")
    if head.startswith("round-"):
        return f"{kind} --round {head.removeprefix('round-')}"
    return folder
