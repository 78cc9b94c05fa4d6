"""Benchmark answer files: read back the way the official evaluators read them.

The readers below are written independently of simpo_cli.evaluate.benchmarks, from the field
accesses the official code makes (../shared/reference/evaluation.md): AlpacaEval loads the JSON
list and joins outputs to the reference on `instruction`; Arena-Hard v0.1 keys answers by file
name and `question_id` and reads `choices[0]["turns"][0]["content"]` and `token_len`; the
current Arena-Hard reads `messages[-1]["content"]["answer"]` keyed by `uid`; FastChat's
llm_judge reads `choices[0]["turns"]` (one string per turn) keyed by `question_id`. Question
files are the tiny ones shipped under recipes/tiny/benchmarks. No network, no model: replies
are made up.
"""

import json
from pathlib import Path

import pytest

from simpo_cli.errors import DataError, UserError
from simpo_cli.evaluate.benchmarks import (
    conversation,
    decoding_defaults,
    group_by_temperature,
    load_questions,
    markdown_counts,
    max_turns,
    read_back,
    turn_prompts,
    write_answers,
)
from simpo_cli.onpolicy.sampling import render_prompt_ids

SHIPPED = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "benchmarks"
MODEL = "tiny-simpo"


def count_words(text: str) -> int:
    """A stand-in for Arena-Hard's tiktoken count (tiktoken is not a test dependency)."""
    return len(text.split())


# --------------------------------------------------------------------------- official readers


