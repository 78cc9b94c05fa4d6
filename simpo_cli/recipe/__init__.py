"""The recipe: one typed schema for the YAML file, its loading, `--set` overrides and errors.

Everything after `load_recipe` works on a validated `Recipe`; no other module reads raw YAML.
This package must not import torch: `simpo validate` and `simpo config show` answer from it alone.

Other modules import from here. The modules inside import each other directly, each only from
those before it in this order: shipped, common, train, onpolicy, evaluate, hub, rounds, sweep,
schema, problems, load, table, catalogue.
"""

from simpo_cli.recipe.catalogue import copy_recipe, recipe_summary
from simpo_cli.recipe.common import (
    STAGES,
    TRAINING_STAGES,
    DataSource,
    LaunchSettings,
    LoggingSettings,
    LoraSettings,
    ModelSettings,
    PositiveFloat,
    PositiveInt,
    Section,
    StageName,
)
from simpo_cli.recipe.evaluate import BenchmarkSettings, EvaluateStage, LmEvalSettings
from simpo_cli.recipe.hub import HubSettings
from simpo_cli.recipe.load import (
    apply_overrides,
    data_sources,
    find_recipe,
    load_recipe,
    parse_override,
    read_yaml,
    resolve_paths,
)
from simpo_cli.recipe.onpolicy import (
    AUTHORS_SEEDS,
    AnnotateStage,
    GenerateStage,
    PromptSource,
    RewardSettings,
    seeds_problem,
)
from simpo_cli.recipe.problems import format_errors
from simpo_cli.recipe.rounds import (
    ROUND_STAGES,
    RoundsSettings,
    expand_override,
    key_paths,
    round_folder,
    slice_bounds,
    split_problem,
)
from simpo_cli.recipe.schema import Recipe, stage_identity
from simpo_cli.recipe.shipped import (
    DEEPSPEED_DIR,
    RECIPES_DIR,
    SBATCH_SCRIPT,
    shipped_deepspeed_configs,
    shipped_recipe_dir,
    shipped_recipes,
)
from simpo_cli.recipe.sweep import (
    DEFAULT_METRIC,
    SweepSettings,
    parse_grid,
    point_name,
    set_text,
    short_names,
    value_text,
)
from simpo_cli.recipe.table import settings_table
from simpo_cli.recipe.train import (
    LOSS_DEFAULTS,
    LOSS_PARAMETERS,
    LossName,
    PreferenceData,
    PreferenceStage,
    ReferenceSettings,
    SFTData,
    SFTStage,
    SFTTraining,
    TrainingSettings,
)

__all__ = [
    "AUTHORS_SEEDS",
    "DEFAULT_METRIC",
    "DEEPSPEED_DIR",
    "LOSS_DEFAULTS",
    "LOSS_PARAMETERS",
    "RECIPES_DIR",
    "ROUND_STAGES",
    "SBATCH_SCRIPT",
    "STAGES",
    "TRAINING_STAGES",
    "AnnotateStage",
    "BenchmarkSettings",
    "DataSource",
    "EvaluateStage",
    "GenerateStage",
    "HubSettings",
    "LaunchSettings",
    "LmEvalSettings",
    "LoggingSettings",
    "LoraSettings",
    "LossName",
    "ModelSettings",
    "PositiveFloat",
    "PositiveInt",
    "PreferenceData",
    "PreferenceStage",
    "PromptSource",
    "Recipe",
    "ReferenceSettings",
    "RewardSettings",
    "RoundsSettings",
    "SFTData",
    "SFTStage",
    "SFTTraining",
    "Section",
    "StageName",
    "SweepSettings",
    "TrainingSettings",
    "apply_overrides",
    "copy_recipe",
    "data_sources",
    "expand_override",
    "find_recipe",
    "format_errors",
    "key_paths",
    "load_recipe",
    "parse_grid",
    "parse_override",
    "point_name",
    "read_yaml",
    "recipe_summary",
    "resolve_paths",
    "round_folder",
    "seeds_problem",
    "set_text",
    "settings_table",
    "shipped_deepspeed_configs",
    "shipped_recipe_dir",
    "shipped_recipes",
    "short_names",
    "slice_bounds",
    "split_problem",
    "stage_identity",
    "value_text",
]
