"""Where the shipped recipes, DeepSpeed configs and SLURM script sit, and their names."""

from __future__ import annotations

import difflib
from pathlib import Path

from simpo_cli.errors import RecipeError

_HERE = Path(__file__).resolve().parent.parent  # the simpo_cli package folder
# Installed, recipes/ and the DeepSpeed configs are package data inside simpo_cli/; in a source
# checkout they sit at the top of the repository.
RECIPES_DIR = _HERE / "recipes" if (_HERE / "recipes").is_dir() else _HERE.parent / "recipes"
DEEPSPEED_DIR = (
    _HERE / "deepspeed_configs"
    if (_HERE / "deepspeed_configs").is_dir()
    else _HERE.parent / "configs" / "deepspeed"
)

# The SLURM batch script (scripts/slurm/simpo.sbatch), which `simpo sweep --slurm` submits.
SBATCH_SCRIPT = (
    _HERE / "slurm" / "simpo.sbatch"
    if (_HERE / "slurm").is_dir()
    else _HERE.parent / "scripts" / "slurm" / "simpo.sbatch"
)


def shipped_deepspeed_configs() -> list[str]:
    return sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package (recipes/<name>/recipe.yaml)."""
    return sorted(p.parent.name for p in RECIPES_DIR.glob("*/recipe.yaml"))


def shipped_recipe_dir(name: str) -> Path:
    """The folder of a shipped recipe; an unknown name is one RecipeError with a "did you mean"."""
    names = shipped_recipes()
    if name in names:
        return RECIPES_DIR / name
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "`simpo recipes list` shows them"
    raise RecipeError([f"{name}: no shipped recipe of that name; {hint}"])
