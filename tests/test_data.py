"""The data pipeline against facts worked out by hand on the shipped tiny tokenizer.

The tiny tokenizer (recipes/tiny/tokenizer) is a byte-level BPE whose Llama-3-style chat template
writes `{{ bos_token }}` itself, while its post-processor also prepends <|begin_of_text|> when
add_special_tokens=True; eos is <|eot_id|> and pad is <|pad|>. Expected token ids are built by
tokenizing hand-written rendered text with add_special_tokens=False, independently of the code
under test, which tokenizes the prompt and response pieces separately.
"""

from __future__ import annotations

import os

# Never touch the hub: set before datasets/transformers read their configuration.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from simpo_cli.data import (  # noqa: E402
    LOCATION_COLUMN,  # noqa: E402
    DataReport,
    PreferenceCollator,
    SFTCollator,
    check_columns,
    fingerprint,
    inspect_row,
    load_source,
    load_tokenizer,
    preference_messages,
    prepare,
    prepare_reused,
    render_segments,
    sft_messages,
    show_tokens,
    tokenize_conversation,
    tokenize_pair,
    tokenize_segments,
)
from simpo_cli.errors import DataError  # noqa: E402
from simpo_cli.losses import IGNORE_INDEX  # noqa: E402
from simpo_cli.recipe import DataSource, ModelSettings  # noqa: E402

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "tokenizer"

BOS_TEXT = "<|begin_of_text|>"
EOT_TEXT = "<|eot_id|>"
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

# A ChatML-style layout (`<start>role\ncontent<end>\n`) that writes no BOS and ends every turn
# with `<|eot_id|>\n`. The tiny vocabulary has no <|im_start|>/<|im_end|>, so its
# <|start_header_id|> and <|eot_id|> special tokens stand in for them.
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '\\n' + m['content'] + '<|eot_id|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\\n' }}{% endif %}"
)
# A template that writes no BOS and ends turns with a plain newline, no EOS at all.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

USER = {"role": "user", "content": "Sort: 3 1 2"}
SYSTEM = {"role": "system", "content": "You sort digits."}
CHOSEN = {"role": "assistant", "content": "1 2 3"}
REJECTED = {"role": "assistant", "content": "3 2 1"}


