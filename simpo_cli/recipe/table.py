"""A stage's resolved settings, one per line, each with where its value came from (printed as a
stage starts)."""

from __future__ import annotations

from pydantic import BaseModel

from simpo_cli.recipe.common import DataSource, StageName
from simpo_cli.recipe.schema import Recipe
from simpo_cli.recipe.train import PreferenceStage
from simpo_cli.redact import redact_setting


def settings_table(recipe: Recipe, stage: StageName) -> list[str]:
    """The resolved settings of a stage, one per line, with where each came from: the recipe
    file, a --set override (or the stage that made the value). Those at their defaults follow
    only with logging.all_settings (--all-settings); else one line counts them."""
    section = recipe.stage(stage)
    rows: list[tuple[str, str, str]] = []

    def walk(model: BaseModel, path: tuple[str, ...]) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            key = (*path, field.alias or name)
            if isinstance(value, DataSource):
                value = value.path + ("" if value.split == "train" else f" [{value.split}]")
            if isinstance(value, BaseModel):
                walk(value, key)
                continue
            if isinstance(value, list) and value and isinstance(value[0], BaseModel):
                for i, item in enumerate(value):  # evaluate.benchmarks: one block each
                    walk(item, (*key, str(i)))
                continue
            if value is None:
                continue
            # The key itself or a section above it; for a data source shown as one value
            # (`train: {path, max_rows}`), a key below it.
            origin = next(
                (
                    recipe._origins[key[:i]]
                    for i in range(len(key), 0, -1)
                    if key[:i] in recipe._origins
                ),
                min(
                    (o for k, o in recipe._origins.items() if k[: len(key)] == key),
                    default="default",  # "--set" sorts before "recipe": an override shows
                ),
            )
            rows.append((".".join(key), redact_setting(key[-1], str(value)), origin))

    walk(section, (stage,))
    if isinstance(section, PreferenceStage) and section.loss == "simpo":
        how = "gamma" if section.gamma is not None else "beta x gamma_beta_ratio"
        rows.insert(2, (f"{stage}.gamma (resolved)", f"{section.resolved_gamma:g}", how))
    if stage in recipe.hub_targets():  # where this stage goes once it has finished
        repo, revision = recipe.hub_targets()[stage]
        for key, value in (("repo_id", repo), ("revision", revision or "main"),
                           ("private", str(recipe.hub.private).lower())):  # fmt: skip
            # The key, its entry for this stage (hub.revision.sft) or the section given whole.
            keys = [("hub", key), ("hub", key, stage), ("hub",)]
            origin = next((recipe._origins[k] for k in keys if k in recipe._origins), "default")
            rows.append((f"hub.{key}", redact_setting(key, value), origin))
    defaults = [row for row in rows if row[2] == "default"]
    if not recipe.logging.all_settings:
        rows = [row for row in rows if row[2] != "default"]
    width = max((len(key) for key, _, _ in rows), default=0)
    value_width = min(max((len(value) for _, value, _ in rows), default=0), 16)
    lines = [f"  {k:<{width}}  {v:<{value_width}}  {o}" for k, v, o in rows]
    if defaults and not recipe.logging.all_settings:
        lines.append(
            f"  ({len(defaults)} more at their defaults: --all-settings prints them; "
            "resolved_recipe.yaml holds them all)"
        )
    return lines
