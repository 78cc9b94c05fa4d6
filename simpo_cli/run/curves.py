"""Training curves from the metrics.jsonl files of a run, as one PNG.

One row per stage: the training loss (with held-out loss points), and for a preference stage
the reward accuracy and margin, training and held-out. matplotlib is optional
(`pip install 'simpo-cli[plot]'`).
"""

from __future__ import annotations

import json
from pathlib import Path

from simpo_cli.errors import UserError


def stage_dirs(run: Path) -> list[Path]:
    """The stage folders of a run folder, in pipeline order, or the folder itself if it is one."""
    if (run / "metrics.jsonl").is_file():
        return [run]
    found = [p for p in (run / "sft", run / "preference") if (p / "metrics.jsonl").is_file()]
    if not found:
        raise UserError(f"{run}: no metrics.jsonl here or in its sft/ and preference/ folders")
    return found


def _series(logs: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in logs if key in m]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run: Path, output: Path | None = None) -> Path:
    """Draw the run's curves into `output` (default: RUN/training_curves.png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(
            "simpo plot needs matplotlib: pip install 'simpo-cli[plot]' (or pip install matplotlib)"
        ) from None
    stages = stage_dirs(run)
    panels = [
        ("loss", "loss", "eval_loss"),
        ("reward accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
        ("reward margin", "rewards/margins", "eval_rewards/margins"),
    ]
    fig, axes = plt.subplots(len(stages), 3, figsize=(13, 3.4 * len(stages)), squeeze=False)
    for row, stage in zip(axes, stages, strict=True):
        logs = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines() if x]
        for ax, (title, train_key, eval_key) in zip(row, panels, strict=True):
            steps, values = _series(logs, train_key)
            eval_steps, eval_values = _series(logs, eval_key)
            if not steps and not eval_steps:
                ax.set_axis_off()
                continue
            ax.plot(steps, values, ".-", label="training", color="tab:blue")
            ax.plot(eval_steps, eval_values, "o", label="held-out", color="tab:orange")
            ax.set_title(f"{stage.name}: {title}")
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    target = output or (run / "training_curves.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
