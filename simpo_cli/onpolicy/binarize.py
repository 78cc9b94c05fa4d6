"""From scored samples to preference pairs: selection, filters, the dataset and its report.

Input: sample records (the shape is in rewards.py's docstring: prompt_id, prompt messages,
samples with text, finish_reason, tokens, seed) and their scores (scores[i][j]: record i,
sample j, from rewards.score_records).

Per prompt, in this order; the first reason that applies drops the prompt and is counted:
  identical     every sample has the same text (the authors' only filter)
  empty         fewer than two samples hold a reply: samples whose text is empty or only
                whitespace are excluded before selection (counted in empty_samples), since the
                preference stage cannot train on an empty reply (it would drop the pair)
  truncated     drop_truncated is set and fewer than two of the others ended on their own:
                samples cut at max_new_tokens (finish_reason "length") are excluded before
                selection, one by one (counted in truncated_samples), and the prompt is kept if
                two remain
  tie           the chosen and rejected scores are equal (the authors kept these: chosen ==
                rejected)
  same_text     the chosen and rejected texts are equal (different samples, same reply)
  under_margin  score_chosen - score_rejected < min_margin

Selection: chosen = the highest score (the first such sample on a tie for highest); rejected =
  best_vs_worst   the lowest score (the first such sample)
  best_vs_random  a sample drawn uniformly from the others whose text differs from the chosen,
                  with an RNG seeded by (seed, prompt_id): the same draw whatever the order of
                  the records or the number of processes

Rows, in the published schema (princeton-nlp/*-ultrafeedback-armorm) plus audit columns:
  prompt_id, prompt (the text of the last user turn), chosen and rejected (message lists: the
  prompt turns, then the assistant reply; the preference stage reads the prompt from them, so
  multi-turn prompts train as such), all_generated_responses, all_rm_scores (every sample, in
  sample order), score_chosen, score_rejected, chosen_index, rejected_index, finish_reasons,
  response_tokens, seeds.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpo_cli import progress
from simpo_cli.errors import DataError, UserError

SELECTIONS = ("best_vs_worst", "best_vs_random")
DROP_REASONS = ("identical", "empty", "truncated", "tie", "same_text", "under_margin")


@dataclass
class BinarizeReport:
    """What binarize did: counts by drop reason, score statistics and a length-bias check."""

    prompts: int = 0
    samples: int = 0
    empty_samples: int = 0  # samples with an empty (or whitespace-only) reply: excluded
    truncated_samples: int = 0  # samples cut at max_new_tokens (excluded with drop_truncated)
    dropped: Counter = field(default_factory=Counter)  # prompts, by DROP_REASONS
    pairs: int = 0
    score_mean: float = math.nan  # over every sample's score
    score_std: float = math.nan
    score_min: float = math.nan
    score_max: float = math.nan
    margin_mean: float = math.nan  # over kept pairs
    chosen_longer: float = math.nan  # fraction of kept pairs whose chosen has more tokens

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "dropped"}
        out["dropped"] = {reason: self.dropped[reason] for reason in DROP_REASONS}
        return out

    def lines(self) -> list[str]:
        out = [
            f"binarize: {self.prompts} prompts, {self.samples} samples -> {self.pairs} pairs",
            f"  samples with an empty reply (never paired): {self.empty_samples}",
            f"  samples cut at max_new_tokens: {self.truncated_samples}",
        ]
        out += [f"  dropped ({reason}): {self.dropped[reason]}" for reason in DROP_REASONS]
        out.append(
            f"  scores: mean {self.score_mean:.4g}, std {self.score_std:.4g}, "
            f"min {self.score_min:.4g}, max {self.score_max:.4g}"
        )
        out.append(f"  mean margin (chosen - rejected): {self.margin_mean:.4g}")
        # SimPO normalizes by length, but a reward model that favours long replies still teaches
        # length: well above 0.5 is a warning sign.
        out.append(f"  chosen longer than rejected: {self.chosen_longer:.1%} of pairs")
        return out


def check_records(records: Sequence[dict[str, Any]], scores: Sequence[Sequence[float]]) -> None:
    """One-line DataErrors for records that do not have the sample-record shape, or whose scores
    do not line up with their samples."""
    if len(records) != len(scores):
        raise DataError(f"{len(records)} sample records but {len(scores)} score lists")
    seen: set[str] = set()
    for index, (record, record_scores) in enumerate(zip(records, scores, strict=True)):
        prompt_id = record.get("prompt_id")
        where = f"sample record {index + 1} (prompt {prompt_id})"
        if not isinstance(prompt_id, str) or not prompt_id:
            raise DataError(f"{where}: no prompt_id; every record needs a string prompt_id")
        if prompt_id in seen:
            raise DataError(f"{where}: prompt_id repeats an earlier record; merge or dedupe them")
        seen.add(prompt_id)
        prompt = record.get("prompt")
        if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
            raise DataError(f"{where}: prompt must be a list of {{role, content}} messages")
        samples = record.get("samples")
        if not isinstance(samples, list) or not samples:
            raise DataError(f"{where}: no samples")
        for sample in samples:
            if not isinstance(sample, dict) or not (
                isinstance(sample.get("text"), str) and isinstance(sample.get("tokens"), int)
            ):
                raise DataError(f"{where}: each sample needs text (a string) and tokens (a count)")
        if len(record_scores) != len(samples):
            raise DataError(f"{where}: {len(samples)} samples but {len(record_scores)} scores")
        if not all(math.isfinite(s) for s in record_scores):
            raise DataError(f"{where}: a score is not a finite number: {list(record_scores)}")


def binarize(
    records: Sequence[dict[str, Any]],
    scores: Sequence[Sequence[float]],
    selection: str = "best_vs_worst",
    min_margin: float = 0.0,
    drop_truncated: bool = True,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], BinarizeReport]:
    """Preference rows (one per kept prompt, in record order) and the report; see the module
    docstring for the order of the filters, the selection rules and the row schema."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, not {selection!r}")
    check_records(records, scores)
    report = BinarizeReport(prompts=len(records))
    rows: list[dict[str, Any]] = []
    for record, record_scores in zip(records, scores, strict=True):
        samples = record["samples"]
        report.samples += len(samples)
        cut = [s.get("finish_reason") == "length" for s in samples]
        report.truncated_samples += sum(cut)
        texts = [s["text"] for s in samples]
        if len(set(texts)) == 1:
            report.dropped["identical"] += 1
            continue
        replies = [j for j in range(len(samples)) if texts[j].strip()]
        report.empty_samples += len(samples) - len(replies)
        if len(replies) < 2:
            report.dropped["empty"] += 1
            continue
        usable = [j for j in replies if not (drop_truncated and cut[j])]
        if len(usable) < 2:
            report.dropped["truncated"] += 1
            continue
        best = max(usable, key=lambda j: (record_scores[j], -j))  # first of the highest
        if selection == "best_vs_worst":
            worst = min(usable, key=lambda j: (record_scores[j], j))  # first of the lowest
        else:
            others = [j for j in usable if texts[j] != texts[best]]
            if not others:
                report.dropped["same_text"] += 1
                continue
            worst = random.Random(f"{seed}:{record['prompt_id']}").choice(others)
        margin = record_scores[best] - record_scores[worst]
        if margin == 0:
            report.dropped["tie"] += 1
        elif texts[best] == texts[worst]:
            report.dropped["same_text"] += 1
        elif margin < min_margin:
            report.dropped["under_margin"] += 1
        else:
            rows.append(_row(record, record_scores, best, worst))
    _statistics(report, scores, rows)
    return rows, report


