"""The row formats training reads: a row's messages (as_messages, preference_messages,
sft_messages), the columns a stage needs (check_columns), and whether a row's prompt holds any
text (empty_prompt). Plain Python on plain rows, no tokenizer and no torch, so that
`simpo validate` checks a recipe's data files with the same code that training reads them with
(check_rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simpo_cli.data.sources import (
    LOCAL_SUFFIXES,
    LOCATION_COLUMN,
    check_column_kinds,
    read_json_rows,
)
from simpo_cli.errors import DataError
from simpo_cli.recipe import DataSource

Message = dict[str, Any]


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


def text_of(message: Message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else json.dumps(content)


def empty_prompt(messages: list[Message]) -> bool:
    """No text before the first reply: a row with `"prompt": ""`, or a conversation that opens
    with the reply. Such a row is dropped, and counted, as "empty prompt" (the chat template
    cannot render a reply to nothing)."""
    first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return not any(text_of(m).strip() for m in messages[:first_reply])


PREFERENCE_COLUMNS = ({"chosen", "rejected"},)
SFT_COLUMNS = ({"messages"}, {"prompt", "completion"})
EMPTY_PROMPT = "empty prompt"


def check_columns(columns: list[str], kind: str, where: str) -> None:
    accepted = PREFERENCE_COLUMNS if kind == "preference" else SFT_COLUMNS
    columns = [c for c in columns if c != LOCATION_COLUMN]
    if any(need <= set(columns) for need in accepted):
        return
    wanted = " or ".join("/".join(sorted(need)) for need in accepted)
    raise DataError(
        f"{where}: missing column(s) for {kind} data: need {wanted}; found {', '.join(columns)}"
    )


def check_rows(source: DataSource, kind: str, role: str) -> str | None:
    """Read a local JSON/JSONL file's rows as training does, short of tokenizing them: the file
    (JSON, one object per row), each column's type, the columns `kind` ('sft' or 'preference')
    needs, and each row's messages (within source.max_rows). Raises DataError naming the first
    bad row. Returns what was checked, or None for a source it does not read here (a parquet
    file, a saved folder, a hub dataset: read by `simpo data inspect`)."""
    path = Path(source.path).expanduser()
    if not (path.is_file() and LOCAL_SUFFIXES.get(path.suffix.lower()) == "json"):
        return None
    numbered, unit = read_json_rows(path)
    check_column_kinds(numbered, unit, role, path)
    columns = list(dict.fromkeys(key for _, row in numbered for key in row))
    check_columns(columns, kind, role)
    numbered = numbered[: source.max_rows]
    empty = []
    for number, row in numbered:
        where = f"{role}: {unit} {number}"
        full = {key: row.get(key) for key in columns}  # a key a row lacks is null there
        if kind == "preference":
            prompt, chosen, _ = preference_messages(full, where)
            messages = [*prompt, chosen]
        else:
            messages = sft_messages(full, where)
        if empty_prompt(messages):
            empty.append(f"{unit} {number}")
    checked = f"{role}: {len(numbered)} rows read"
    if empty:
        checked += f"; {len(empty)} dropped ({EMPTY_PROMPT}: {', '.join(empty[:3])})"
    return checked
