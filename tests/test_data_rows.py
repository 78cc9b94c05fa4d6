"""Rows as users write them: multi-turn preference pairs (the prompt is everything before the final
reply), files whose rows differ in keys, and data errors that name the file and its line.

Expected values come from computations written here with the tokenizer and plain transformers,
never from the functions under test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from simpo_cli.data import (
    LOCATION_COLUMN,
    inspect_row,
    load_source,
    prepare,
    tokenize_conversation,
)
from simpo_cli.errors import DataError
from simpo_cli.losses import IGNORE_INDEX
from simpo_cli.recipe import RECIPES_DIR, DataSource, load_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

BOS_TEXT = "<|begin_of_text|>"
EOT = "<|eot_id|>"
HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"

SYSTEM = {"role": "system", "content": "You sort digits."}
U1 = {"role": "user", "content": "Sort: 3 1 2"}
A1 = {"role": "assistant", "content": "1 2 3"}
U2 = {"role": "user", "content": "Now backwards."}
GOOD = {"role": "assistant", "content": "3 2 1"}
BAD = {"role": "assistant", "content": "1 2 3 3"}


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def turn(role: str, content: str) -> str:
    return HEADER.format(role) + content + EOT


def write_jsonl(path: Path, rows: list[dict], blank_after: int | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


# Multi-turn pairs in every supported layout, each with the history that both replies share.
MULTI_TURN = {
    "implicit": ([U1, A1, U2], {"chosen": [U1, A1, U2, GOOD], "rejected": [U1, A1, U2, BAD]}),
    "implicit-system": (
        [SYSTEM, U1, A1, U2],
        {"chosen": [SYSTEM, U1, A1, U2, GOOD], "rejected": [SYSTEM, U1, A1, U2, BAD]},
    ),
    "prompt-column": ([U1, A1, U2], {"prompt": [U1, A1, U2], "chosen": [GOOD], "rejected": [BAD]}),
    "prompt-column-strings": (
        [SYSTEM, U1, A1, U2],
        {"prompt": [SYSTEM, U1, A1, U2], "chosen": GOOD["content"], "rejected": BAD["content"]},
    ),
}


# --------------------------------------------------------------------------- 1. multi-turn pairs


def _history_text(history: list[dict]) -> str:
    """The history rendered by hand in the tiny Llama-3-style template."""
    return BOS_TEXT + "".join(turn(m["role"], m["content"]) for m in history)


@pytest.mark.parametrize("layout", list(MULTI_TURN))
def test_multi_turn_pair_trains_only_the_final_reply(tok, layout):
    """Default tokenization: the prompt is the whole history (earlier assistant turns included)
    plus the assistant header; the response is the final reply and its <|eot_id|> only."""
    history, row = MULTI_TURN[layout]
    pairs, _ = prepare(_dataset([row]), tok, "preference", "p", 128, 100)
    prompt = enc(tok, _history_text(history) + HEADER.format("assistant"))
    for side, reply in (("chosen", GOOD), ("rejected", BAD)):
        response = enc(tok, reply["content"] + EOT)
        assert pairs[0][f"{side}_ids"] == prompt + response
        assert pairs[0][f"{side}_labels"] == [IGNORE_INDEX] * len(prompt) + response


@pytest.mark.parametrize("layout", list(MULTI_TURN))
def test_multi_turn_pair_in_the_authors_tokenization(tok, layout):
    """Authors' tokenization: the prompt is the history rendered without the generation prompt;
    the response is the header, the final reply and <|eot_id|>; the earlier reply is prompt."""
    history, row = MULTI_TURN[layout]
    pairs, _ = prepare(_dataset([row]), tok, "preference", "p", 128, 100, "authors")
    prompt = enc(tok, _history_text(history))
    for side, reply in (("chosen", GOOD), ("rejected", BAD)):
        response = enc(tok, turn("assistant", reply["content"]))
        assert pairs[0][f"{side}_ids"] == prompt + response
        assert pairs[0][f"{side}_labels"] == [IGNORE_INDEX] * len(prompt) + response


def test_sft_still_trains_every_assistant_turn(tok):
    """The preference convention does not leak into SFT: both replies are trained there."""
    out = tokenize_conversation(tok, {"messages": [U1, A1, U2, GOOD]}, "w", 128)
    trained = [i for i, label in zip(out["input_ids"], out["labels"], strict=True) if label >= 0]
    assert trained == enc(tok, "1 2 3" + EOT) + enc(tok, "3 2 1" + EOT)


def _dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """The tiny recipe's seeded model, saved as a model folder (config, weights, tokenizer)."""
    from simpo_cli.model.load import load_model

    recipe = load_recipe("tiny")
    folder = tmp_path_factory.mktemp("model")
    load_model(recipe, None, 42).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _plain_logps(model, tok, prompt_text: str, response_text: str) -> tuple[float, int]:
    """Average log-prob of the response tokens after the prompt, with plain transformers."""
    prompt = enc(tok, prompt_text)
    response = enc(tok, response_text)
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    token_logps = logp[torch.arange(len(targets)), targets][len(prompt) - 1 :]
    return token_logps.mean().item(), len(token_logps)


def simpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize("tokenization", ["default", "authors"])
def test_eval_of_multi_turn_pairs_matches_plain_transformers(
    model_dir, tok, tmp_path, tokenization
):
    """`simpo eval` on multi-turn pairs in every layout: each side's average log-prob is that of
    the final reply alone (the shared history is not counted), as computed here."""
    from transformers import AutoModelForCausalLM

    from simpo_cli.evaluate.pairs import evaluate_model_dir

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for layout, (history, row) in MULTI_TURN.items():
        pairs = write_jsonl(tmp_path / f"{layout}.jsonl", [row])
        got = evaluate_model_dir(str(model_dir), str(pairs), tokenization=tokenization)
        assert got["summary"]["tokenization"] == tokenization
        for side, reply in (("chosen", GOOD), ("rejected", BAD)):
            if tokenization == "default":
                texts = (
                    _history_text(history) + HEADER.format("assistant"),
                    reply["content"] + EOT,
                )
            else:
                texts = (_history_text(history), turn("assistant", reply["content"]))
            expected, n_tokens = _plain_logps(model, tok, *texts)
            assert got["pairs"][0][f"{side}_tokens"] == n_tokens, layout
            assert got["pairs"][0][f"{side}_logps"] == pytest.approx(expected, abs=1e-5), layout