# --------------------------------------------------------------------------- helpers


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def masked(n: int) -> list[int]:
    return [IGNORE_INDEX] * n


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pair_columns(out: dict) -> dict:
    """The columns prepare keeps from a tokenize_pair result."""
    return {k: out[k] for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")}


def pair_row(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def llama_prompt(user: str, system: str | None = None) -> str:
    """The tiny template's rendering of [system,] user plus the generation prompt, by hand."""
    head = BOS_TEXT + (SYSTEM_HEADER + system + EOT_TEXT if system is not None else "")
    return head + USER_HEADER + user + EOT_TEXT + ASSISTANT_HEADER


def pair_by_hand(tokenizer, prompt: str, chosen: str, rejected: str) -> dict:
    """What tokenize_pair should give for an untruncated pair, from hand-written text: each side's
    whole text tokenized at once, and the prompt's tokens masked."""
    n_prompt = len(enc(tokenizer, prompt))
    out = {"drop": "", "truncated": False}
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        out[f"{side}_ids"] = enc(tokenizer, prompt + reply)
        out[f"{side}_labels"] = masked(n_prompt) + enc(tokenizer, reply)
    return out


def sevens(n: int) -> str:
    return " ".join(["7"] * n)


# --------------------------------------------------------------------------- 1. Llama-3 template


def test_tiny_tokenizer_facts(tok):
    """Preconditions the rest relies on: the special ids, and that both the template and the
    tokenizer add a BOS, so naive tokenization of a rendered conversation would give two."""
    assert tok.bos_token_id == tok.convert_tokens_to_ids(BOS_TEXT) == 0
    assert tok.eos_token_id == tok.convert_tokens_to_ids(EOT_TEXT) == 4
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|pad|>") == 5
    assert tok.padding_side == "right"
    rendered = tok.apply_chat_template([USER, CHOSEN], tokenize=False)
    assert rendered == BOS_TEXT + USER_HEADER + "Sort: 3 1 2" + EOT_TEXT + ASSISTANT_HEADER + (
        "1 2 3" + EOT_TEXT
    )
    assert tok(rendered)["input_ids"][:2] == [0, 0]


def test_render_segments_llama_template(tok):
    prompt = (
        BOS_TEXT + SYSTEM_HEADER + "You sort digits." + EOT_TEXT
        + USER_HEADER + "Sort: 3 1 2" + EOT_TEXT + ASSISTANT_HEADER
    )  # fmt: skip
    assert render_segments(tok, [SYSTEM, USER, CHOSEN]) == [
        (prompt, False),
        ("1 2 3" + EOT_TEXT, True),
    ]


def test_tokenize_segments_llama_masks_prompt_trains_reply(tok):
    """System/user turns and the assistant header are -100; `1 2 3<|eot_id|>` is trained; one
    BOS at 0; ids equal the whole rendered text tokenized without special tokens."""
    prompt = (
        BOS_TEXT + SYSTEM_HEADER + "You sort digits." + EOT_TEXT
        + USER_HEADER + "Sort: 3 1 2" + EOT_TEXT + ASSISTANT_HEADER
    )  # fmt: skip
    reply = "1 2 3" + EOT_TEXT
    ids, labels = tokenize_segments(tok, render_segments(tok, [SYSTEM, USER, CHOSEN]))

    assert ids == enc(tok, prompt + reply)
    n_prompt = len(enc(tok, prompt))
    assert labels == masked(n_prompt) + enc(tok, reply)
    # By hand: "1", " 2", " 3", <|eot_id|> are the only trained tokens.
    assert [label for label in labels if label != IGNORE_INDEX] == [22, 272, 271, 4]
    assert ids[0] == 0 and ids.count(0) == 1
    header = enc(tok, ASSISTANT_HEADER)
    assert ids[n_prompt - len(header) : n_prompt] == header
    assert labels[n_prompt - len(header) : n_prompt] == masked(len(header))
    assert ids[-1] == labels[-1] == tok.eos_token_id


def test_tokenize_pair_llama(tok):
    prompt = BOS_TEXT + USER_HEADER + "Sort: 3 1 2" + EOT_TEXT + ASSISTANT_HEADER
    out = tokenize_pair(tok, {"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]}, "w", 64, 32)
    n = len(enc(tok, prompt))
    assert out["drop"] == "" and out["truncated"] is False
    assert out["chosen_ids"] == enc(tok, prompt + "1 2 3" + EOT_TEXT)
    assert out["rejected_ids"] == enc(tok, prompt + "3 2 1" + EOT_TEXT)
    assert out["chosen_labels"] == masked(n) + enc(tok, "1 2 3" + EOT_TEXT)
    assert out["rejected_labels"] == masked(n) + enc(tok, "3 2 1" + EOT_TEXT)
    assert out["chosen_ids"].count(0) == out["rejected_ids"].count(0) == 1


# --------------------------------------------------------------------------- 2. other templates


def test_chatml_override_from_jinja_file_gets_one_bos_and_no_extra_eos(tmp_path):
    """A template without BOS relies on the tokenizer's: one BOS is prepended (masked). Its reply
    piece `1 2 3<|eot_id|>\\n` already holds the EOS, so none is appended."""
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML_TEMPLATE)
    tokenizer = load_tokenizer(
        ModelSettings(name_or_path=str(TINY_TOKENIZER), chat_template=str(template_file))
    )
    assert tokenizer.chat_template == CHATML_TEMPLATE

    prompt = "<|start_header_id|>user\nSort: 3 1 2<|eot_id|>\n<|start_header_id|>assistant\n"
    reply = "1 2 3<|eot_id|>\n"
    pieces = render_segments(tokenizer, [USER, CHOSEN])
    assert pieces == [(prompt, False), (reply, True)]

    ids, labels = tokenize_segments(tokenizer, pieces)
    assert ids == [0] + enc(tokenizer, prompt + reply)
    assert labels == masked(1 + len(enc(tokenizer, prompt))) + enc(tokenizer, reply)
    assert ids.count(0) == 1
    assert ids.count(4) == 2  # the user turn's and the reply's <|eot_id|>, nothing appended
    assert ids[-2:] == [4, 204]  # <|eot_id|>, "\n"


def test_template_text_override_without_eos_gets_eos_appended(fresh_tok):
    """`user: ...\\nassistant: ` then `1 2 3\\n`: no EOS in the reply, so <|eot_id|> is appended
    and trained; one BOS is prepended."""
    tokenizer = load_tokenizer(
        ModelSettings(name_or_path=str(TINY_TOKENIZER), chat_template=PLAIN_TEMPLATE)
    )
    assert tokenizer.chat_template == PLAIN_TEMPLATE
    pieces = render_segments(tokenizer, [USER, CHOSEN])
    assert pieces == [("user: Sort: 3 1 2\nassistant: ", False), ("1 2 3\n", True)]

    ids, labels = tokenize_segments(tokenizer, pieces)
    prompt_ids = enc(tokenizer, "user: Sort: 3 1 2\nassistant: ")
    reply_ids = enc(tokenizer, "1 2 3\n")
    assert ids == [0] + prompt_ids + reply_ids + [4]
    assert labels == masked(1 + len(prompt_ids)) + reply_ids + [4]

    out = tokenize_pair(tokenizer, pair_row("Sort: 3 1 2", "1 2 3", "3 2 1"), "w", 64, 32)
    assert out["chosen_ids"] == [0] + prompt_ids + reply_ids + [4]
    assert out["rejected_ids"] == [0] + prompt_ids + enc(tokenizer, "3 2 1\n") + [4]


def test_template_writing_bos_twice_still_gives_one(tok, fresh_tok):
    """An override that prefixes the shipped template with another `{{ bos_token }}` renders two
    BOS strings; the tokenized example still starts with exactly one."""
    fresh_tok.chat_template = "{{ bos_token }}" + tok.chat_template
    pieces = render_segments(fresh_tok, [USER, CHOSEN])
    assert pieces[0][0].startswith(BOS_TEXT + BOS_TEXT + USER_HEADER)
    prompt, reply = llama_prompt("Sort: 3 1 2"), "1 2 3" + EOT_TEXT
    assert tokenize_segments(fresh_tok, pieces) == (
        enc(tok, prompt + reply),
        masked(len(enc(tok, prompt))) + enc(tok, reply),
    )


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=r"model\.chat_template: cannot read .*missing\.jinja"):
        load_tokenizer(
            ModelSettings(
                name_or_path=str(TINY_TOKENIZER), chat_template=str(tmp_path / "missing.jinja")
            )
        )
    with pytest.raises(DataError, match="cannot load a tokenizer from '.*no-such-tokenizer'"):
        load_tokenizer(ModelSettings(name_or_path=str(tmp_path / "no-such-tokenizer")))


def test_load_tokenizer_pads_with_eos_when_there_is_no_pad(tmp_path, fresh_tok):
    fresh_tok.pad_token = None
    fresh_tok.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(ModelSettings(name_or_path=str(tmp_path)))
    assert tokenizer.pad_token_id == 4


# --------------------------------------------------------------------------- 3. SFT


def test_multi_turn_sft_trains_every_assistant_turn(tok):
    messages = [
        {"role": "user", "content": "Sort: 2 1"},
        {"role": "assistant", "content": "1 2"},
        {"role": "user", "content": "Reverse it."},
        {"role": "assistant", "content": "2 1"},
    ]
    p1 = BOS_TEXT + USER_HEADER + "Sort: 2 1" + EOT_TEXT + ASSISTANT_HEADER
    r1 = "1 2" + EOT_TEXT
    p2 = USER_HEADER + "Reverse it." + EOT_TEXT + ASSISTANT_HEADER
    r2 = "2 1" + EOT_TEXT
    assert render_segments(tok, messages) == [(p1, False), (r1, True), (p2, False), (r2, True)]

    out = tokenize_conversation(tok, {"messages": messages}, "w", 512)
    assert out["drop"] == "" and out["truncated"] is False
    assert out["input_ids"] == enc(tok, p1 + r1 + p2 + r2)
    assert out["labels"] == (
        masked(len(enc(tok, p1))) + enc(tok, r1) + masked(len(enc(tok, p2))) + enc(tok, r2)
    )


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Sort: 3 1 2", "completion": "1 2 3"},
        {"prompt": [SYSTEM, USER], "completion": [CHOSEN]},
        {"prompt": [SYSTEM, USER], "completion": "1 2 3"},
    ],
    ids=["strings", "message-lists", "mixed"],
)
def test_prompt_completion_equals_messages(tok, row):
    """Each form gives the conversation written out by hand: the reply trained, the rest masked."""
    system = None if isinstance(row["prompt"], str) else "You sort digits."
    messages = [USER, CHOSEN] if system is None else [SYSTEM, USER, CHOSEN]
    assert sft_messages(row, "w") == messages
    prompt, reply = llama_prompt("Sort: 3 1 2", system), "1 2 3" + EOT_TEXT
    expected = {
        "input_ids": enc(tok, prompt + reply),
        "labels": masked(len(enc(tok, prompt))) + enc(tok, reply),
        "drop": "",
        "truncated": False,
    }
    assert tokenize_conversation(tok, row, "w", 512) == expected
    assert tokenize_conversation(tok, {"messages": messages}, "w", 512) == expected


