"""Benchmark answer files: read back the way the official evaluators read them.

The readers below are written independently of simpo_cli.evaluate.benchmarks, from the field
accesses the official code makes (../shared/reference/evaluation.md): AlpacaEval loads the JSON
list and joins outputs to the reference on `instruction`; Arena-Hard v0.1 keys answers by file
name and `question_id` and reads `choices[0]["turns"][0]["content"]` and `token_len`; the
current Arena-Hard reads `messages[-1]["content"]["answer"]` keyed by `uid`; FastChat's
llm_judge reads `choices[0]["turns"]` (one string per turn) keyed by `question_id`. Question
files are the tiny ones shipped under recipes/tiny/benchmarks. No network; up to the Arena-Hard
runs of the real CLI at the end (the tiny model), no model: replies are made up.
"""

import json
import math
import subprocess
import sys
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
    """A stand-in for Arena-Hard's tiktoken count, whose encoding would be downloaded."""
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


def test_new_tokens_are_capped_to_what_the_context_leaves(tok, capsys):
    """The tiny model reads 128 positions. MT-Bench's longest question (84) renders its two
    turns, before any answer, as 65 tokens: (128 - 65) // 2 = 31 tokens per answer, down from
    FastChat's 1024. AlpacaEval's 4096: what its longest prompt leaves. A model that reads more
    keeps the defaults; one that cannot hold a question is one line naming it. A later pass whose
    history came back longer than generated gets what its longest prompt leaves, with a line."""
    from simpo_cli.evaluate.context import fit_to_context, pass_limit
    from simpo_cli.onpolicy.sampling import Prompt

    questions = load_questions("mt_bench", str(SHIPPED / "mt_bench.jsonl"))
    skeletons = [
        len(render_prompt_ids(tok, turn_prompts([q], 1, {q.prompt_id: [""]})[0])) for q in questions
    ]
    assert max(skeletons) == skeletons[3] == 65  # question 84
    capped, line = fit_to_context(decoding_defaults("mt_bench"), questions, tok, 128)
    assert capped.max_new_tokens == 31 and "capped to 31 by the model's context" in capped.source
    assert line == (
        "mt_bench: max_new_tokens 1024 capped to 31 per turn (2 turns share what is left): the "
        "model reads 128 tokens and question 84's turns take 65 of them before any answer"
    )
    alpaca = load_questions("alpaca_eval", str(SHIPPED / "alpaca_eval.json"))
    longest = max(len(render_prompt_ids(tok, p)) for p in turn_prompts(alpaca, 0, {}))
    capped, line = fit_to_context(decoding_defaults("alpaca_eval"), alpaca, tok, 128)
    assert capped.max_new_tokens == 128 - longest and "per turn" not in line
    wide = decoding_defaults("mt_bench")
    assert fit_to_context(wide, questions, tok, 4096) == (wide, None)
    assert fit_to_context(wide, questions, tok, None) == (wide, None)
    with pytest.raises(UserError, match="question 84 leaves no room for an answer"):
        fit_to_context(wide, questions, tok, 66)

    history = [
        {"role": "user", "content": "Sort: 1 2"},
        {"role": "assistant", "content": "9" * 200},
    ]
    long = Prompt("7", [*history, {"role": "user", "content": "Again."}], "q")
    length = len(render_prompt_ids(tok, long))
    capsys.readouterr()
    assert pass_limit(wide, [long], tok, 256, 1, "m") == 256 - length
    assert f"turn 2: max_new_tokens 1024 capped to {256 - length} for 1 question: question 7" in (
        capsys.readouterr().out
    )
    assert pass_limit(wide, [long], tok, 8, 1, "m") == 1  # past the context: cut at once


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


# --------------------------------------------------------------------------- Arena-Hard via the CLI