def _message(message: dict[str, Any]) -> dict[str, str]:
    return {"role": str(message["role"]), "content": str(message.get("content") or "")}


def _row(
    record: dict[str, Any], scores: Sequence[float], chosen: int, rejected: int
) -> dict[str, Any]:
    prompt = [_message(m) for m in record["prompt"]]
    samples = record["samples"]
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return {
        "prompt_id": record["prompt_id"],
        "prompt": users[-1] if users else "",
        "chosen": prompt + [{"role": "assistant", "content": samples[chosen]["text"]}],
        "rejected": prompt + [{"role": "assistant", "content": samples[rejected]["text"]}],
        "all_generated_responses": [s["text"] for s in samples],
        "all_rm_scores": [float(s) for s in scores],
        "score_chosen": float(scores[chosen]),
        "score_rejected": float(scores[rejected]),
        "chosen_index": chosen,
        "rejected_index": rejected,
        "finish_reasons": [str(s.get("finish_reason") or "") for s in samples],
        "response_tokens": [s["tokens"] for s in samples],
        "seeds": [s.get("seed") for s in samples],
    }


def _statistics(
    report: BinarizeReport, scores: Sequence[Sequence[float]], rows: list[dict[str, Any]]
) -> None:
    flat = [s for record_scores in scores for s in record_scores]
    if flat:
        mean = sum(flat) / len(flat)
        report.score_mean = mean
        report.score_std = math.sqrt(sum((s - mean) ** 2 for s in flat) / len(flat))
        report.score_min, report.score_max = min(flat), max(flat)
    report.pairs = len(rows)
    if rows:
        report.margin_mean = sum(r["score_chosen"] - r["score_rejected"] for r in rows) / len(rows)
        longer = sum(
            r["response_tokens"][r["chosen_index"]] > r["response_tokens"][r["rejected_index"]]
            for r in rows
        )
        report.chosen_longer = longer / len(rows)


