"""`simpo recipes`: list, show and copy the recipes that ship with the package."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simpo_cli.errors import UserError
from simpo_cli.recipe import (
    copy_recipe,
    load_recipe,
    recipe_summary,
    shipped_recipe_dir,
    shipped_recipes,
)
from simpo_cli.run.paths import check_copy_destination

recipes_app = typer.Typer(
    help="The shipped recipes: the paper's settings and the tiny demo.", no_args_is_help=True
)

ShippedName = Annotated[str, typer.Argument(help="A shipped recipe's name (simpo recipes list).")]


@recipes_app.command("list")
def recipes_list() -> None:
    """List the shipped recipes: model, method (the preference loss, or sft) and key settings."""
    rows, failed = [("NAME", "MODEL", "METHOD", "HYPERPARAMETERS")], []
    for name in shipped_recipes():
        try:
            rows.append((name, *recipe_summary(load_recipe(name))))
        except UserError as err:
            failed += err.messages
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, model, method, settings in rows:
        print(f"{name:<{width[0]}}  {model:<{width[1]}}  {method:<{width[2]}}  {settings}")
    if failed:
        raise UserError(failed)


@recipes_app.command("show")
def recipes_show(name: ShippedName) -> None:
    """Print a shipped recipe file as written, comments included."""
    print((shipped_recipe_dir(name) / "recipe.yaml").read_text(), end="")


@recipes_app.command("copy")
def recipes_copy(
    name: ShippedName,
    dest: Annotated[Path, typer.Argument(help="Folder to copy into (created if missing).")],
) -> None:
    """Copy a shipped recipe's files into DEST to edit them; never overwrites a file."""
    check_copy_destination(dest)
    for target, origin in copy_recipe(name, dest):
        print(f"wrote {target}" + (f" (from {origin}; recipe.yaml points at it)" if origin else ""))
    print(f"edit {dest / 'recipe.yaml'}, then: simpo train {dest}")
