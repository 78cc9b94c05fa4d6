"""Reward scorers: reward functions by file or module name, and tiny sequence-classification
reward models built from a config, saved with the shipped tiny tokenizer and loaded through the
real path (AutoModelForSequenceClassification.from_pretrained of the folder). Nothing is
downloaded."""

import json
import re
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from simpo_cli.errors import UserError
from simpo_cli.onpolicy.rewards import (
    FunctionScorer,
    RewardModelScorer,
    ScoreItem,
    load_reward_function,
    score_records,
    split_for_rank,
)
from simpo_cli.recipe import RECIPES_DIR

# A template unlike the policy's (the tiny Llama-3-style one): scoring must render with the
# reward model's own template, so the rendered text shows which template was used.
RM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)
TINY_TOKENIZER = RECIPES_DIR / "tiny" / "tokenizer"
BOS = 0  # the tiny tokenizer's <|begin_of_text|>; it also adds a BOS when tokenizing


def _config(**kwargs) -> LlamaConfig:
    base = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=4,
    )
    return LlamaConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A scalar-head reward model saved WITHOUT pad_token_id (the scorer sets it from the
    tokenizer), with the tiny tokenizer carrying RM_TEMPLATE."""
    folder = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    LlamaForSequenceClassification(_config(num_labels=1, pad_token_id=None)).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    tokenizer.chat_template = RM_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(rm_dir):
    return RewardModelScorer(str(rm_dir), batch_size=3)


ITEMS = [
    ScoreItem("p1", [{"role": "user", "content": "Sort: 3 1 2"}], "1 2 3"),
    ScoreItem("p2", [{"role": "user", "content": "Sort: 9 8"}], "8 9 and some more words here"),
    ScoreItem(
        "p3",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sort: 5 4"},
        ],
        "",
    ),
]


# --------------------------------------------------------------------------- reward models


def test_a_reward_model_renders_with_its_own_template_and_one_bos(scorer):
    ids = scorer.render(ITEMS[0])
    # The RM template writes the BOS and the tokenizer would add another: exactly one remains.
    assert ids[0] == BOS and ids[1] != BOS and ids.count(BOS) == 1
    assert (
        scorer.tokenizer.decode(ids) == "<|begin_of_text|>[user] Sort: 3 1 2\n[assistant] 1 2 3\n"
    )


def test_the_bos_is_added_once_when_the_template_does_not_write_it(rm_dir):
    scorer = RewardModelScorer(str(rm_dir))
    scorer.tokenizer.chat_template = RM_TEMPLATE.removeprefix("{{ bos_token }}")
    ids = scorer.render(ITEMS[0])
    assert ids[0] == BOS and ids.count(BOS) == 1
    scorer.tokenizer.chat_template = "{{ bos_token }}" + RM_TEMPLATE  # a template writing two
    assert scorer.render(ITEMS[0]) == ids


def test_a_reward_model_scores_each_conversation_as_the_model_does_alone(scorer, rm_dir):
    """Scores equal the model's logit on each unpadded conversation alone, batched (right
    padding, the shorter rows masked) or not."""
    model = LlamaForSequenceClassification.from_pretrained(rm_dir)
    expected = [
        model(input_ids=torch.tensor([scorer.render(i)])).logits[0, 0].item() for i in ITEMS
    ]
    assert len({len(scorer.render(i)) for i in ITEMS}) == 3  # the batch really is padded
    assert scorer(ITEMS) == pytest.approx(expected, abs=1e-5)
    assert [scorer([i])[0] for i in ITEMS] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == 3


def test_a_missing_pad_token_id_is_taken_from_the_tokenizer(scorer, rm_dir):
    assert json.loads((rm_dir / "config.json").read_text()).get("pad_token_id") is None
    assert scorer.model.config.pad_token_id == scorer.tokenizer.pad_token_id == 5


def test_long_inputs_keep_the_bos_and_the_end_of_the_reply(rm_dir):
    scorer = RewardModelScorer(str(rm_dir), max_length=8)
    full = RewardModelScorer(str(rm_dir)).render(ITEMS[1])
    assert len(full) > 8
    assert scorer.render(ITEMS[1]) == [BOS] + full[-7:]
    assert scorer.cut == 1


def test_a_reward_model_without_a_scalar_head_is_refused(tmp_path):
    _config(num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"reward_model: .* no scalar head \(num_labels is 3"):
        RewardModelScorer(str(tmp_path))


def test_remote_code_is_refused_without_the_opt_in(tmp_path):
    config = _config(num_labels=19)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_armo.ArmoLike"}
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError) as err:
        RewardModelScorer(str(tmp_path), key="annotate.reward_model")
    (line,) = err.value.messages
    assert line.startswith("annotate.reward_model: ") and "trust_remote_code: true" in line


ARMO_CODE = """
from dataclasses import dataclass

