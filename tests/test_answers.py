"""`simpo eval MODEL --benchmark ...` through the real CLI on the tiny model: answer files read
back the way the official evaluators read them, MT-Bench's second turn generated with the first
answer in its history, resume, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import count_sampled_prompts

from simpo_cli.recipe import RECIPES_DIR

QUESTIONS = RECIPES_DIR / "tiny" / "benchmarks"
WORK = Path("checkpoints") / "tiny-ckpt" / "mt_bench"  # generation passes, judge-free numbers


def simpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny recipe's seeded model with its tokenizer, saved as a checkpoint folder."""
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-ckpt")


@pytest.fixture(scope="module")
def mt_bench(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "answers"
    result = simpo(
        "eval",
        model_dir,
        "--benchmark",
        "mt_bench",
        "--questions",
        QUESTIONS / "mt_bench.jsonl",
        "--output-dir",
        out,
    )  # fmt: skip  (FastChat's 1024 new tokens, capped to what the tiny model's 128 leave)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out, result.stdout


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def test_mt_bench_file_as_fastchat_reads_it(mt_bench):
    out, stdout = mt_bench
    questions = jsonl(QUESTIONS / "mt_bench.jsonl")
    # FastChat's load_model_answers: model name = file name, answers keyed by question_id,
    # choices[0]["turns"] a list of strings, one per question turn.
    path = out / "mt_bench" / "model_answer" / "tiny-ckpt.jsonl"
    answers = {row["question_id"]: row for row in jsonl(path)}
    assert set(answers) == {q["question_id"] for q in questions}
    for question in questions:
        row = answers[question["question_id"]]
        assert row["model_id"] == "tiny-ckpt"
        turns = row["choices"][0]["turns"]
        assert len(turns) == len(question["turns"]) and all(isinstance(t, str) for t in turns)
    assert f"wrote {path} (4 answers in 8 turns, mean " in stdout  # questions, then turns
    assert f"wrote {out / 'comparison.png'}" in stdout  # a table without pairs has its plot too
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_mt_bench_answers_stay_within_the_models_context(mt_bench, model_dir):
    """No pass asks for more new tokens than the 128 positions leave: every prompt plus its
    answer fits, the cap is said once for the benchmark, and the settings beside the answers
    record it."""
    from simpo_cli.data import load_tokenizer
    from simpo_cli.onpolicy.sampling import Prompt, render_prompt_ids
    from simpo_cli.recipe import ModelSettings

    out, stdout = mt_bench
    assert stdout.count("mt_bench: max_new_tokens 1024 capped to 31 per turn") == 1
    tokenizer = load_tokenizer(ModelSettings(name_or_path=str(model_dir)))
    for shard in (out / WORK / "generation").glob("*/samples-rank0.jsonl"):
        header, *records = jsonl(shard)
        assert header["generation"]["max_new_tokens"] <= 31
        for record in records:
            prompt = Prompt(record["prompt_id"], record["prompt"], "q")
            assert len(render_prompt_ids(tokenizer, prompt)) + record["samples"][0]["tokens"] <= 128
    settings = json.loads((out / "mt_bench" / "generation_settings" / "tiny-ckpt.json").read_text())
    assert "capped to 31 by the model's context" in json.dumps(settings)


def test_mt_bench_second_turn_sees_the_first_answer(mt_bench):
    out, _ = mt_bench
    questions = {q["question_id"]: q for q in jsonl(QUESTIONS / "mt_bench.jsonl")}
    answers = {
        row["question_id"]: row
        for row in jsonl(out / "mt_bench" / "model_answer" / "tiny-ckpt.jsonl")
    }
    second = [
        record
        for folder in sorted((out / WORK / "generation").glob("turn2-*"))
        for record in jsonl(folder / "samples-rank0.jsonl")
        if "prompt_id" in record
    ]
    assert len(second) == len(questions)
    for record in second:
        question = questions[int(record["prompt_id"])]
        first_answer = answers[question["question_id"]]["choices"][0]["turns"][0]
        assert record["prompt"] == [
            {"role": "user", "content": question["turns"][0]},
            {"role": "assistant", "content": first_answer},
            {"role": "user", "content": question["turns"][1]},
        ]


def test_mt_bench_temperatures_per_category_and_judge_free_numbers(mt_bench):
    out, _ = mt_bench
    questions = jsonl(QUESTIONS / "mt_bench.jsonl")
    categories = {q["category"] for q in questions}
    expected = {"writing": 0.7, "math": 0.0, "coding": 0.0, "stem": 0.1}
    folders = {p.name for p in (out / WORK / "generation").iterdir()}
    for temperature in {expected[c] for c in categories}:
        assert f"turn1-temperature{temperature:g}" in folders
    header = jsonl(out / WORK / "generation" / "turn1-temperature0" / "samples-rank0.jsonl")[0]
    assert header["generation"]["temperature"] == 0.0  # below 1e-4: greedy, as FastChat
    numbers = json.loads((out / WORK / "judge_free.json").read_text())
    assert numbers["turns_generated"] == sum(len(q["turns"]) for q in questions)
    assert 0 < numbers["mean_tokens"] <= 31 and 0 <= numbers["cut_at_max_new_tokens"] <= 1


def test_alpaca_eval_keeps_instructions_and_order_and_resumes(
    cli, model_dir, tmp_path, monkeypatch
):
    out = tmp_path / "alpaca"
    command = [
        "eval", model_dir, "--benchmark", "alpaca_eval", "--questions",
        QUESTIONS / "alpaca_eval.json", "--output-dir", out, "--max-new-tokens", "6",
        "--model-id", "tiny-simpo",
    ]  # fmt: skip
    result = simpo(*command)
    assert result.returncode == 0, result.stderr[-2000:]
    source = json.loads((QUESTIONS / "alpaca_eval.json").read_text(encoding="utf-8"))
    answers = out / "alpaca_eval" / "tiny-simpo" / "model_outputs.json"
    rows = json.loads(answers.read_text(encoding="utf-8"))
    assert [r["instruction"] for r in rows] == [q["instruction"] for q in source]
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in rows)
    assert {r["generator"] for r in rows} == {"tiny-simpo"}

    # A run stopped after 2 answers leaves them in the generation shard: the rerun answers the
    # other questions only. (Answering them all again would give the same file, sampling being
    # seeded per question: the questions asked tell a resume from a restart.)
    [shard] = out.rglob("samples-rank0.jsonl")
    header, *records = shard.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(records) == len(source)
    shard.write_text("\n".join([header, *records[:2]]) + "\n", encoding="utf-8")
    asked = count_sampled_prompts(monkeypatch)
    again = cli(*command)
    assert again.code == 0, again.stderr[-2000:]
    assert asked == [json.loads(record)["prompt_id"] for record in records[2:]]
    assert json.loads(answers.read_text(encoding="utf-8")) == rows

    asked.clear()
    again = cli(*command)  # every answer is there: nothing is generated again
    assert again.code == 0, again.stderr[-2000:]
    assert asked == []
    assert json.loads(answers.read_text(encoding="utf-8")) == rows


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "give --pairs (score pairs), --benchmark (write answers) or --lm-eval"),
        (["--benchmark", "alpacaeval", "-o", "x"], "unknown benchmark 'alpacaeval'"),
        (["--benchmark", "mt_bench"], "--benchmark writes answer files; give -o DIR"),
        # The default question set is the hub's copy of FastChat's (the tests run offline).
        (["--benchmark", "mt_bench", "-o", "x"], "cannot load 'lighteval/mt-bench'"),
        (["--benchmark", "mt_bench", "-o", "x", "--questions", "nope.jsonl"], "nope.jsonl"),
        (
            ["--benchmark", "mt_bench", "-o", "x", "--questions", "BAD"],
            "line 1",  # a question file in the wrong format names the line and the field
        ),
    ],
)
def test_bad_benchmark_input_is_one_line(cli, model_dir, tmp_path, args, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "math"}) + "\n")
    args = [str(bad) if a == "BAD" else str(tmp_path / a) if a == "x" else a for a in args]
    result = cli("eval", model_dir, *args)
    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.errors()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    if "BAD" in args or str(bad) in args:
        assert "turns" in lines[0]