def test_sft_truncation_and_drops(tok):
    """17 prompt tokens + `1 2 3<|eot_id|>` (4): max_length 19 keeps "1", " 2"; 17 keeps none."""
    prompt, reply = enc(tok, llama_prompt("Sort: 3 1 2")), enc(tok, "1 2 3" + EOT_TEXT)
    assert (len(prompt), reply) == (17, [22, 272, 271, 4])  # the case we claim
    cut = tokenize_conversation(tok, {"messages": [USER, CHOSEN]}, "w", 19)
    assert cut == {
        "input_ids": prompt + [22, 272],
        "labels": masked(17) + [22, 272],
        "drop": "",
        "truncated": True,
    }
    # Cut at the end of the prompt: nothing left to train on.
    prompt_only = tokenize_conversation(tok, {"messages": [USER, CHOSEN]}, "w", 17)
    assert prompt_only["drop"] == "no response tokens after truncation"
    empty = {"messages": [USER, {"role": "assistant", "content": "  "}]}
    assert tokenize_conversation(tok, empty, "w", 512)["drop"] == "empty response"
    with pytest.raises(DataError, match="w: the conversation has no assistant turn"):
        tokenize_conversation(tok, {"messages": [USER]}, "w", 512)


# --------------------------------------------------------------------------- 4. preference formats

PREFERENCE_ENCODINGS = {
    "lists-holding-prompt": {
        "chosen": [SYSTEM, USER, CHOSEN],
        "rejected": [SYSTEM, USER, REJECTED],
    },
    "ultrafeedback-binarized": {
        "prompt": "Sort: 3 1 2",
        "chosen": [SYSTEM, USER, CHOSEN],
        "rejected": [SYSTEM, USER, REJECTED],
    },
    "prompt-messages-plus-reply-lists": {
        "prompt": [SYSTEM, USER],
        "chosen": [CHOSEN],
        "rejected": [REJECTED],
    },
    "strings": {
        "prompt": [SYSTEM, USER],
        "chosen": "1 2 3",
        "rejected": "3 2 1",
    },
}


@pytest.mark.parametrize("name", list(PREFERENCE_ENCODINGS))
def test_preference_formats_agree(tok, name):
    """Every format of one system + user + reply pair gives the pair written out by hand."""
    row = PREFERENCE_ENCODINGS[name]
    assert preference_messages(row, "w") == ([SYSTEM, USER], CHOSEN, REJECTED)
    assert tokenize_pair(tok, row, "w", 64, 32) == pair_by_hand(
        tok, llama_prompt("Sort: 3 1 2", "You sort digits."), "1 2 3" + EOT_TEXT, "3 2 1" + EOT_TEXT
    )


