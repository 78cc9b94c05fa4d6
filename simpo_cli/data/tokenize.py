"""Rows to training examples: rendering a conversation with the chat template, and tokenizing,
masking and truncating rows (tokenize_pair, tokenize_conversation, prepare,
add_mismatched_pairs). Reading a source is sources.py, a row's messages rows.py, the tokenizer
tokenizer.py, batching collate.py.

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

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jinja2.exceptions import TemplateError

from simpo_cli import progress
from simpo_cli.data.rows import (
    EMPTY_PROMPT,
    Message,
    check_columns,
    empty_prompt,
    preference_messages,
    sft_messages,
    text_of,
)
from simpo_cli.data.sources import SOURCE_ROW, row_location
from simpo_cli.data.tokenizer import adds_bos
from simpo_cli.errors import DataError
from simpo_cli.losses import IGNORE_INDEX

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
    if empty_prompt([*prompt, chosen]):
        out["drop"] = EMPTY_PROMPT
    elif not text_of(chosen).strip() or not text_of(rejected).strip():
        out["drop"] = "empty response"
    elif text_of(chosen) == text_of(rejected):
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
    drop = EMPTY_PROMPT if empty_prompt(messages) else ""
    if not drop and not any(text_of(m).strip() for m in messages if m["role"] == "assistant"):
        drop = "empty response"
    if drop:
        return {"input_ids": [], "labels": [], "drop": drop, "truncated": False}
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

    with progress.dataset_bars(len(dataset), progress.TOKENIZING):
        tokenized = dataset.map(
            one,
            # Explicit types: a first batch of only dropped rows (empty lists) must not fix the
            # id columns' type as a list of nulls.
            features=_tokenized_features(kind),
            with_indices=True,
            remove_columns=dataset.column_names,
            desc=f"Tokenizing {name}",
            load_from_cache_file=False,
        )
    report = DataReport(name=name, rows_read=len(dataset))
    drops = tokenized["drop"]
    report.dropped.update(d for d in drops if d)
    report.truncated = sum(tokenized["truncated"])
    # select, not filter: the drop column is read already; no second pass (and no second bar).
    kept = tokenized.select([i for i, drop in enumerate(drops) if not drop])
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
