"""Judge-free win rates: opponents read from the official answer layouts, every reply scored with
its own conversation, and hard/soft win rates checked against numbers worked out by hand.

Answer files are written with benchmarks.write_answers (the layouts its own tests check against
the official readers) for the tiny question files under recipes/tiny/benchmarks. Scores come
from a real FunctionScorer over a reward function in a temp .py file; no model, no network.
"""

import json
import math
from pathlib import Path

import pytest

from simpo_cli.errors import DataError, UserError
from simpo_cli.evaluate.benchmarks import load_questions, write_answers
from simpo_cli.evaluate.winrate import (
    NOTE,
    opponent_replies,
    read_replies,
    summarize_win_rates,
    summary_lines,
    win_rate_records,
)
from simpo_cli.onpolicy.rewards import FunctionScorer, score_records

SHIPPED = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "benchmarks"

REWARDS = '''
def length(messages, reply):
    """Best at 10 characters: -|len(reply) - 10|."""
    return -abs(len(reply) - 10)


def mt_bench(messages, reply):
    """Turn 1: as `length`. Later turns: 1 when the reply repeats the assistant's previous
    answer in its history, else 0 (so it depends on whose history the reply is scored with)."""
    earlier = [m["content"] for m in messages if m["role"] == "assistant"]
    if not earlier:
        return length(messages, reply)
    return float(earlier[-1] in reply)
'''


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(REWARDS)
    return path


def scorer(rewards_file: Path, name: str) -> FunctionScorer:
    return FunctionScorer.from_spec(f"{rewards_file}:{name}")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def count_words(text: str) -> int:
    """A stand-in for Arena-Hard's tiktoken count, whose encoding would be downloaded."""
    return len(text.split())


def one_turn(questions, replies: list[str]) -> dict[str, list[str]]:
    """{question id: [reply]}, the replies in question order."""
    return {q.prompt_id: [reply] for q, reply in zip(questions, replies, strict=True)}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- AlpacaEval


ALPACA_MODEL = ["1 2 3 4 5", "123456789", "x", "0123456789"]


def test_alpaca_eval_against_the_reference_outputs(tmp_path, rewards_file):
    """Reward -|len - 10|. The reference outputs of the tiny eval set ("1 2 3", "1 2 4 7 8 9",
    "0 5 5", "3 6 8") have 5, 11, 5, 5 characters: rewards -5, -1, -5, -5. The model's replies
    have 9, 9, 1, 10 characters: rewards -1, -1, -9, 0. Pairs: win, tie, loss, win.

        hard = (1 + 0.5 + 0 + 1) / 4 = 0.625
        soft = (s(4) + s(0) + s(-4) + s(5)) / 4 = (1.5 + s(5)) / 4    (s(x) + s(-x) = 1)
        mean reward: model (-1 - 1 - 9 + 0) / 4 = -2.75, reference (-5 - 1 - 5 - 5) / 4 = -4
        mean chars:  model (9 + 9 + 1 + 10) / 4 = 7.25,  reference (5 + 11 + 5 + 5) / 4 = 6.5
    """
    questions = load_questions("alpaca_eval", str(SHIPPED / "alpaca_eval.json"))
    answers = one_turn(questions, ALPACA_MODEL)
    write_answers("alpaca_eval", questions, answers, tmp_path / "out", "tiny-simpo")

    model_name, replies = read_replies("alpaca_eval", questions, tmp_path / "out")
    name, reference = opponent_replies("alpaca_eval", questions, "reference")
    records = win_rate_records(questions, replies, reference)
    summary = summarize_win_rates(
        records, score_records(records, scorer(rewards_file, "length"), False), name
    )

    assert (model_name, name) == ("tiny-simpo", "reference")  # the file's `generator`
    assert replies == answers
    assert [r[0] for r in reference.values()] == ["1 2 3", "1 2 4 7 8 9", "0 5 5", "3 6 8"]
    assert summary["n"] == 4
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 1, 1)
    assert summary["win_rate"] == 0.625
    assert summary["soft_win_rate"] == pytest.approx((1.5 + sigmoid(5)) / 4)
    assert summary["mean_reward"] == {"model": -2.75, "opponent": -4.0}
    assert summary["mean_chars"] == {"model": 7.25, "opponent": 6.5}
    assert summary["rows"][2] == {
        "prompt_id": "2",
        "turn": 1,
        "model_reward": -9.0,
        "opponent_reward": -5.0,
        "model_chars": 1,
        "opponent_chars": 5,
    }
    assert "per_turn" not in summary and summary["note"] == NOTE
    assert "62.5% (2 wins, 1 tie, 1 loss of 4)" in summary_lines(summary, "tiny-simpo")[0]