import torch
from transformers import LlamaForSequenceClassification
from transformers.utils import ModelOutput


@dataclass
class ArmoOutput(ModelOutput):
    score: torch.FloatTensor | None = None
    rewards: torch.FloatTensor | None = None


class ArmoLike(LlamaForSequenceClassification):
    # Like ArmoRM: several reward heads, and the score is their combination.
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        rewards = super().forward(input_ids=input_ids, attention_mask=attention_mask).logits
        return ArmoOutput(score=rewards.sum(-1, keepdim=True), rewards=rewards)
"""


def test_a_remote_code_model_is_scored_by_its_score_output(tmp_path, monkeypatch):
    """An ArmoRM-like model (3 outputs, .score = their sum) loaded with trust_remote_code from a
    local folder; the score is the sum of the 3 logits of the same weights."""
    import transformers.dynamic_module_utils as dynamic

    # Remote code is copied into a modules cache: a private one, and sys.path restored after.
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "armo"
    folder.mkdir()
    (folder / "modeling_armo.py").write_text(ARMO_CODE)
    config = _config(num_labels=3, pad_token_id=5)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_armo.ArmoLike"}
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(folder)

    scorer = RewardModelScorer(str(folder), trust_remote_code=True)
    assert type(scorer.model).__name__ == "ArmoLike"
    plain = LlamaForSequenceClassification.from_pretrained(folder)
    expected = [
        plain(input_ids=torch.tensor([scorer.render(i)])).logits[0].sum().item() for i in ITEMS[:2]
    ]
    assert scorer(ITEMS[:2]) == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- reward functions

REWARDS_PY = """
def exact(prompt, response):
    # 1.0 when the reply is the sorted digits of the last user turn.
    digits = prompt[-1]["content"].removeprefix("Sort: ").split()
    return float(response.split() == sorted(digits))

def passes(prompt, response):
    return response.endswith("3")

def boom(prompt, response):
    raise ZeroDivisionError("division by zero")

def text(prompt, response):
    return "1.0"

def nan(prompt, response):
    return float("nan")

