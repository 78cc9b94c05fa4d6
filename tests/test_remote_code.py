"""trust_remote_code is opt-in everywhere: off unless the recipe says model.trust_remote_code:
true, passed as the recipe says at every place the package loads a model, config or
tokenizer, and never turned on by `simpo eval`. The transformers loaders are replaced by
recorders (the boundary this test is about); nothing is downloaded or built."""

import shutil
import sys

import pytest
import transformers

from simpo_cli.data import load_tokenizer
from simpo_cli.evaluate.pairs import evaluate_model_dir
from simpo_cli.launch import count_parameters
from simpo_cli.model.load import load_model
from simpo_cli.recipe import RECIPES_DIR, load_recipe


class Loaded(Exception):
    """Raised by a recorder once it has seen its call: the caller stops there."""


@pytest.fixture
def calls(monkeypatch):
    """Record every from_pretrained / from_config call the package makes on the Auto classes.
    Model and config loads stop there (Loaded); the tiny tokenizer really loads. Calls made by
    transformers itself (AutoTokenizer reads configs through AutoConfig) pass through."""
    seen: list[tuple[str, dict]] = []

    def recorder(cls, method: str, load: bool):
        original = getattr(cls, method)
        name = f"{cls.__name__}.{method}"

        def record(*args, **kwargs):
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("simpo_cli"):
                return original(*args, **kwargs)
            seen.append((name, kwargs))
            if load:
                return original(*args, **kwargs)
            raise Loaded(name)

        monkeypatch.setattr(cls, method, record)

    recorder(transformers.AutoModelForCausalLM, "from_pretrained", load=False)
    recorder(transformers.AutoModelForCausalLM, "from_config", load=False)
    recorder(transformers.AutoConfig, "from_pretrained", load=False)
    recorder(transformers.AutoTokenizer, "from_pretrained", load=True)
    return seen


def _recipe(trust: bool | None, init: str = "from_config"):
    sets = ["pipeline=[preference]"]
    if init == "pretrained":
        sets += ["model.init=pretrained", "model.name_or_path=some-org/some-model"]
    if trust is not None:
        sets.append(f"model.trust_remote_code={str(trust).lower()}")
    return load_recipe("tiny", sets)


def test_a_recipe_without_the_key_does_not_trust_remote_code():
    assert _recipe(None).model.trust_remote_code is False


@pytest.mark.parametrize("trust", [None, True])
@pytest.mark.parametrize("init", ["from_config", "pretrained"])
def test_training_loads_pass_the_recipe_setting(calls, trust, init):
    recipe = _recipe(trust, init)
    with pytest.raises(Loaded):
        load_model(recipe, None, 42)
    assert count_parameters(recipe) is None  # its loader stopped it: the estimate is skipped
    load_tokenizer(recipe.model)
    assert len(calls) == 3
    for name, kwargs in calls:
        assert kwargs.get("trust_remote_code") is bool(trust), name


def test_eval_never_trusts_remote_code(calls, tmp_path):
    """`simpo eval` loads whatever folder it is given; remote code stays off."""
    model_dir = tmp_path / "model"
    shutil.copytree(RECIPES_DIR / "tiny" / "tokenizer", model_dir)
    with pytest.raises(Loaded):
        evaluate_model_dir(str(model_dir), str(RECIPES_DIR / "tiny" / "data" / "pref_eval.jsonl"))
    assert [name for name, _ in calls] == [
        "AutoTokenizer.from_pretrained",
        "AutoModelForCausalLM.from_pretrained",
    ]
    for name, kwargs in calls:
        assert not kwargs.get("trust_remote_code"), name
