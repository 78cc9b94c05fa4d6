"""The record of each round of an iterative run: DIR/round-<r>/round.json, and all of them in
DIR/rounds.json, printed as a table at the end of a command that ran rounds.

A round's record answers what users of iterative scripts ask: which model the round started
from, which reference a DPO-family loss kept, which prompts it sampled (their place among the
prompts and a hash of their ids), which reward scored them, how many pairs it kept and
dropped (and why), the mean reward of the samples, how often the chosen reply is the longer one
and how long the replies are (on-policy rounds under a length-biased reward drift longer). It is
read from what the round's stages wrote (stage_complete.json, reproducibility.json), so it says
what happened, and is written again after each of the round's stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simpo_cli.outputs import StageDir
from simpo_cli.recipe import Recipe
from simpo_cli.redact import redact
from simpo_cli.run.instances import (
    StageInstance,
    model_label,
    model_path,
    reference_text,
    round_start,
)

RECORD = "round.json"
SUMMARY = "rounds.json"


def round_record(recipe: Recipe, stages: list[StageInstance], out: Path) -> dict[str, Any]:
    """The record of one round from its stage instances (generate, annotate, preference)."""
    by_kind = {instance.kind: instance for instance in stages}
    round_ = stages[0].round
    assert round_ is not None and recipe.rounds is not None
    seen = stages[0].recipe  # the round's recipe: its overrides applied
    start = round_start(recipe, round_)
    done = {kind: _read(out / i.folder, "stage_complete.json") for kind, i in by_kind.items()}
    sampled = _read(out / by_kind["generate"].folder, "reproducibility.json")
    reward = seen.stage("annotate").reward
    record: dict[str, Any] = {
        "round": round_,
        "of": recipe.rounds.count,
        "stages": {kind: "finished" if done[kind] else "not finished" for kind in by_kind},
        "start_model": model_label(recipe, start),
        # What the generate stage sampled from, as it recorded it (the plan's until it has).
        "start_model_path": sampled.get("start_model") or model_path(recipe, start, out),
        "reference": reference_text(by_kind["preference"]),
        "prompts": done["generate"].get("prompt_slice")
        or {"mode": recipe.rounds.prompts, "slice": round_, "of_slices": recipe.rounds.count},
        "reward": f"model {reward.model}" if reward.model else f"function {reward.function}",
    }
    train = done["generate"].get("train") or {}
    if train:
        record["samples"] = train.get("samples")
        record["mean_reply_tokens"] = train.get("mean_tokens")
    report = done["annotate"].get("report") or {}
    if report:
        dropped = report.get("dropped") or {}
        record |= {
            "reward_mean": report.get("score_mean"),
            "pairs_kept": report.get("pairs"),
            "pairs_dropped": sum(dropped.values()),
            "dropped": dropped,
            "chosen_longer": report.get("chosen_longer"),
        }
    trained = done["preference"]
    if trained:
        folder = out / by_kind["preference"].folder
        record["model"] = str(folder.resolve())
        record["global_step"] = trained.get("global_step")
        if "greedy_eval" in trained:  # annotate.greedy_eval: held-out prompts, before and after
            before = _read(folder, "greedy_before.json")
            record["greedy_eval"] = {"before": before or None, "after": trained["greedy_eval"]}
    return record


def write_records(recipe: Recipe, every: list[StageInstance], out: Path) -> list[dict[str, Any]]:
    """Write the record of every round that has started (round.json in its folder) and all of
    them in DIR/rounds.json; returns them. Main process only."""
    records = []
    for round_ in range(1, (recipe.rounds.count if recipe.rounds else 0) + 1):
        stages = [i for i in every if i.round == round_]
        folder = out / f"round-{round_}"
        if not stages or not folder.is_dir():
            continue
        record = round_record(recipe, stages, out)
        StageDir(folder).write_json(RECORD, record)
        records.append(record)
    if records:
        (out / SUMMARY).write_text(json.dumps(redact({"rounds": records}), indent=2) + "\n")
    return records


def summary_lines(records: list[dict[str, Any]], out: Path) -> list[str]:
    """The rounds side by side, for the end of a command that ran rounds."""
    header = (
        "round", "start model", "prompts", "reward mean", "pairs kept/dropped",
        "chosen longer", "reply tokens", "reference",
    )  # fmt: skip
    rows = [header]
    for r in records:
        prompts = r["prompts"]
        rows.append(
            (
                f"{r['round']}/{r['of']}",
                r["start_model"],
                f"{prompts['first']}-{prompts['last']} of {prompts['of']}"
                if "first" in prompts
                else "not sampled yet",
                _number(r.get("reward_mean")),
                f"{r['pairs_kept']}/{r['pairs_dropped']}" if "pairs_kept" in r else "-",
                _share(r.get("chosen_longer")),
                _number(r.get("mean_reply_tokens")),
                r["reference"],
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
    lines = [f"rounds ({out / SUMMARY}):"]
    for row in rows:
        cells = [f"{cell:<{width}}" for cell, width in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[-1]]))
    rewards = list(dict.fromkeys(r["reward"] for r in records))
    lines.append(f"  scored by: {'; '.join(rewards)}")
    return lines


def _number(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or value != value else f"{value:.4g}"


def _share(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or value != value else f"{value:.1%}"


def _read(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}
