"""Benchmark answer files: questions in, files out exactly as the official evaluators read them.

Covers AlpacaEval 2, Arena-Hard and MT-Bench (FastChat llm_judge); sources and formats are in
../shared/reference/evaluation.md (sections 1-4). Generation is the caller's: this module reads
questions, says how to decode, builds the conversations to generate from, and writes and checks
the answer files. The flow:

    questions = load_questions("mt_bench", "question.jsonl")
    settings = decoding_defaults("mt_bench")
    replies = {}                                    # question id -> one reply per turn so far
    for turn in range(max_turns(questions)):        # MT-Bench: 2 passes; the others: 1
        for temperature, group in group_by_temperature(settings, questions).items():
            prompts = turn_prompts(group, turn, replies)   # history holds the earlier replies
            ... generate `prompts` at `temperature`, append each reply to replies[prompt_id]
    write_answers("mt_bench", questions, replies, "out", "my-model", settings=settings)
    read_back("mt_bench", "out", "my-model", questions)   # the official readers' rules

Where each benchmark takes the model name from: the file name model_answer/<model_id>.jsonl
(Arena-Hard, MT-Bench) or the `generator` field (AlpacaEval), so `model_id` must be a plain name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from simpo_cli.data import LOCATION_COLUMN, Message, load_source, read_json_rows, row_location
from simpo_cli.errors import DataError, UserError
from simpo_cli.onpolicy.sampling import Prompt
from simpo_cli.recipe import DataSource

BENCHMARKS: tuple[str, ...] = ("alpaca_eval", "arena_hard", "mt_bench")
# Arena-Hard answer layouts: "v0.1" (arena-hard-auto up to Mar 2025, the paper's) and "current"
# (the v2.0 release). The other benchmarks have one layout each.
ArenaLayout = Literal["v0.1", "current"]
ARENA_LAYOUTS: tuple[str, ...] = ("v0.1", "current")
# The tokenizer Arena-Hard counts `token_len` with (evaluation.md section 2).
ARENA_TIKTOKEN_MODEL = {"v0.1": "gpt-3.5-turbo", "current": "gpt-4o"}

# The AlpacaEval 2 eval set with GPT-4 Turbo's reference outputs, as a plain JSON file: the hub's
# loading script for it fails on datasets>=4 (alpaca_eval#454), the file itself does not.
ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_FILE = "alpaca_eval_gpt4_baseline.json"
# The official question sets on the hub (split "train"), in the layouts the parsers read:
# arena-hard-auto's own v0.1 copy (question_id, category, cluster, turns[{content}], 500 rows)
# and FastChat's question.jsonl as lighteval publishes it (question_id, category, turns, 80 rows).
HUB_QUESTIONS = {
    "arena_hard": "lmarena-ai/arena-hard-auto-v0.1",
    "mt_bench": "lighteval/mt-bench",
}


def check_benchmark(benchmark: str) -> None:
    """Raise UserError unless `benchmark` is one this module knows."""
    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark '{benchmark}'; choose one of {', '.join(BENCHMARKS)}")


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    """One benchmark question: its id as the benchmark writes it, its user turns, and its place
    in the source.

    question_id: AlpacaEval has none, so its position (0-804, the order the judge expects);
    Arena-Hard's `question_id` (v0.1) or `uid` (current); MT-Bench's integer `question_id`.
    category: MT-Bench's sets the temperature; AlpacaEval's `dataset` (source subset) is kept in
    `dataset` and copied to the answers.
    """

    question_id: int | str
    turns: tuple[str, ...]
    where: str  # "question.jsonl: line 3", for error messages
    category: str | None = None
    dataset: str | None = None
    # AlpacaEval's eval set carries the baseline's answer (GPT-4 Turbo) and its name.
    reference: str | None = None
    reference_generator: str | None = None

    @property
    def prompt_id(self) -> str:
        """The id generation keys this question by (generation.Prompt.prompt_id)."""
        return str(self.question_id)


def load_questions(benchmark: str, path_or_hub_name: str | None = None) -> list[Question]:
    """The questions of a benchmark, in source order, from a local .json/.jsonl file, a hub
    dataset name (or any source `data.load_source` reads), or, for AlpacaEval when None, the
    official eval set from the hub. Raises DataError naming the file, line and field of the
    first row that does not fit the official format; UserError for an unknown benchmark."""
    check_benchmark(benchmark)
    if path_or_hub_name is None:
        path_or_hub_name = _default_questions(benchmark)
    name = str(path_or_hub_name)
    parse = _PARSERS[benchmark]
    questions = [parse(row, f"{name}: {where}", index) for index, (where, row) in _rows(name)]
    _check_unique(benchmark, questions)
    if not questions:
        raise DataError(f"{name}: no questions")
    return questions


def _default_questions(benchmark: str) -> str:
    """The benchmark's official question set: a hub dataset name, or for AlpacaEval the local
    path of the downloaded eval set file."""
    if benchmark != "alpaca_eval":
        return HUB_QUESTIONS[benchmark]
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(ALPACA_EVAL_REPO, ALPACA_EVAL_FILE, repo_type="dataset")
    except Exception as err:  # network, auth and offline-cache errors have many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"alpaca_eval: cannot download {ALPACA_EVAL_FILE} from {ALPACA_EVAL_REPO}: {first}; "
            "give the file's local path instead"
        ) from None


def _rows(name: str) -> list[tuple[int, tuple[str, dict[str, Any]]]]:
    """(index, (where, row)) of each row of a source. JSON files are read as they are (no
    column typing, so every string stays byte-for-byte and each error names the line); other
    sources through `load_source`."""
    path = Path(name)
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        numbered, unit = read_json_rows(path)
        return list(enumerate((f"{unit} {number}", row) for number, row in numbered))
    # AlpacaEval's hub config calls its split "eval"; question sets copied to the hub use "train".
    split = "eval" if "alpaca" in name.lower() else "train"
    dataset = load_source(DataSource(path=name, split=split), "benchmark questions")
    return [
        (index, (row_location(row, index), {k: v for k, v in row.items() if k != LOCATION_COLUMN}))
        for index, row in enumerate(dataset)
    ]


_KINDS = {
    str: "a string",
    int: "an integer",
    list: "a list",
    dict: "a JSON object",
    float: "a number",
}


def _field(row: dict[str, Any], key: str, kind: type, where: str, fmt: str) -> Any:
    """row[key], checked to be of `kind` (str, int, list or dict); else DataError naming the
    file, line and field and showing the expected row format."""
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        got = "missing" if value is None else _KINDS.get(type(value), type(value).__name__)
        raise DataError(
            f"{where}: '{key}' must be {_KINDS[kind]} (got {got}); rows look like {fmt}"
        )
    return value


ALPACA_FORMAT = '{"instruction": str, "dataset": str, ...}'
ARENA_FORMAT = '{"question_id": str, "turns": [{"content": str}]} or {"uid": str, "prompt": str}'
MT_BENCH_FORMAT = '{"question_id": int, "category": str, "turns": [str, str]}'


def _alpaca_question(row: dict[str, Any], where: str, index: int) -> Question:
    instruction = _field(row, "instruction", str, where, ALPACA_FORMAT)
    dataset = row.get("dataset")
    if dataset is not None:
        dataset = _field(row, "dataset", str, where, ALPACA_FORMAT)
    output, generator = row.get("output"), row.get("generator")
    return Question(
        index, (instruction,), where, dataset=dataset,
        reference=output if isinstance(output, str) else None,
        reference_generator=generator if isinstance(generator, str) else None,
    )  # fmt: skip


def _arena_question(row: dict[str, Any], where: str, index: int) -> Question:
    category = row.get("category")
    if "uid" in row:  # the current layout: one prompt string
        uid = _field(row, "uid", str, where, ARENA_FORMAT)
        return Question(uid, (_field(row, "prompt", str, where, ARENA_FORMAT),), where, category)
    question_id = _field(row, "question_id", str, where, ARENA_FORMAT)
    turns = _field(row, "turns", list, where, ARENA_FORMAT)
    if len(turns) != 1 or not isinstance(turns[0], dict):
        raise DataError(
            f"{where}: 'turns' must hold one {{\"content\": str}} object (got {turns!r:.40}); "
            f"rows look like {ARENA_FORMAT}"
        )
    content = _field(turns[0], "content", str, f"{where}: turns[0]", ARENA_FORMAT)
    return Question(question_id, (content,), where, category)


def _mt_bench_question(row: dict[str, Any], where: str, index: int) -> Question:
    question_id = _field(row, "question_id", int, where, MT_BENCH_FORMAT)
    category = _field(row, "category", str, where, MT_BENCH_FORMAT)
    turns = _field(row, "turns", list, where, MT_BENCH_FORMAT)
    if not turns or not all(isinstance(turn, str) for turn in turns):
        raise DataError(
            f"{where}: 'turns' must be a list of strings, one per user turn (got {turns!r:.40}); "
            f"rows look like {MT_BENCH_FORMAT}"
        )
    return Question(question_id, tuple(turns), where, category)


_PARSERS: dict[str, Callable[[dict[str, Any], str, int], Question]] = {
    "alpaca_eval": _alpaca_question,
    "arena_hard": _arena_question,
    "mt_bench": _mt_bench_question,
}


def _check_unique(benchmark: str, questions: list[Question]) -> None:
    """Answers are joined to questions by id (AlpacaEval: by instruction), so a repeat would pair
    an answer with the wrong question."""
    joined_on = "instruction" if benchmark == "alpaca_eval" else "question id"
    seen: dict[Any, Question] = {}
    for question in questions:
        key = question.turns[0] if benchmark == "alpaca_eval" else question.question_id
        first = seen.setdefault(key, question)
        if first is not question:
            raise DataError(
                f"{question.where}: repeats the {joined_on} of {first.where.rsplit(': ', 1)[-1]} "
                f"({str(key)!r:.40}); the evaluator joins answers on it"
            )


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode a benchmark's answers. `category_temperatures` (MT-Bench) overrides
    `temperature` per question category; a temperature below 1e-4 means greedy decoding, as in
    FastChat. `source` says where the values come from."""

    benchmark: str
    temperature: float
    top_p: float
    max_new_tokens: int
    source: str
    category_temperatures: dict[str, float] = field(default_factory=dict)

    def temperature_for(self, question: Question) -> float:
        """The temperature to answer this question at."""
        return self.category_temperatures.get(question.category or "", self.temperature)


