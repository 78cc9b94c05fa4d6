"""Judge-free win rates: a checkpoint's benchmark answers against an opponent's, both scored by
a reward model (or a reward function) instead of the benchmark's GPT-4 judge.

A proxy, not the benchmark's score (../shared/reference/evaluation.md section 6): the judge's
preferences and the reward model's differ, and AlpacaEval's length control is not applied. The
numbers: hard win rate (the model's reward above the opponent's: 1, equal: 0.5, below: 0), soft
win rate (mean sigmoid(r_model - r_opponent)), mean reward and mean reply length in characters
of each side (AlpacaEval's avg_length), per turn for MT-Bench.

The opponent is the benchmark's reference (AlpacaEval: the `output` column of the eval set, GPT-4
Turbo's answers), another model's answer file in the official format, or a folder written by
`simpo eval MODEL --benchmark B -o DIR`. Scoring is the caller's, so that it can be spread over
processes:

    questions = benchmarks.load_questions("mt_bench", "question.jsonl")
    model_name, replies = read_replies("mt_bench", questions, "out")   # `simpo eval`'s folder
    opponent_name, opponent = opponent_replies("mt_bench", questions, "other/model_answer/x.jsonl")
    records = win_rate_records(questions, replies, opponent)
    scores = annotate.gather_scores(records, scorer)    # or rewards.score_records(records, scorer)
    summary = summarize_win_rates(records, scores, opponent_name)

Records are in the annotate stage's sample-record shape (rewards.py), so any scorer reads them.
A reply is scored with the conversation it answered: on a later MT-Bench turn the two sides'
histories differ (each holds its own first answer), so that turn gets one record per side.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simpo_cli.data import read_json_rows
from simpo_cli.errors import DataError, UserError
from simpo_cli.evaluate import benchmarks
from simpo_cli.evaluate.benchmarks import Question

NOTE = "reward-model proxy, not the benchmark's GPT-4 judge"
SIDES = ("model", "opponent")

# Where the baselines' answers are, for benchmarks whose question file has no reference outputs.
BASELINE_FILES = {
    "arena_hard": (
        "the baseline's answer file (v0.1: data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl of "
        "an arena-hard-auto checkout; v2.0: o3-mini-2025-01-31.jsonl)"
    ),
    "mt_bench": (
        "another model's answer file (fastchat/llm_judge/data/mt_bench/model_answer/<model>.jsonl "
        "of a FastChat checkout)"
    ),
}


# --------------------------------------------------------------------------- opponent replies


def opponent_replies(
    benchmark: str,
    questions: Sequence[Question],
    against: str,
    key: str = "--against",
    checkpoints: Sequence[str] = (),
) -> tuple[str, dict[str, list[str]]]:
    """(opponent name, {question.prompt_id: one reply per turn}) for every question.

    `against`: "reference" (AlpacaEval only: the eval set's `output` column; the name is its
    `generator`), an answer file in the benchmark's official format, or a folder written by
    `simpo eval --benchmark` (see `read_replies`), named as given (the file's own model name may
    be anyone's). `key` names the setting in the one-line errors; `checkpoints`, the names of
    the checkpoints evaluated beside it, are offered when `against` is none of these."""
    benchmarks.check_benchmark(benchmark)
    if against == "reference":
        if benchmark != "alpaca_eval":
            raise UserError(
                f"{key} reference: {benchmark}'s question file holds no reference answers; give "
                f"{BASELINE_FILES[benchmark]} or another checkpoint's `simpo eval` output folder"
            )
        return _alpaca_reference(questions)
    if not Path(against).exists():
        close = difflib.get_close_matches(against, checkpoints, n=1, cutoff=0.6)
        named = (
            f"one of the checkpoints evaluated here ({', '.join(checkpoints)}), "
            if checkpoints
            else ""
        )
        raise UserError(
            f"{key} {against}: no such checkpoint, file or folder; "
            + (f"did you mean {close[0]}? " if close else "")
            + f"give {named}'reference' (alpaca_eval only), an answer file in {benchmark}'s "
            f"official format or a folder written by `simpo eval MODEL --benchmark {benchmark} "
            "-o DIR`"
        )
    _, replies = read_replies(benchmark, questions, against, key)
    return _as_given(against), replies


def _as_given(path: str) -> str:
    """A path as the user wrote it; an absolute one (a recipe's, resolved) shortened to the
    current folder's view of it."""
    given = Path(path)
    if given.is_absolute() and given.is_relative_to(Path.cwd()):
        return str(given.relative_to(Path.cwd()))
    return str(given)


def _alpaca_reference(questions: Sequence[Question]) -> tuple[str, dict[str, list[str]]]:
    """The eval set's `output` column (read with the questions); the name is its `generator`."""
    for question in questions:
        if question.reference is None:
            raise DataError(
                f"{question.where}: no reference 'output'; use the eval set with GPT-4 Turbo's "
                f"outputs ({benchmarks.ALPACA_EVAL_FILE}) or give the baseline's "
                "model_outputs.json"
            )
    name = questions[0].reference_generator or "reference"
    return name, {q.prompt_id: [q.reference] for q in questions}


def read_replies(
    benchmark: str, questions: Sequence[Question], path: str | Path, key: str = "--against"
) -> tuple[str, dict[str, list[str]]]:
    """(model name, {question.prompt_id: one reply per turn}) from an answer file in the
    benchmark's official format, or from the folder `simpo eval --benchmark` wrote it to (its
    single answer file, found where benchmarks.answer_path puts it). Reads the model's own
    answers as well as an opponent's.

    Formats (evaluation.md sections 1-3), joined to the questions as the official readers join:
    AlpacaEval model_outputs.json, a list of {instruction, output, generator}, on the
    instruction byte for byte (name: `generator`); Arena-Hard model_answer/<model>.jsonl, v0.1
    (choices[0].turns[0].content, key question_id) or current (messages[-1].content.answer, key
    uid); MT-Bench model_answer/<model>.jsonl (choices[0].turns, one string per turn, key
    question_id). Arena-Hard and MT-Bench take the name from the file name. Answers to questions
    not asked are ignored (a full baseline file against a subset of questions); a question with
    no answer, a repeated answer or a row of the wrong format raises a one-line DataError naming
    the file and line."""
    path = Path(path)
    if path.is_dir():
        path = _answer_file(benchmark, path, key)
    if not path.is_file():
        raise UserError(f"{key} {path}: no such file")
    numbered, unit = read_json_rows(path)
    rows = [(f"{path}: {unit} {number}", row) for number, row in numbered]
    if benchmark == "alpaca_eval":
        answers = _join(rows, _alpaca_answer)
        name = rows[0][1].get("generator")
        name = name if isinstance(name, str) else path.parent.name
    else:
        answers = _join(rows, _arena_answer if benchmark == "arena_hard" else _mt_bench_answer)
        name = path.stem
    return name, _for_questions(benchmark, questions, answers, path)


def _answer_file(benchmark: str, folder: Path, key: str) -> Path:
    """The one answer file in a `simpo eval --benchmark` output folder."""
    pattern = benchmarks.answer_path(benchmark, folder, "*")  # DIR/model_answer/*.jsonl
    found = sorted(pattern.parent.glob(pattern.name))
    if not found:
        raise UserError(
            f"{key} {folder}: no {pattern.relative_to(folder)} in it; give a folder written by "
            f"`simpo eval MODEL --benchmark {benchmark} -o DIR` or the answer file itself"
        )
    if len(found) > 1:
        raise UserError(
            f"{key} {folder}: holds the answers of {len(found)} models "
            f"({', '.join(p.stem for p in found)}); give one answer file, e.g. {found[0]}"
        )
    return found[0]


def _join(rows, answer) -> dict[Any, tuple[str, list[str]]]:
    """{join key: (where, replies)} over the rows; a key answered twice is an error (the
    official readers would keep one of the two silently)."""
    answers: dict[Any, tuple[str, list[str]]] = {}
    for where, row in rows:
        join_key, replies = answer(row, where)
        if join_key in answers:
            raise DataError(
                f"{where}: answers {join_key!r:.40} again (first at "
                f"{answers[join_key][0].rsplit(': ', 1)[-1]}); keep one answer per question"
            )
        answers[join_key] = (where, replies)
    return answers


def _alpaca_answer(row: dict[str, Any], where: str) -> tuple[str, list[str]]:
    fmt = benchmarks.ALPACA_ANSWER
    instruction = _typed(_dig(row, ("instruction",), where, fmt), str, "instruction", where, fmt)
    output = _typed(_dig(row, ("output",), where, fmt), str, "output", where, fmt)
    return instruction, [output]


def _arena_answer(row: dict[str, Any], where: str) -> tuple[str, list[str]]:
    if "uid" in row:  # the current layout
        fmt = benchmarks.ARENA_CURRENT_ANSWER
        uid = _typed(row["uid"], str, "uid", where, fmt)
        path = ("messages", -1, "content", "answer")
        return uid, [_typed(_dig(row, path, where, fmt), str, _dotted(path), where, fmt)]
    fmt = benchmarks.ARENA_V01_ANSWER
    question_id = _typed(_dig(row, ("question_id",), where, fmt), str, "question_id", where, fmt)
    path = ("choices", 0, "turns", 0, "content")
    return question_id, [_typed(_dig(row, path, where, fmt), str, _dotted(path), where, fmt)]


def _mt_bench_answer(row: dict[str, Any], where: str) -> tuple[int, list[str]]:
    fmt = benchmarks.MT_BENCH_ANSWER
    question_id = _typed(_dig(row, ("question_id",), where, fmt), int, "question_id", where, fmt)
    path = ("choices", 0, "turns")
    turns = _dig(row, path, where, fmt)
    if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
        raise DataError(
            f"{where}: choices[0].turns must be a list of reply strings, one per turn (got "
            f"{turns!r:.40}); rows look like {fmt}"
        )
    return question_id, turns


def _dig(row: dict[str, Any], path: tuple[str | int, ...], where: str, fmt: str) -> Any:
    """row[path[0]][path[1]]...; DataError naming the whole path when a step is missing."""
    value: Any = row
    for step in path:
        if isinstance(step, str):
            found = isinstance(value, dict) and step in value
        else:
            found = isinstance(value, list) and -len(value) <= step < len(value)
        if not found:
            raise DataError(f"{where}: no {_dotted(path)}; rows look like {fmt}")
        value = value[step]
    return value


def _typed(value: Any, kind: type, name: str, where: str, fmt: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(
            f"{where}: {name} must be {'a string' if kind is str else 'an integer'} "
            f"(got {_kind(value)}); rows look like {fmt}"
        )
    return value


def _dotted(path: tuple[str | int, ...]) -> str:
    """("choices", 0, "turns") -> "choices[0].turns"."""
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)[1:]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r:.30}"


def _for_questions(
    benchmark: str,
    questions: Sequence[Question],
    answers: Mapping[Any, tuple[str, list[str]]],
    path: Path,
) -> dict[str, list[str]]:
    """Each question's replies, found by the key the official reader joins on: AlpacaEval's
    instruction (byte for byte), the others' question id (of the type the format gives it)."""
    alpaca = benchmark == "alpaca_eval"
    joined_on = [q.turns[0] if alpaca else q.question_id for q in questions]
    missing = [q for q, k in zip(questions, joined_on, strict=True) if k not in answers]
    if missing:
        first = missing[0]
        what = f"instruction {first.turns[0]!r:.50}" if alpaca else f"question {first.question_id}"
        hint = (
            "the judge joins on the exact instruction: write the outputs for the same eval set"
            if alpaca
            else "give answers to the same question file"
        )
        raise DataError(
            f"{path}: no answer to {what} ({first.where}; {len(missing)} of {len(questions)} "
            f"questions unanswered); {hint}"
        )
    replies = {}
    for question, join_key in zip(questions, joined_on, strict=True):
        where, turns = answers[join_key]
        if len(turns) != len(question.turns):
            raise DataError(
                f"{where}: {len(turns)} replies for the {len(question.turns)} turns of question "
                f"{question.question_id} ({question.where}); give one reply per turn"
            )
        replies[question.prompt_id] = list(turns)
    return replies


# --------------------------------------------------------------------------- records


def win_rate_records(
    questions: Sequence[Question],
    replies: Mapping[str, Sequence[str]],
    opponent: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """Sample records to score (rewards.py's shape), each reply with the conversation it
    answered, in question order:

        {"prompt_id": str, "question_id": question.prompt_id, "turn": 1-based,
         "prompt": messages (benchmarks.conversation), "samples": [{"text": str, "side": str}]}

    Turn 1 (every benchmark): one record, prompt_id = question.prompt_id, samples [model reply,
    opponent reply] (sides "model", "opponent"): both answered the same prompt. A later turn
    (MT-Bench turn 2): the histories differ, each holding that side's own earlier replies
    (FastChat generates turn 2 after the model's own turn 1), so one record per side, one sample
    each, prompt_id "<id>:turn2:model" and "<id>:turn2:opponent". Every reply is scored once.
    summarize_win_rates pairs the samples up again by (question_id, turn, side)."""
    for side, given in zip(SIDES, (replies, opponent), strict=True):
        for question in questions:
            turns = given.get(question.prompt_id)
            if turns is None or len(turns) != len(question.turns):
                raise ValueError(
                    f"{question.where}: the {side} needs {len(question.turns)} replies, "
                    f"got {turns!r:.60}"
                )
    records = []
    for question in questions:
        own = {
            "model": list(replies[question.prompt_id]),
            "opponent": list(opponent[question.prompt_id]),
        }
        qid = question.prompt_id
        first = benchmarks.conversation(question, [])
        samples = [{"text": own[side][0], "side": side} for side in SIDES]
        records.append(
            {"prompt_id": qid, "question_id": qid, "turn": 1, "prompt": first, "samples": samples}
        )
        for turn in range(1, len(question.turns)):
            for side in SIDES:
                records.append(
                    {
                        "prompt_id": f"{qid}:turn{turn + 1}:{side}",
                        "question_id": qid,
                        "turn": turn + 1,
                        "prompt": benchmarks.conversation(question, own[side][:turn]),
                        "samples": [{"text": own[side][turn], "side": side}],
                    }
                )
    return records


# --------------------------------------------------------------------------- summary


def summarize_win_rates(
    records: Sequence[dict[str, Any]], scores: Sequence[Sequence[float]], opponent_name: str
) -> dict[str, Any]:
    """The win rates of the model over the opponent from the scored records (scores[i][j]: record
    i, sample j, as rewards.score_records returns them).

    Returns {"opponent", "n" (answer pairs: questions x turns), "win_rate" (the hard win rate,
    AlpacaEval's name for it: a pair counts 1 when the model's reward is above the opponent's,
    0.5 when exactly equal, 0 below), "soft_win_rate" (mean sigmoid(r_model - r_opponent)),
    "wins", "ties", "losses", "mean_reward" and "mean_chars" ({"model", "opponent"}: reply
    length in characters), "per_turn" ({"turn1": the same numbers, "turn2": ...}; only with more
    than one turn), "rows" (one per pair: prompt_id ("<id>" or "<id>:turn2"), turn,
    model_reward, opponent_reward, model_chars, opponent_chars), "note"}. Win rates are
    fractions in [0, 1]; a tie is an exactly equal reward."""
    if len(scores) != len(records):
        raise ValueError(f"{len(scores)} score lists for {len(records)} records")
    pairs: dict[tuple[str, int], dict[str, tuple[float, str]]] = {}
    for record, record_scores in zip(records, scores, strict=True):
        if len(record_scores) != len(record["samples"]):
            raise ValueError(f"record {record['prompt_id']}: scores do not match its samples")
        pair = pairs.setdefault((record["question_id"], record["turn"]), {})
        for sample, score in zip(record["samples"], record_scores, strict=True):
            if not math.isfinite(score):
                raise ValueError(f"record {record['prompt_id']}: score {score} (not scored?)")
            pair[sample["side"]] = (float(score), sample["text"])
    rows = []
    for (qid, turn), pair in pairs.items():
        if set(pair) != set(SIDES):
            raise ValueError(f"question {qid} turn {turn}: scores for {sorted(pair)} only")
        rows.append(
            {
                "prompt_id": qid if turn == 1 else f"{qid}:turn{turn}",
                "turn": turn,
                "model_reward": pair["model"][0],
                "opponent_reward": pair["opponent"][0],
                "model_chars": len(pair["model"][1]),
                "opponent_chars": len(pair["opponent"][1]),
            }
        )
    summary: dict[str, Any] = {"opponent": opponent_name, **_rates(rows)}
    turns = sorted({row["turn"] for row in rows})
    if len(turns) > 1:
        summary["per_turn"] = {
            f"turn{turn}": _rates([row for row in rows if row["turn"] == turn]) for turn in turns
        }
    summary["rows"] = rows
    summary["note"] = NOTE
    return summary


def _rates(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    if n == 0:
        raise ValueError("no answer pairs to compare")
    margins = [row["model_reward"] - row["opponent_reward"] for row in rows]
    wins, ties = sum(m > 0 for m in margins), sum(m == 0 for m in margins)
    return {
        "n": n,
        "win_rate": (wins + 0.5 * ties) / n,
        "soft_win_rate": sum(_sigmoid(m) for m in margins) / n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "mean_reward": {side: sum(r[f"{side}_reward"] for r in rows) / n for side in SIDES},
        "mean_chars": {side: sum(r[f"{side}_chars"] for r in rows) / n for side in SIDES},
    }


def _sigmoid(x: float) -> float:
    # Two forms so that exp never overflows for reward gaps in the hundreds.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def summary_lines(summary: dict[str, Any], model_name: str) -> list[str]:
    """What to print: the win rates, rewards and lengths, per turn when there are several."""
    parts = [("", summary)] + [(f"{t}: ", s) for t, s in summary.get("per_turn", {}).items()]
    lines = []
    for label, s in parts:
        lines.append(
            f"{label}{model_name} vs {summary['opponent']}: hard win rate "
            f"{100 * s['win_rate']:.1f}% ({_count(s['wins'], 'win')}, "
            f"{_count(s['ties'], 'tie')}, {_count(s['losses'], 'loss')} of {s['n']}), soft "
            f"{100 * s['soft_win_rate']:.1f}%; mean "
            f"reward {s['mean_reward']['model']:.3g} vs {s['mean_reward']['opponent']:.3g}; "
            f"mean length {s['mean_chars']['model']:.0f} vs {s['mean_chars']['opponent']:.0f} chars"
        )
    lines.append(f"({summary['note']})")
    return lines