def test_alpaca_eval_records_pair_both_replies_on_the_instruction():
    questions = load_questions("alpaca_eval", str(SHIPPED / "alpaca_eval.json"))
    replies = {q.prompt_id: [f"model {q.prompt_id}"] for q in questions}
    opponent = {q.prompt_id: [f"opponent {q.prompt_id}"] for q in questions}

    records = win_rate_records(questions, replies, opponent)

    assert records[2] == {
        "prompt_id": "2",
        "question_id": "2",
        "turn": 1,
        "prompt": [{"role": "user", "content": "Sort: 5 5 0 \u00e9 "}],
        "samples": [
            {"text": "model 2", "side": "model"},
            {"text": "opponent 2", "side": "opponent"},
        ],
    }


def test_alpaca_eval_opponent_joins_on_the_exact_instruction(tmp_path):
    questions = load_questions("alpaca_eval", str(SHIPPED / "alpaca_eval.json"))
    answers = {q.prompt_id: [f"answer {q.prompt_id}"] for q in questions}
    path = write_answers("alpaca_eval", questions, answers, tmp_path, "other-model")
    rows = json.loads(path.read_text(encoding="utf-8"))

    # Reordered rows and an extra instruction still join: the judge joins on the instruction.
    extra = {"instruction": "Not asked", "output": "-", "generator": "other-model"}
    path.write_text(json.dumps([extra, *rows[::-1]]), encoding="utf-8")
    # Named as the user gave it, not after the file's `generator` (which may be anyone's).
    assert opponent_replies("alpaca_eval", questions, str(path)) == (str(path), answers)

    # The trailing space of "Sort: 5 5 0 é " lost: the judge would not find that output.
    rows[2]["instruction"] = rows[2]["instruction"].rstrip()
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError) as err:
        opponent_replies("alpaca_eval", questions, str(path))
    message = one_line(err)
    assert message.startswith(f"{path}: no answer to instruction 'Sort: 5 5 0 é '")
    assert "alpaca_eval.json: item 3; 1 of 4 questions unanswered" in message
    assert "exact instruction" in message


def test_reference_needs_an_output_column(tmp_path):
    source = tmp_path / "eval.json"
    source.write_text(json.dumps([{"instruction": "Sort: 2 1", "dataset": "x"}]))
    questions = load_questions("alpaca_eval", str(source))

    with pytest.raises(DataError) as err:
        opponent_replies("alpaca_eval", questions, "reference")
    assert one_line(err).startswith(f"{source}: item 1: no reference 'output'")


# --------------------------------------------------------------------------- Arena-Hard