# AlpacaEval 2: the SimPO authors' vllm_local_completions configs per model family (evaluation.md
# section 4). Their do_sample: true meant beam search under alpaca-eval 0.6.2 and vLLM <= 0.6.2,
# which current vLLM cannot do, so these reproduce the settings, not the exact outputs.
ALPACA_EVAL_DECODING = {
    "llama3": (0.9, 1.0, 4096),
    "mistral-base": (0.7, 1.0, 2048),
    "mistral-instruct": (0.5, 1.0, 2048),
    "gemma2": (0.5, 1.0, 4096),
}
# MT-Bench: FastChat's temperature_config (fastchat/llm_judge/common.py); other categories 0.7.
MT_BENCH_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}


def decoding_defaults(benchmark: str, family: str = "llama3") -> DecodingSettings:
    """The decoding settings the paper's answers were generated with. `family` picks the SimPO
    authors' AlpacaEval config (llama3, mistral-base, mistral-instruct, gemma2); Arena-Hard and
    MT-Bench use one setting for every model."""
    check_benchmark(benchmark)
    if family not in ALPACA_EVAL_DECODING:
        raise UserError(
            f"unknown model family '{family}'; choose one of {', '.join(ALPACA_EVAL_DECODING)}"
        )
    if benchmark == "alpaca_eval":
        temperature, top_p, max_new_tokens = ALPACA_EVAL_DECODING[family]
        source = f"SimPO eval/alpacaeval2 config for {family} (sampling, not 0.6.2 beam search)"
        return DecodingSettings(benchmark, temperature, top_p, max_new_tokens, source)
    if benchmark == "arena_hard":
        source = "arena-hard-auto gen_answer_config.yaml (SimPO): temperature 0, max_tokens 4096"
        return DecodingSettings(benchmark, 0.0, 1.0, 4096, source)
    source = "FastChat llm_judge gen_model_answer: temperature_config, max_new_token 1024"
    return DecodingSettings(benchmark, 0.7, 1.0, 1024, source, dict(MT_BENCH_TEMPERATURES))


