"""What a sweep did: each point's record (DIR/sweep/<point>/point.json) and the report of all of
them, DIR/sweep/report.{md,csv,json} and report.png, printed as a table at the end with the
command that trains the best point on the full data.

A point's numbers are read from what its stages wrote (like the rounds' records, run/rounds.py):
the held-out numbers of its last training stage (stage_complete.json "eval"), its last logged
training loss (metrics.jsonl), and the evaluate stage's table row of its model when the
pipeline evaluates. Its record holds what the stages cannot say: its phase and values, whether
it finished or failed (and the error), and the seconds spent on it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpo_cli.outputs import StageDir
from simpo_cli.recipe import TRAINING_STAGES, value_text
from simpo_cli.redact import redact, redact_args

if TYPE_CHECKING:  # run/sweep.py imports this module
    from simpo_cli.run.sweep import Point, Sweep

RECORD = "point.json"
REPORT = "report"  # DIR/sweep/report.md, .csv, .json, .png


def read_record(out: Path, point: Point) -> dict[str, Any]:
    path = out / point.folder / RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def write_record(sweep: Sweep, point: Point, status: str, error: str | None, seconds: float):
    """The point's record: status is running, finished, failed (with its error) or stopped."""
    record = {
        "phase": point.phase,
        "point": point.name,
        "values": point.values,
        "status": status,
        "error": error,
        "seconds": round(seconds, 1),
        "max_rows": sweep.settings.max_rows,
    }
    folder = StageDir(sweep.out / point.folder)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_json(RECORD, record)


def numbers(sweep: Sweep, point: Point) -> dict[str, Any]:
    """The point's numbers from its stage folders: the last training stage's held-out numbers
    (eval_...), its last logged training loss (train_loss), and its evaluate-table columns."""
    recipe, out = point.recipe, sweep.out
    found: dict[str, Any] = {}
    trained = [kind for kind in recipe.pipeline if kind in TRAINING_STAGES]
    if trained:
        folder = out / recipe.final_folder(trained[-1])
        done = _read(folder / "stage_complete.json")
        found |= {k: v for k, v in (done.get("eval") or {}).items() if isinstance(v, float | int)}
        losses = [row["loss"] for row in _jsonl(folder / "metrics.jsonl") if "loss" in row]
        if losses:
            found["train_loss"] = losses[-1]
        if "evaluate" in recipe.pipeline:
            table = _read(out / recipe.final_folder("evaluate") / "stage_complete.json")
            label = f"{recipe.name}-{trained[-1]}"
            row = next((r for r in table.get("rows") or [] if r.get("checkpoint") == label), {})
            found |= {k: v for k, v in row.items() if k != "checkpoint" and v is not None}
    return found


def metric_value(sweep: Sweep, point: Point) -> float | None:
    """The point's value of the sweep's metric; None before it has finished, or where its
    evaluation did not produce it (a NaN counts as missing: it cannot be compared)."""
    metric = sweep.settings.metric
    found = numbers(sweep, point)
    value = found.get(metric)
    if value is None:  # a win-rate column named without its opponent: `alpaca_eval/win_rate vs `
        value = next((v for k, v in found.items() if k.startswith(metric)), None)
    if not isinstance(value, float | int) or math.isnan(value):
        return None
    return float(value)


def best_point(sweep: Sweep, points: list[Point]) -> Point | None:
    """The finished point with the best metric (the first in grid order on a tie), or None."""
    scored = [
        (value, index, point)
        for index, point in enumerate(points)
        if read_record(sweep.out, point).get("status") == "finished"
        and (value := metric_value(sweep, point)) is not None
    ]
    if not scored:
        return None
    sign = -1 if sweep.settings.goal == "max" else 1
    return min(scored, key=lambda item: (sign * item[0], item[1]))[2]


