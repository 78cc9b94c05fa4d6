"""The stage kinds, one module each. pipeline.py builds a stage's trainer through the same call
for every kind (TrainerBuilder); `common` holds the Trainer arguments that every kind shares
(model, args, datasets, tokenizer, callbacks), and the kind adds its collator and the rest.
A new kind is a new module here and an entry in BUILDERS."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from transformers import Trainer

from simpo_cli.recipe import Recipe
from simpo_cli.stages import preference, sft


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