def group_by_temperature(
    settings: DecodingSettings, questions: Sequence[Question]
) -> dict[float, list[Question]]:
    """The questions grouped by the temperature they are answered at (one generation call per
    group), groups and questions in source order."""
    groups: dict[float, list[Question]] = {}
    for question in questions:
        groups.setdefault(settings.temperature_for(question), []).append(question)
    return groups


# --------------------------------------------------------------------------- conversations


def max_turns(questions: Sequence[Question]) -> int:
    """How many generation passes the questions need (MT-Bench: 2; the others: 1)."""
    return max(len(question.turns) for question in questions)


def conversation(question: Question, replies: Sequence[str]) -> list[Message]:
    """The history to generate turn len(replies) + 1 from: each earlier user turn followed by the
    model's own reply to it, then the next user turn (FastChat's gen_model_answer: the first
    answer is in the history of the second turn)."""
    if len(replies) >= len(question.turns):
        raise ValueError(
            f"{question.where}: {len(replies)} replies already answer all "
            f"{len(question.turns)} turns"
        )
    messages: list[Message] = []
    for user, reply in zip(question.turns, replies, strict=False):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": question.turns[len(replies)]})
    return messages


def turn_prompts(
    questions: Sequence[Question], turn: int, replies: Mapping[str, Sequence[str]]
) -> list[Prompt]:
    """The prompts of generation pass `turn` (from 0): every question with that many turns, its
    conversation holding the replies of the earlier passes, keyed by Question.prompt_id. Each
    pass goes to its own generation folder (generation resumes by prompt id)."""
    prompts = []
    for question in questions:
        if turn < len(question.turns):
            earlier = list(replies.get(question.prompt_id, ()))[:turn]
            if len(earlier) < turn:
                raise ValueError(f"{question.where}: turn {turn + 1} needs {turn} earlier replies")
            prompts.append(
                Prompt(question.prompt_id, conversation(question, earlier), question.where)
            )
    return prompts


