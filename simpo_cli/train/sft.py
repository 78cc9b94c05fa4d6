"""The SFT stage: transformers' Trainer on the responses (SFTCollator masks the prompt tokens),
with the loss computed here so that batches can be packed and log-probs chunked (logps.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simpo_cli.data import SFTCollator
from simpo_cli.distributed import world_size
from simpo_cli.faults import GuardedTrainer
from simpo_cli.recipe import Recipe, SFTStage
from simpo_cli.train.logps import batch_layout, sequence_scores
from simpo_cli.train.trainer import SeededBatches


class SFTTrainer(SeededBatches, GuardedTrainer):
    """Cross-entropy over the trained tokens: their summed negative log-likelihood divided by
    the trained tokens of the whole optimizer step, on every process (num_items_in_batch, which
    Trainer counts from the labels), as transformers' own causal-LM loss does."""

    def __init__(self, *args, chunk_size: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size
        # Our loss takes num_items_in_batch whatever the model's forward signature says, and is
        # then already scaled for gradient accumulation.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = sequence_scores(model, inputs, self.chunk_size)
        nll = -scores.sums.sum()
        if num_items_in_batch is None:
            loss = nll / scores.counts.sum().clamp(min=1)
        else:
            loss = nll / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts every process's tokens and the processes' gradients
                # are averaged.
                loss = loss * world_size()
        return (loss, {}) if return_outputs else loss


def build_trainer(
    recipe: Recipe,
    name: str,
    stage: SFTStage,
    common: dict[str, Any],
    start_from: str | None,
    output_dir: Path,
    checkpoint: Path | None,
) -> SFTTrainer:
    layout = batch_layout(common["model"], stage.training, name)
    pad_token_id = common["processing_class"].pad_token_id
    return SFTTrainer(
        data_collator=SFTCollator(pad_token_id, layout.padding_free, layout.one_row),
        chunk_size=layout.chunk_size,
        **common,
    )