def test_plain_string_pair_matches_lists(tok):
    expected = pair_by_hand(
        tok, llama_prompt("Sort: 3 1 2"), "1 2 3" + EOT_TEXT, "3 2 1" + EOT_TEXT
    )
    strings = pair_row("Sort: 3 1 2", "1 2 3", "3 2 1")
    lists = {"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]}
    assert tokenize_pair(tok, strings, "w", 64, 32) == expected
    assert tokenize_pair(tok, lists, "w", 64, 32) == expected


def test_preference_row_errors():
    with pytest.raises(DataError, match="^r: row 2: chosen must end with an assistant message$"):
        preference_messages({"chosen": [USER], "rejected": [USER, REJECTED]}, "r: row 2")
    with pytest.raises(DataError, match="^r: row 2: rejected must end with an assistant message$"):
        preference_messages({"chosen": [USER, CHOSEN], "rejected": [REJECTED, USER]}, "r: row 2")
    other = {"role": "user", "content": "Sort: 9 8"}
    with pytest.raises(DataError, match="^r: row 2: chosen and rejected have different prompt"):
        preference_messages({"chosen": [USER, CHOSEN], "rejected": [other, REJECTED]}, "r: row 2")
    with pytest.raises(DataError, match="^r: row 2: no prompt"):
        preference_messages({"chosen": "1 2 3", "rejected": "3 2 1"}, "r: row 2")
    with pytest.raises(DataError, match="^r: row 2: chosen: expected a string or a list"):
        preference_messages({"chosen": 7, "rejected": "x", "prompt": "p"}, "r: row 2")


# --------------------------------------------------------------------------- 5. truncation


def _long_prompt_pair():
    return pair_row("Sort: " + sevens(40), sevens(20), "7 7")


def _long_prompt_pieces(tok) -> tuple[list[int], list[int], list[int]]:
    """_long_prompt_pair's prompt, chosen and rejected tokens, from the text written out."""
    prompt = enc(tok, llama_prompt("Sort: " + sevens(40)))
    return prompt, enc(tok, sevens(20) + EOT_TEXT), enc(tok, "7 7" + EOT_TEXT)


def test_long_prompt_keeps_bos_and_its_tail_then_cuts_responses(tok):
    """max_length 24, max_prompt_length 10: the prompt becomes BOS + its last 9 tokens, and each
    response is cut to 24 - 10 = 14 tokens (the short rejected one is left whole)."""
    row = _long_prompt_pair()
    prompt, chosen, rejected = _long_prompt_pieces(tok)
    assert (len(prompt), len(chosen), len(rejected)) == (54, 21, 3)  # the case is what we claim

    out = tokenize_pair(tok, row, "w", 24, 10)
    kept_prompt = [0] + prompt[-9:]
    assert out["truncated"] is True
    assert out["chosen_ids"] == kept_prompt + chosen[:14]
    assert out["chosen_labels"] == masked(10) + chosen[:14]
    assert out["rejected_ids"] == kept_prompt + rejected
    assert out["rejected_labels"] == masked(10) + rejected
    assert out["rejected_ids"][-1] == 4  # the whole rejected reply, EOS included
    assert len(out["chosen_ids"]) == 24 and out["chosen_ids"].count(0) == 1


def test_short_prompt_long_response_cuts_only_the_response(tok):
    """Prompt 15 tokens, chosen 22, rejected 2; max_length 20, max_prompt_length 16: the prompt
    is whole, chosen is cut to its first 5 tokens, rejected is whole."""
    row = pair_row("Sort: 7", sevens(21), "7")
    prompt = enc(tok, llama_prompt("Sort: 7"))
    chosen, rejected = enc(tok, sevens(21) + EOT_TEXT), enc(tok, "7" + EOT_TEXT)
    assert (len(prompt), len(chosen), len(rejected)) == (15, 22, 2)  # the case we claim
    out = tokenize_pair(tok, row, "w", 20, 16)
    assert out["truncated"] is True
    assert out["chosen_ids"] == prompt + chosen[:5]
    assert out["chosen_labels"] == masked(15) + chosen[:5]
    assert out["rejected_ids"] == prompt + rejected
    assert out["rejected_labels"] == masked(15) + rejected


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(64, 40), (20, 5), (13, 12)])
def test_lengths_never_exceed_max_length(tok, max_length, max_prompt_length):
    out = tokenize_pair(tok, _long_prompt_pair(), "w", max_length, max_prompt_length)
    assert out["truncated"] is True
    for side in ("chosen", "rejected"):
        assert len(out[f"{side}_ids"]) == len(out[f"{side}_labels"])
        assert len(out[f"{side}_ids"]) <= max_length
        assert out[f"{side}_ids"][0] == 0
        assert out[f"{side}_labels"].count(IGNORE_INDEX) == max_prompt_length
    assert out["drop"] == ""


def test_short_pair_and_long_prompt_that_fits_are_untouched(tok):
    """Truncation starts only when prompt + longer response exceeds max_length: a prompt longer
    than max_prompt_length is kept whole if the pair fits."""
    row = _long_prompt_pair()
    full = pair_by_hand(
        tok, llama_prompt("Sort: " + sevens(40)), sevens(20) + EOT_TEXT, "7 7" + EOT_TEXT
    )
    assert len(full["chosen_ids"]) == 54 + 21
    assert tokenize_pair(tok, row, "w", 10_000, 9_000) == full
    assert tokenize_pair(tok, row, "w", 54 + 21, 5) == full
    short = tokenize_pair(tok, pair_row("Sort: 3 1 2", "1 2 3", "3 2 1"), "w", 64, 40)
    # 17 prompt tokens (BOS, 5 for the user header, "Sort" ":" " 3" " 1" " 2", <|eot_id|>,
    # 5 for the assistant header) + 4 reply tokens.
    assert short["truncated"] is False and len(short["chosen_ids"]) == 17 + 4


# --------------------------------------------------------------------------- 6. prepare