def write_report(sweep: Sweep, points: list[Point]) -> int:
    """Write DIR/sweep/report.{md,csv,json} (and report.png with matplotlib), print the table
    and the command that trains the best point on the full data. Returns the failed points."""
    rows = _rows(sweep, points)
    folder = sweep.out / "sweep"
    best = next((row for row in rows if row["metric"] is not None), None)
    best_point_ = next((p for p in points if best and p.name == best["point"]), None)
    command = _best_command(sweep, best_point_) if best_point_ is not None else None
    table = _table(sweep, rows)
    head = _head(sweep)
    lines = [f"# Sweep of {sweep.recipe.name}", "", *head, "", *table]
    if command:
        lines += ["", f"Best: `{best['point']}`. Train it on the full data:", "", "```",
                  command, "```"]  # fmt: skip
    (folder / f"{REPORT}.md").write_text("\n".join(lines) + "\n")
    _write_csv(folder / f"{REPORT}.csv", sweep, rows)
    payload = {
        "recipe": sweep.recipe.name,
        "metric": sweep.settings.metric,
        "mode": sweep.settings.goal,
        "max_rows": sweep.settings.max_rows,
        "shared": sweep.shared_kinds,
        "best": {"point": best["point"], "values": best["values"], "command": command}
        if best
        else None,
        "points": rows,
    }
    (folder / f"{REPORT}.json").write_text(json.dumps(redact(payload), indent=2) + "\n")
    print("\n".join([f"sweep ({folder / REPORT}.md):", *head, *table]), flush=True)
    _plot(sweep, points, rows, folder / f"{REPORT}.png")
    if command:
        print(f"best point: {best['point']}; to train it on the full data:\n  {command}")
    missing = [r["point"] for r in rows if r["status"] == "finished" and r["metric"] is None]
    if missing:
        print(f"[sweep] {sweep.settings.metric}: not produced by the evaluation of "
              f"{', '.join(missing)}; those points are not ranked", flush=True)  # fmt: skip
    return sum(row["status"] != "finished" for row in rows)


def _rows(sweep: Sweep, points: list[Point]) -> list[dict[str, Any]]:
    """One row per point, best first: finished ones by the metric, then those without it, then
    those that failed or have not finished."""
    rows = []
    for point in points:
        record = read_record(sweep.out, point)
        status = record.get("status", "not started")
        found = numbers(sweep, point) if status == "finished" else {}
        rows.append({
            "phase": point.phase,
            "point": point.name,
            "values": point.values,
            "status": status,
            "error": record.get("error"),
            "seconds": record.get("seconds"),
            "metric": metric_value(sweep, point) if status == "finished" else None,
            "numbers": found,
        })  # fmt: skip
    sign = -1 if sweep.settings.goal == "max" else 1

    def order(row: dict[str, Any]) -> tuple:
        if row["status"] != "finished":
            return (2, 0.0)
        return (1, 0.0) if row["metric"] is None else (0, sign * row["metric"])

    return sorted(rows, key=order)  # stable: grid order among equals


def _head(sweep: Sweep) -> list[str]:
    settings = sweep.settings
    best = "highest" if settings.goal == "max" else "lowest"
    lines = [f"Best: {best} {settings.metric}. Shared stages (run once): "
             f"{', '.join(sweep.shared_kinds) or 'none'}."]  # fmt: skip
    if settings.max_rows is not None:
        lines.append(
            f"Each point trained on at most {settings.max_rows} rows per training stage "
            "(max_rows): a quick scan, not the full data."
        )
    keys = ", ".join(f"{short} = {key}" for key, short in sweep.short.items())
    lines.append(f"Keys: {keys}.")
    return lines


def _columns(sweep: Sweep) -> list[tuple[str, str]]:
    """(title, number key) of the table's number columns."""
    metric = sweep.settings.metric
    columns = [(metric, "metric")]
    if metric != "eval_rewards/accuracies":
        columns.append(("held-out reward acc", "eval_rewards/accuracies"))
    columns += [("train loss", "train_loss"), ("held-out loss", "eval_loss")]
    return columns


def _table(sweep: Sweep, rows: list[dict[str, Any]]) -> list[str]:
    """The report as a markdown table (what the command prints, too)."""
    keys = list(sweep.short)
    columns = _columns(sweep)
    header = ["point", "phase", *(sweep.short[k] for k in keys), *(t for t, _ in columns),
              "time (s)", "status"]  # fmt: skip
    body = []
    for row in rows:
        cells = [row["point"], str(row["phase"])]
        cells += [value_text(row["values"][k]) if k in row["values"] else "" for k in keys]
        for _, key in columns:
            value = row["metric"] if key == "metric" else row["numbers"].get(key)
            cells.append("" if value is None else f"{value:.4g}")
        cells.append("" if row["seconds"] is None else f"{row['seconds']:.0f}")
        status = row["status"] + (f": {_short_error(row['error'])}" if row["error"] else "")
        cells.append(status.replace("|", "/"))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(header), rule, *(line(cells) for cells in body)]


