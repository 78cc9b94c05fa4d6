"""`simpo data inspect`: one training row of a stage, read, rendered and tokenized as training
sees it (inspect_row), shown token by token with the trained tokens marked (show_tokens). Built on
sources, tokenizer and tokenize; adds no data handling of its own.
"""

from __future__ import annotations

from simpo_cli.data.sources import load_source, row_location
from simpo_cli.data.tokenize import check_columns, tokenize_conversation, tokenize_pair
from simpo_cli.data.tokenizer import load_tokenizer
from simpo_cli.errors import DataError
from simpo_cli.losses import IGNORE_INDEX


def show_tokens(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The example token by token, trained tokens marked: green with color, else ⟦...⟧."""
    out = []
    trained_run = False
    for token_id, label in zip(input_ids, labels, strict=True):
        text = tokenizer.decode([token_id]).replace("\n", "↵\n")
        trained = label != IGNORE_INDEX
        if color:
            out.append(f"\x1b[42;30m{text}\x1b[0m" if trained else f"\x1b[2m{text}\x1b[0m")
        else:
            if trained and not trained_run:
                out.append("⟦")
            if not trained and trained_run:
                out.append("⟧")
            out.append(text)
        trained_run = trained
    if trained_run and not color:
        out.append("⟧")
    return "".join(out)


def inspect_row(recipe, stage_name: str, row: int, color: bool) -> str:
    """`simpo data inspect`: one training row of a stage, rendered and tokenized as training
    sees it, with counts that make a masking, BOS or EOS mistake obvious."""
    stage = recipe.stage(stage_name)
    tokenizer = load_tokenizer(recipe.model)
    role = f"{stage_name}.data.train"
    dataset = load_source(stage.data.train, role)
    if row >= len(dataset):
        raise DataError(
            f"--row {row}: {role} has {len(dataset)} rows; choose 0..{len(dataset) - 1}"
        )
    kind = "sft" if stage_name == "sft" else "preference"
    check_columns(dataset.column_names, kind, role)
    where = f"{role}: --row {row} ({row_location(dataset[row], row)} of {stage.data.train.path})"
    if kind == "sft":
        out = tokenize_conversation(tokenizer, dataset[row], where, stage.data.max_length)
        shown = {"example": (out["input_ids"], out["labels"])}
    else:
        data = stage.data
        out = tokenize_pair(
            tokenizer,
            dataset[row],
            where,
            data.max_length,
            data.max_prompt_length,
            data.tokenization,
        )
        shown = {
            side: (out[f"{side}_ids"], out[f"{side}_labels"]) for side in ("chosen", "rejected")
        }
    legend = "green = trained" if color else "⟦trained⟧"
    lines = [f"{where} ({legend}; ↵ = newline)"]
    if out["drop"]:
        lines.append(f"this row is dropped before training: {out['drop']}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for side, (ids, labels) in shown.items():
        trained = sum(label != IGNORE_INDEX for label in labels)
        lines += [
            f"--- {side}: {len(ids)} tokens, {trained} trained, {len(ids) - trained} masked; "
            f"BOS count {ids.count(bos) if bos is not None else 0}; "
            f"ends with EOS: {'yes' if ids[-1:] == [eos] else 'no'}",
            show_tokens(tokenizer, ids, labels, color),
        ]
    return "\n".join(lines)
