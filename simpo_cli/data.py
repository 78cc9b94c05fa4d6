"""Data: reading sources, rendering conversations, tokenizing, masking, truncating and collating.

Default convention (SFT data, and preference data with tokenization "default"):
- prompt   = the chat template applied to the prompt messages with the generation prompt;
- response = the rest of the rendered conversation (the reply, its end-of-turn/EOS);
- exactly one BOS at the start; labels are -100 everywhere except response tokens, so losses
  and per-token averages cover response tokens only.

The SimPO authors' convention (preference data with tokenization "authors", for exact parity
with the paper's runs):
- prompt   = the chat template applied to the prompt messages WITHOUT the generation prompt;
- response = the template applied to the reply alone, less the BOS the template writes, so the
  assistant header is response text: trained, and counted in the per-token average;
- one BOS before the prompt, an EOS ending each response; the authors' truncation (see
  `_authors_tokens`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpo_cli.errors import DataError
from simpo_cli.losses import IGNORE_INDEX
from simpo_cli.recipe import DataSource, ModelSettings

Message = dict[str, Any]
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------- reading sources


def load_source(source: DataSource, role: str):
    """Read a DataSource into a datasets.Dataset; `role` (sft.data.train...) names it in errors."""
    import datasets

    path = Path(source.path)
    if path.is_file():
        kind = LOCAL_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"{_at(role, path)}: unsupported file type '{path.suffix}'; "
                "use .json, .jsonl or .parquet, or a save_to_disk folder"
            )
        if kind == "json":
            dataset = _json_dataset(path, role)
        else:
            try:
                dataset = datasets.Dataset.from_parquet(str(path))
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise DataError(f"{_at(role, path)}: cannot read parquet: {err}") from None
    elif path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(
                f"{_at(role, path)}: not a dataset saved with save_to_disk ({err}); "
                "point path at a .json/.jsonl/.parquet file or a saved dataset folder"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(
                    f"{_at(role, path)}: no split '{source.split}'; "
                    f"set split to one of {', '.join(loaded)}"
                )
            loaded = loaded[source.split]
        dataset = loaded
    else:
        # A hub name, or a local copy of a hub dataset repository (data files in a folder):
        # the same load_dataset call either way.
        try:
            dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"{role}: cannot load '{source.path}' (split {source.split}): {first}; "
                "check the hub name and split, or give a local file or folder path"
            ) from None
    if source.max_rows is not None and source.max_rows < len(dataset):
        dataset = dataset.select(range(source.max_rows))
    return dataset


# Raw datasets read from a JSON file carry each row's place in the file ("line 12", "item 3") in
# this column, so that every data error names the line a user can open; other sources have none
# and their rows are named "row N", counted from 1.
LOCATION_COLUMN = "__location__"
# The same, kept in a tokenized dataset (collators leave it out of the model's inputs).
SOURCE_ROW = "source_row"


def _at(role: str, path: Path) -> str:
    """`role: path`, or the role alone when it names the path already (the stages' roles do)."""
    return role if str(path) in role else f"{role}: {path}"


def _json_dataset(path: Path, role: str):
    """A JSON/JSONL file as a Dataset with the union of the rows' keys (a key a row lacks is null
    there), so a column that appears in later rows only is kept; plus LOCATION_COLUMN."""
    import datasets

    numbered, unit = read_json_rows(path)
    columns: dict[str, None] = {}  # ordered set: first appearance
    for _, row in numbered:
        columns.update(dict.fromkeys(row))
    kinds: dict[str, tuple[str, int]] = {}
    for number, row in numbered:
        for key, value in row.items():
            if value is None:
                continue
            kind = _json_kind(value)
            first = kinds.setdefault(key, (kind, number))
            if first[0] != kind:
                raise DataError(
                    f"{_at(role, path)}: {unit} {number}: '{key}' is {kind} but {unit} {first[1]} "
                    f"has {first[0]}; make each column one type (e.g. chosen always a list of "
                    "messages)"
                )
    table = {key: [row.get(key) for _, row in numbered] for key in columns}
    table[LOCATION_COLUMN] = [f"{unit} {number}" for number, _ in numbered]
    try:
        return datasets.Dataset.from_dict(table)
    except (TypeError, ValueError) as err:  # pyarrow's ArrowTypeError / ArrowInvalid
        raise DataError(
            f"{_at(role, path)}: rows hold values of different shapes that cannot form one column "
            f"({err}); make each column one type"
        ) from None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def row_location(row: dict[str, Any], index: int) -> str:
    """Where a raw row is in its source, counted from 1: "line 12" of a JSONL file, "item 3" of
    a JSON list, else "row N" by position."""
    return row.get(LOCATION_COLUMN) or f"row {index + 1}"


def read_json_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """(number, row) of each row of a JSON Lines file (number: the line) or of a .json file
    holding a list of objects (number: the item, from 1), and that unit ("line" or "item")."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
        numbered = list(enumerate(rows, start=1))
        unit = "item"
    else:
        numbered = []
        # split("\n"), not splitlines(): JSON strings may hold U+2028 or U+0085 unescaped.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {number}: invalid JSON ({err.msg} at column {err.colno}); "
                    "each line must be one JSON object"
                ) from None
        unit = "line"
    for number, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {unit} {number}: expected a JSON object, got {row!r:.60}")
    if not numbered:
        raise DataError(f"{path}: no rows; the file is empty")
    return numbered, unit


def fingerprint(source: DataSource, dataset) -> str:
    """A content fingerprint for the reproducibility record."""
    path = Path(source.path)
    if path.is_file():
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return f"datasets:{dataset._fingerprint}"


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(model: ModelSettings, name_or_path: str | None = None):
    """The tokenizer for a stage: from `name_or_path` (a previous stage's output) when given, else
    model.tokenizer or model.name_or_path; model.chat_template overrides the template."""
    from transformers import AutoTokenizer

    source = name_or_path or model.tokenizer or model.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"model.tokenizer: cannot load a tokenizer from '{source}': {first}; "
            "give a local tokenizer folder or a reachable hub name"
        ) from None
    if model.chat_template:
        template = model.chat_template
        if template.endswith(".jinja"):
            try:
                template = Path(template).read_text()
            except OSError as err:
                raise DataError(f"model.chat_template: cannot read {template}: {err}") from None
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise DataError(
            f"model.chat_template: the tokenizer at '{source}' has no chat template; "
            "set model.chat_template to a .jinja file or the template text"
        )
    if tokenizer.pad_token_id is None:
        # Padding is always masked out of the loss and attention; any id serves.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


# --------------------------------------------------------------------------- rendering


def render_segments(
    tokenizer, messages: list[Message], last_reply_only: bool = False
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces: every assistant reply (with its
    end-of-turn) is trained; the rest (system, user turns, assistant headers) is not.

    With last_reply_only (a preference pair), only the final reply is trained: earlier assistant
    turns are history, part of the prompt that chosen and rejected share."""
    pieces: list[tuple[str, bool]] = []
    done = 0
    replies = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    for i in replies[-1:] if last_reply_only else replies:
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and before.startswith(_joined(pieces))):
            raise DataError(
                "model.chat_template: the template does not render a conversation as a prefix "
                "of its continuation, so prompt and response cannot be separated; use a "
                "template that renders turns in order"
            )
        pieces.append((before[done:], False))
        pieces.append((through[len(before) :], True))
        done = len(through)
    return [(text, trained) for text, trained in pieces if text]


def _joined(pieces: list[tuple[str, bool]]) -> str:
    return "".join(text for text, _ in pieces)


def tokenize_segments(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """input_ids and labels for rendered pieces: exactly one BOS, an EOS ending the last reply."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    bos = tokenizer.bos_token_id
    if bos is not None:
        # Templates that write the BOS themselves plus a tokenizer that adds one would give two;
        # templates that do not write it rely on the tokenizer: the model saw exactly one.
        while ids[:2] == [bos, bos]:
            ids, labels = ids[1:], labels[1:]
        if ids[:1] != [bos] and adds_bos(tokenizer):
            ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    eos = tokenizer.eos_token_id
    if eos is not None and pieces and pieces[-1][1] and eos not in _last_reply(ids, labels):
        ids, labels = ids + [eos], labels + [eos]
    return ids, labels


def _last_reply(ids: list[int], labels: list[int]) -> list[int]:
    end = len(labels)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[start:end]


# --------------------------------------------------------------------------- row formats


def as_messages(value: Any, role: str, where: str) -> list[Message]:
    if value is None:
        raise DataError(f"{where}: no value in this row; give a string or a list of messages")
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content") or ""} for m in value]
    raise DataError(f"{where}: expected a string or a list of {{role, content}} messages")


def preference_messages(row: dict[str, Any], where: str) -> tuple[list[Message], Message, Message]:
    """(prompt messages, chosen reply, rejected reply) from any supported preference format:
    chosen/rejected message lists holding the prompt (princeton-nlp), message lists plus a
    `prompt` column (UltraFeedback-binarized), or prompt/chosen/rejected strings."""
    chosen = as_messages(row["chosen"], "assistant", f"{where}: chosen")
    rejected = as_messages(row["rejected"], "assistant", f"{where}: rejected")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation or conversation[-1]["role"] != "assistant":
            raise DataError(f"{where}: {name} must end with an assistant message")
    prompt = chosen[:-1]
    if len(rejected) > 1 and rejected[:-1] != prompt:
        raise DataError(f"{where}: chosen and rejected have different prompt turns")
    if not prompt:
        if row.get("prompt") is None:
            raise DataError(
                f"{where}: no prompt: chosen holds only the reply and this row has no 'prompt' "
                "value; put the prompt turns before the reply in chosen/rejected, or give prompt"
            )
        prompt = as_messages(row["prompt"], "user", f"{where}: prompt")
    return prompt, chosen[-1], rejected[-1]


def sft_messages(row: dict[str, Any], where: str) -> list[Message]:
    """The conversation of an SFT row: a `messages` list, or prompt/completion (a file may mix
    the two forms: a row with no messages value is read as prompt/completion)."""
    if row.get("messages") is not None:
        messages = as_messages(row["messages"], "user", f"{where}: messages")
    else:
        prompt = as_messages(row.get("prompt"), "user", f"{where}: prompt")
        completion = as_messages(row.get("completion"), "assistant", f"{where}: completion")
        messages = prompt + completion
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return messages


PREFERENCE_COLUMNS = ({"chosen", "rejected"},)
SFT_COLUMNS = ({"messages"}, {"prompt", "completion"})


def check_columns(columns: list[str], kind: str, where: str) -> None:
    accepted = PREFERENCE_COLUMNS if kind == "preference" else SFT_COLUMNS
    columns = [c for c in columns if c != LOCATION_COLUMN]
    if any(need <= set(columns) for need in accepted):
        return
    wanted = " or ".join("/".join(sorted(need)) for need in accepted)
    raise DataError(
        f"{where}: missing column(s) for {kind} data: need {wanted}; found {', '.join(columns)}"
    )


# --------------------------------------------------------------------------- tokenizing rows


@dataclass
class DataReport:
    """What happened to the rows of one source before training."""

    name: str
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    mean_tokens: dict[str, float] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.dropped.values())

    def lines(self) -> list[str]:
        out = [f"{self.name}: {self.rows_read} rows read, {self.rows_kept} kept"]
        out += [f"  dropped ({reason}): {n}" for reason, n in sorted(self.dropped.items())]
        out.append(f"  truncated: {self.truncated}")
        out += [f"  mean {name} tokens: {value:.1f}" for name, value in self.mean_tokens.items()]
        return out


def _content(message: Message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else json.dumps(content)


def tokenize_pair(
    tokenizer,
    row: dict[str, Any],
    where: str,
    max_length: int,
    max_prompt_length: int,
    tokenization: str = "default",
) -> dict[str, Any]:
    """One preference row -> chosen/rejected input_ids and labels, or a drop reason, in the
    `tokenization` convention: "default" or "authors" (see the module docstring)."""
    prompt, chosen, rejected = preference_messages(row, where)
    out: dict[str, Any] = {"drop": "", "truncated": False}
    if not _content(chosen).strip() or not _content(rejected).strip():
        out["drop"] = "empty response"
    elif _content(chosen) == _content(rejected):
        out["drop"] = "chosen identical to rejected"
    if out["drop"]:
        return {
            **out,
            **{f"{s}_{k}": [] for s in ("chosen", "rejected") for k in ("ids", "labels")},
        }

    tokens = _authors_tokens if tokenization == "authors" else _default_tokens
    prompt_ids, responses, out["truncated"] = tokens(
        tokenizer, prompt, chosen, rejected, where, max_length, max_prompt_length
    )
    for side, response in responses.items():
        out[f"{side}_ids"] = prompt_ids + response
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response
    if not all(responses.values()):  # cannot happen with max_prompt_length < max_length
        out["drop"] = "empty response after truncation"
    return out


def _default_tokens(
    tokenizer,
    prompt: list[Message],
    chosen: Message,
    rejected: Message,
    where: str,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], dict[str, list[int]], bool]:
    """Prompt ids, response ids by side and whether anything was cut, in the default convention.

    Truncation: when prompt + the longer response exceeds max_length, the prompt keeps its last
    max_prompt_length tokens (and its BOS); if still too long, both responses are cut to fit.
    """
    prompt_ids: list[int] | None = None
    responses = {}
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        pieces = render_segments(tokenizer, prompt + [reply], last_reply_only=True)
        ids, labels = tokenize_segments(tokenizer, pieces)
        n_prompt = labels.index(next(x for x in labels if x != IGNORE_INDEX))
        if prompt_ids is None:
            prompt_ids = ids[:n_prompt]
        elif ids[:n_prompt] != prompt_ids:
            raise DataError(f"{where}: the prompt tokenizes differently with chosen and rejected")
        responses[side] = ids[n_prompt:]
    assert prompt_ids is not None

    longest = max(len(r) for r in responses.values())
    truncated = len(prompt_ids) + longest > max_length
    if truncated:
        if len(prompt_ids) > max_prompt_length:
            bos = tokenizer.bos_token_id
            keep_bos = bos is not None and prompt_ids[:1] == [bos]
            tail = max_prompt_length - keep_bos
            prompt_ids = prompt_ids[:keep_bos] + prompt_ids[len(prompt_ids) - tail :]
        room = max_length - len(prompt_ids)
        responses = {side: r[:room] for side, r in responses.items()}
    return prompt_ids, responses, truncated


def _authors_tokens(
    tokenizer,
    prompt: list[Message],
    chosen: Message,
    rejected: Message,
    where: str,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], dict[str, list[int]], bool]:
    """Prompt ids, response ids by side and whether anything was cut, in the SimPO authors'
    convention: the prompt is rendered without the generation prompt and each reply on its own, so
    the assistant header starts the response; the pieces are tokenized separately."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if bos is not None:
        # The authors prepend a BOS unless present. Extra copies (a template override writing
        # two) go too: a double BOS silently costs points, and standard templates write one.
        while prompt_ids[:2] == [bos, bos]:
            prompt_ids = prompt_ids[1:]
        if prompt_ids[:1] != [bos]:
            prompt_ids = [bos] + prompt_ids
    responses = {}
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        text = _render_reply_alone(tokenizer, reply, where)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None and ids[-1:] != [eos]:
            ids = ids + [eos]
        responses[side] = ids

    longest = max(len(r) for r in responses.values())
    # Too long means something is cut: the prompt if over max_prompt_length, else the longer
    # response (it exceeds max_length - max_prompt_length).
    truncated = len(prompt_ids) + longest > max_length
    if truncated:
        # keep_end: the last max_prompt_length tokens, as the authors cut; unlike the default
        # convention this may drop the BOS, which their runs did too.
        prompt_ids = prompt_ids[-max_prompt_length:]
        if len(prompt_ids) + longest > max_length:
            # Their fixed budget, not max_length - len(prompt_ids): a pair with a short prompt
            # ends up shorter than max_length.
            room = max_length - max_prompt_length
            responses = {side: r[:room] for side, r in responses.items()}
    return prompt_ids, responses, truncated


def _render_reply_alone(tokenizer, reply: Message, where: str) -> str:
    """The template applied to [reply] alone (its assistant header, content, end-of-turn), less
    the BOS text the template writes at the start of every rendering."""
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template([reply], tokenize=False)
    except TemplateError as err:
        raise DataError(
            f"{where}: the chat template cannot render an assistant message on its own ({err}), "
            "which tokenization 'authors' needs; use tokenization 'default' or another template"
        ) from None
    bos_text = tokenizer.bos_token
    while bos_text and text.startswith(bos_text):  # every BOS copy: the prompt holds the one BOS
        text = text[len(bos_text) :]
    return text


def tokenize_conversation(
    tokenizer, row: dict[str, Any], where: str, max_length: int
) -> dict[str, Any]:
    """One SFT row -> input_ids and labels (every assistant turn trained), cut to max_length."""
    messages = sft_messages(row, where)
    if not any(_content(m).strip() for m in messages if m["role"] == "assistant"):
        return {"input_ids": [], "labels": [], "drop": "empty response", "truncated": False}
    ids, labels = tokenize_segments(tokenizer, render_segments(tokenizer, messages))
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    drop = (
        "" if any(x != IGNORE_INDEX for x in labels[1:]) else "no response tokens after truncation"
    )
    return {"input_ids": ids, "labels": labels, "drop": drop, "truncated": truncated}


def prepare(
    dataset,
    tokenizer,
    kind: str,
    name: str,
    max_length: int,
    max_prompt_length: int = 0,
    tokenization: str = "default",
):
    """Tokenize a loaded dataset for a stage ('sft' or 'preference'); drop and count bad rows.

    Returns (tokenized dataset, DataReport). The dataset keeps each row's place in its source
    (SOURCE_ROW: "line 12") for messages about a training step. Raises DataError naming the
    source and the row's line for malformed rows.
    """
    check_columns(dataset.column_names, kind, name)

    def one(row: dict[str, Any], index: int) -> dict[str, Any]:
        location = row_location(row, index)
        where = f"{name}: {location}"
        if kind == "preference":
            out = tokenize_pair(tokenizer, row, where, max_length, max_prompt_length, tokenization)
        else:
            out = tokenize_conversation(tokenizer, row, where, max_length)
        return {**out, SOURCE_ROW: location}

    tokenized = dataset.map(
        one,
        # Explicit types: a first batch of only dropped rows (empty lists) must not fix the id
        # columns' type as a list of nulls.
        features=_tokenized_features(kind),
        with_indices=True,
        remove_columns=dataset.column_names,
        desc=f"Tokenizing {name}",
        load_from_cache_file=False,
    )
    report = DataReport(name=name, rows_read=len(dataset))
    report.dropped.update(d for d in tokenized["drop"] if d)
    report.truncated = sum(tokenized["truncated"])
    kept = tokenized.filter(lambda d: not d, input_columns="drop", desc=f"Dropping from {name}")
    kept = kept.remove_columns(["drop", "truncated"])
    sides = ("chosen", "rejected") if kind == "preference" else ("response",)
    for side in sides:
        column = "labels" if side == "response" else f"{side}_labels"
        counts = [sum(x != IGNORE_INDEX for x in labels) for labels in kept[column]]
        report.mean_tokens[side] = sum(counts) / max(len(counts), 1)
    if len(kept) == 0:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
        raise DataError(f"{name}: no usable rows: all {report.rows_read} dropped ({reasons})")
    return kept, report


def add_mismatched_pairs(dataset, max_length: int):
    """KTO's KL term scores completions under prompts they do not answer: row i gets
    kl_ids / kl_labels = its own prompt followed by the chosen response of row i + 1 (the last
    row wraps to the first), cut to max_length. A fixed pairing, so that a cached reference
    pre-pass can score it once."""

    def split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        return ids[:n_prompt], ids[n_prompt:]

    ids, labels = dataset["chosen_ids"], dataset["chosen_labels"]
    kl_ids, kl_labels = [], []
    for i in range(len(ids)):
        prompt, _ = split(ids[i], labels[i])
        _, response = split(ids[(i + 1) % len(ids)], labels[(i + 1) % len(ids)])
        response = response[: max_length - len(prompt)]
        kl_ids.append(prompt + response)
        kl_labels.append([IGNORE_INDEX] * len(prompt) + response)
    return dataset.add_column("kl_ids", kl_ids).add_column("kl_labels", kl_labels)


def _tokenized_features(kind: str):
    import datasets

    ints = datasets.List(datasets.Value("int64"))
    columns = (
        ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
        if kind == "preference"
        else ("input_ids", "labels")
    )
    return datasets.Features(
        {
            **dict.fromkeys(columns, ints),
            "drop": datasets.Value("string"),
            "truncated": datasets.Value("bool"),
            SOURCE_ROW: datasets.Value("string"),
        }
    )


# --------------------------------------------------------------------------- collating


def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


LENGTH_COLUMN = "length"  # tokens of a training example (training.balanced_batches groups by it)


def with_lengths(dataset):
    """The dataset with a `length` column: the tokens each example puts through the model (every
    *_ids column: SFT's input_ids; chosen, rejected and KTO's mismatched of a pair)."""
    columns = [c for c in dataset.column_names if c.endswith("_ids")]
    lengths = [
        sum(len(seq) for seq in seqs) for seqs in zip(*(dataset[c] for c in columns), strict=True)
    ]
    return dataset.add_column(LENGTH_COLUMN, lengths)


def collate_sequences(
    ids: list[list[int]],
    labels: list[list[int]],
    pad_token_id: int,
    padding_free: bool,
    one_row: bool = False,
) -> dict[str, Any]:
    """A training batch of S sequences (token ids and unshifted labels, -100 where untrained).

    padding_free=False: one row per sequence, right-padded to the longest: [S, T] input_ids,
    labels and attention_mask.

    padding_free=True: sequences packed into rows, position_ids restarting at 0 for each, and no
    attention_mask, from which transformers builds a block-diagonal causal mask (sdpa, eager),
    so no token attends across a boundary; each sequence's first label is set to -100 (it would
    be predicted by the previous sequence's last token). With one_row, every sequence goes into
    a single row [1, N], N the sum of the lengths, with the boundaries as cu_seq_lens and
    max_length for flash-attention's variable-length kernel, whose cost is the sum of the
    squared lengths. Otherwise the sequences are packed first-fit, longest first, into rows as
    long as the longest sequence (the block-diagonal mask of sdpa and eager costs the square of
    the row length, so a row no longer than the longest sequence is never dearer than padding);
    a row's unused tail is padding, a segment of its own.

    Both forms list, for the vocabulary projection, the trained positions of the flattened batch
    computed here on the host (no device sync in the step): token_index [M] (positions whose
    next token is trained), token_targets [M] (that token) and token_seq [M] (its sequence).
    """
    import torch

    lengths = [len(row) for row in ids]
    if not padding_free:
        rows = [[s] for s in range(len(ids))]
    elif one_row:
        rows = [list(range(len(ids)))]
        labels = [[IGNORE_INDEX, *row[1:]] for row in labels]
    else:
        rows = _fit_rows(lengths)
        labels = [[IGNORE_INDEX, *row[1:]] for row in labels]
    width = max(sum(lengths[s] for s in row) for row in rows)
    input_ids = [[pad_token_id] * width for _ in rows]
    row_labels = [[IGNORE_INDEX] * width for _ in rows]
    positions = [list(range(width)) for _ in rows]
    trained, targets, sequences = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            n = lengths[s]
            input_ids[r][offset : offset + n] = ids[s]
            row_labels[r][offset : offset + n] = labels[s]
            positions[r][offset : offset + n] = range(n)
            for t in range(n - 1):  # position t predicts the token at t + 1
                if labels[s][t + 1] != IGNORE_INDEX:
                    trained.append(r * width + offset + t)
                    targets.append(labels[s][t + 1])
                    sequences.append(s)
            offset += n
        positions[r][offset:] = range(width - offset)  # the padding tail: a segment of its own
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(row_labels, dtype=torch.long),
    }
    if not padding_free:
        batch["attention_mask"] = _pad([[1] * n for n in lengths], 0)
    else:
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        if one_row:
            cumulative = [0, *itertools.accumulate(lengths)]
            batch["cu_seq_lens"] = torch.tensor(cumulative, dtype=torch.int32)
            batch["max_length"] = max(lengths)  # a Python int: read without a device sync
    batch["token_index"] = torch.tensor(trained, dtype=torch.long)
    batch["token_targets"] = torch.tensor(targets, dtype=torch.long)
    batch["token_seq"] = torch.tensor(sequences, dtype=torch.long)
    batch["num_sequences"] = len(ids)
    return batch


def _fit_rows(lengths: list[int]) -> list[list[int]]:
    """Sequence indices packed into rows of the longest length: first fit, longest first."""
    capacity = max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda s: -lengths[s]):
        r = next((r for r, room in enumerate(free) if room >= lengths[s]), None)
        if r is None:
            rows.append([])
            free.append(capacity)
            r = len(rows) - 1
        rows[r].append(s)
        free[r] -= lengths[s]
    return rows