def test_prepare_preference_drops_counts_and_means(tok):
    rows = [
        pair_row("Sort: 3 1 2", "1 2 3", "3 2 1"),  # kept: 4 + 4 trained tokens
        pair_row("Sort: 2 1", "  \n", "2 1"),  # empty chosen
        pair_row("Sort: 2 1", "1 2", "1 2"),  # identical
        pair_row("Sort: " + sevens(30), "7 7", "7"),  # kept, prompt truncated
        pair_row("Sort: 5 4", "4 5", ""),  # empty rejected
    ]
    kept, report = prepare(datasets.Dataset.from_list(rows), tok, "preference", "p", 24, 12)
    assert isinstance(report, DataReport)
    assert (report.rows_read, report.rows_kept, report.truncated) == (5, 2, 1)
    assert dict(report.dropped) == {"empty response": 2, "chosen identical to rejected": 1}
    # Trained tokens: "1 2 3<eot>" 4 and "7 7<eot>" 3 -> 3.5; "3 2 1<eot>" 4 and "7<eot>" 2 -> 3.
    assert report.mean_tokens == {"chosen": 3.5, "rejected": 3.0}
    assert sorted(kept.column_names) == [
        "chosen_ids",
        "chosen_labels",
        "rejected_ids",
        "rejected_labels",
        "source_row",
    ]
    assert pair_columns(kept[0]) == pair_columns(
        pair_by_hand(tok, llama_prompt("Sort: 3 1 2"), "1 2 3" + EOT_TEXT, "3 2 1" + EOT_TEXT)
    )
    # The 44-token prompt keeps BOS + its last 11 tokens; both replies fit whole.
    prompt = enc(tok, llama_prompt("Sort: " + sevens(30)))
    chosen, rejected = enc(tok, "7 7" + EOT_TEXT), enc(tok, "7" + EOT_TEXT)
    assert len(prompt) == 44
    assert pair_columns(kept[1]) == {
        "chosen_ids": [0] + prompt[-11:] + chosen,
        "chosen_labels": masked(12) + chosen,
        "rejected_ids": [0] + prompt[-11:] + rejected,
        "rejected_labels": masked(12) + rejected,
    }
    assert report.lines() == [
        "p: 5 rows read, 2 kept",
        "  dropped (chosen identical to rejected): 1",
        "  dropped (empty response): 2",
        "  truncated: 1",
        "  mean chosen tokens: 3.5",
        "  mean rejected tokens: 3.0",
    ]


def test_prepare_sft_report(tok):
    rows = [
        {"messages": [USER, CHOSEN]},  # 4 trained
        {"messages": [USER, {"role": "assistant", "content": " "}]},  # empty
        {"messages": [SYSTEM, USER, {"role": "assistant", "content": "1 2 3 4 5 6"}]},  # 7
    ]
    kept, report = prepare(datasets.Dataset.from_list(rows), tok, "sft", "s", 512)
    assert (report.rows_read, report.rows_kept, report.truncated) == (3, 2, 0)
    assert dict(report.dropped) == {"empty response": 1}
    assert report.mean_tokens == {"response": 5.5}
    assert sorted(kept.column_names) == ["input_ids", "labels", "source_row"]


def test_rows_with_an_empty_prompt_are_dropped_and_counted(tok):
    """`"prompt": ""` was kept and trained on, and the data report did not count it: it is
    dropped as "empty prompt", in preference and SFT data alike (what `simpo validate` reports
    too), as is a conversation that opens with the reply (the chat template failed on it)."""
    pairs = [pair_row("Sort: 2 1", "1 2", "2 1"), pair_row(" ", "1 2", "2 1")]
    _, report = prepare(datasets.Dataset.from_list(pairs), tok, "preference", "p", 64, 32)
    assert (report.rows_read, dict(report.dropped)) == (2, {"empty prompt": 1})
    assert "  dropped (empty prompt): 1" in report.lines()
    silent = {"chosen": [{"role": "system", "content": ""}, CHOSEN], "rejected": [REJECTED]}
    assert tokenize_pair(tok, silent, "w", 64, 32)["drop"] == "empty prompt"
    rows = [
        {"messages": None, "prompt": "", "completion": "1 2"},
        {"messages": [CHOSEN], "prompt": None, "completion": None},  # opens with the reply
        {"messages": [USER, CHOSEN], "prompt": None, "completion": None},
    ]
    kept, report = prepare(datasets.Dataset.from_list(rows), tok, "sft", "s", 64)
    assert (len(kept), dict(report.dropped)) == (1, {"empty prompt": 2})


def test_prepare_all_rows_dropped_is_a_data_error(tok):
    rows = [pair_row("a", " ", "b"), pair_row("a", "b", "b")]
    with pytest.raises(DataError) as err:
        prepare(datasets.Dataset.from_list(rows), tok, "preference", "p", 64, 32)
    assert str(err.value) == (
        "p: no usable rows: all 2 dropped (1 chosen identical to rejected, 1 empty response)"
    )