@pytest.mark.parametrize(
    "model_layout, opponent_layout", [("v0.1", "current"), ("current", "v0.1")]
)
def test_arena_hard_both_layouts_read_back(tmp_path, rewards_file, model_layout, opponent_layout):
    """Reward -|len - 10|. Model replies of 10, 8, 3 characters (rewards 0, -2, -7); the
    opponent's of 6, 8, 10 (rewards -4, -2, 0). Pairs: win, tie, loss.

        hard = (1 + 0.5 + 0) / 3 = 0.5
        soft = (s(4) + s(0) + s(-7)) / 3
    """
    name = "v0.1.jsonl" if model_layout == "v0.1" else "v2.0.jsonl"
    questions = load_questions("arena_hard", str(SHIPPED / f"arena_hard_{name}"))
    model = one_turn(questions, ["1 2 3 4 5 ", "1 2 3 4 ", "123"])
    other = one_turn(questions, ["1 2 3 ", "12345678", "0123456789"])
    write_answers(
        "arena_hard",
        questions,
        model,
        tmp_path / "a",
        "mine",
        model_layout,
        count_tokens=count_words,
    )
    path = write_answers(
        "arena_hard",
        questions,
        other,
        tmp_path / "b",
        "gpt-4-0314",
        opponent_layout,
        count_tokens=count_words,
    )

    model_name, replies = read_replies("arena_hard", questions, tmp_path / "a")
    opponent_name, opponent = opponent_replies("arena_hard", questions, str(path))
    records = win_rate_records(questions, replies, opponent)
    summary = summarize_win_rates(
        records, score_records(records, scorer(rewards_file, "length"), False), opponent_name
    )

    assert (model_name, replies) == ("mine", model)
    assert (opponent_name, opponent) == (str(path), other)  # named as the user gave it
    assert summary["win_rate"] == 0.5
    assert summary["soft_win_rate"] == pytest.approx((sigmoid(4) + 0.5 + sigmoid(-7)) / 3)
    assert [row["prompt_id"] for row in summary["rows"]] == [q.prompt_id for q in questions]


def test_arena_hard_has_no_reference_in_its_question_file():
    questions = load_questions("arena_hard", str(SHIPPED / "arena_hard_v0.1.jsonl"))

    with pytest.raises(UserError) as err:
        opponent_replies("arena_hard", questions, "reference")

    message = one_line(err)
    assert message.startswith("--against reference: arena_hard's question file holds no reference")
    assert "model_answer/gpt-4-0314.jsonl" in message and "output folder" in message


def test_a_missing_answer_names_the_question_and_how_many(tmp_path):
    questions = load_questions("arena_hard", str(SHIPPED / "arena_hard_v0.1.jsonl"))
    answers = {q.prompt_id: ["1 2"] for q in questions}
    path = write_answers(
        "arena_hard", questions, answers, tmp_path, "base", count_tokens=count_words
    )
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n")

    with pytest.raises(DataError) as err:
        opponent_replies("arena_hard", questions, str(path))

    message = one_line(err)
    assert message.startswith(f"{path}: no answer to question tiny-sort-002 (")
    assert "2 of 3 questions unanswered" in message


def test_a_folder_with_two_models_names_both(tmp_path):
    questions = load_questions("arena_hard", str(SHIPPED / "arena_hard_v0.1.jsonl"))
    answers = {q.prompt_id: ["1 2"] for q in questions}
    for model_id in ("model-a", "model-b"):
        write_answers(
            "arena_hard", questions, answers, tmp_path, model_id, count_tokens=count_words
        )

    with pytest.raises(UserError) as err:
        opponent_replies("arena_hard", questions, str(tmp_path))

    message = one_line(err)
    assert "holds the answers of 2 models (model-a, model-b)" in message
    assert str(tmp_path / "model_answer" / "model-a.jsonl") in message
    with pytest.raises(UserError, match="no model_answer/"):
        opponent_replies("arena_hard", questions, str(tmp_path / "model_answer"))
    with pytest.raises(UserError, match="no such checkpoint, file or folder"):
        opponent_replies("arena_hard", questions, str(tmp_path / "nowhere"))


