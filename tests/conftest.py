"""Fixtures shared by the data tests: the shipped tiny tokenizer, loaded as the CLI loads it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from simpo_cli.data import load_tokenizer  # noqa: E402
from simpo_cli.recipe import RECIPES_DIR, ModelSettings  # noqa: E402

TINY_TOKENIZER = RECIPES_DIR / "tiny" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    """The shipped tiny tokenizer as the CLI loads it (never mutated: see `fresh_tok`)."""
    return load_tokenizer(ModelSettings(name_or_path=str(TINY_TOKENIZER)))


@pytest.fixture
def fresh_tok():
    """A private copy for tests that change the chat template."""
    return load_tokenizer(ModelSettings(name_or_path=str(TINY_TOKENIZER)))


def save_tiny_model(folder):
    """The tiny recipe's seeded model and its tokenizer, saved as a checkpoint folder."""
    from simpo_cli.recipe import load_recipe
    from simpo_cli.training import load_model

    recipe = load_recipe("tiny")
    load_model(recipe, None, 42).save_pretrained(folder)
    load_tokenizer(recipe.model).save_pretrained(folder)
    return folder
