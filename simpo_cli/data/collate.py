"""Tokenized examples to training batches: padding or packing sequences (collate_sequences), the
SFT and preference collators, and the length column that training.balanced_batches groups by
(with_lengths). Reads no source and needs no tokenizer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from simpo_cli.losses import IGNORE_INDEX


def _pad(rows: list[list[int]], value: int):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


LENGTH_COLUMN = "length"  # tokens of a training example (training.balanced_batches groups by it)


def with_lengths(dataset):
    """The dataset with a `length` column: the tokens each example puts through the model (every
    *_ids column: SFT's input_ids; chosen, rejected and KTO's mismatched of a pair)."""
    columns = [c for c in dataset.column_names if c.endswith("_ids")]
    lengths = [
        sum(len(seq) for seq in seqs) for seqs in zip(*(dataset[c] for c in columns), strict=True)
    ]
    return dataset.add_column(LENGTH_COLUMN, lengths)


def collate_sequences(
    ids: list[list[int]],
    labels: list[list[int]],
    pad_token_id: int,
    padding_free: bool,
    one_row: bool = False,
) -> dict[str, Any]:
    """A training batch of S sequences (token ids and unshifted labels, -100 where untrained).

    padding_free=False: one row per sequence, right-padded to the longest: [S, T] input_ids,
    labels and attention_mask.

    padding_free=True: sequences packed into rows, position_ids restarting at 0 for each, and no
    attention_mask, from which transformers builds a block-diagonal causal mask (sdpa, eager),
    so no token attends across a boundary; each sequence's first label is set to -100 (it would
    be predicted by the previous sequence's last token). With one_row, every sequence goes into
    a single row [1, N], N the sum of the lengths, with the boundaries as cu_seq_lens and
    max_length for flash-attention's variable-length kernel, whose cost is the sum of the
    squared lengths. Otherwise the sequences are packed first-fit, longest first, into rows as
    long as the longest sequence (the block-diagonal mask of sdpa and eager costs the square of
    the row length, so a row no longer than the longest sequence is never dearer than padding);
    a row's unused tail is padding, a segment of its own.

    Both forms list, for the vocabulary projection, the trained positions of the flattened batch
    computed here on the host (no device sync in the step): token_index [M] (positions whose
    next token is trained), token_targets [M] (that token) and token_seq [M] (its sequence).
    """
    lengths = [len(row) for row in ids]
    if not padding_free:
        rows = [[s] for s in range(len(ids))]
    elif one_row:
        rows = [list(range(len(ids)))]
        labels = [[IGNORE_INDEX, *row[1:]] for row in labels]
    else:
        rows = _fit_rows(lengths)
        labels = [[IGNORE_INDEX, *row[1:]] for row in labels]
    width = max(sum(lengths[s] for s in row) for row in rows)
    input_ids = [[pad_token_id] * width for _ in rows]
    row_labels = [[IGNORE_INDEX] * width for _ in rows]
    positions = [list(range(width)) for _ in rows]
    trained, targets, sequences = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            n = lengths[s]
            input_ids[r][offset : offset + n] = ids[s]
            row_labels[r][offset : offset + n] = labels[s]
            positions[r][offset : offset + n] = range(n)
            for t in range(n - 1):  # position t predicts the token at t + 1
                if labels[s][t + 1] != IGNORE_INDEX:
                    trained.append(r * width + offset + t)
                    targets.append(labels[s][t + 1])
                    sequences.append(s)
            offset += n
        positions[r][offset:] = range(width - offset)  # the padding tail: a segment of its own
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(row_labels, dtype=torch.long),
    }
    if not padding_free:
        batch["attention_mask"] = _pad([[1] * n for n in lengths], 0)
    else:
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        if one_row:
            cumulative = [0, *itertools.accumulate(lengths)]
            batch["cu_seq_lens"] = torch.tensor(cumulative, dtype=torch.int32)
            batch["max_length"] = max(lengths)  # a Python int: read without a device sync
    batch["token_index"] = torch.tensor(trained, dtype=torch.long)
    batch["token_targets"] = torch.tensor(targets, dtype=torch.long)
    batch["token_seq"] = torch.tensor(sequences, dtype=torch.long)
    batch["num_sequences"] = len(ids)
    return batch


def _fit_rows(lengths: list[int]) -> list[list[int]]:
    """Sequence indices packed into rows of the longest length: first fit, longest first."""
    capacity = max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda s: -lengths[s]):
        r = next((r for r, room in enumerate(free) if room >= lengths[s]), None)
        if r is None:
            rows.append([])
            free.append(capacity)
            r = len(rows) - 1
        rows[r].append(s)
        free[r] -= lengths[s]
    return rows


@dataclass
class SFTCollator:
    """Batches of examples for the SFT stage, packed or padded (collate_sequences)."""

    pad_token_id: int
    padding_free: bool = False
    one_row: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_sequences(
            [f["input_ids"] for f in features],
            [f["labels"] for f in features],
            self.pad_token_id,
            self.padding_free,
            self.one_row,
        )


@dataclass
class PreferenceCollator:
    """Stacks chosen then rejected into one batch of 2B sequences, so both go through the policy
    in a single forward pass: sequences [0, B) are chosen, [B, 2B) the matching rejected, and for
    KTO [2B, 3B) the mismatched completions of its KL term. Packed into one row or padded
    (collate_sequences)."""

    pad_token_id: int
    padding_free: bool = False
    one_row: bool = False
    # Cached reference log-probs (DPO, IPO, R-DPO, KTO), summed, per pair_id: (chosen,
    # rejected) or, for KTO, (chosen, rejected, mismatched).
    reference: list[tuple[float, ...] | None] | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        sides = ("chosen", "rejected", "kl") if "kl_ids" in features[0] else ("chosen", "rejected")
        batch = collate_sequences(
            [f[f"{side}_ids"] for side in sides for f in features],
            [f[f"{side}_labels"] for side in sides for f in features],
            self.pad_token_id,
            self.padding_free,
            self.one_row,
        )
        batch["num_pairs"] = len(features)
        pairs = [self.reference[f["pair_id"]] for f in features] if self.reference else []
        if pairs and all(p is not None for p in pairs):  # None: the pre-pass that fills them
            for column, side in enumerate(sides):
                batch[f"ref_{side}_logps"] = torch.tensor([p[column] for p in pairs])
        return batch