def test_a_misspelt_opponent_gets_the_checkpoints_and_a_did_you_mean(tmp_path, monkeypatch):
    """--against tiny-sftt beside the checkpoints tiny-sft and tiny-preference: the list of
    what exists and the close name; a folder given by a relative path keeps that name."""
    questions = load_questions("arena_hard", str(SHIPPED / "arena_hard_v0.1.jsonl"))
    with pytest.raises(UserError) as err:
        opponent_replies(
            "arena_hard", questions, "tiny-sftt", "--against", ["tiny-sft", "tiny-preference"]
        )
    assert one_line(err).startswith(
        "--against tiny-sftt: no such checkpoint, file or folder; did you mean tiny-sft? give "
        "one of the checkpoints evaluated here (tiny-sft, tiny-preference), "
    )
    answers = {q.prompt_id: ["1 2"] for q in questions}
    write_answers("arena_hard", questions, answers, tmp_path / "base", "x", count_tokens=len)
    monkeypatch.chdir(tmp_path)
    assert opponent_replies("arena_hard", questions, "base/")[0] == "base"
    assert opponent_replies("arena_hard", questions, str(tmp_path / "base"))[0] == "base"


WRONG_FORMAT = [
    # (benchmark, a row, what the error names)
    (
        "mt_bench",
        {"question_id": 81, "choices": [{"turns": [{"content": "a"}]}]},
        "choices[0].turns",
    ),
    (
        "mt_bench",
        {"question_id": "81", "choices": [{"turns": ["a", "b"]}]},
        "question_id must be an integer",
    ),
    (
        "arena_hard",
        {"question_id": "tiny-sort-001", "choices": []},
        "no choices[0].turns[0].content",
    ),
    (
        "arena_hard",
        {"uid": "tiny0001", "messages": [{"content": "x"}]},
        "no messages[-1].content.answer",
    ),
]


@pytest.mark.parametrize("benchmark, row, named", WRONG_FORMAT)
def test_a_row_of_the_wrong_format_names_the_line_and_field(tmp_path, benchmark, row, named):
    question_file = "mt_bench.jsonl" if benchmark == "mt_bench" else "arena_hard_v0.1.jsonl"
    questions = load_questions(benchmark, str(SHIPPED / question_file))
    path = tmp_path / "model.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n")

    with pytest.raises(DataError) as err:
        opponent_replies(benchmark, questions, str(path))

    message = one_line(err)
    assert message.startswith(f"{path}: line 2: ")
    assert named in message and "rows look like" in message


# --------------------------------------------------------------------------- MT-Bench

# Turn 1 is scored by length (-|len - 10|); turn 2 by whether the reply repeats the turn-1
# answer in its history. No reply contains the other side's turn-1 answer.
MT_MODEL = {
    "81": ["sorted 123", "sorted 123 -> 321"],
    "82": ["sorted1469", "sorted1469 -> 25710"],
    "83": ["s 258", "369"],
    "84": ["sorted 077", "sorted 077 -> 07"],
}
MT_OPPONENT = {
    "81": ["answer 123", "answer 123 -> 321"],
    "82": ["a: 1469", "25710"],
    "83": ["answer 258", "answer 258 answer 258"],
    "84": ["answer: 077", "07"],
}