def test_tokenized_data_is_kept_and_read_back_only_for_the_same_rows_and_settings(
    tok, fresh_tok, tmp_path
):
    """prepare_reused: the first call tokenizes and keeps the result; a second with the same
    file, tokenizer and settings reads it back (same rows, same report); another max_length,
    max_rows, file content or chat template tokenizes anew; a source whose rows all drop is
    not kept (its error comes again)."""
    path = tmp_path / "pairs.jsonl"
    rows = [pair_row("Sort: 2 1", "1 2", "2 1"), pair_row("Sort: 3 1", " ", "1 3"),
            pair_row("Sort: 9 8 7", "7 8 9", "9 8 7")]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    folder = tmp_path / "tokenized"

    def run(source, tokenizer=tok, max_length=64):
        raw = load_source(source, "p")
        return prepare_reused(source, raw, tokenizer, "preference", "p", max_length, 32,
                              "default", folder, write=True)  # fmt: skip

    source = DataSource(path=str(path))
    first, report, read = run(source)
    assert read is None and len(list(folder.iterdir())) == 1
    again, report_again, read = run(source)
    assert read is not None and read.parent == folder
    assert again.to_list() == first.to_list()
    assert report_again.lines() == report.lines() and dict(report.dropped) == {"empty response": 1}
    assert run(source, max_length=32)[2] is None
    assert run(DataSource(path=str(path), max_rows=2))[2] is None
    fresh_tok.chat_template = fresh_tok.chat_template.replace("<|eot_id|>", "<|eot_id|>\n")
    assert run(source, tokenizer=fresh_tok)[2] is None
    path.write_text(json.dumps(rows[0]) + "\n")
    assert run(source)[2] is None
    assert len(list(folder.iterdir())) == 5 and not list(folder.glob("*.partial"))
    path.write_text(json.dumps(rows[1]) + "\n")
    for _ in range(2):
        with pytest.raises(DataError, match="no usable rows"):
            run(source)
    assert len(list(folder.iterdir())) == 5


def test_prepare_keeps_rows_after_a_first_batch_of_dropped_rows(tok):
    """1000 dropped rows (one full writer batch of empty lists) then one good row: the good row
    must be kept and counted, not crash while writing the tokenized columns."""
    rows = [pair_row("Sort: 2 1", " ", "2 1")] * 1000 + [pair_row("Sort: 2 1", "1 2", "2 1")]
    kept, report = prepare(datasets.Dataset.from_list(rows), tok, "preference", "p", 64, 32)
    assert (report.rows_read, report.rows_kept, len(kept)) == (1001, 1, 1)
    assert pair_columns(kept[0]) == pair_columns(
        pair_by_hand(tok, llama_prompt("Sort: 2 1"), "1 2" + EOT_TEXT, "2 1" + EOT_TEXT)
    )


def test_prepare_names_the_bad_row(tok):
    """A source without lines (here a Dataset built in memory) names rows counted from 1."""
    rows = [
        {"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]},
        {"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]},
        {"chosen": [USER, CHOSEN, USER], "rejected": [USER, REJECTED]},
    ]
    with pytest.raises(
        DataError, match="^pref.data.train: row 3: chosen must end with an assistant"
    ):
        prepare(datasets.Dataset.from_list(rows), tok, "preference", "pref.data.train", 64, 32)


def test_missing_columns_name_needed_and_found(tok):
    with pytest.raises(
        DataError,
        match=r"^t: missing column\(s\) for preference data: need chosen/rejected; "
        r"found prompt, chosen$",
    ):
        check_columns(["prompt", "chosen"], "preference", "t")
    with pytest.raises(
        DataError, match=r"need messages or completion/prompt; found prompt, answer$"
    ):
        prepare(datasets.Dataset.from_list([{"prompt": "a", "answer": "b"}]), tok, "sft", "t", 64)
    check_columns(["prompt", "completion", "extra"], "sft", "t")  # accepted: no error


# --------------------------------------------------------------------------- 7. source errors


def test_jsonl_broken_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a",\n')
    with pytest.raises(DataError) as err:
        load_source(DataSource(path=str(path)), "simpo.data.train")
    message = str(err.value)
    assert message.startswith(f"{path}: line 3: invalid JSON")


def test_json_values_that_are_not_objects(tmp_path):
    listed = tmp_path / "pairs.json"
    listed.write_text('[{"prompt": "a"}, ["not", "an", "object"]]')
    with pytest.raises(DataError, match=f"^{listed}: item 2: expected a JSON object, got \\["):
        load_source(DataSource(path=str(listed)), "r")
    lines = tmp_path / "pairs.jsonl"
    lines.write_text('{"prompt": "a"}\n"just a string"\n')
    with pytest.raises(DataError, match=f"^{lines}: line 2: expected a JSON object"):
        load_source(DataSource(path=str(lines)), "r")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataError, match=f"^{broken}: line 3: invalid JSON"):
        load_source(DataSource(path=str(broken)), "r")


@pytest.mark.parametrize("text", ["", "\n  \n", "[]"])
def test_empty_file(tmp_path, text):
    path = tmp_path / ("empty.json" if text == "[]" else "empty.jsonl")
    path.write_text(text)
    with pytest.raises(DataError, match=f"^{path}: no rows; the file is empty$"):
        load_source(DataSource(path=str(path)), "r")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\n")
    with pytest.raises(DataError, match=f"^simpo.data.train: {path}: unsupported file type '.csv'"):
        load_source(DataSource(path=str(path)), "simpo.data.train")


def test_damaged_parquet_and_empty_folder(tmp_path):
    parquet = tmp_path / "pairs.parquet"
    parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=f"^r: {parquet}: cannot read parquet"):
        load_source(DataSource(path=str(parquet)), "r")
    folder = tmp_path / "folder"
    folder.mkdir()  # neither a save_to_disk folder nor one holding data files
    with pytest.raises(DataError, match="^r: ") as err:
        load_source(DataSource(path=str(folder)), "r")
    assert str(folder) in str(err.value)


def test_hub_name_offline_is_a_data_error(monkeypatch):
    # Offline even if another module imported datasets before this one set the environment.
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        DataError, match="^r: cannot load 'simpo-tests/no-such-dataset' \\(split x\\)"
    ):
        load_source(DataSource(path="simpo-tests/no-such-dataset", split="x"), "r")


def test_rows_with_mixed_types_are_a_data_error(tmp_path):
    """Row 1 has chosen as a string, row 2 as a message list: Arrow cannot build one column, which
    must surface as a DataError naming the file, not a raw pyarrow exception."""
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            pair_row("a", "b", "c"),
            {"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
        ],
    )
    with pytest.raises(DataError, match=str(path)):
        load_source(DataSource(path=str(path)), "r")