# --------------------------------------------------------------------------- writing answers


def answer_path(benchmark: str, output_dir: str | Path, model_id: str) -> Path:
    """Where the official evaluator looks for a model's answers inside `output_dir`."""
    check_benchmark(benchmark)
    if benchmark == "alpaca_eval":
        return Path(output_dir) / "model_outputs.json"
    return Path(output_dir) / "model_answer" / f"{model_id}.jsonl"


def settings_path(benchmark: str, output_dir: str | Path, model_id: str) -> Path:
    """Where the settings used are recorded: beside the answers, outside the folder the
    evaluators glob for answer files."""
    if benchmark == "alpaca_eval":
        return Path(output_dir) / "generation_settings.json"
    return Path(output_dir) / "generation_settings" / f"{model_id}.json"


def check_model_id(model_id: str) -> None:
    """The model name becomes a file name (Arena-Hard, MT-Bench) and the judge's label."""
    if not model_id or "/" in model_id or "\\" in model_id or model_id.startswith("."):
        raise UserError(
            f"model id '{model_id}': it names the answer file model_answer/<model id>.jsonl; "
            "give a plain name without '/' (e.g. Llama-3-Instruct-8B-SimPO)"
        )


def write_answers(
    benchmark: str,
    questions: Sequence[Question],
    answers: Mapping[str, Sequence[str]],
    output_dir: str | Path,
    model_id: str,
    layout: ArenaLayout = "v0.1",
    settings: DecodingSettings | None = None,
    record: Mapping[str, Any] | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> Path:
    """Write the answer file the official evaluator reads, plus the settings used beside it
    (`settings` or the defaults, and `record`: whatever else the caller wants kept, e.g.
    backend, seeds, stop ids). `answers` maps each Question.prompt_id to one reply per turn.
    `layout` picks the Arena-Hard layout; `count_tokens` counts Arena-Hard's token_len (default:
    tiktoken's encoding for the layout). Returns the answer file's path."""
    check_benchmark(benchmark)
    check_model_id(model_id)
    if layout not in ARENA_LAYOUTS:
        raise UserError(f"unknown Arena-Hard layout '{layout}'; choose one of v0.1, current")
    replies = _replies(questions, answers)
    if benchmark == "alpaca_eval":
        rows = [_alpaca_row(q, r, model_id) for q, r in zip(questions, replies, strict=True)]
    elif benchmark == "mt_bench":
        rows = [_mt_bench_row(q, r, model_id) for q, r in zip(questions, replies, strict=True)]
    else:
        count = count_tokens or tiktoken_counter(ARENA_TIKTOKEN_MODEL[layout])
        arena_row = _arena_v01_row if layout == "v0.1" else _arena_current_row
        rows = [
            arena_row(q, r[0], model_id, count) for q, r in zip(questions, replies, strict=True)
        ]
    path = answer_path(benchmark, output_dir, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if benchmark == "alpaca_eval":
        # ensure_ascii=False keeps the file readable; either way json.load gives the same strings.
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    else:
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
        path.write_text("".join(lines), encoding="utf-8")
    _write_settings(benchmark, output_dir, model_id, layout, settings, record, len(rows))
    return path


def _replies(
    questions: Sequence[Question], answers: Mapping[str, Sequence[str]]
) -> list[list[str]]:
    """Each question's replies, in question order: one per turn, all strings. A missing or extra
    answer is a bug in the caller (the judge would skip or misjoin it)."""
    extra = set(answers) - {q.prompt_id for q in questions}
    if extra:
        raise ValueError(f"answers for unknown question ids: {sorted(extra)[:5]}")
    replies = []
    for question in questions:
        reply = list(answers.get(question.prompt_id, ()))
        if len(reply) != len(question.turns) or not all(isinstance(r, str) for r in reply):
            raise ValueError(
                f"{question.where}: expected {len(question.turns)} reply string(s), "
                f"got {reply!r:.60}"
            )
        replies.append(reply)
    return replies


def answer_id(model_id: str, question_id: int | str) -> str:
    """A stable answer id (the official scripts draw a random shortuuid; only uniqueness is
    used), so a re-run writes the same file apart from timestamps."""
    return hashlib.sha256(f"{model_id}:{question_id}".encode()).hexdigest()[:22]


def _alpaca_row(question: Question, replies: list[str], model_id: str) -> dict[str, Any]:
    # The judge joins outputs to the reference on `instruction`: the question's exact string.
    return {
        "instruction": question.turns[0],
        "output": replies[0],
        "generator": model_id,
        "dataset": question.dataset,
    }


def _mt_bench_row(question: Question, replies: list[str], model_id: str) -> dict[str, Any]:
    return {
        "question_id": question.question_id,
        "answer_id": answer_id(model_id, question.question_id),
        "model_id": model_id,
        "choices": [{"index": 0, "turns": replies}],  # plain strings, unlike Arena-Hard v0.1
        "tstamp": time.time(),
    }


def _arena_v01_row(question: Question, reply: str, model_id: str, count) -> dict[str, Any]:
    return {
        "question_id": question.question_id,
        "answer_id": answer_id(model_id, question.question_id),
        "model_id": model_id,
        "choices": [{"index": 0, "turns": [{"content": reply, "token_len": count(reply)}]}],
        "tstamp": time.time(),
    }


def _arena_current_row(question: Question, reply: str, model_id: str, count) -> dict[str, Any]:
    # The judge reads messages[-1]["content"]["answer"]; the metadata feeds style control.
    return {
        "uid": question.question_id,
        "ans_id": answer_id(model_id, question.question_id),
        "model": model_id,
        "messages": [
            {"role": "user", "content": question.turns[0]},
            {"role": "assistant", "content": {"answer": reply}},
        ],
        "tstamp": time.time(),
        "metadata": {"token_len": count(reply), **markdown_counts(reply)},
    }


def tiktoken_counter(model: str) -> Callable[[str], int]:
    """Token counts as Arena-Hard computes token_len: tiktoken's encoding for `model`.

    tiktoken downloads the encoding on first use and keeps it in its cache folder
    (TIKTOKEN_CACHE_DIR, else the system's temp folder); on a node without network that fetch
    fails, which is a UserError saying how to bring the cached file along."""
    try:
        import tiktoken
        import tiktoken.model
    except ImportError:
        raise UserError(
            "Arena-Hard answers need tiktoken to count token_len: pip install tiktoken"
        ) from None
    name = tiktoken.model.encoding_name_for_model(model)  # a table look-up: no download
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as err:  # offline: requests' ConnectionError; proxies and caches raise others
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} holds no copy of it" if cache else "it is not cached"
        raise UserError(
            f"Arena-Hard's token_len needs tiktoken's {name} encoding, which could not be "
            f"downloaded ({type(err).__name__}) and {where}; on a machine with network run "
            f'`TIKTOKEN_CACHE_DIR=DIR python -c "import tiktoken; '
            f"tiktoken.get_encoding('{name}')\"`, copy DIR here and set TIKTOKEN_CACHE_DIR to it"
        ) from None
    # disallowed_special=(): an answer may contain "<|endoftext|>" as text.
    return lambda text: len(encoding.encode(text, disallowed_special=()))


_CODE_BLOCK = re.compile(r"```.*?```", re.DOTALL)


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """Markdown element counts for Arena-Hard's style control: headers by level, ordered and
    unordered list items, bold spans; code blocks are left out (their '#' lines are comments)."""
    text = _CODE_BLOCK.sub("", text)

    def count(pattern: str) -> int:
        return len(re.findall(pattern, text, flags=re.MULTILINE))

    return {
        "header_count": {f"h{n}": count(rf"^#{{{n}}}\s") for n in range(1, 7)},
        "list_count": {"ordered": count(r"^\s*\d+\.\s"), "unordered": count(r"^\s*[-*+]\s")},
        "bold_count": {"**": count(r"\*\*[^*\n]+\*\*"), "__": count(r"__[^_\n]+__")},
    }


def _write_settings(benchmark, output_dir, model_id, layout, settings, record, rows) -> None:
    settings = settings or decoding_defaults(benchmark)
    written = {
        "benchmark": benchmark,
        "model_id": model_id,
        "answers": str(answer_path(benchmark, output_dir, model_id)),
        "layout": layout if benchmark == "arena_hard" else None,
        "questions": rows,
        "decoding": asdict(settings),
        **dict(record or {}),
    }
    path = settings_path(benchmark, output_dir, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(written, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- reading back


def read_back(
    benchmark: str,
    output_dir: str | Path,
    model_id: str,
    questions: Sequence[Question] | None = None,
) -> list[dict[str, Any]]:
    """The answer rows of a written file, checked with the official readers' rules: the fields
    they access, of the types they use; one answer per question id (or instruction); with
    `questions`, every question answered, AlpacaEval in the eval set's order with identical
    instructions. Raises DataError naming the file, line and field of the first problem."""
    path = answer_path(benchmark, output_dir, model_id)
    if not path.is_file():
        raise DataError(f"{path}: no answer file")
    numbered, unit = read_json_rows(path)
    rows = [(f"{path}: {unit} {number}", row) for number, row in numbered]
    check = {"alpaca_eval": _check_alpaca, "arena_hard": _check_arena, "mt_bench": _check_mt}
    keys = [check[benchmark](row, where, model_id) for where, row in rows]
    seen: dict[Any, str] = {}
    for (where, _), key in zip(rows, keys, strict=True):
        if seen.setdefault(key, where) != where:
            raise DataError(f"{where}: answers {key!r:.40} again (first at {seen[key]})")
    if questions is not None:
        _check_answered(benchmark, path, questions, keys, [row for _, row in rows])
    return [row for _, row in rows]


ALPACA_ANSWER = '{"instruction": str, "output": str, "generator": str, "dataset": str}'
ARENA_V01_ANSWER = (
    '{"question_id": str, "answer_id", "model_id": str, '
    '"choices": [{"index": 0, "turns": [{"content": str, "token_len": int}]}], "tstamp"}'
)
ARENA_CURRENT_ANSWER = (
    '{"uid": str, "ans_id", "model": str, "messages": [..., '
    '{"role": "assistant", "content": {"answer": str}}], "tstamp", "metadata": {"token_len": int}}'
)
MT_BENCH_ANSWER = (
    '{"question_id": int, "answer_id", "model_id": str, '
    '"choices": [{"index": 0, "turns": [str, str]}], "tstamp"}'
)


def _check_alpaca(row: dict[str, Any], where: str, model_id: str) -> str:
    _field(row, "output", str, where, ALPACA_ANSWER)
    _check_name(row, "generator", where, model_id, ALPACA_ANSWER)
    return _field(row, "instruction", str, where, ALPACA_ANSWER)


def _check_arena(row: dict[str, Any], where: str, model_id: str) -> str:
    if "uid" in row:  # the current layout
        _check_name(row, "model", where, model_id, ARENA_CURRENT_ANSWER)
        messages = _field(row, "messages", list, where, ARENA_CURRENT_ANSWER)
        last = _object(messages[-1] if messages else None)
        content = _object(last.get("content"))
        _field(content, "answer", str, f"{where}: messages[-1].content", ARENA_CURRENT_ANSWER)
        metadata = _field(row, "metadata", dict, where, ARENA_CURRENT_ANSWER)
        _field(metadata, "token_len", int, f"{where}: metadata", ARENA_CURRENT_ANSWER)
        return _field(row, "uid", str, where, ARENA_CURRENT_ANSWER)
    _check_name(row, "model_id", where, model_id, ARENA_V01_ANSWER)
    turns = _field(
        _first_choice(row, where), "turns", list, f"{where}: choices[0]", ARENA_V01_ANSWER
    )
    turn = _object(turns[0] if turns else None)
    _field(turn, "content", str, f"{where}: choices[0].turns[0]", ARENA_V01_ANSWER)
    _field(turn, "token_len", int, f"{where}: choices[0].turns[0]", ARENA_V01_ANSWER)
    return _field(row, "question_id", str, where, ARENA_V01_ANSWER)


def _check_mt(row: dict[str, Any], where: str, model_id: str) -> int:
    _check_name(row, "model_id", where, model_id, MT_BENCH_ANSWER)
    turns = _field(
        _first_choice(row, where), "turns", list, f"{where}: choices[0]", MT_BENCH_ANSWER
    )
    if not turns or not all(isinstance(turn, str) for turn in turns):
        raise DataError(f"{where}: choices[0]: 'turns' must be a list of reply strings")
    return _field(row, "question_id", int, where, MT_BENCH_ANSWER)


def _check_name(row: dict[str, Any], key: str, where: str, model_id: str, fmt: str) -> None:
    """The model name in a row is the one the file is written for."""
    name = _field(row, key, str, where, fmt)
    if name != model_id:
        raise DataError(f"{where}: '{key}' is {name!r}, expected {model_id!r}")


def _object(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one (so `_field` reports the key missing)."""
    return value if isinstance(value, dict) else {}


def _first_choice(row: dict[str, Any], where: str) -> dict[str, Any]:
    choices = row.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise DataError(f"{where}: 'choices' must be a list holding {{index, turns}} objects")
    return choices[0]


def _check_answered(
    benchmark: str, path: Path, questions: Sequence[Question], keys: list, rows: list
) -> None:
    """Every question answered, with as many turns; AlpacaEval's rows in the eval set's order."""
    if benchmark == "alpaca_eval":
        expected = [q.turns[0] for q in questions]
        for number, (want, got) in enumerate(zip(expected, keys, strict=False), start=1):
            if want != got:
                raise DataError(
                    f"{path}: item {number}: 'instruction' differs from "
                    f"{questions[number - 1].where} (the judge joins on the exact instruction, "
                    "in order)"
                )
        if len(keys) != len(expected):
            raise DataError(f"{path}: {len(keys)} outputs for {len(expected)} instructions")
        return
    missing = [q.question_id for q in questions if q.question_id not in set(keys)]
    if missing:
        raise DataError(f"{path}: no answer to question id(s) {missing[:5]}")
    if benchmark == "mt_bench":
        turns = {key: len(row["choices"][0]["turns"]) for key, row in zip(keys, rows, strict=True)}
        for question in questions:
            if turns[question.question_id] != len(question.turns):
                raise DataError(
                    f"{path}: question {question.question_id}: {turns[question.question_id]} "
                    f"replies for {len(question.turns)} turns"
                )