def numpy_score(prompt, response):
    import numpy
    return numpy.float32(0.5)

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def rewards_py(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


def test_a_reward_function_loads_from_a_file(rewards_py):
    exact = load_reward_function(f"{rewards_py}:exact")
    assert exact([{"role": "user", "content": "Sort: 3 1 2"}], "1 2 3") == 1.0
    assert exact([{"role": "user", "content": "Sort: 3 1 2"}], "1 3 2") == 0.0


def test_a_reward_function_loads_from_a_module(rewards_py, monkeypatch):
    monkeypatch.syspath_prepend(str(rewards_py.parent))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    assert load_reward_function("my_rewards:passes")([], "1 2 3") is True


@pytest.mark.parametrize(
    "spec, message",
    [
        ("my_rewards.py", "is not a function reference; write 'path/to/file.py:name'"),
        ("missing/nowhere.py:exact", "no file missing/nowhere.py"),
        ("{dir}/my_rewards.py:nope", "my_rewards.py has no 'nope'"),
        ("{dir}/my_rewards.py:NOT_A_FUNCTION", "'NOT_A_FUNCTION' in .* is a int, not a function"),
        ("{dir}/broken.py:f", r"importing .*broken.py failed: NameError: name 'undefined'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz': ModuleNotFound"),
    ],
)
def test_a_bad_reward_function_reference_is_one_line(rewards_py, spec, message):
    (rewards_py.parent / "broken.py").write_text("x = undefined\n")
    with pytest.raises(UserError) as err:
        load_reward_function(spec.format(dir=rewards_py.parent), key="annotate.reward_function")
    (line,) = err.value.messages
    assert line.startswith("annotate.reward_function: ")
    assert "\n" not in line
    assert re.search(message, line), line


def test_a_function_scorer_turns_returns_into_floats(rewards_py):
    prompt = [{"role": "user", "content": "Sort: 3 1 2"}]
    items = [ScoreItem("p1", prompt, "1 2 3"), ScoreItem("p2", prompt, "1 3 2")]
    assert FunctionScorer.from_spec(f"{rewards_py}:exact")(items) == [1.0, 0.0]
    # True/False are scores (a rule that passes or not); numpy scalars too.
    passes = FunctionScorer.from_spec(f"{rewards_py}:passes")(items)
    assert passes == [1.0, 0.0] and all(type(s) is float for s in passes)
    assert FunctionScorer.from_spec(f"{rewards_py}:numpy_score")(items[:1]) == [0.5]


@pytest.mark.parametrize(
    "name, message",
    [
        ("boom", r"on prompt p2: raised ZeroDivisionError: division by zero; fix the function"),
        ("text", r"on prompt p2: returned str '1.0'; return a number"),
        ("nan", r"on prompt p2: returned nan; return a finite number"),
    ],
)
def test_a_failing_reward_function_names_the_prompt(rewards_py, name, message):
    scorer = FunctionScorer.from_spec(f"{rewards_py}:{name}")
    with pytest.raises(UserError, match=message) as err:
        scorer([ScoreItem("p2", [{"role": "user", "content": "Sort: 1"}], "1")])
    assert len(err.value.messages) == 1


def test_a_reward_function_cannot_change_the_prompt():
    def meddle(prompt, response):
        prompt[0]["content"] = "changed"
        prompt.append({"role": "user", "content": "more"})
        return 0

    prompt = [{"role": "user", "content": "Sort: 1"}]
    FunctionScorer(meddle)([ScoreItem("p", prompt, "1")])
    assert prompt == [{"role": "user", "content": "Sort: 1"}]


# --------------------------------------------------------------------------- records


def _record(prompt_id: str, *texts: str) -> dict:
    return {
        "prompt_id": prompt_id,
        "prompt": [{"role": "user", "content": f"question {prompt_id}"}],
        "samples": [
            {"text": t, "finish_reason": "stop", "tokens": len(t), "seed": s}
            for s, t in enumerate(texts)
        ],
    }


def test_score_records_returns_scores_by_record_and_sample():
    """Scored longest first in batches of 2; the scores come back in sample order."""
    seen: list[list[str]] = []

    def length(items):
        seen.append([i.response for i in items])
        return [float(len(i.response)) + (0.5 if i.prompt_id == "b" else 0) for i in items]

    length.batch_size = 2
    records = [_record("a", "xx", "x", "xxxx"), _record("b", "xxx", "")]
    assert score_records(records, length, progress=False) == [[2.0, 1.0, 4.0], [3.5, 0.5]]
    assert seen == [["xxxx", "xxx"], ["xx", "x"], [""]]


def test_the_rank_shares_cover_every_record_once():
    records = list(range(5))
    assert [split_for_rank(records, r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [split_for_rank(records, r, 4) for r in range(4)] == [[0, 1], [2, 3], [4], []]
    assert [split_for_rank([7], r, 3) for r in range(3)] == [[7], [], []]
    with pytest.raises(ValueError):
        split_for_rank(records, 2, 2)


def test_a_zero_d_array_is_a_score():
    scorer = FunctionScorer(lambda p, r: np.array(2.5))
    assert scorer([ScoreItem("p", [], "x")]) == [2.5]
    scorer = FunctionScorer(lambda p, r: np.array([1.0, 2.0]))
    with pytest.raises(UserError, match="returned ndarray"):
        scorer([ScoreItem("p", [], "x")])
    assert FunctionScorer(lambda p, r: 3)([ScoreItem("p", [], "x")]) == [3.0]