def official_alpaca_outputs(path: Path) -> dict[str, dict]:
    """AlpacaEval: a JSON list; each row needs instruction and output; joined on instruction."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(rows, list)
    joined = {}
    for row in rows:
        assert isinstance(row["instruction"], str) and isinstance(row["output"], str)
        joined[row["instruction"]] = row
    assert len(joined) == len(rows), "two outputs share an instruction: the join would drop one"
    return joined


def official_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def official_model_answers(answer_dir: Path, key: str) -> dict[str, dict]:
    """Arena-Hard / FastChat load_model_answers: every *.jsonl in model_answer/, the model name
    from the file name, the answers keyed by question id."""
    models = {}
    for path in sorted(answer_dir.glob("*.jsonl")):
        models[path.stem] = {row[key]: row for row in official_jsonl(path)}
    return models


# --------------------------------------------------------------------------- AlpacaEval 2


def test_alpaca_eval_outputs_keep_instructions_byte_for_byte_and_in_order(tmp_path):
    raw = json.loads((SHIPPED / "alpaca_eval.json").read_text(encoding="utf-8"))
    questions = load_questions("alpaca_eval", str(SHIPPED / "alpaca_eval.json"))
    answers = {q.prompt_id: [f"answer {i}"] for i, q in enumerate(questions)}

    path = write_answers("alpaca_eval", questions, answers, tmp_path, MODEL)

    assert path == tmp_path / "model_outputs.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert [r["instruction"].encode() for r in rows] == [r["instruction"].encode() for r in raw]
    assert [set(r) for r in rows] == [{"instruction", "output", "generator", "dataset"}] * len(raw)
    joined = official_alpaca_outputs(path)
    for i, reference in enumerate(raw):
        row = joined[reference["instruction"]]
        assert row["output"] == f"answer {i}"
        assert row["generator"] == MODEL and row["dataset"] == reference["dataset"]
    assert len(read_back("alpaca_eval", tmp_path, MODEL, questions)) == len(raw)


def test_alpaca_eval_instructions_survive_unusual_characters(tmp_path):
    # Trailing spaces, CRLF, a line separator and a non-BMP character: the judge's join on
    # instruction fails silently if any of them is normalised.
    instructions = ["Sort: 2 1 ", "Sort:\r\n3 1", "Sort\u2028 5 4", "Sort 🙂 9 8", "  Sort: 1"]
    source = tmp_path / "eval.json"
    source.write_text(json.dumps([{"instruction": i, "dataset": "x"} for i in instructions]))
    questions = load_questions("alpaca_eval", str(source))
    answers = {q.prompt_id: ["1 2"] for q in questions}

    write_answers("alpaca_eval", questions, answers, tmp_path / "out", MODEL)

    rows = official_alpaca_outputs(tmp_path / "out" / "model_outputs.json")
    assert [i.encode() for i in rows] == [i.encode() for i in instructions]


# --------------------------------------------------------------------------- Arena-Hard


def test_arena_hard_v01_answers_read_back_like_the_official_reader(tmp_path):
    raw = official_jsonl(SHIPPED / "arena_hard_v0.1.jsonl")
    questions = load_questions("arena_hard", str(SHIPPED / "arena_hard_v0.1.jsonl"))
    answers = {q.prompt_id: [f"1 2 3 {q.prompt_id}"] for q in questions}

    write_answers("arena_hard", questions, answers, tmp_path, MODEL, count_tokens=count_words)

    models = official_model_answers(tmp_path / "model_answer", "question_id")
    assert list(models) == [MODEL]
    assert list(models[MODEL]) == [r["question_id"] for r in raw]
    for question_id, row in models[MODEL].items():
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert row["model_id"] == MODEL and isinstance(row["tstamp"], float)
        assert row["choices"][0]["index"] == 0
        turn = row["choices"][0]["turns"][0]
        assert turn == {"content": f"1 2 3 {question_id}", "token_len": 4}
    answer_ids = [row["answer_id"] for row in models[MODEL].values()]
    assert len(set(answer_ids)) == len(answer_ids)
    read_back("arena_hard", tmp_path, MODEL, questions)


def test_arena_hard_current_layout_reads_back_like_the_official_reader(tmp_path):
    raw = official_jsonl(SHIPPED / "arena_hard_v2.0.jsonl")
    questions = load_questions("arena_hard", str(SHIPPED / "arena_hard_v2.0.jsonl"))
    reply = "# Sorted\n\n1. **four** 4\n2. five\n- __six__\n```\n# not a header\n```"
    answers = {q.prompt_id: [reply] for q in questions}

    write_answers(
        "arena_hard", questions, answers, tmp_path, MODEL, "current", count_tokens=count_words
    )

    models = official_model_answers(tmp_path / "model_answer", "uid")
    assert list(models[MODEL]) == [r["uid"] for r in raw]
    for uid, row in models[MODEL].items():
        assert set(row) == {"uid", "ans_id", "model", "messages", "tstamp", "metadata"}
        assert row["model"] == MODEL
        assert row["messages"][0] == {"role": "user", "content": raw_prompt(raw, uid)}
        assert row["messages"][-1]["role"] == "assistant"
        assert row["messages"][-1]["content"]["answer"] == reply
        metadata = row["metadata"]
        assert metadata["token_len"] == len(reply.split())
        # Counted by hand from `reply`; the fenced "# not a header" is code, not a header.
        assert metadata["header_count"] == {"h1": 1, "h2": 0, "h3": 0, "h4": 0, "h5": 0, "h6": 0}
        assert metadata["list_count"] == {"ordered": 2, "unordered": 1}
        assert metadata["bold_count"] == {"**": 1, "__": 1}
    read_back("arena_hard", tmp_path, MODEL, questions)


def raw_prompt(raw: list[dict], uid: str) -> str:
    return next(r["prompt"] for r in raw if r["uid"] == uid)


def test_markdown_counts_by_level():
    text = "## two\n### three\n###### six\n####### seven is not a header\n#no space\n"
    assert markdown_counts(text)["header_count"] == {
        "h1": 0,
        "h2": 1,
        "h3": 1,
        "h4": 0,
        "h5": 0,
        "h6": 1,
    }


# --------------------------------------------------------------------------- MT-Bench


def fake_generate(prompts) -> dict[str, str]:
    """A stand-in model: replies with the number of messages it saw and the last user turn."""
    return {p.prompt_id: f"saw {len(p.messages)}: {p.messages[-1]['content']}" for p in prompts}


def test_mt_bench_two_passes_keep_the_first_answer_in_the_second_turn(tmp_path):
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    replies: dict[str, list[str]] = {}
    seen = []
    for turn in range(max_turns(questions)):
        prompts = turn_prompts(questions, turn, replies)
        seen.append(prompts)
        for prompt_id, text in fake_generate(prompts).items():
            replies.setdefault(prompt_id, []).append(text)

    assert max_turns(questions) == 2
    for question, prompt in zip(questions, seen[1], strict=True):
        first = f"saw 1: {question.turns[0]}"
        assert prompt.messages == [
            {"role": "user", "content": question.turns[0]},
            {"role": "assistant", "content": first},
            {"role": "user", "content": question.turns[1]},
        ]
        assert replies[question.prompt_id] == [first, f"saw 3: {question.turns[1]}"]

    write_answers("mt_bench", questions, replies, tmp_path, MODEL)

    models = official_model_answers(tmp_path / "model_answer", "question_id")
    assert list(models[MODEL]) == [81, 82, 83, 84]
    for question in questions:
        row = models[MODEL][question.question_id]
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert row["model_id"] == MODEL
        assert row["choices"] == [{"index": 0, "turns": replies[question.prompt_id]}]
    read_back("mt_bench", tmp_path, MODEL, questions)


def test_mt_bench_turn_two_prompt_renders_the_first_answer(tok):
    question = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))[0]
    prompt = turn_prompts([question], 1, {question.prompt_id: ["3 2 1 zyx"]})[0]

    text = tok.decode(render_prompt_ids(tok, prompt))

    assert text.index(question.turns[0]) < text.index("3 2 1 zyx") < text.index(question.turns[1])
    assert conversation(question, []) == [{"role": "user", "content": question.turns[0]}]


def test_turn_two_needs_the_first_reply():
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    with pytest.raises(ValueError, match="turn 2 needs 1 earlier replies"):
        turn_prompts(questions, 1, {})


# --------------------------------------------------------------------------- decoding settings


def test_decoding_defaults_follow_the_paper_and_fastchat():
    mt = decoding_defaults("mt_bench")
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    assert [mt.temperature_for(q) for q in questions] == [0.7, 0.0, 0.1, 0.0]
    assert mt.max_new_tokens == 1024 and mt.temperature == 0.7  # other categories
    groups = group_by_temperature(mt, questions)
    assert {t: [q.question_id for q in g] for t, g in groups.items()} == {
        0.7: [81],
        0.0: [82, 84],
        0.1: [83],
    }
    arena = decoding_defaults("arena_hard")
    assert (arena.temperature, arena.max_new_tokens) == (0.0, 4096)
    alpaca = decoding_defaults("alpaca_eval")
    assert (alpaca.temperature, alpaca.top_p, alpaca.max_new_tokens) == (0.9, 1.0, 4096)
    gemma = decoding_defaults("alpaca_eval", "gemma2")
    assert (gemma.temperature, gemma.max_new_tokens) == (0.5, 4096)
    assert decoding_defaults("alpaca_eval", "mistral-base").max_new_tokens == 2048


def test_settings_are_written_beside_the_answers(tmp_path):
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    replies = {q.prompt_id: ["a", "b"] for q in questions}
    settings = decoding_defaults("mt_bench")

    write_answers(
        "mt_bench", questions, replies, tmp_path, MODEL, settings=settings, record={"seed": 7}
    )

    written = json.loads((tmp_path / "generation_settings" / f"{MODEL}.json").read_text())
    assert written["model_id"] == MODEL and written["seed"] == 7
    assert written["decoding"]["max_new_tokens"] == 1024
    assert written["decoding"]["category_temperatures"]["stem"] == 0.1
    assert [p.name for p in (tmp_path / "model_answer").iterdir()] == [f"{MODEL}.jsonl"]


# --------------------------------------------------------------------------- bad input


BAD_QUESTIONS = [
    # (benchmark, file name, lines, the line and field the error must name)
    (
        "mt_bench",
        "q.jsonl",
        ['{"question_id": 81, "category": "math", "turns": ["a", "b"]}', '{"question_id": 82}'],
        ("line 2", "'category'"),
    ),
    (
        "mt_bench",
        "q.jsonl",
        ['{"question_id": 81, "category": "math", "turns": "a"}'],
        ("line 1", "'turns'"),
    ),
    (
        "mt_bench",
        "q.jsonl",
        ['{"question_id": "81", "category": "math", "turns": ["a"]}'],
        ("line 1", "'question_id'"),
    ),
    (
        "arena_hard",
        "question.jsonl",
        ['{"question_id": "a", "turns": [{"content": "x"}]}', "", '{"question_id": "b"}'],
        ("line 3", "'turns'"),
    ),
    (
        "arena_hard",
        "question.jsonl",
        ['{"question_id": "a", "turns": [{"text": "x"}]}'],
        ("line 1", "'content'"),
    ),
    ("arena_hard", "question.jsonl", ['{"uid": "a", "prompt": 5}'], ("line 1", "'prompt'")),
    (
        "arena_hard",
        "question.jsonl",
        ['{"uid": "a", "prompt": "x"}', '{"uid": "a", "prompt": "y"}'],
        ("line 2", "question id"),
    ),
    (
        "alpaca_eval",
        "eval.json",
        ['[{"instruction": "a"},', '{"output": "b"}]'],
        ("item 2", "'instruction'"),
    ),
    (
        "alpaca_eval",
        "eval.json",
        ['[{"instruction": "a"},', '{"instruction": "a"}]'],
        ("item 2", "instruction"),
    ),
]


@pytest.mark.parametrize("benchmark, name, lines, named", BAD_QUESTIONS)
def test_wrong_format_question_file_is_one_line_naming_file_line_field(
    tmp_path, benchmark, name, lines, named
):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as err:
        load_questions(benchmark, str(path))

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {named[0]}: ")
    assert named[1] in message


def test_unknown_benchmark_names_the_choices(tmp_path):
    with pytest.raises(UserError, match="choose one of alpaca_eval, arena_hard, mt_bench"):
        load_questions("mmlu", str(SHIPPED / "mt_bench.jsonl"))
    with pytest.raises(UserError, match="alpaca_eval, arena_hard, mt_bench"):
        decoding_defaults("alpacaeval")
    with pytest.raises(UserError, match="without '/'"):
        write_answers("mt_bench", [], {}, tmp_path, "org/model")


def test_answers_must_cover_every_question_and_turn(tmp_path):
    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    one_turn = {q.prompt_id: ["only one"] for q in questions}
    with pytest.raises(ValueError, match="expected 2 reply string"):
        write_answers("mt_bench", questions, one_turn, tmp_path, MODEL)
    with pytest.raises(ValueError, match="unknown question ids"):
        write_answers(
            "mt_bench", questions[:1], {"81": ["a", "b"], "99": ["c", "d"]}, tmp_path, MODEL
        )


def test_read_back_names_the_line_and_field_of_a_broken_answer(tmp_path):
    questions = load_questions("arena_hard", str(SHIPPED / "arena_hard_v0.1.jsonl"))
    answers = {q.prompt_id: ["1 2"] for q in questions}
    path = write_answers(
        "arena_hard", questions, answers, tmp_path, MODEL, count_tokens=count_words
    )
    lines = path.read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["choices"][0]["turns"][0]["token_len"]
    path.write_text("\n".join([lines[0], json.dumps(broken), lines[2]]) + "\n")

    with pytest.raises(DataError, match=r"line 2: choices\[0\]\.turns\[0\]: 'token_len'"):
        read_back("arena_hard", tmp_path, MODEL)

    path.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DataError, match="no answer to question id"):
        read_back("arena_hard", tmp_path, MODEL, questions)


def test_read_back_rejects_reordered_alpaca_outputs(tmp_path):
    questions = load_questions("alpaca_eval", str(SHIPPED / "alpaca_eval.json"))
    answers = {q.prompt_id: ["x"] for q in questions}
    path = write_answers("alpaca_eval", questions, answers, tmp_path, MODEL)
    rows = json.loads(path.read_text())
    path.write_text(json.dumps(rows[::-1]))

    with pytest.raises(DataError, match="item 1: 'instruction' differs"):
        read_back("alpaca_eval", tmp_path, MODEL, questions)


def test_questions_load_from_other_sources_through_load_source(tmp_path):
    import datasets

    rows = official_jsonl(SHIPPED / "arena_hard_v0.1.jsonl")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "question.parquet"))

    questions = load_questions("arena_hard", str(tmp_path / "question.parquet"))

    assert [(q.question_id, q.turns[0]) for q in questions] == [
        (r["question_id"], r["turns"][0]["content"]) for r in rows
    ]
    assert questions[1].where.endswith("question.parquet: row 2")
    # No question file: the hub copy of the official set, which these offline tests cannot reach.
    with pytest.raises(DataError, match="cannot load 'lmarena-ai/arena-hard-auto-v0.1'"):
        load_questions("arena_hard")
