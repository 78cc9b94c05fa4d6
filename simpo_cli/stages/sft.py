"""The SFT stage: transformers' Trainer on the responses (SFTCollator masks the prompt tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simpo_cli.data import SFTCollator
from simpo_cli.faults import GuardedTrainer
from simpo_cli.recipe import Recipe, SFTStage


def build_trainer(
    recipe: Recipe,
    name: str,
    stage: SFTStage,
    common: dict[str, Any],
    start_from: str | None,
    output_dir: Path,
    checkpoint: Path | None,
) -> GuardedTrainer:
    return GuardedTrainer(
        data_collator=SFTCollator(common["processing_class"].pad_token_id), **common
    )
