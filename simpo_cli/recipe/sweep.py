"""Sweeps: the `sweep:` section, the `--grid KEY=V1,V2,...` flags that write it, and the names
of a sweep's points.

A sweep trains the recipe once per point of a grid (the cartesian product of every key's
values), in phases: phase k's grid is applied on top of the best point of phase k-1 (the SimPO
authors tune the learning rate first, then gamma/beta, then beta). `metric` names the number
that picks the best. Each point's recipe is the recipe with `--set KEY=VALUE` for each of its
values, validated like any other (run/sweep.py builds and runs them).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from simpo_cli.errors import UserError
from simpo_cli.recipe.common import PositiveInt, Section

# The preference stage's held-out reward accuracy, as it records it in stage_complete.json.
DEFAULT_METRIC = "eval_rewards/accuracies"


class SweepPhase(Section):
    """One grid: every combination of its keys' values is a point."""

    grid: dict[str, list[Any]] = Field(
        description="Recipe keys (dotted, as --set writes them) and the values to try: "
        "{preference.training.learning_rate: [3.0e-7, 5.0e-7, 1.0e-6]}."
    )

    @field_validator("grid")
    @classmethod
    def _not_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not grid:
            raise ValueError("no keys; give at least one key with its values")
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key}: no values; list one or more, e.g. [0.3, 0.5]")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"{key}: {values} lists a value twice; list each once")
        return grid


class SweepSettings(Section):
    """`simpo sweep`: train one point per combination of values, phase after phase."""

    phases: list[SweepPhase] = Field(
        default_factory=list,
        description="Grids in order; each phase after the first starts from the best point of "
        "the phase before. --grid flags replace this list with one phase.",
    )
    metric: str = Field(
        DEFAULT_METRIC,
        description="What picks the best point: a key of the preference stage's held-out "
        "numbers (eval_rewards/accuracies, eval_loss, ...) or a column of the evaluate stage's "
        "table for the point's preference model (alpaca_eval/exact_match, reward_accuracy, ...).",
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="Best is the highest (max) or lowest (min); default: min for a metric "
        "whose name ends in 'loss', else max.",
    )  # fmt: skip
    max_rows: PositiveInt | None = Field(
        None,
        description="Train each point's preference stage on at most this many pairs (a quick "
        "scan); the report says so, and the best point's command trains on all of them.",
    )

    @property
    def goal(self) -> Literal["max", "min"]:
        """max or min, the default resolved."""
        if self.mode is not None:
            return self.mode
        return "min" if self.metric.endswith("loss") else "max"


def parse_grid(flags: list[str]) -> dict[str, list[Any]]:
    """`--grid KEY=V1,V2,...` flags as one grid: {KEY: [V1, V2, ...]}, each value parsed as YAML
    (so 0.5 is a number; [a, b] a list). One line (UserError) for a flag without `=` or values,
    or a key given twice."""
    grid: dict[str, list[Any]] = {}
    for text in flags:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(
                f"--grid {text}: expected KEY=V1,V2,..., e.g. --grid "
                "preference.training.learning_rate=3e-7,5e-7,1e-6"
            )
        if not raw.strip():
            raise UserError(f"--grid {text}: no values; give V1,V2,... after the =")
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError:
            raise UserError(
                f"--grid {text}: the values are not a comma-separated list; quote a value that "
                "holds commas or brackets"
            ) from None
        if key in grid:
            raise UserError(f"--grid {text}: {key} is given twice; give each key once")
        grid[key] = values
    return grid


def set_text(key: str, value: Any) -> str:
    """The `--set KEY=VALUE` override of one value (JSON is YAML: --set reads it back as is)."""
    return f"{key}={json.dumps(value)}"


def short_names(keys: list[str]) -> dict[str, str]:
    """A short, readable name for each swept key, for point folder names: its last part, a name
    of several words as their initials (learning_rate: lr, gamma_beta_ratio: gbr); where two keys
    would share one, the stage's name before it (sft.lr, preference.lr)."""

    def short(part: str) -> str:
        words = [w for w in part.split("_") if w]
        return "".join(w[0] for w in words) if len(words) > 1 else part

    first = {key: short(key.split(".")[-1]) for key in keys}
    taken = list(first.values())
    return {
        key: f"{key.split('.')[0]}.{name}" if taken.count(name) > 1 and "." in key else name
        for key, name in first.items()
    }


def value_text(value: Any) -> str:
    """A value as a point's name shows it: numbers as %g (5e-07, 0.5), others as YAML."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def point_name(values: dict[str, Any], short: dict[str, str]) -> str:
    """A point's folder name from its values: lr=5e-07_gbr=0.5 (characters other than letters,
    digits and . _ + - = , become -)."""
    text = "_".join(f"{short[key]}={value_text(value)}" for key, value in values.items())
    return re.sub(r"[^A-Za-z0-9._+\-=,]", "-", text)
