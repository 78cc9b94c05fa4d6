"""Iterative on-policy rounds: the `rounds:` section, its per-round overrides, and how the prompts
are split between rounds.

A recipe with `rounds: {count: N}` runs its generate -> annotate -> preference stages N times:
round r samples from, and trains further, round r-1's preference model (round 1: the model of
the stage before the loop). Each round's stages see the recipe with that round's entry of
`rounds.overrides` applied; load.py builds those recipes, and run/instances.py the stage
instances in DIR/round-<r>/<stage>.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field

from simpo_cli.recipe.common import PositiveInt, Section, StageName

# The stages a round repeats, in order; the rest of the pipeline runs once around them.
ROUND_STAGES: tuple[StageName, ...] = ("generate", "annotate", "preference")


class RoundsSettings(Section):
    """Repeat generate -> annotate -> preference, each round starting from the last one's model."""

    count: PositiveInt = Field(description="Rounds of generate -> annotate -> preference.")
    prompts: Literal["split", "all"] = Field(
        "split",
        description="'split': disjoint slices of generate.prompts, one per round (in source "
        "order, the first len % count slices one prompt longer); 'all': every prompt each round.",
    )
    reference: Literal["initial", "previous"] = Field(
        "initial",
        description="Reference model of DPO-family losses (dpo, ipo, rdpo, kto) from round 2 on: "
        "the model round 1 started from, or the round's own start (the previous round's model). "
        "SimPO has none.",
    )
    overrides: list[dict[str, Any]] = Field(
        default_factory=list,
        description="One mapping per round, in order (entry 0: round 1), of generate, annotate "
        "or preference keys to change in that round, dotted or nested: "
        "[{}, {preference.training.learning_rate: 5.0e-7}].",
    )


def round_folder(round_: int, kind: str) -> str:
    """The folder of a round's stage under the output directory: round-2/preference."""
    return f"round-{round_}/{kind}"


def slice_bounds(prompts: int, count: int, round_: int) -> tuple[int, int]:
    """[start, stop) of round `round_`'s prompts (1-based round) when `prompts` prompts are split
    into `count` contiguous slices in source order: disjoint, covering them all, the first
    prompts % count slices one prompt longer (as the processes of a launch share them)."""
    size, extra = divmod(prompts, count)
    index = round_ - 1
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def split_problem(prompts: int, count: int) -> str | None:
    """What is wrong with splitting `prompts` prompts into `count` rounds, or None."""
    if prompts >= count:
        return None
    return (
        f"rounds.count: {count} rounds cannot each have their own slice of {prompts} prompt(s) "
        f"(rounds.prompts: split); set rounds.count to {prompts} or less, give more prompts, or "
        "set rounds.prompts: all"
    )


def expand_override(entry: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """A round's override as a nested mapping of recipe sections ({preference: {training: {...}}})
    from dotted keys, nested ones or both; and one problem line per key that is not a generate,
    annotate or preference key (named `where`.key as the user wrote it)."""
    if entry is None:
        return {}, []
    if not isinstance(entry, dict):
        return {}, [
            f"{where}: {entry!r} is not a mapping; give one mapping of keys per round, e.g. "
            "{preference.training.learning_rate: 5.0e-7} ({} for no change)"
        ]
    nested: dict[str, Any] = {}
    problems = []
    for key, value in copy.deepcopy(entry).items():
        parts = str(key).split(".")
        if parts[0] not in ROUND_STAGES:
            what = (
                "is a stage outside the rounds' loop"
                if parts[0] in ("sft", "evaluate")
                else "is not a stage the rounds repeat"
            )
            problems.append(
                f"{where}.{key}: {parts[0]} {what}; rounds repeat "
                f"{', '.join(ROUND_STAGES)}: override their keys here, and set the others in "
                "their own sections"
            )
            continue
        if any(not part for part in parts):
            problems.append(f"{where}.{key}: empty part in the key; write e.g. preference.beta")
            continue
        node = nested
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            merge_into(node[leaf], value)
        else:
            node[leaf] = value
    return nested, problems


def merge_into(target: dict[str, Any], update: dict[str, Any]) -> None:
    """Merge `update` into `target` in place, mapping into mapping; other values replace. A data
    source written as a bare path (`train: x.jsonl`) takes keys as {path: x.jsonl}."""
    for key, value in update.items():
        here = target.get(key)
        if isinstance(here, str) and isinstance(value, dict) and "path" not in value:
            here = target[key] = {"path": here}
        if isinstance(here, dict) and isinstance(value, dict):
            merge_into(here, value)
        else:
            target[key] = value


def key_paths(nested: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The key path of every value written in a nested override."""
    paths = []
    for key, value in nested.items():
        if isinstance(value, dict) and value:
            paths += key_paths(value, (*prefix, key))
        else:
            paths.append((*prefix, key))
    return paths