# --------------------------------------------------------------------------- writing


def features():
    """Explicit column types: a column that is null in every row (seeds of a greedy run) still
    gets its type, and every written dataset has the same schema."""
    from datasets import Features, List, Value

    messages = List({"role": Value("string"), "content": Value("string")})
    return Features(
        {
            "prompt_id": Value("string"),
            "prompt": Value("string"),
            "chosen": messages,
            "rejected": messages,
            "all_generated_responses": List(Value("string")),
            "all_rm_scores": List(Value("float64")),
            "score_chosen": Value("float64"),
            "score_rejected": Value("float64"),
            "chosen_index": Value("int64"),
            "rejected_index": Value("int64"),
            "finish_reasons": List(Value("string")),
            "response_tokens": List(Value("int64")),
            "seeds": List(Value("int64")),
        }
    )


def split_rows(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test): round(eval_fraction * n) rows held out (at least one when the fraction is
    above 0 and there are two rows), drawn by a seeded shuffle of the sorted prompt ids, so the
    split depends on the prompts, not on the order the rows came in. Both keep row order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    n_test = round(eval_fraction * len(rows))
    if eval_fraction > 0 and len(rows) >= 2:
        n_test = min(max(n_test, 1), len(rows) - 1)
    ids = sorted(row["prompt_id"] for row in rows)
    random.Random(seed).shuffle(ids)
    held_out = set(ids[:n_test])
    return (
        [r for r in rows if r["prompt_id"] not in held_out],
        [r for r in rows if r["prompt_id"] in held_out],
    )


def write_dataset(
    rows: list[dict[str, Any]],
    folder: Path,
    eval_fraction: float = 0.0,
    seed: int = 0,
    test_rows: list[dict[str, Any]] | None = None,
    report: BinarizeReport | None = None,
) -> dict[str, int]:
    """Write the pairs to `folder`: a DatasetDict (save_to_disk: train, and test when held out)
    plus train.jsonl / test.jsonl, and report.json when a report is given. The test split is
    `test_rows` (pairs from the prompts source's own test split) or, with eval_fraction, a
    share of `rows` (see split_rows); not both.

    Refuses a folder that exists and is not empty (one-line UserError). Everything is written to
    `<folder>.partial` first and renamed at the end, so a crash never leaves a half dataset that
    looks complete. Returns the number of rows per split."""
    from datasets import Dataset, DatasetDict

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(
            f"{folder}: exists and is not empty; choose a new output folder or delete this one"
        )
    if test_rows is not None and eval_fraction > 0:
        raise ValueError("give test_rows or eval_fraction, not both")
    if not rows:
        raise UserError(
            f"{folder}: no preference pairs to write: every prompt was dropped (see the binarize "
            "report); lower min_margin, keep truncated samples or sample more per prompt"
        )
    splits = {"train": rows, "test": test_rows or []}
    if eval_fraction > 0:
        splits["train"], splits["test"] = split_rows(rows, eval_fraction, seed)
    splits = {name: split for name, split in splits.items() if split}

    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():  # left by an earlier crash of this same write
        shutil.rmtree(partial)
    schema = features()
    dataset = DatasetDict(
        {name: Dataset.from_list(split, features=schema) for name, split in splits.items()}
    )
    with progress.dataset_bars(sum(map(len, splits.values())), progress.WRITING):
        dataset.save_to_disk(str(partial))
    for name, split in splits.items():
        with open(partial / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in split:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if report is not None:
        (partial / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if folder.exists():
        folder.rmdir()  # empty: checked above
    partial.rename(folder)
    return {name: len(split) for name, split in splits.items()}