def test_jsonl_with_unicode_line_separator_in_a_string(tmp_path):
    """U+2028 is legal unescaped inside a JSON string (json.dumps(..., ensure_ascii=False) writes
    it raw), so this is one valid JSON Lines row; it is not a line break."""
    row = pair_row("first\u2028second", "b\x85c", "d")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_source(DataSource(path=str(path)), "r").to_list() == [
        row | {LOCATION_COLUMN: "line 1"}
    ]


# --------------------------------------------------------------------------- 8. sources


def _source_row(a: int, b: int) -> dict:
    user = {"role": "user", "content": f"Sort: {a} {b}"}
    return {
        "prompt": f"Sort: {a} {b}",
        "chosen": [user, {"role": "assistant", "content": f"{b} {a}"}],
        "rejected": [user, {"role": "assistant", "content": f"{a} {b}"}],
        "score": float(a),
    }


SOURCE_ROWS = [_source_row(a, b) for a, b in [(3, 1), (5, 2), (9, 4), (8, 0)]]


def _write_sources(tmp_path: Path) -> dict[str, DataSource]:
    write_jsonl(tmp_path / "rows.jsonl", SOURCE_ROWS)
    (tmp_path / "rows.json").write_text(json.dumps(SOURCE_ROWS, indent=2))
    dataset = datasets.Dataset.from_list(SOURCE_ROWS)
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    other = datasets.Dataset.from_list(SOURCE_ROWS[:1])
    datasets.DatasetDict({"train": other, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    # A local copy of a hub dataset repository: data files named by split, read by the same
    # load_dataset(name, split=...) call that reads a hub name.
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", SOURCE_ROWS[:1])
    write_jsonl(tmp_path / "repo" / "test.jsonl", SOURCE_ROWS)
    return {
        "hub-layout": DataSource(path=str(tmp_path / "repo"), split="test"),
        "jsonl": DataSource(path=str(tmp_path / "rows.jsonl")),
        "json": DataSource(path=str(tmp_path / "rows.json")),
        "parquet": DataSource(path=str(tmp_path / "rows.parquet")),
        "saved": DataSource(path=str(tmp_path / "saved")),
        "dict-split": DataSource(path=str(tmp_path / "dict"), split="test"),
    }


def without_location(dataset) -> list[dict]:
    """Rows as read, less the place in the file that JSON sources add (LOCATION_COLUMN)."""
    if LOCATION_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(LOCATION_COLUMN)
    return dataset.to_list()


def test_sources_give_identical_rows(tmp_path):
    sources = _write_sources(tmp_path)
    for name, source in sources.items():
        assert without_location(load_source(source, "r")) == SOURCE_ROWS, name
        limited = source.model_copy(update={"max_rows": 2})
        assert without_location(load_source(limited, "r")) == SOURCE_ROWS[:2], name
    more = sources["jsonl"].model_copy(update={"max_rows": 99})
    assert len(load_source(more, "r")) == 4
    train = DataSource(path=str(tmp_path / "dict"))  # split defaults to train
    assert without_location(load_source(train, "r")) == SOURCE_ROWS[:1]


def test_missing_split_lists_available(tmp_path):
    sources = _write_sources(tmp_path)
    missing = sources["dict-split"].model_copy(update={"split": "validation"})
    with pytest.raises(
        DataError, match=r"^r: .*dict: no split 'validation'; set split to one of train, test$"
    ):
        load_source(missing, "r")


def test_fingerprint_of_a_file_is_its_sha256(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", SOURCE_ROWS)
    source = DataSource(path=str(path))
    expected = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert fingerprint(source, load_source(source, "r")) == expected


# --------------------------------------------------------------------------- 9. collators


def test_preference_collator_stacks_chosen_then_rejected():
    features = [
        {"chosen_ids": [0, 7, 8], "chosen_labels": [-100, 8, 4],
         "rejected_ids": [0, 7], "rejected_labels": [-100, 7]},
        {"chosen_ids": [0, 9], "chosen_labels": [-100, 9],
         "rejected_ids": [0, 9, 9, 4], "rejected_labels": [-100, -100, 9, 4]},
    ]  # fmt: skip
    batch = PreferenceCollator(pad_token_id=5)(features)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [
        [0, 7, 8, 5],
        [0, 9, 5, 5],
        [0, 7, 5, 5],
        [0, 9, 9, 4],
    ]
    assert batch["labels"].tolist() == [
        [-100, 8, 4, -100],
        [-100, 9, -100, -100],
        [-100, 7, -100, -100],
        [-100, -100, 9, 4],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ]


def test_sft_collator_right_pads():
    features = [
        {"input_ids": [0, 7, 8], "labels": [-100, 8, 4]},
        {"input_ids": [0, 9, 9, 9, 4], "labels": [-100, -100, 9, 9, 4]},
    ]
    batch = SFTCollator(pad_token_id=5)(features)
    assert batch["input_ids"].tolist() == [[0, 7, 8, 5, 5], [0, 9, 9, 9, 4]]
    assert batch["labels"].tolist() == [[-100, 8, 4, -100, -100], [-100, -100, 9, 9, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# --------------------------------------------------------------------------- 10. show_tokens


def test_show_tokens_brackets_exactly_the_response(tok):
    ids, labels = tokenize_segments(tok, render_segments(tok, [USER, CHOSEN]))
    assert show_tokens(tok, ids, labels, color=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>↵\n↵\nSort: 3 1 2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>↵\n↵\n⟦1 2 3<|eot_id|>⟧"
    )
    two_turns = [USER, CHOSEN, {"role": "user", "content": "Again"}, REJECTED]
    ids, labels = tokenize_segments(tok, render_segments(tok, two_turns))
    shown = show_tokens(tok, ids, labels, color=False)
    assert shown.endswith(
        "⟦1 2 3<|eot_id|>⟧<|start_header_id|>user<|end_header_id|>↵\n↵\nAgain<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>↵\n↵\n⟦3 2 1<|eot_id|>⟧"
    )
    assert shown.count("⟦") == shown.count("⟧") == 2


def test_show_tokens_color(tok):
    shown = show_tokens(tok, [0, 22], [IGNORE_INDEX, 22], color=True)
    assert shown == "\x1b[2m<|begin_of_text|>\x1b[0m\x1b[42;30m1\x1b[0m"


# --------------------------------------------------------------------------- 11. data inspect


def test_inspect_row_marks_trained_tokens():
    """`simpo data inspect tiny`: row 0 of the shipped pairs is "Sort: 1 2 3 7 4" with chosen
    "1 2 3 4 7" and rejected "1 2 3 7 4"; only the replies and their <|eot_id|> are marked."""
    from simpo_cli.recipe import load_recipe

    shown = inspect_row(load_recipe("tiny"), "preference", 0, color=False)
    assert "⟦1 2 3 4 7<|eot_id|>⟧" in shown and "⟦1 2 3 7 4<|eot_id|>⟧" in shown
    assert shown.count("⟦") == 3  # the legend and the two replies
    assert "BOS count 1; ends with EOS: yes" in shown
    assert shown.count("<|begin_of_text|>") == 2  # one per side
    rows = load_recipe("tiny").preference.data.train.max_rows  # the rows the stage reads
    expected = rf"--row 5000: preference.data.train has {rows} rows; choose 0..{rows - 1}"
    with pytest.raises(DataError, match=expected):
        inspect_row(load_recipe("tiny"), "preference", 5000, color=False)


# --------------------------------------------------------------------------- 12. KTO's KL pairs


def test_mismatched_pairs_join_each_prompt_to_the_next_rows_chosen_response(tok):
    """Row i's KL sequence = its own prompt + row i+1's chosen response (the last wraps), cut to
    max_length; expected ids are built from the text written out."""
    from simpo_cli.data import add_mismatched_pairs

    sorts = ((3, 1), (5, 2), (9, 4))
    rows = [pair_row(f"Sort: {a} {b}", f"{b} {a}", f"{a} {b}") for a, b in sorts]
    prompts = [enc(tok, llama_prompt(f"Sort: {a} {b}")) for a, b in sorts]
    replies = [enc(tok, f"{b} {a}" + EOT_TEXT) for a, b in sorts]
    # By hand: "1" " 3", "2" " 5", "4" " 9", each then <|eot_id|>; every prompt is 16 tokens.
    assert replies == [[22, 271, 4], [23, 269, 4], [25, 265, 4]]
    assert [len(p) for p in prompts] == [16, 16, 16]
    pairs, _ = prepare(datasets.Dataset.from_list(rows), tok, "preference", "p", 64, 32)
    assert pairs["chosen_ids"] == [p + r for p, r in zip(prompts, replies, strict=True)]

    with_kl = add_mismatched_pairs(pairs, max_length=64)
    following = [replies[1], replies[2], replies[0]]  # row 2 wraps to row 0
    assert with_kl["kl_ids"] == [p + r for p, r in zip(prompts, following, strict=True)]
    assert with_kl["kl_labels"] == [masked(16) + r for r in following]
    assert with_kl["chosen_ids"] == pairs["chosen_ids"]  # the pairs themselves are untouched

    cut = add_mismatched_pairs(pairs, max_length=16 + 2)
    assert cut["kl_ids"] == [p + r[:2] for p, r in zip(prompts, following, strict=True)]
    assert cut["kl_labels"] == [masked(16) + r[:2] for r in following]


def test_a_kept_entry_is_written_whole_once_and_killed_writers_leftovers_go(tmp_path):
    """keep_whole (DIR/tokenized, DIR/evaluated): the first writer's entry stays, a second
    writer's is dropped; a write that fails leaves nothing; the next writer removes what a
    writer on this machine that was killed mid-write left (its process is gone), not what a
    running process or another machine is writing."""
    import socket
    import subprocess

    from simpo_cli.data.reuse import PARTIAL, keep_whole

    def writes(text: str):
        def write(folder: Path) -> None:
            folder.mkdir()
            (folder / "a.txt").write_text(text)

        return write

    entry = tmp_path / "kept" / "key"
    assert keep_whole(entry, writes("first"))
    assert not keep_whole(entry, writes("second"))
    assert (entry / "a.txt").read_text() == "first"

    def fails(folder: Path) -> None:
        folder.mkdir()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        keep_whole(tmp_path / "kept" / "other", fails)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["key"]

    ended = subprocess.Popen(["true"])
    ended.wait()
    host = socket.gethostname()
    left = {
        "killed": f"a{PARTIAL}{ended.pid}@{host}-0f0f0f0f",
        "running": f"b{PARTIAL}{os.getpid()}@{host}-0f0f0f0f",
        "elsewhere": f"c{PARTIAL}{ended.pid}@other-{host}-0f0f0f0f",
    }
    for name in left.values():
        (tmp_path / "kept" / name).mkdir()
    assert keep_whole(tmp_path / "kept" / "next", writes("next"))
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == sorted(
        ["key", "next", left["running"], left["elsewhere"]]
    )