@dataclass
class SFTCollator:
    """Batches of examples for the SFT stage, packed or padded (collate_sequences)."""

    pad_token_id: int
    padding_free: bool = False
    one_row: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_sequences(
            [f["input_ids"] for f in features],
            [f["labels"] for f in features],
            self.pad_token_id,
            self.padding_free,
            self.one_row,
        )


@dataclass
class PreferenceCollator:
    """Stacks chosen then rejected into one batch of 2B sequences, so both go through the policy
    in a single forward pass: sequences [0, B) are chosen, [B, 2B) the matching rejected, and for
    KTO [2B, 3B) the mismatched completions of its KL term. Packed into one row or padded
    (collate_sequences)."""

    pad_token_id: int
    padding_free: bool = False
    one_row: bool = False
    # Cached reference log-probs (DPO, IPO, R-DPO, KTO), summed, per pair_id: (chosen,
    # rejected) or, for KTO, (chosen, rejected, mismatched).
    reference: list[tuple[float, ...] | None] | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        sides = ("chosen", "rejected", "kl") if "kl_ids" in features[0] else ("chosen", "rejected")
        batch = collate_sequences(
            [f[f"{side}_ids"] for side in sides for f in features],
            [f[f"{side}_labels"] for side in sides for f in features],
            self.pad_token_id,
            self.padding_free,
            self.one_row,
        )
        batch["num_pairs"] = len(features)
        pairs = [self.reference[f["pair_id"]] for f in features] if self.reference else []
        if pairs and all(p is not None for p in pairs):  # None: the pre-pass that fills them
            for column, side in enumerate(sides):
                batch[f"ref_{side}_logps"] = torch.tensor([p[column] for p in pairs])
        return batch