def test_eval_uses_the_tokenization_the_stage_was_trained_with(tmp_path, tok):
    """A preference stage trained with data.tokenization: authors is scored with it by
    `simpo eval` (and says so); --tokenization overrides it."""
    from simpo_cli.run.pipeline import run_stage

    recipe = load_recipe(
        "tiny",
        [
            "pipeline=[preference]",
            "preference.data.train.max_rows=8",
            "preference.data.eval=null",
            "preference.data.tokenization=authors",
            "preference.training.max_steps=1",
            "preference.training.warmup_ratio=0",
            "preference.training.total_batch_size=8",
        ],
    )
    stage_dir = run_stage(recipe, "preference", tmp_path / "run")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [MULTI_TURN["implicit"][1]])
    for flag, expected in (((), "authors"), (("--tokenization", "default"), "default")):
        output = tmp_path / f"{expected}.json"
        result = simpo(
            "eval", str(stage_dir), "--pairs", str(pairs), "--pairs-output", str(output), *flag
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"tokenization {expected}" in result.stdout
        got = json.loads(output.read_text())["pairs"][0]
        # The authors' response holds the assistant header: 5 more tokens than the default's.
        reply = enc(tok, GOOD["content"] + EOT)
        header = enc(tok, HEADER.format("assistant"))
        assert got["chosen_tokens"] == len(reply) + (len(header) if expected == "authors" else 0)


def test_data_inspect_marks_only_the_final_reply_of_a_multi_turn_pair(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [MULTI_TURN["implicit-system"][1]])
    recipe = load_recipe("tiny", [f"preference.data.train={pairs}"])
    shown = inspect_row(recipe, "preference", 0, color=False)
    assert "⟦3 2 1<|eot_id|>⟧" in shown and "⟦1 2 3 3<|eot_id|>⟧" in shown
    assert "⟦1 2 3<|eot_id|>⟧" not in shown  # the earlier reply is history, not trained
    assert shown.count("⟦") == 3  # the legend and the two final replies
    assert "line 1 of" in shown


# --------------------------------------------------------------------------- 2. mixed rows


PAIR_IN_CHOSEN = {"chosen": [U1, GOOD], "rejected": [U1, BAD]}
# UltraFeedback-binarized style: a prompt column, replies alone in chosen/rejected.
PAIR_WITH_PROMPT = {
    "prompt": "Sort: 9 8",
    "chosen": [{"role": "assistant", "content": "8 9"}],
    "rejected": [{"role": "assistant", "content": "9 8"}],
    "score": 7,
}


def test_rows_with_different_keys_keep_every_column(tmp_path, tok):
    """A `prompt` column (and an extra one) that appears only from row 2 on is kept: the file is
    read with the union of keys, a key a row lacks being null there."""
    path = write_jsonl(tmp_path / "mixed.jsonl", [PAIR_IN_CHOSEN, PAIR_WITH_PROMPT])
    dataset = load_source(DataSource(path=str(path)), "r")
    assert dataset.column_names == ["chosen", "rejected", "prompt", "score", LOCATION_COLUMN]
    assert dataset[0]["prompt"] is None and dataset[1]["prompt"] == "Sort: 9 8"
    assert dataset[1]["score"] == 7 and dataset[0]["score"] is None
    pairs, report = prepare(dataset, tok, "preference", "r", 64, 40)
    assert report.rows_kept == 2
    second = enc(tok, BOS_TEXT + turn("user", "Sort: 9 8") + HEADER.format("assistant"))
    assert pairs[1]["chosen_ids"] == second + enc(tok, "8 9" + EOT)
    assert pairs[1]["source_row"] == "line 2"


def test_sft_file_mixing_messages_and_prompt_completion_rows(tmp_path, tok):
    rows = [
        {"messages": [U1, A1]},
        {"prompt": "Sort: 9 8", "completion": "8 9"},
        {"messages": [SYSTEM, U1, A1], "source": "extra column"},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    dataset = load_source(DataSource(path=str(path)), "r")
    kept, report = prepare(dataset, tok, "sft", "s", 64)
    assert report.rows_kept == 3 and not report.dropped
    expected = [
        (BOS_TEXT + turn("user", "Sort: 3 1 2") + HEADER.format("assistant"), "1 2 3" + EOT),
        (BOS_TEXT + turn("user", "Sort: 9 8") + HEADER.format("assistant"), "8 9" + EOT),
        (
            BOS_TEXT + turn("system", "You sort digits.") + turn("user", "Sort: 3 1 2")
            + HEADER.format("assistant"),
            "1 2 3" + EOT,
        ),
    ]  # fmt: skip
    for row, (prompt, response) in zip(kept, expected, strict=True):
        assert row["input_ids"] == enc(tok, prompt) + enc(tok, response)
        assert row["labels"] == [IGNORE_INDEX] * len(enc(tok, prompt)) + enc(tok, response)


def test_errors_name_the_file_and_its_line_counted_from_one(tmp_path, tok):
    """Row 3 of the data sits on line 4 (a blank line before it): the error says line 4, and a
    row holding its prompt is never reported as missing one."""
    no_prompt = {"chosen": [GOOD], "rejected": [BAD]}
    path = write_jsonl(
        tmp_path / "pairs.jsonl", [PAIR_IN_CHOSEN, PAIR_WITH_PROMPT, no_prompt], blank_after=2
    )
    dataset = load_source(DataSource(path=str(path)), "r")
    with pytest.raises(DataError) as err:
        prepare(dataset, tok, "preference", f"preference.data.train ({path})", 64, 40)
    assert str(err.value) == (
        f"preference.data.train ({path}): line 4: no prompt: chosen holds only the reply and "
        "this row has no 'prompt' value; put the prompt turns before the reply in "
        "chosen/rejected, or give prompt"
    )


def test_json_list_errors_name_the_item(tmp_path, tok):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIR_WITH_PROMPT, {**PAIR_WITH_PROMPT, "chosen": None}]))
    dataset = load_source(DataSource(path=str(path)), "r")
    with pytest.raises(DataError, match=r"^d: item 2: chosen: no value in this row"):
        prepare(dataset, tok, "preference", "d", 64, 40)


def test_a_column_of_two_types_names_both_lines(tmp_path):
    strings = {"prompt": "Sort: 9 8", "chosen": "8 9", "rejected": "9 8"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [strings, PAIR_IN_CHOSEN, strings])
    with pytest.raises(DataError) as err:
        load_source(DataSource(path=str(path)), "train")
    assert str(err.value) == (
        f"train: {path}: line 2: 'chosen' is a list but line 1 has a string; make each column "
        "one type (e.g. chosen always a list of messages)"
    )


@pytest.mark.slow
def test_cli_data_error_names_the_line(tmp_path, cli):
    """Through `simpo preference`: one line naming the file and the line, exit 2."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR_WITH_PROMPT, {**PAIR_WITH_PROMPT}])
    pairs.write_text(pairs.read_text() + json.dumps({**PAIR_WITH_PROMPT, "rejected": 3}) + "\n")
    recipe = yaml.safe_load((RECIPES_DIR / "tiny" / "recipe.yaml").read_text())
    recipe["model"]["tokenizer"] = str(RECIPES_DIR / "tiny" / "tokenizer")
    recipe["pipeline"] = ["preference"]
    recipe["preference"]["data"] = {"train": str(pairs), "max_length": 64, "max_prompt_length": 40}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    result = cli("preference", recipe_path, "-o", tmp_path / "out")
    assert result.code == 2, result.stderr[-2000:]
    assert result.errors() == [
        f"error: preference.data.train ({pairs}): line 3: 'rejected' is a number but line 1 "
        "has a list; make each column one type (e.g. chosen always a list of messages)"
    ]