def test_mt_bench_turn_two_is_scored_with_each_sides_own_history(tmp_path, rewards_file):
    """Turn 1, reward -|len - 10|: model lengths 10, 10, 5, 10 (rewards 0, 0, -5, 0), the
    opponent's 10, 7, 10, 11 (0, -3, 0, -1): tie, win, loss, win.
    Turn 2, reward 1 when the reply repeats the turn-1 answer in its history: with each side's
    own history the model gets 1, 1, 0, 1 and the opponent 1, 0, 1, 0: tie, win, loss, win.
    (Swapped histories would give 0 everywhere, all ties; the model's history for both, the
    model 1, 1, 0, 1 and the opponent 0s.)

        turn 1: hard (0.5 + 1 + 0 + 1) / 4 = 0.625, soft (s(0) + s(3) + s(-5) + s(1)) / 4
        turn 2: hard 0.625,                          soft (s(0) + s(1) + s(-1) + s(1)) / 4
        all 8:  hard 0.625, soft the mean of the two
    """
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    write_answers("mt_bench", questions, MT_MODEL, tmp_path / "mine", "tiny-simpo")
    path = write_answers("mt_bench", questions, MT_OPPONENT, tmp_path / "other", "zephyr")

    model_name, replies = read_replies("mt_bench", questions, tmp_path / "mine")
    opponent_name, opponent = opponent_replies("mt_bench", questions, str(path))
    records = win_rate_records(questions, replies, opponent)
    scores = score_records(records, scorer(rewards_file, "mt_bench"), False)
    summary = summarize_win_rates(records, scores, opponent_name)

    assert (model_name, replies, opponent_name, opponent) == (
        "tiny-simpo",
        MT_MODEL,
        str(path),
        MT_OPPONENT,
    )
    by_id = {record["prompt_id"]: record for record in records}
    assert len(records) == 12 and sum(len(r["samples"]) for r in records) == 16  # each reply once
    for question in questions:
        qid = question.prompt_id
        assert [s["side"] for s in by_id[qid]["samples"]] == ["model", "opponent"]
        for side, own in (("model", MT_MODEL), ("opponent", MT_OPPONENT)):
            record = by_id[f"{qid}:turn2:{side}"]
            assert record["prompt"] == [
                {"role": "user", "content": question.turns[0]},
                {"role": "assistant", "content": own[qid][0]},
                {"role": "user", "content": question.turns[1]},
            ]
            assert record["samples"] == [{"text": own[qid][1], "side": side}]
            assert (record["question_id"], record["turn"]) == (qid, 2)

    turn1, turn2 = summary["per_turn"]["turn1"], summary["per_turn"]["turn2"]
    soft1 = (0.5 + sigmoid(3) + sigmoid(-5) + sigmoid(1)) / 4
    soft2 = (0.5 + sigmoid(1) + sigmoid(-1) + sigmoid(1)) / 4
    assert (turn1["win_rate"], turn1["soft_win_rate"]) == (0.625, pytest.approx(soft1))
    assert (turn2["win_rate"], turn2["soft_win_rate"]) == (0.625, pytest.approx(soft2))
    assert turn2["mean_reward"] == {"model": 0.75, "opponent": 0.5}
    assert (summary["n"], summary["win_rate"]) == (8, 0.625)
    assert summary["soft_win_rate"] == pytest.approx((soft1 + soft2) / 2)
    assert [row["prompt_id"] for row in summary["rows"][:2]] == ["81", "81:turn2"]


def test_mt_bench_needs_one_reply_per_turn(tmp_path):
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    path = write_answers("mt_bench", questions, MT_OPPONENT, tmp_path, "zephyr")
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    row["choices"][0]["turns"] = row["choices"][0]["turns"][:1]
    path.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")

    with pytest.raises(DataError) as err:
        opponent_replies("mt_bench", questions, str(tmp_path))

    assert one_line(err).startswith(f"{path}: line 2: 1 replies for the 2 turns of question 82")


def test_summary_refuses_scores_that_do_not_fit_the_records():
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    records = win_rate_records(questions, MT_MODEL, MT_OPPONENT)
    scores = [[0.0] * len(record["samples"]) for record in records]

    with pytest.raises(ValueError, match="score lists for 12 records"):
        summarize_win_rates(records, scores[:-1], "zephyr")
    scores[-1] = [math.nan]
    with pytest.raises(ValueError, match="84:turn2:opponent"):
        summarize_win_rates(records, scores, "zephyr")
    with pytest.raises(ValueError, match="the opponent needs 2 replies"):
        win_rate_records(questions, MT_MODEL, {**MT_OPPONENT, "81": ["one"]})


def test_a_question_answered_twice_names_both_lines(tmp_path):
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    path = write_answers("mt_bench", questions, MT_OPPONENT, tmp_path, "zephyr")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[0]]) + "\n")

    with pytest.raises(DataError) as err:
        opponent_replies("mt_bench", questions, str(path))

    assert one_line(err).startswith(f"{path}: line 5: answers 81 again (first at line 1)")