def test_a_model_without_a_chat_template_is_one_line(cli, model_dir, tmp_path):
    """Questions cannot be rendered as the model was trained: refused before generating."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    result = cli("eval", bare, "--benchmark", "alpaca_eval", "--questions",
                 QUESTIONS / "alpaca_eval.json", "-o", tmp_path / "out")  # fmt: skip
    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.errors()
    assert len(lines) == 1 and "has no chat template" in lines[0], result.stderr
    assert not (tmp_path / "out" / "alpaca_eval").exists()


def test_exact_match_counts_answers_equal_to_the_reference_and_shows_them(tmp_path):
    """Three questions, references "1 2 3", "4 5", "0 0 7". Checkpoint a answers " 1 2 3" (the
    space a tokenizer fuses to the first digit does not count), "5 4" and "0 0 7\\n": 2 of 3.
    Checkpoint b answers "1 1 1 1 1 1 1 1 1 1 1 1" to all: 0 of 3, and its quoted answer is cut
    to the width with '...'. A question without a reference is refused by name."""
    from simpo_cli.errors import DataError
    from simpo_cli.evaluate.answers import check_references, exact_matches, side_by_side
    from simpo_cli.evaluate.benchmarks import load_questions

    rows = [
        {"instruction": "Sort: 3 1 2", "output": "1 2 3"},
        {"instruction": "Sort: 5 4", "output": "4 5"},
        {"instruction": "Sort: 7 0 0", "output": "0 0 7"},
    ]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(rows))
    questions = load_questions("alpaca_eval", str(path))
    check_references(questions)
    a = {"0": [" 1 2 3"], "1": ["5 4"], "2": ["0 0 7\n"]}
    b = {str(i): ["1 1 1 1 1 1 1 1 1 1 1 1"] for i in range(3)}
    assert exact_matches(questions, a) == {
        "exact_match": pytest.approx(2 / 3), "exact_matches": 2, "questions": 3,
    }  # fmt: skip
    assert exact_matches(questions, b)["exact_matches"] == 0

    lines = side_by_side("alpaca_eval", questions, {"sft": a, "simpo": b}, shown=2, width=20)
    assert lines == [
        "alpaca_eval: the first 2 of 3 questions (= marks an answer equal to the reference)",
        '  "Sort: 3 1 2"  reference "1 2 3"',
        '    sft    = " 1 2 3"',
        '    simpo    "1 1 1 1 1 1 1 1..."',  # 20 characters
        '  "Sort: 5 4"  reference "4 5"',
        '    sft      "5 4"',
        '    simpo    "1 1 1 1 1 1 1 1..."',  # 20 characters
        "alpaca_eval exact match: sft    0.67 (2 of 3)",
        "alpaca_eval exact match: simpo  0.00 (0 of 3)",
    ]

    path.write_text(json.dumps([*rows, {"instruction": "Sort: 9 8"}]))
    with pytest.raises(DataError, match=r"questions.json: item 4: no reference answer"):
        check_references(load_questions("alpaca_eval", str(path)))
