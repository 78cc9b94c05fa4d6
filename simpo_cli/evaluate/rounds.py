"""The rounds of an iterative run side by side (`rounds:`): each checkpoint of the evaluate stage
(sft, round-1, ..., round-k) answers the held-out prompts (generate.eval_prompts) greedily, the
recipe's reward (the annotate stage's model or function) scores the answers, and each round's
answers are compared with the previous row's and the first row's (the rounds' start, SFT) as
winrate.py compares benchmark answers: a win when its reward is above the opponent's on the same
prompt, half a win on an exact tie.

Per checkpoint, checkpoints/<label>/held_out.json holds the answers and their rewards; the
numbers go into the comparison table (held-out reward, success, reply tokens, win rates) and
into rounds.json, and rounds.png plots reward, win rate and reply length by round: a reward
that favours long replies shows as a length that climbs with the round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simpo_cli.data import load_tokenizer
from simpo_cli.distributed import is_main_process
from simpo_cli.evaluate import winrate
from simpo_cli.model.load import load_checkpoint
from simpo_cli.onpolicy.annotate import greedy_replies
from simpo_cli.onpolicy.rewards import Scorer
from simpo_cli.recipe import ModelSettings, Recipe

ANSWERS = "held_out.json"
SUMMARY = "rounds.json"
PLOT = "rounds.png"
# The opponents each row is compared with, as comparison columns name them.
OPPONENTS = ("previous", "first")
# rounds.png's panels, left to right (rounds.json lists them).
PANELS = (
    "held-out greedy answers: reward",
    "win rate (recipe's reward)",
    "reply length (tokens)",
)


def held_out(
    recipe: Recipe, model_dir: str, dtype: str, scorer: Scorer, work: Path
) -> dict[str, Any]:
    """One checkpoint's greedy answers to the held-out prompts, scored; their summary with the
    answers under "replies" (dropped from the comparison files), also written to
    work/held_out.json (main process)."""
    tokenizer = load_tokenizer(ModelSettings(name_or_path=model_dir))
    model = load_checkpoint(model_dir, dtype)
    replies = greedy_replies(recipe, model, tokenizer, scorer)
    del model
    n = len(replies)
    summary: dict[str, Any] = {
        "prompts": n,
        "mean_reward": sum(r["reward"] for r in replies) / n,
        "mean_tokens": sum(r["tokens"] for r in replies) / n,
        "mean_chars": sum(len(r["text"]) for r in replies) / n,
    }
    success = recipe.annotate.success_reward if recipe.annotate is not None else None
    if success is not None:
        summary["success"] = sum(r["reward"] >= success for r in replies) / n
    if is_main_process():
        work.mkdir(parents=True, exist_ok=True)
        payload = {"summary": summary, "replies": replies}
        (work / ANSWERS).write_text(json.dumps(payload, indent=2) + "\n")
    return summary | {"replies": replies}


def win_rate(mine: list[dict], theirs: list[dict], opponent: str) -> dict[str, Any]:
    """The win rate of one checkpoint's held-out answers over another's (held_out's "replies",
    the same prompts in the same order), from the rewards already given: winrate.py's summary
    without its rows."""
    records, scores = [], []
    for a, b in zip(mine, theirs, strict=True):
        assert a["prompt_id"] == b["prompt_id"]
        samples = [{"text": a["text"], "side": "model"}, {"text": b["text"], "side": "opponent"}]
        records.append(
            {"prompt_id": a["prompt_id"], "question_id": a["prompt_id"], "turn": 1,
             "prompt": a["prompt"], "samples": samples}
        )  # fmt: skip
        scores.append([a["reward"], b["reward"]])
    summary = winrate.summarize_win_rates(records, scores, opponent)
    return {k: v for k, v in summary.items() if k not in ("rows", "note")}


def compare_rounds(results: dict[str, dict[str, Any]]) -> None:
    """Add to each row after the first its held-out win rates over the previous row and over the
    first (results: label -> entry with "held_out", in row order)."""
    labels = [label for label, entry in results.items() if entry.get("held_out")]
    for i, label in enumerate(labels[1:], start=1):
        entry = results[label]["held_out"]
        for name, opponent in zip(OPPONENTS, (labels[i - 1], labels[0]), strict=True):
            theirs = results[opponent]["held_out"]["replies"]
            entry[f"win_rate_vs_{name}"] = win_rate(entry["replies"], theirs, opponent)


def write_rounds(recipe: Recipe, results: dict[str, dict[str, Any]], output_dir: Path) -> list[str]:
    """rounds.json (one row per checkpoint: its held-out numbers and win rates) and rounds.png
    (with matplotlib) in output_dir; returns the paths written."""
    reward = recipe.annotate.reward if recipe.annotate is not None else None
    rows = [
        {
            "checkpoint": label,
            "name": label.removeprefix(f"{recipe.name}-"),  # sft, round-1, ...
            **{k: v for k, v in entry["held_out"].items() if k != "replies"},
        }
        for label, entry in results.items()
        if entry.get("held_out")
    ]
    scored_by = (
        f"model {reward.model}" if reward and reward.model else f"function {reward.function}"
        if reward else None
    )  # fmt: skip
    payload = {"reward": scored_by, "greedy": True, "rows": rows}
    path = output_dir / SUMMARY
    plot = plot_rounds(rows, output_dir / PLOT)
    if plot is not None:
        payload["plot"] = {"file": PLOT, "panels": list(PANELS)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return [str(path)] + ([str(plot)] if plot else [])


def plot_rounds(rows: list[dict[str, Any]], output: Path) -> Path | None:
    """Three panels by checkpoint (round): held-out reward (and success), win rates over the
    previous row and the first, reply length. None without matplotlib or rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    names = [row.get("name", row["checkpoint"]) for row in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(13.8, 4))
    reward, wins, length = axes
    reward.plot(x, [row["mean_reward"] for row in rows], marker="o", label="mean reward")
    if all("success" in row for row in rows):
        reward.plot(x, [row["success"] for row in rows], marker="s", label="success")
    reward.set_title(PANELS[0])
    for name in OPPONENTS:
        key = f"win_rate_vs_{name}"
        points = [(i, row[key]["win_rate"]) for i, row in enumerate(rows) if key in row]
        if points:
            wins.plot(*zip(*points, strict=True), marker="o", label=f"vs {name} row")
    wins.axhline(0.5, color="gray", lw=0.8, ls="--")
    wins.set_ylim(0, 1)
    wins.set_title(PANELS[1])
    length.plot(x, [row["mean_tokens"] for row in rows], marker="o", color="C3")
    length.set_title(PANELS[2])
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