# --------------------------------------------------------------------------- showing an example


def show_tokens(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The example token by token, trained tokens marked: green with color, else ⟦...⟧."""
    out = []
    trained_run = False
    for token_id, label in zip(input_ids, labels, strict=True):
        text = tokenizer.decode([token_id]).replace("\n", "↵\n")
        trained = label != IGNORE_INDEX
        if color:
            out.append(f"\x1b[42;30m{text}\x1b[0m" if trained else f"\x1b[2m{text}\x1b[0m")
        else:
            if trained and not trained_run:
                out.append("⟦")
            if not trained and trained_run:
                out.append("⟧")
            out.append(text)
        trained_run = trained
    if trained_run and not color:
        out.append("⟧")
    return "".join(out)


def inspect_row(recipe, stage_name: str, row: int, color: bool) -> str:
    """`simpo data inspect`: one training row of a stage, rendered and tokenized as training
    sees it, with counts that make a masking, BOS or EOS mistake obvious."""
    stage = recipe.stage(stage_name)
    tokenizer = load_tokenizer(recipe.model)
    role = f"{stage_name}.data.train"
    dataset = load_source(stage.data.train, role)
    if row >= len(dataset):
        raise DataError(
            f"--row {row}: {role} has {len(dataset)} rows; choose 0..{len(dataset) - 1}"
        )
    kind = "sft" if stage_name == "sft" else "preference"
    check_columns(dataset.column_names, kind, role)
    where = f"{role}: --row {row} ({row_location(dataset[row], row)} of {stage.data.train.path})"
    if kind == "sft":
        out = tokenize_conversation(tokenizer, dataset[row], where, stage.data.max_length)
        shown = {"example": (out["input_ids"], out["labels"])}
    else:
        data = stage.data
        out = tokenize_pair(
            tokenizer,
            dataset[row],
            where,
            data.max_length,
            data.max_prompt_length,
            data.tokenization,
        )
        shown = {
            side: (out[f"{side}_ids"], out[f"{side}_labels"]) for side in ("chosen", "rejected")
        }
    legend = "green = trained" if color else "⟦trained⟧"
    lines = [f"{where} ({legend}; ↵ = newline)"]
    if out["drop"]:
        lines.append(f"this row is dropped before training: {out['drop']}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for side, (ids, labels) in shown.items():
        trained = sum(label != IGNORE_INDEX for label in labels)
        lines += [
            f"--- {side}: {len(ids)} tokens, {trained} trained, {len(ids) - trained} masked; "
            f"BOS count {ids.count(bos) if bos is not None else 0}; "
            f"ends with EOS: {'yes' if ids[-1:] == [eos] else 'no'}",
            show_tokens(tokenizer, ids, labels, color),
        ]
    return "\n".join(lines)