def _short_error(error: str) -> str:
    """An error as the table shows it: its stage's kind and its first clause (the report's JSON
    and CSV hold it whole): `preference: step 3: non-finite gradient norm`."""
    head, sep, rest = error.partition("] ")
    if error.startswith("[") and sep:
        error = f"{head.rpartition('/')[2].lstrip('[')}: {rest}"
    short = error.split(" (")[0].split("; ")[0]
    return short if len(short) <= 80 else short[:77] + "..."


def _write_csv(path: Path, sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    keys = list(sweep.short)
    found = sorted({k for row in rows for k in row["numbers"]})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["phase", "point", *keys, sweep.settings.metric, *found, "seconds",
                         "status", "error"])  # fmt: skip
        for row in rows:
            writer.writerow([
                row["phase"], row["point"], *(row["values"].get(k, "") for k in keys),
                row["metric"], *(row["numbers"].get(k, "") for k in found), row["seconds"],
                row["status"], row["error"] or "",
            ])  # fmt: skip


def _best_command(sweep: Sweep, point: Point) -> str:
    """`simpo train RECIPE -o DIR/best --set ...`: the best point on the full data (the --set
    of the sweep: section left out: train reads none of it)."""
    own = [text for text in sweep.sets if not text.startswith(("sweep.", "sweep="))]
    sets = [*own, *(f"{key}={value_text(v)}" for key, v in point.values.items())]
    args = ["simpo", "train", sweep.recipe_ref, "-o", str(sweep.out / "best")]
    args += [arg for text in sets for arg in ("--set", text)]
    return shlex.join(redact_args(args))


def _plot(sweep: Sweep, points: list[Point], rows: list[dict[str, Any]], path: Path) -> None:
    """report.png: one panel per phase, the metric against its values: a line for one key, a
    heatmap for two, a bar per point for more. Skipped, with a line, without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("report.png: skipped (matplotlib is not installed: pip install matplotlib)")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = {row["point"]: row["metric"] for row in rows}
    phases = sweep.settings.phases
    figure, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 4), squeeze=False)
    for number, (phase, ax) in enumerate(zip(phases, axes[0], strict=True), 1):
        mine = [p for p in points if p.phase == number]
        keys = list(phase.grid)
        value = [math.nan if metric.get(p.name) is None else metric[p.name] for p in mine]
        ax.set_title(f"phase {number}" + (f" (on phase {number - 1}'s best)" if number > 1 else ""))
        if not mine:  # a report of the phases so far (a SLURM phase's report job, a stop)
            ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        if len(keys) == 1:
            xs = [p.values[keys[0]] for p in mine]
            numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
            positions = xs if numeric else list(range(len(xs)))
            ax.plot(positions, value, marker="o")
            if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(positions, [value_text(x) for x in xs])
            ax.set_xlabel(keys[0])
            ax.set_ylabel(sweep.settings.metric)
        elif len(keys) == 2:
            # the values as validated (3e-4 given as text is the number 0.0003), in grid order
            first, second = (
                list(dict.fromkeys(value_text(p.values[k]) for p in mine)) for k in keys
            )
            grid = [
                [value[i * len(second) + j] for j in range(len(second))] for i in range(len(first))
            ]
            image = ax.imshow(grid, cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(first)), first)
            ax.set_xticks(range(len(second)), second)
            ax.set_ylabel(keys[0])
            ax.set_xlabel(keys[1])
            for i, row in enumerate(grid):
                for j, cell in enumerate(row):
                    text = "failed" if math.isnan(cell) else f"{cell:.3g}"
                    ax.text(j, i, text, ha="center", va="center", color="white")
            figure.colorbar(image, ax=ax, label=sweep.settings.metric)
        else:
            ax.bar(range(len(mine)), value)
            ax.set_xticks(range(len(mine)), [p.name for p in mine], rotation=60, ha="right")
            ax.set_ylabel(sweep.settings.metric)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"report plot: {path}")


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