# tiktoken's encodings are downloaded on first use. The runs below stand in at that fetch: a
# byte-level vocabulary (one token per UTF-8 byte, no merges) in place of the cl100k_base file, so
# token_len is the answer's length in bytes; or no network at all (name resolution fails, as on a
# compute node), so that tiktoken's own request fails as it does offline.
BYTE_LEVEL_TIKTOKEN = """
import base64, sys
import tiktoken.load

def fetch(blobpath, expected_hash=None):
    assert blobpath.endswith("/cl100k_base.tiktoken"), blobpath  # gpt-3.5-turbo's encoding
    return b"".join(base64.b64encode(bytes([b])) + b" %d\\n" % b for b in range(256))

tiktoken.load.read_file_cached = fetch
from simpo_cli.cli import main
main()
"""
RM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
)
BASELINE = ["1 3 4", "0 2 7 8", "9"]  # the baseline's answers to the three tiny questions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny recipe's seeded model with its tokenizer, saved as a checkpoint folder."""
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-ckpt")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A 1-layer sequence-classification reward model on the tiny tokenizer, with a chat
    template of its own; seeded, runs on the CPU."""
    import torch
    from conftest import TINY_TOKENIZER
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=4, num_labels=1,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    tokenizer.chat_template = RM_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def arena_hard(model_dir, reward_model, tmp_path_factory):
    """`simpo eval MODEL --benchmark arena_hard` with --temperature 0.5 (the benchmark's own is
    0) and a reward-model win rate against a baseline's answer file (written here by hand in
    the v0.1 layout), tiktoken's download stood in by BYTE_LEVEL_TIKTOKEN."""
    base = tmp_path_factory.mktemp("arena")
    baseline = base / "gpt-4-0314.jsonl"
    rows = official_jsonl(SHIPPED / "arena_hard_v0.1.jsonl")
    baseline.write_text(
        "".join(
            json.dumps({"question_id": row["question_id"], "model_id": "gpt-4-0314",
                        "choices": [{"index": 0, "turns": [{"content": text, "token_len": 1}]}]})
            + "\n"
            for row, text in zip(rows, BASELINE, strict=True)
        )
    )  # fmt: skip
    out = base / "eval"
    result = subprocess.run(
        [sys.executable, "-c", BYTE_LEVEL_TIKTOKEN, "eval", model_dir, "--benchmark",
         "arena_hard", "--questions", SHIPPED / "arena_hard_v0.1.jsonl", "-o", out,
         "--max-new-tokens", "6", "--temperature", "0.5", "--against", baseline,
         "--reward-model", reward_model],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_arena_hard_through_the_cli_as_arena_hard_auto_reads_it(arena_hard):
    """The answer file in model_answer/, read as arena-hard-auto's load_model_answers reads it:
    the model name from the file name, one row per question_id, each turn's content with its
    token_len (here the content's UTF-8 bytes: the byte-level stand-in for cl100k_base). The
    contents are the answers the model generated (the generation pass's samples)."""
    out, stdout = arena_hard
    raw = official_jsonl(SHIPPED / "arena_hard_v0.1.jsonl")
    models = official_model_answers(out / "arena_hard" / "model_answer", "question_id")
    assert list(models) == ["tiny-ckpt"]
    assert list(models["tiny-ckpt"]) == [r["question_id"] for r in raw]
    generation = out / "checkpoints" / "tiny-ckpt" / "arena_hard" / "generation"
    samples = {
        record["prompt_id"]: record["samples"][0]["text"]
        for record in official_jsonl(generation / "turn1-temperature0.5" / "samples-rank0.jsonl")
        if "prompt_id" in record
    }
    for question_id, row in models["tiny-ckpt"].items():
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert row["model_id"] == "tiny-ckpt" and row["choices"][0]["index"] == 0
        [turn] = row["choices"][0]["turns"]
        assert turn["content"] == samples[question_id]
        assert turn["token_len"] == len(turn["content"].encode("utf-8"))
    assert any(row["choices"][0]["turns"][0]["content"] for row in models["tiny-ckpt"].values())
    assert f"wrote {out / 'comparison.md'}" in stdout


def test_temperature_flag_decides_how_arena_hard_is_sampled(arena_hard):
    """--temperature 0.5: one generation pass sampled at 0.5 (Arena-Hard's own setting, 0, would
    decode greedily in a turn1-temperature0 pass), and the settings beside the answers say so."""
    out, _ = arena_hard
    work = out / "checkpoints" / "tiny-ckpt" / "arena_hard" / "generation"
    assert [p.name for p in work.iterdir()] == ["turn1-temperature0.5"]
    header = official_jsonl(work / "turn1-temperature0.5" / "samples-rank0.jsonl")[0]
    assert header["generation"]["temperature"] == 0.5
    written = json.loads(
        (out / "arena_hard" / "generation_settings" / "tiny-ckpt.json").read_text()
    )
    assert written["decoding"]["temperature"] == 0.5
    assert written["decoding"]["source"] == "--temperature"


def test_reward_model_win_rate_through_the_cli(arena_hard, reward_model):
    """--against the baseline's file --reward-model RM: each answer and the baseline's scored
    here by the reward model alone (its template, one conversation per forward pass), then
    counted: a win when the model's reward is higher, a tie (0.5) when equal."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    out, stdout = arena_hard
    rm = LlamaForSequenceClassification.from_pretrained(reward_model).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(reward_model)

    def reward(question: str, reply: str) -> float:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        text = rm_tokenizer.apply_chat_template(messages, tokenize=False)
        ids = rm_tokenizer(text, add_special_tokens=False)["input_ids"]  # the template's BOS
        with torch.no_grad():
            return rm(input_ids=torch.tensor([ids])).logits[0, 0].item()

    questions = official_jsonl(SHIPPED / "arena_hard_v0.1.jsonl")
    answers = {
        row["question_id"]: row["choices"][0]["turns"][0]["content"]
        for row in official_jsonl(out / "arena_hard" / "model_answer" / "tiny-ckpt.jsonl")
    }
    margins = [
        reward(q["turns"][0]["content"], answers[q["question_id"]])
        - reward(q["turns"][0]["content"], baseline)
        for q, baseline in zip(questions, BASELINE, strict=True)
    ]
    assert min(abs(m) for m in margins) > 1e-4  # no pair so close that rounding decides it
    got = json.loads((out / "checkpoints/tiny-ckpt/arena_hard/win_rate.json").read_text())
    assert got["opponent"] == str(out.parent / "gpt-4-0314.jsonl")  # as given to --against
    assert got["n"] == 3
    assert (got["wins"], got["losses"]) == (
        sum(m > 0 for m in margins),
        sum(m < 0 for m in margins),
    )
    assert got["win_rate"] == sum(m > 0 for m in margins) / 3
    assert got["soft_win_rate"] == pytest.approx(sum(1 / (1 + math.exp(-m)) for m in margins) / 3)
    row_margins = [row["model_reward"] - row["opponent_reward"] for row in got["rows"]]
    assert row_margins == pytest.approx(margins, abs=1e-5)
    assert f"tiny-ckpt vs {got['opponent']}: hard win rate" in stdout


def test_arena_hard_without_tiktoken_is_one_line(cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` fails
    result = cli("eval", model_dir, "--benchmark", "arena_hard", "--questions",
                 SHIPPED / "arena_hard_v0.1.jsonl", "-o", tmp_path / "out", "--max-new-tokens",
                 "2")  # fmt: skip
    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.errors() == [
        "error: Arena-Hard answers need tiktoken to count token_len: pip install tiktoken"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "layout, questions, encoding",
    [("v0.1", "arena_hard_v0.1.jsonl", "cl100k_base"), ("current", "arena_hard_v2.0.jsonl",
     "o200k_base")],
)  # fmt: skip
def test_arena_hard_offline_is_one_line_before_any_answer(
    cli, model_dir, tmp_path, monkeypatch, layout, questions, encoding
):
    """No network and an empty tiktoken cache: before any model loads, one line saying how to
    bring the layout's encoding along in TIKTOKEN_CACHE_DIR; an earlier run's files in -o stay
    as they were and nothing is added (no generation pass)."""
    import socket

    import tiktoken.registry

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # what requests meets on a compute node
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # nothing loaded earlier here
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    out = tmp_path / "out"
    earlier = {
        out / "arena_hard" / "model_answer" / "tiny-ckpt.jsonl": '{"question_id": "earlier"}\n',
        out / "comparison.md": "| an earlier run |\n",
    }
    for path, text in earlier.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    result = cli("eval", model_dir, "--benchmark", "arena_hard", "--questions", SHIPPED / questions,
                 "--arena-layout", layout, "-o", out, "--max-new-tokens", "2")  # fmt: skip

    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    [line] = result.errors()
    assert "Traceback" not in result.stderr
    assert line.startswith(f"error: Arena-Hard's token_len needs tiktoken's {encoding} encoding")
    assert f"TIKTOKEN_CACHE_DIR={cache} holds no copy of it" in line
    assert "on a machine with network run `TIKTOKEN_CACHE_DIR=DIR python -c" in line
    assert f"tiktoken.get_encoding('{encoding}')" in line and "set TIKTOKEN_CACHE_DIR" in line
    assert {p: p.read_text() for p in out.rglob("*") if p.is_file()} == earlier
    assert list(cache.iterdir()) == []
