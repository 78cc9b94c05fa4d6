"""The whole recipe: the `Recipe` model, which checks that its stages fit together, and the part
of a recipe that decides each stage's result (stage_identity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, model_validator

from simpo_cli.errors import RecipeError
from simpo_cli.recipe.common import (
    STAGES,
    TRAINING_STAGES,
    DataSource,
    LaunchSettings,
    LoggingSettings,
    ModelSettings,
    Section,
    StageName,
)
from simpo_cli.recipe.evaluate import EvaluateStage
from simpo_cli.recipe.hub import HubSettings
from simpo_cli.recipe.onpolicy import AnnotateStage, GenerateStage
from simpo_cli.recipe.rounds import (
    ROUND_STAGES,
    RoundsSettings,
    expand_override,
    key_paths,
    round_folder,
)
from simpo_cli.recipe.sweep import SweepSettings
from simpo_cli.recipe.train import PreferenceStage, SFTStage
from simpo_cli.redact import redact


class Recipe(Section):
    name: str = Field("recipe", description="Recipe name; default: the file's name.")
    description: str | None = None
    output_dir: str | None = Field(None, description="Where stages write; default outputs/<name>.")
    model: ModelSettings
    pipeline: list[StageName] = Field(
        default_factory=lambda: ["sft", "preference"], description="Stages run by `simpo train`."
    )
    rounds: RoundsSettings | None = Field(
        None, description="Repeat generate -> annotate -> preference; see recipe/rounds.py."
    )
    sft: SFTStage | None = None
    generate: GenerateStage | None = None
    annotate: AnnotateStage | None = None
    preference: PreferenceStage | None = None
    evaluate: EvaluateStage | None = None
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    launch: LaunchSettings = Field(default_factory=LaunchSettings)
    hub: HubSettings | None = Field(
        None, description="Push stage folders to the Hugging Face Hub (run/hub.py)."
    )
    sweep: SweepSettings | None = Field(
        None, description="`simpo sweep`'s grids and metric; see recipe/sweep.py."
    )
    # Where each key path's value came from ("recipe" or "--set"); absent keys are defaults.
    _origins: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)
    # With rounds: the recipe each round's stages see, its rounds.overrides entry applied
    # (load.py builds them; round_recipe).
    _rounds: list[Recipe] = PrivateAttr(default_factory=list)
    # A sweep point's recipe: the folder of each stage kind under the output directory, where it
    # is not DIR/<kind> (sweep/<point>/preference; the shared stages keep theirs).
    _folders: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_pipeline(self) -> Recipe:
        if not self.pipeline:
            raise ValueError("pipeline is empty; list the stages to run, e.g. [sft, preference]")
        if len(set(self.pipeline)) != len(self.pipeline):
            raise ValueError(f"pipeline {self.pipeline} repeats a stage; list each once")
        if self.pipeline != sorted(self.pipeline, key=STAGES.index):
            raise ValueError(
                f"pipeline {self.pipeline} is out of order; stages run in the order "
                f"{', '.join(STAGES)}"
            )
        for stage in self.pipeline:
            if getattr(self, stage) is None:
                raise ValueError(f"pipeline runs '{stage}' but the recipe has no {stage}: section")
        if "annotate" in self.pipeline and "generate" not in self.pipeline:
            raise ValueError(
                "pipeline runs annotate without generate; add generate before it (annotate "
                "scores the generate stage's samples)"
            )
        if (
            self.preference is not None
            and self.preference.data.train is None
            and "annotate" not in self.pipeline
        ):
            raise ValueError(
                "preference.data.train: required key is missing; add it, or run an annotate "
                "stage before preference (pipeline: [generate, annotate, preference])"
            )
        if (
            self.annotate is not None
            and self.annotate.greedy_eval
            and (self.generate is None or self.generate.eval_prompts is None)
        ):
            raise ValueError(
                "annotate.greedy_eval: needs held-out prompts; set generate.eval_prompts"
            )
        if "evaluate" in self.pipeline:
            self._check_evaluate()
        self._check_continued_adapter()
        problems = [
            p for name in TRAINING_STAGES if getattr(self, name) for p in self._batch_problems(name)
        ]
        problems += self._sample_problems()
        problems += self._rounds_problems()
        problems += self._hub_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _check_continued_adapter(self) -> None:
        """A continued adapter switched off is the first stage's base, not the preference
        stage's start: no live reference from it."""
        lora = self.model.lora
        stage = self.preference
        if lora is None or not lora.continue_adapter or stage is None:
            return
        if "preference" not in self.pipeline or self.model_stage_before("preference") is None:
            return
        if stage.uses_reference and stage.reference.mode == "live" and not stage.reference.model:
            raise ValueError(
                "preference.reference.mode: live with model.lora.continue_adapter would score the "
                f"reference as the adapters switched off, which is the model before "
                f"{self.model_stage_before('preference')}, not this stage's start; use "
                "reference.mode: cached (the start's log-probs, computed once) or set "
                "reference.model"
            )

    def _check_evaluate(self) -> None:
        stage = self.evaluate
        assert stage is not None
        if not self.evaluate_checkpoints():
            raise ValueError(
                "evaluate: no checkpoints to evaluate; run a training stage before it, or list "
                "model folders in evaluate.checkpoints"
            )
        if self.evaluate_pairs() is None and not stage.benchmarks and stage.lm_eval is None:
            raise ValueError(
                "evaluate: nothing to evaluate; set evaluate.pairs (or preference.data.eval), "
                "evaluate.benchmarks or evaluate.lm_eval"
            )
        labels = [label for label, _ in self.evaluate_checkpoints()]
        for i, bench in enumerate(stage.benchmarks):
            against = bench.against
            if against in TRAINING_STAGES and against not in labels:
                raise ValueError(
                    f"evaluate.benchmarks.{i}.against: '{against}' is not among the checkpoints "
                    f"evaluated ({', '.join(labels)}); add it to evaluate.checkpoints"
                )

    def evaluate_checkpoints(self) -> list[tuple[str, str]]:
        """(label, stage name or model folder) of each checkpoint the evaluate stage compares:
        evaluate.checkpoints, else every training stage before it. A training stage's name
        stands for its folder in the output directory (pipeline.stage_folder)."""
        stage = self.evaluate
        if stage is None:
            return []
        if stage.checkpoints is not None:
            return [
                (entry if entry in TRAINING_STAGES else Path(entry).name, entry)
                for entry in stage.checkpoints
            ]
        before = (
            self.pipeline[: self.pipeline.index("evaluate")] if "evaluate" in self.pipeline else []
        )
        return [(name, name) for name in before if name in TRAINING_STAGES]

    def evaluate_rows(self) -> list[tuple[str, str, bool]]:
        """(name, folder or model path, whether it is a stage folder) of each checkpoint row of
        the evaluate stage: evaluate_checkpoints(), where under rounds: a stage the rounds repeat
        is one row per round, named round-<r> (its folder round-<r>/preference), in order."""
        rows = []
        for label, entry in self.evaluate_checkpoints():
            if entry not in TRAINING_STAGES:
                rows.append((label, entry, False))
            elif self.rounds is not None and entry in ROUND_STAGES:
                count = self.rounds.count
                rows += [(f"round-{r}", round_folder(r, entry), True) for r in range(1, count + 1)]
            else:
                rows.append((label, self.final_folder(entry), True))
        return rows

    def compares_rounds(self) -> bool:
        """Whether the evaluate stage compares the rounds on the held-out prompts (every row's
        greedy answers under the annotate stage's reward): rounds with generate.eval_prompts."""
        return (
            self.rounds is not None
            and self.annotate is not None
            and self.generate is not None
            and self.generate.eval_prompts is not None
        )

    def evaluate_pairs(self) -> DataSource | None:
        """The pairs the evaluate stage scores: its own, else the preference stage's held-out
        pairs."""
        if self.evaluate is None:
            return None
        if self.evaluate.pairs is not None:
            return self.evaluate.pairs
        return self.preference.data.eval if self.preference is not None else None

    def _batch_problems(self, name: StageName) -> list[str]:
        t = self.stage(name).training
        if t.total_batch_size is None:
            return []
        world = self.launch.world_size
        per_step = t.per_device_train_batch_size * world
        where = f"{name}.training.total_batch_size: {t.total_batch_size}"
        if t.total_batch_size % per_step:
            fits = [
                b for b in range(1, t.total_batch_size + 1) if t.total_batch_size % (b * world) == 0
            ]
            fix = (
                f"with {world} processes, per_device_train_batch_size "
                f"{_or_list(fits[:8])} would work"
                if fits
                else f"no per-device batch divides it over {world} processes; use a "
                f"total_batch_size that is a multiple of {world}"
            )
            return [
                f"{where} is not a multiple of per_device_train_batch_size "
                f"{t.per_device_train_batch_size} x {world} processes = {per_step}; {fix}"
            ]
        derived = t.total_batch_size // per_step
        if t.gradient_accumulation_steps not in (None, derived):
            return [
                f"{where} needs gradient_accumulation_steps {derived} with {world} processes x "
                f"per_device_train_batch_size {t.per_device_train_batch_size}, but "
                f"{t.gradient_accumulation_steps} is set; remove one of the two"
            ]
        return []

    def _sample_problems(self) -> list[str]:
        """annotate pairs two replies to the same prompt: the generate stage before it must
        sample at least two per prompt (with one, every prompt would be dropped)."""
        generate = self.generate
        if "annotate" not in self.pipeline or generate is None or len(generate.sample_seeds) > 1:
            return []
        why = "gives one reply per prompt, and annotate needs two or more to make a pair"
        if generate.num_samples is not None:
            return [
                f"generate.num_samples: {generate.num_samples} {why}; set generate.num_samples "
                "to 2 or more (the SimPO authors sample 5)"
            ]
        return [
            f"generate.seeds: {generate.seeds} {why}; list two or more seeds (the SimPO authors "
            "use [13, 21, 42, 79, 100])"
        ]

    def _rounds_problems(self) -> list[str]:
        """Rounds repeat generate -> annotate -> preference: all three in the pipeline. With
        reference: initial, a DPO-family loss needs round 1's start as a model it can load."""
        rounds = self.rounds
        if rounds is None:
            return []
        missing = [name for name in ROUND_STAGES if name not in self.pipeline]
        if missing:
            return [
                f"rounds: the pipeline [{', '.join(self.pipeline)}] has no "
                f"{', '.join(missing)}; rounds repeat generate -> annotate -> preference: add "
                "them to the pipeline, or remove the rounds: section"
            ]
        stage = self.preference
        assert stage is not None  # in the pipeline, so the section is there
        if (
            rounds.count > 1
            and rounds.reference == "initial"
            and stage.uses_reference
            and not stage.reference.model
            and self.model_stage_before("generate") is None
            and self.model.init == "from_config"
        ):
            return [
                "rounds.reference: initial keeps round 1's start model as the reference of "
                f"{stage.loss}, but that model is built from model.config and never saved; "
                "train a stage before the rounds (sft), set preference.reference.model, or use "
                "rounds.reference: previous"
            ]
        return []

    def round_recipe(self, round_: int) -> Recipe:
        """The recipe round `round_` (from 1) sees: rounds.overrides' entry for it applied."""
        if self.rounds is None or not 1 <= round_ <= self.rounds.count:
            raise ValueError(f"round {round_}: not a round of recipe '{self.name}'")
        if not self._rounds:
            raise RuntimeError("round recipes are built by load_recipe")
        return self._rounds[round_ - 1]

    def final_folder(self, name: str) -> str:
        """The folder under the output directory holding stage `name`'s final result: the last
        round's for a stage the rounds repeat, a sweep point's own for a stage it runs, else the
        stage's own."""
        if name in self._folders:
            return self._folders[name]
        if self.rounds is not None and name in ROUND_STAGES:
            return round_folder(self.rounds.count, name)
        return name

    def _hub_problems(self) -> list[str]:
        """Each pushed stage is a training stage of the pipeline, and has a repository and
        revision of its own."""
        hub = self.hub
        if hub is None:
            return []
        pushed = hub.pushed_stages(self.pipeline)
        if not pushed:
            return [
                f"hub: the pipeline [{', '.join(self.pipeline)}] trains no model to push; add a "
                "training stage (sft, preference) or remove the hub: section"
            ]
        problems = []
        listed = f"[{', '.join(pushed)}]"
        for name in pushed:
            if name not in TRAINING_STAGES:
                problems.append(
                    f"hub.stages: {name} writes no model to push; list training stages "
                    f"({', '.join(TRAINING_STAGES)})"
                )
            elif name not in self.pipeline:
                problems.append(
                    f"hub.stages: {name} is not in the pipeline [{', '.join(self.pipeline)}]; add "
                    "it to the pipeline or remove it from hub.stages"
                )
        if len(set(pushed)) != len(pushed):
            problems.append(f"hub.stages: {listed} lists a stage twice; list each once")
        if isinstance(hub.revision, dict):
            for name in hub.revision:
                if name not in pushed:
                    problems.append(
                        f"hub.revision: {name} is not pushed (hub.stages: {listed}); remove it, "
                        "or add the stage to hub.stages"
                    )
        seen: dict[tuple[str, str | None], str] = {}
        if problems:
            return problems
        for name in pushed:
            target = hub.target(name, self.name)
            if target in seen:
                repo, revision = target
                problems.append(
                    f"hub: stages {seen[target]} and {name} would both push to {repo} "
                    f"(revision {revision or 'main'}); put {{stage}} in hub.repo_id (a repository "
                    "per stage) or in hub.revision (a branch per stage: revision: '{stage}')"
                )
            seen[target] = name
        return problems

    def hub_targets(self) -> dict[str, tuple[str, str | None]]:
        """{stage: (repository, revision or None for main)} of every stage pushed."""
        if self.hub is None:
            return {}
        pushed = self.hub.pushed_stages(self.pipeline)
        return {name: self.hub.target(name, self.name) for name in pushed}

    def accumulation_steps(self, name: StageName) -> int:
        """Gradient accumulation of a stage: given, derived from total_batch_size, or 1."""
        t = self.stage(name).training
        if t.total_batch_size is not None:
            return t.total_batch_size // (t.per_device_train_batch_size * self.launch.world_size)
        return t.gradient_accumulation_steps or 1

    def total_batch(self, name: StageName) -> int:
        t = self.stage(name).training
        return (
            t.per_device_train_batch_size * self.launch.world_size * self.accumulation_steps(name)
        )

    def stage(self, name: StageName) -> Any:
        """The section of a stage: SFTStage, GenerateStage, AnnotateStage, PreferenceStage or
        EvaluateStage."""
        if name not in STAGES:
            raise RecipeError([f"{name}: no such stage; the stages are {', '.join(STAGES)}"])
        section = getattr(self, name)
        if section is None:
            raise RecipeError([f"recipe '{self.name}' has no {name}: section; add one to run it"])
        return section

    def first_stage_seed(self) -> int:
        """The seed a model built from model.config is initialised with: the first training
        stage's (a generate stage before it samples from the same model)."""
        for name in self.pipeline:
            if name in TRAINING_STAGES:
                return self.stage(name).training.seed
        return 42

    def origin(self, key: tuple[str, ...]) -> str:
        """Where a key's value came from: "recipe", "--set", "annotate stage" or "default"."""
        return self._origins.get(key, "default")

    def model_stage_before(self, name: StageName) -> StageName | None:
        """The training stage whose model `name` starts from or samples from: the nearest one
        before it in the pipeline, or None for the recipe's model."""
        if name not in self.pipeline:
            return None
        before = self.pipeline[: self.pipeline.index(name)]
        return next((s for s in reversed(before) if s in TRAINING_STAGES), None)

    def connect_stages(self, output_dir: Path, annotate: str | None = None) -> None:
        """Point a preference stage without data at the annotate stage's pairs in output_dir
        (its train split, and its test split when annotate holds pairs out). `annotate`: the
        annotate stage's folder (default: its final one, the last round's with rounds)."""
        stage = self.preference
        if stage is None or self.annotate is None or "annotate" not in self.pipeline:
            return
        made = {  # the splits this method points at the pairs (again, with another folder)
            split: getattr(stage.data, split) is None
            or self.origin(("preference", "data", split)) == "annotate stage"
            for split in ("train", "eval")
        }
        if not made["train"]:
            return
        pairs = output_dir / (annotate or self.final_folder("annotate")) / "dataset"
        folder = str(pairs.resolve())
        stage.data.train = DataSource(path=folder, split="train")
        held_out = self.annotate.eval_fraction > 0 or (
            self.generate is not None and self.generate.eval_prompts is not None
        )
        if made["eval"] and held_out:
            stage.data.eval = DataSource(path=folder, split="test")
        for split in ("train", "eval"):
            key = ("preference", "data", split)
            if getattr(stage.data, split) is not None and key not in self._origins:
                self._origins[key] = "annotate stage"

    def dump(self) -> dict[str, Any]:
        """The recipe as YAML keys (aliases such as `lambda`), defaults filled."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_yaml(self) -> str:
        """The recipe as YAML, secrets redacted (see redact.py): what resolved_recipe.yaml,
        `config show` and `--dry-run` show."""
        return yaml.safe_dump(
            redact(self.dump()), sort_keys=False, default_flow_style=None, width=100
        )


def _or_list(values: list[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def stage_identity(recipe: dict[str, Any], stage: str, round_: int | None = None) -> dict[str, Any]:
    """The part of a (dumped) recipe that decides a stage's result: the model and the sections of
    this stage and every stage before it. Names, output folders and logging do not count, nor
    training.on_nonfinite: a run stopped on a bad step may switch to skip and resume.

    A stage of round `round_` sees its round's recipe (that round's override applied), and
    depends on the rounds before it as well: their overrides, and the sections the rounds
    repeat less the keys this round overrides (what the earlier rounds share); on the prompt
    split (its count too, when it splits) and, once a round's preference stage before it had a
    reference model, on rounds.reference. A stage after the rounds (evaluate) depends on the
    whole rounds section."""
    pipeline = list(recipe.get("pipeline") or [])
    before = pipeline[: pipeline.index(stage) + 1] if stage in pipeline else [stage]
    sections = {name: _without_on_nonfinite(recipe.get(name)) for name in before}
    identity = {"model": recipe.get("model"), **sections}
    rounds = recipe.get("rounds")
    if not rounds or not any(name in ROUND_STAGES for name in before):
        return identity
    if round_ is None:  # after the rounds: all of them
        identity["rounds"] = rounds
        return identity
    overrides = [
        {name: _without_on_nonfinite(section) for name, section in entry.items()}
        for entry in (
            expand_override(e, "")[0]
            for e in [*(rounds.get("overrides") or []), *[{}] * round_][:round_]
        )
    ]  # nested, one per round so far ({} where none is given)
    shared = {}
    if round_ > 1:
        own = set(key_paths(overrides[-1]))
        shared = {name: _without(recipe.get(name), own, (name,)) for name in ROUND_STAGES}
    uses_reference = (recipe.get("preference") or {}).get("reference") is not None
    reference_counts = round_ > 2 or (round_ == 2 and stage == "preference")
    identity["rounds"] = {
        "round": round_,
        "prompts": rounds.get("prompts"),
        "count": rounds.get("count") if rounds.get("prompts") == "split" else None,
        "reference": rounds.get("reference") if uses_reference and reference_counts else None,
        "earlier_overrides": overrides[:-1],
        "shared": shared,
    }
    return identity


def _without(section: Any, keys: set[tuple[str, ...]], path: tuple[str, ...]) -> Any:
    """A dumped section less the key paths in `keys`."""
    if not isinstance(section, dict):
        return section
    return {
        name: _without(value, keys, (*path, name))
        for name, value in _without_on_nonfinite(section).items()
        if (*path, name) not in keys
    }


def _without_on_nonfinite(section: Any) -> Any:
    if not isinstance(section, dict) or not isinstance(section.get("training"), dict):
        return section
    training = {k: v for k, v in section["training"].items() if k != "on_nonfinite"}
    return {**section, "training": training}
