"""Training curves from the metrics.jsonl files of a run, as one PNG.

One row per stage: the training loss (with held-out loss points), and for a preference stage
the reward accuracy and margin, training and held-out; only the panels a stage logged, each with
its axes labelled. matplotlib is optional
(`pip install 'simpo-cli[plot]'`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from simpo_cli.errors import UserError


def stage_dirs(run: Path) -> list[Path]:
    """The stage folders of a run folder, in pipeline order, or the folder itself if it is one."""
    if (run / "metrics.jsonl").is_file():
        return [run]
    numbered = [(p.parent.name.removeprefix("round-"), p) for p in run.glob("round-*/preference")]
    rounds = [p for _, p in sorted((int(n), p) for n, p in numbered if n.isdigit())]
    found = [
        p for p in (run / "sft", run / "preference", *rounds) if (p / "metrics.jsonl").is_file()
    ]
    if not found:
        raise UserError(
            f"{run}: no metrics.jsonl here or in its sft/, preference/ and round-*/preference/ "
            "folders"
        )
    return found


def _label(stage: Path) -> str:
    """preference, or round-2/preference for a round's stage."""
    in_round = re.fullmatch(r"round-\d+", stage.parent.name) is not None
    return f"{stage.parent.name}/{stage.name}" if in_round else stage.name


def _series(logs: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in logs if key in m]
    return [s for s, _ in points], [v for _, v in points]


PANELS = [  # (title and y-axis label, training key, held-out key)
    ("loss", "loss", "eval_loss"),
    ("reward accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
    ("reward margin", "rewards/margins", "eval_rewards/margins"),
]


def plot_run(run: Path, output: Path | None = None) -> Path:
    """Draw the run's curves into `output` (default: RUN/training_curves.png)."""
    plt = _pyplot()
    fig = curves_figure(stage_dirs(run))
    target = output or (run / "training_curves.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(
            "simpo plot needs matplotlib: pip install 'simpo-cli[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def curves_figure(stages: list[Path]):
    """One row per stage with one panel per curve it logged (an SFT stage: its loss alone, as
    wide as the row), each axis labelled."""
    plt = _pyplot()
    logs = {
        stage: [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines() if x]
        for stage in stages
    }
    drawn = {
        stage: [panel for panel in PANELS if any(k in m for m in logs[stage] for k in panel[1:])]
        for stage in stages
    }
    stages = [stage for stage in stages if drawn[stage]]
    if not stages:  # a run stopped before its first logging step
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no loss or reward logged yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    fig = plt.figure(figsize=(13, 3.4 * len(stages)), layout="constrained")
    rows = fig.subfigures(len(stages), 1, squeeze=False)[:, 0]
    for row, stage in zip(rows, stages, strict=True):
        axes = row.subplots(1, len(drawn[stage]), squeeze=False)[0]
        for ax, (title, train_key, eval_key) in zip(axes, drawn[stage], strict=True):
            steps, values = _series(logs[stage], train_key)
            eval_steps, eval_values = _series(logs[stage], eval_key)
            if steps:
                ax.plot(steps, values, ".-", label="training", color="tab:blue")
            if eval_steps:
                ax.plot(eval_steps, eval_values, "o", label="held-out", color="tab:orange")
            ax.set_title(f"{_label(stage)}: {title}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            ax.legend()
    return fig
