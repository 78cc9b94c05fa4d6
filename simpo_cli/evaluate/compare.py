"""One comparison of evaluated checkpoints: a table (markdown, CSV, JSON) and plots.

Rows are checkpoints, in the order given; columns are the numbers each evaluation produced
(checkpoints.py): pair metrics, per-benchmark judge-free proxies and reward-model win rates,
lm-eval task metrics. A column a checkpoint lacks is left empty. The plots (matplotlib, optional):
reward accuracy and margin per checkpoint, the length / average log-prob scatter of every
response with its Spearman value, each benchmark's mean answer length with the share cut at
max_new_tokens, each benchmark's win rate against answer length, and the lm-eval metrics: every
table has its plot.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

PAIR_COLUMNS = (
    ("pairs", "pairs"),
    ("reward_accuracy", "reward accuracy (untied pairs)"),
    ("reward_ties", "reward ties"),
    ("reward_margin", "reward margin"),
    ("loss", "SimPO loss"),
    ("sft_loss", "SFT loss (chosen NLL)"),
    ("beta", "beta"),
    ("spearman_length_logp", "Spearman(length, avg logp)"),
    ("mean_chosen_tokens", "chosen tokens"),
    ("mean_rejected_tokens", "rejected tokens"),
    ("implicit_reward_accuracy", "DPO implicit reward accuracy (untied pairs)"),
    ("implicit_reward_ties", "DPO implicit reward ties"),
    ("implicit_likelihood_disagreement", "implicit reward vs likelihood disagree"),
)
BENCHMARK_COLUMNS = (
    ("mean_characters", "chars"),
    ("mean_tokens", "tokens"),
    ("cut_at_max_new_tokens", "cut at max"),
)
# Only for benchmarks scored against their reference answers (`exact_match`).
EXACT_MATCH_COLUMNS = (("exact_match", "exact match"),)
WIN_RATE_COLUMNS = (("win_rate", "RM win rate"), ("soft_win_rate", "RM soft win rate"))
# With rounds (rounds.py): greedy answers to the held-out prompts under the recipe's reward, and
# each row's win rate over the previous row and the first.
HELD_OUT_COLUMNS = (
    ("held_out_reward", "held-out reward"),
    ("held_out_success", "held-out success"),
    ("held_out_tokens", "held-out reply tokens"),
    ("win_rate_vs_previous", "held-out win rate vs previous row"),
    ("win_rate_vs_first", "held-out win rate vs first row"),
)
# How a cell reads: counts as whole numbers, settings as given, mean lengths to one decimal,
# rates, margins and losses to four.
COUNTS = ("pairs",)
SETTINGS = ("beta",)
MEAN_LENGTHS = (
    "mean_chosen_tokens", "mean_rejected_tokens", "mean_characters", "mean_tokens",
    "held_out_tokens",
)  # fmt: skip


def comparison_rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict]]:
    """(column names, one row per checkpoint): {column: value or None}."""
    columns: list[str] = ["checkpoint"]
    rows: list[dict[str, Any]] = []

    def put(row: dict, column: str, value: Any) -> None:
        if column not in columns:
            columns.append(column)
        row[column] = value

    for label, entry in results.items():
        row: dict[str, Any] = {"checkpoint": label}
        pairs = entry.get("pairs") or {}
        for key, _ in PAIR_COLUMNS:
            if key in pairs:
                put(row, key, pairs[key])
        for bench, numbers in (entry.get("benchmarks") or {}).items():
            for key, _ in BENCHMARK_COLUMNS:
                put(row, f"{bench}/{key}", numbers.get(key))
            for key, _ in EXACT_MATCH_COLUMNS:
                if key in numbers:
                    put(row, f"{bench}/{key}", numbers[key])
            win = numbers.get("win_rate") or {}
            for key, _ in WIN_RATE_COLUMNS:
                if key in win:
                    put(row, f"{bench}/{key} vs {win.get('opponent', '?')}", win[key])
        held_out = entry.get("held_out") or {}
        if held_out:
            numbers = {
                "held_out_reward": held_out["mean_reward"],
                "held_out_success": held_out.get("success"),
                "held_out_tokens": held_out["mean_tokens"],
            } | {
                f"win_rate_vs_{name}": (held_out.get(f"win_rate_vs_{name}") or {}).get("win_rate")
                for name in ("previous", "first")
            }
            for key, value in numbers.items():
                put(row, key, value)
        for task, metrics in (entry.get("lm_eval") or {}).items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr"):
                    put(row, f"{task}/{metric}", value)
        rows.append(row)
    # Pair columns first, in PAIR_COLUMNS order, whichever checkpoint brought them in.
    order = {key: i for i, (key, _) in enumerate(PAIR_COLUMNS + HELD_OUT_COLUMNS)}
    columns = ["checkpoint"] + sorted(
        columns[1:], key=lambda c: (0, order[c]) if c in order else (1, columns.index(c))
    )
    return columns, [{c: row.get(c) for c in columns} for row in rows]


def _title(column: str) -> str:
    names = dict(PAIR_COLUMNS) | dict(BENCHMARK_COLUMNS) | dict(HELD_OUT_COLUMNS)
    bench, _, key = column.partition("/")
    if not key:
        return names.get(column, column)
    for name, title in (*BENCHMARK_COLUMNS, *EXACT_MATCH_COLUMNS, *WIN_RATE_COLUMNS):
        if key == name or key.startswith(name + " vs "):
            return f"{bench} {title}{key[len(name) :]}"
    return column


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "nan"
    key = column.partition("/")[2] or column
    if key in COUNTS:
        return str(round(value))
    if key in SETTINGS:
        return f"{value:g}"
    if key in MEAN_LENGTHS:
        return f"{value:.1f}"
    return f"{value:.4f}"


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(_title(c) for c in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_comparison(results: dict[str, dict[str, Any]], output_dir: Path) -> list[str]:
    """comparison.md, .csv, .json (and comparison.png when matplotlib is installed) in
    output_dir; returns the paths written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    columns, rows = comparison_rows(results)
    md = output_dir / "comparison.md"
    note = (
        "Judge-free numbers: answer lengths and reward-model win rates are proxies, not the "
        "benchmarks' GPT-4 judges.\n"
    )
    md.write_text(markdown_table(columns, rows) + ("\n" + note if _has_benchmarks(rows) else ""))
    with (output_dir / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: _csv(c, row[c]) for c in columns} for row in rows)
    details = {
        label: {k: _without_points(v) for k, v in entry.items()} for label, entry in results.items()
    }
    payload = {"columns": columns, "rows": rows, "checkpoints": details}
    (output_dir / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n")
    files = [str(output_dir / f"comparison.{ext}") for ext in ("md", "csv", "json")]
    plot = plot_comparison(results, output_dir / "comparison.png")
    return files + ([str(plot)] if plot else [])


def _has_benchmarks(rows: list[dict]) -> bool:
    from simpo_cli.evaluate.benchmarks import BENCHMARKS

    return any(column.split("/")[0] in BENCHMARKS for row in rows for column in row)


def _csv(column: str, value: Any) -> Any:
    """Full precision, except counts, which are whole numbers."""
    if isinstance(value, float) and (column.partition("/")[2] or column) in COUNTS:
        return round(value)
    return "" if value is None else value


def _without_points(value: Any) -> Any:
    """Without the plot's points and the held-out answers (in their own files)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("points", "replies")}
    return value


def plot_comparison(results: dict[str, dict[str, Any]], output: Path) -> Path | None:
    """The comparison's plots in one PNG; None when matplotlib is missing or nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = list(results)
    pairs = {k: e["pairs"] for k, e in results.items() if e.get("pairs")}
    wins = [
        (label, bench, numbers["mean_characters"], numbers["win_rate"]["win_rate"])
        for label, entry in results.items()
        for bench, numbers in (entry.get("benchmarks") or {}).items()
        if numbers.get("win_rate")
    ]
    answers = [
        (label, bench, numbers["mean_tokens"], numbers["cut_at_max_new_tokens"])
        for label, entry in results.items()
        for bench, numbers in (entry.get("benchmarks") or {}).items()
    ]
    tasks = [
        (label, f"{task}/{metric}", value)
        for label, entry in results.items()
        for task, metrics in (entry.get("lm_eval") or {}).items()
        for metric, value in metrics.items()
        if not metric.endswith("_stderr") and isinstance(value, (int, float))
    ]
    panels = (
        (["accuracy", "margin", "scatter"] if pairs else [])
        + (["answers"] if answers else [])
        + (["wins"] if wins else [])
        + (["lm_eval"] if tasks else [])
    )
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel in ("accuracy", "margin"):
            key = "reward_accuracy" if panel == "accuracy" else "reward_margin"
            names = list(pairs)
            # An accuracy over no untied pair reads "identical": no bar.
            values = [pairs[n][key] if not isinstance(pairs[n][key], str) else 0 for n in names]
            ax.bar(names, values, color=[colors[n] for n in names])
            ax.set_title(f"held-out pairs: reward {panel}")
            ax.tick_params(axis="x", labelrotation=20)
            if panel == "accuracy":
                ax.set_ylim(0, 1)
                ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        elif panel == "scatter":
            for name, numbers in pairs.items():
                points = numbers["points"]
                rho = numbers["spearman_length_logp"]
                ax.scatter(
                    points["tokens"], points["logps"], s=8, alpha=0.5, color=colors[name],
                    label=f"{name} (Spearman {rho:.2f})",
                )  # fmt: skip
            ax.set_xlabel("response length (tokens)")
            ax.set_ylabel("average log-prob")
            ax.set_title("length vs likelihood")
            ax.legend(fontsize=7)
        elif panel == "answers":
            names = [f"{label}\n{bench}" for label, bench, _, _ in answers]
            heights = [tokens for _, _, tokens, _ in answers]
            bars = ax.bar(names, heights, color=[colors[label] for label, *_ in answers])
            for bar, (*_, cut) in zip(bars, answers, strict=True):
                ax.annotate(f"{cut:.0%} cut", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)  # fmt: skip
            ax.set_ylabel("mean answer length (tokens)")
            ax.set_title("benchmark answers (share cut at max_new_tokens)")
            ax.tick_params(axis="x", labelsize=7)
        elif panel == "lm_eval":
            names = [f"{label}\n{metric}" for label, metric, _ in tasks]
            ax.bar(names, [value for *_, value in tasks], color=[colors[t[0]] for t in tasks])
            ax.set_ylabel("lm-eval metric")
            ax.set_title("lm-eval tasks")
            ax.tick_params(axis="x", labelsize=7)
        else:
            for label, bench, chars, rate in wins:
                ax.scatter([chars], [rate], color=colors[label])
                ax.annotate(f"{label} ({bench})", (chars, rate), fontsize=7)
            ax.set_xlabel("mean answer length (characters)")
            ax.set_ylabel("reward-model win rate (proxy)")
            ax.set_ylim(0, 1)
            ax.set_title("win rate vs length")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
