"""tokenization: "authors" (the SimPO authors' convention) against facts worked out by hand.

On the shipped tiny tokenizer (recipes/tiny/tokenizer: a Llama-3-style template that writes
`{{ bos_token }}`, a post-processor that also adds <|begin_of_text|>, eos <|eot_id|>):
- default: prompt = `BOS user-turn <|eot_id|> assistant-header`, response = `reply <|eot_id|>`;
- authors: prompt = `BOS user-turn <|eot_id|>`, response = `assistant-header reply <|eot_id|>`.
The text is the same, only the prompt/response boundary moves, so the ids are identical and the
authors' convention trains the 5 header tokens on top of the default's. Expected ids are built by
tokenizing hand-written text with add_special_tokens=False, independently of the code under test.
"""

from __future__ import annotations

import os

# Never touch the hub: set before datasets/transformers read their configuration.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from simpo_cli.data import load_source, prepare, tokenize_pair  # noqa: E402
from simpo_cli.errors import DataError  # noqa: E402
from simpo_cli.losses import IGNORE_INDEX  # noqa: E402
from simpo_cli.recipe import DataSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "recipes" / "tiny" / "tokenizer"
PREF_EVAL = ROOT / "recipes" / "tiny" / "data" / "pref_eval.jsonl"

BOS, EOS = 0, 4
BOS_TEXT = "<|begin_of_text|>"
EOT_TEXT = "<|eot_id|>"
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

USER = {"role": "user", "content": "Sort: 3 1 2"}
SYSTEM = {"role": "system", "content": "You sort digits."}
CHOSEN = {"role": "assistant", "content": "1 2 3"}
REJECTED = {"role": "assistant", "content": "3 2 1"}
PAIR = {"chosen": [SYSTEM, USER, CHOSEN], "rejected": [SYSTEM, USER, REJECTED]}
# The same conversation written out by hand, as the template renders it.
PROMPT_TEXT = BOS_TEXT + SYSTEM_HEADER + "You sort digits." + EOT_TEXT + USER_HEADER
PROMPT_TEXT += "Sort: 3 1 2" + EOT_TEXT


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def masked(n: int) -> list[int]:
    return [IGNORE_INDEX] * n


def trained(labels: list[int]) -> list[int]:
    return [label for label in labels if label != IGNORE_INDEX]


def pair_row(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def sevens(n: int) -> str:
    return " ".join(["7"] * n)


def authors_by_hand(tokenizer, prompt: str, chosen: str, rejected: str) -> dict:
    """What tokenize_pair(..., "authors") should give for an untruncated pair, from hand-written
    text: `prompt` masked, each response (assistant header, reply, <|eot_id|>) trained."""
    prompt_ids = enc(tokenizer, prompt)
    out = {"drop": "", "truncated": False}
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        response = enc(tokenizer, ASSISTANT_HEADER + reply + EOT_TEXT)
        out[f"{side}_ids"] = prompt_ids + response
        out[f"{side}_labels"] = masked(len(prompt_ids)) + response
    return out


# --------------------------------------------------------------------------- the convention


def test_authors_pair_by_hand(tok):
    """Prompt = the prompt turns without the generation prompt; each response = the assistant
    header, the reply and its <|eot_id|>, all trained; one BOS; no EOS appended twice."""
    out = tokenize_pair(tok, PAIR, "w", 64, 32, "authors")
    prompt = enc(tok, PROMPT_TEXT)
    for side, reply in (("chosen", "1 2 3"), ("rejected", "3 2 1")):
        response = enc(tok, ASSISTANT_HEADER + reply + EOT_TEXT)
        assert out[f"{side}_ids"] == prompt + response
        assert out[f"{side}_labels"] == masked(len(prompt)) + response
        assert out[f"{side}_ids"].count(BOS) == 1 and out[f"{side}_ids"][0] == BOS
        assert out[f"{side}_ids"][-1] == out[f"{side}_labels"][-1] == EOS
        assert out[f"{side}_ids"].count(EOS) == 3  # system, user, reply: none appended
    assert out["drop"] == "" and out["truncated"] is False
    # By hand: the header is 5 tokens, then "1", " 2", " 3", <|eot_id|>.
    assert trained(out["chosen_labels"]) == [2, 308, 3, 204, 204, 22, 272, 271, 4]


def test_header_trained_in_authors_masked_in_default(tok):
    """The same row: identical ids, and the assistant header's 5 tokens sit right before the
    reply; they are -100 in "default" and trained in "authors"."""
    default = tokenize_pair(tok, PAIR, "w", 64, 32, "default")
    authors = tokenize_pair(tok, PAIR, "w", 64, 32, "authors")
    header = enc(tok, ASSISTANT_HEADER)
    assert len(header) == 5
    for side, reply in (("chosen", "1 2 3"), ("rejected", "3 2 1")):
        ids = enc(tok, PROMPT_TEXT + ASSISTANT_HEADER + reply + EOT_TEXT)
        assert authors[f"{side}_ids"] == default[f"{side}_ids"] == ids
        start = len(ids) - len(enc(tok, reply + EOT_TEXT)) - len(header)
        assert ids[start : start + 5] == header
        assert default[f"{side}_labels"][start : start + 5] == masked(5)
        assert authors[f"{side}_labels"][start : start + 5] == header
        assert default[f"{side}_labels"][start + 5 :] == authors[f"{side}_labels"][start + 5 :]
        assert authors[f"{side}_labels"][:start] == masked(start)


@pytest.mark.parametrize("tokenization", ["default", "authors"])
def test_ids_equal_the_full_conversation(tok, tokenization):
    """In both conventions the concatenated ids are the whole rendered conversation tokenized
    without special tokens: the template's BOS is the one BOS, and the header only moves sides."""
    out = tokenize_pair(tok, PAIR, "w", 64, 32, tokenization)
    for side, reply in (("chosen", CHOSEN), ("rejected", REJECTED)):
        rendered = tok.apply_chat_template([SYSTEM, USER, reply], tokenize=False)
        assert rendered == PROMPT_TEXT + ASSISTANT_HEADER + reply["content"] + EOT_TEXT
        assert out[f"{side}_ids"] == enc(tok, rendered)


def test_trained_tokens_differ_by_the_header_on_shipped_pairs(tok):
    """On 20 shipped pairs (user turn + reply lists), each written out by hand: the same ids in
    both conventions; "default" trains the reply and its <|eot_id|>, "authors" the 5 header tokens
    too."""
    rows = load_source(DataSource(path=str(PREF_EVAL), max_rows=20), "r").to_list()
    assert len(rows) == 20
    for index, row in enumerate(rows):
        default = tokenize_pair(tok, row, f"row {index}", 64, 40, "default")
        authors = tokenize_pair(tok, row, f"row {index}", 64, 40, "authors")
        (user,) = [m["content"] for m in row["chosen"] if m["role"] == "user"]
        prompt = BOS_TEXT + USER_HEADER + user + EOT_TEXT
        for side in ("chosen", "rejected"):
            reply = row[side][-1]["content"]
            ids = enc(tok, prompt + ASSISTANT_HEADER + reply + EOT_TEXT)
            assert authors[f"{side}_ids"] == default[f"{side}_ids"] == ids, index
            assert trained(default[f"{side}_labels"]) == enc(tok, reply + EOT_TEXT), index
            assert trained(authors[f"{side}_labels"]) == enc(
                tok, ASSISTANT_HEADER + reply + EOT_TEXT
            ), index


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": [SYSTEM, USER], "chosen": "1 2 3", "rejected": "3 2 1"},
        {"prompt": "Sort: 3 1 2", "chosen": [SYSTEM, USER, CHOSEN], "rejected": PAIR["rejected"]},
        {"prompt": [SYSTEM, USER], "chosen": [CHOSEN], "rejected": [REJECTED]},
    ],
    ids=["strings", "ultrafeedback-binarized", "reply-lists"],
)
def test_preference_formats_agree(tok, row):
    """Every format of the system + user + reply pair gives the pair written out by hand."""
    expected = authors_by_hand(tok, PROMPT_TEXT, "1 2 3", "3 2 1")
    assert tokenize_pair(tok, row, "w", 64, 32, "authors") == expected
    assert tokenize_pair(tok, PAIR, "w", 64, 32, "authors") == expected


def test_drops_and_columns_as_default(tok):
    """Empty and identical replies are dropped with the default's reasons and columns."""
    empty_columns = {f"{s}_{k}": [] for s in ("chosen", "rejected") for k in ("ids", "labels")}
    for row, reason in (
        (pair_row("Sort: 2 1", " \n", "2 1"), "empty response"),
        (pair_row("Sort: 2 1", "1 2", "1 2"), "chosen identical to rejected"),
    ):
        expected = {"drop": reason, "truncated": False, **empty_columns}
        assert tokenize_pair(tok, row, "w", 64, 32, "authors") == expected
        assert tokenize_pair(tok, row, "w", 64, 32, "default") == expected
    columns = ["chosen_ids", "chosen_labels", "drop", "rejected_ids", "rejected_labels"]
    for tokenization in ("authors", "default"):
        assert sorted(tokenize_pair(tok, PAIR, "w", 64, 32, tokenization)) == [
            *columns,
            "truncated",
        ]


# --------------------------------------------------------------------------- other templates


def test_template_writing_bos_twice_still_gives_one(tok, fresh_tok):
    """An override writing two BOS strings gives the same example as the shipped template."""
    fresh_tok.chat_template = "{{ bos_token }}" + tok.chat_template
    assert fresh_tok.apply_chat_template([CHOSEN], tokenize=False).startswith(BOS_TEXT * 2)
    expected = authors_by_hand(tok, PROMPT_TEXT, "1 2 3", "3 2 1")
    assert tokenize_pair(fresh_tok, PAIR, "w", 64, 32, "authors") == expected


def test_template_without_bos_or_final_eos(fresh_tok):
    """A ChatML-style layout writing no BOS, whose reply ends `<|eot_id|>\\n`: one BOS is
    prepended to the prompt, and an EOS appended since the reply does not end with it."""
    fresh_tok.chat_template = (
        "{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '\\n' + m['content'] + '<|eot_id|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\\n' }}{% endif %}"
    )
    out = tokenize_pair(
        fresh_tok, pair_row("Sort: 3 1 2", "1 2 3", "3 2 1"), "w", 64, 32, "authors"
    )
    prompt = [BOS] + enc(fresh_tok, "<|start_header_id|>user\nSort: 3 1 2<|eot_id|>\n")
    response = enc(fresh_tok, "<|start_header_id|>assistant\n1 2 3<|eot_id|>\n") + [EOS]
    assert out["chosen_ids"] == prompt + response
    assert out["chosen_labels"] == masked(len(prompt)) + response
    assert out["chosen_ids"].count(BOS) == 1


def test_template_that_cannot_render_a_reply_alone_is_a_data_error(fresh_tok):
    fresh_tok.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}"
        "{{ raise_exception('Conversations must start with a user turn') }}{% endif %}"
        + fresh_tok.chat_template
    )
    with pytest.raises(DataError, match="^row 3: the chat template cannot render an assistant"):
        tokenize_pair(fresh_tok, PAIR, "row 3", 64, 32, "authors")
    assert tokenize_pair(fresh_tok, PAIR, "row 3", 64, 32, "default")["drop"] == ""


# --------------------------------------------------------------------------- truncation


def test_long_prompt_keeps_its_tail_and_responses_get_the_fixed_budget(tok):
    """Prompt 49 tokens, chosen 26, rejected 8; max_length 24, max_prompt_length 10: the prompt
    keeps its last 10 tokens (the BOS goes, as in the authors' keep_end cut) and each response is
    cut to 24 - 10 = 14 tokens (the 8-token rejected is left whole)."""
    row = pair_row("Sort: " + sevens(40), sevens(20), "7 7")
    prompt = enc(tok, BOS_TEXT + USER_HEADER + "Sort: " + sevens(40) + EOT_TEXT)
    chosen = enc(tok, ASSISTANT_HEADER + sevens(20) + EOT_TEXT)
    rejected = enc(tok, ASSISTANT_HEADER + "7 7" + EOT_TEXT)
    assert (len(prompt), len(chosen), len(rejected)) == (49, 26, 8)  # the case we claim

    out = tokenize_pair(tok, row, "w", 24, 10, "authors")
    assert out["truncated"] is True and out["drop"] == ""
    assert out["chosen_ids"] == prompt[-10:] + chosen[:14]
    assert out["chosen_labels"] == masked(10) + chosen[:14]
    assert out["rejected_ids"] == prompt[-10:] + rejected
    assert out["rejected_labels"] == masked(10) + rejected
    assert BOS not in out["chosen_ids"] and BOS not in out["rejected_ids"]
    assert out["chosen_ids"][-1] != EOS and out["rejected_ids"][-1] == EOS
    # The default keeps the BOS instead: BOS + the last 9 tokens of its prompt (header included).
    default = tokenize_pair(tok, row, "w", 24, 10, "default")
    assert default["chosen_ids"][:10] == [BOS] + (prompt + enc(tok, ASSISTANT_HEADER))[-9:]


def test_prompt_cut_alone_can_be_enough(tok):
    """max_length 40: after the prompt keeps its last 10 tokens, 10 + 26 fits; responses whole."""
    row = pair_row("Sort: " + sevens(40), sevens(20), "7 7")
    prompt = enc(tok, BOS_TEXT + USER_HEADER + "Sort: " + sevens(40) + EOT_TEXT)
    chosen = enc(tok, ASSISTANT_HEADER + sevens(20) + EOT_TEXT)
    out = tokenize_pair(tok, row, "w", 40, 10, "authors")
    assert out["truncated"] is True
    assert out["chosen_ids"] == prompt[-10:] + chosen


def test_short_prompt_long_response_cut_to_max_length_minus_max_prompt_length(tok):
    """Prompt 10 tokens (under max_prompt_length 20, kept whole with its BOS), chosen 36: the
    chosen response is cut to 30 - 20 = 10 tokens, not 30 - 10 = 20, so the row is 20 long."""
    row = pair_row("Sort: 7", sevens(30), "7")
    prompt = enc(tok, BOS_TEXT + USER_HEADER + "Sort: 7" + EOT_TEXT)
    chosen = enc(tok, ASSISTANT_HEADER + sevens(30) + EOT_TEXT)
    rejected = enc(tok, ASSISTANT_HEADER + "7" + EOT_TEXT)
    assert (len(prompt), len(chosen), len(rejected)) == (10, 36, 7)

    out = tokenize_pair(tok, row, "w", 30, 20, "authors")
    assert out["truncated"] is True
    assert out["chosen_ids"] == prompt + chosen[:10]
    assert out["chosen_labels"] == masked(10) + chosen[:10]
    assert out["rejected_ids"] == prompt + rejected
    assert len(tokenize_pair(tok, row, "w", 30, 20, "default")["chosen_ids"]) == 30


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(64, 40), (20, 5), (13, 12)])
def test_lengths_never_exceed_max_length(tok, max_length, max_prompt_length):
    row = pair_row("Sort: " + sevens(40), sevens(20), "7 7")
    out = tokenize_pair(tok, row, "w", max_length, max_prompt_length, "authors")
    assert out["truncated"] is True and out["drop"] == ""
    for side in ("chosen", "rejected"):
        assert len(out[f"{side}_ids"]) == len(out[f"{side}_labels"]) <= max_length
        assert out[f"{side}_labels"].count(IGNORE_INDEX) == max_prompt_length


def test_pair_that_fits_is_untouched(tok):
    """Prompt 49 + chosen 26 tokens: max_length 75 fits, so max_prompt_length 5 cuts nothing."""
    row = pair_row("Sort: " + sevens(40), sevens(20), "7 7")
    prompt = BOS_TEXT + USER_HEADER + "Sort: " + sevens(40) + EOT_TEXT
    full = authors_by_hand(tok, prompt, sevens(20), "7 7")
    assert len(full["chosen_ids"]) == 49 + 26
    assert tokenize_pair(tok, row, "w", 10_000, 9_000, "authors") == full
    assert tokenize_pair(tok, row, "w", 49 + 26, 5, "authors") == full


# --------------------------------------------------------------------------- prepare


def test_prepare_end_to_end_on_shipped_pairs(tok):
    """prepare on the first 20 pairs of recipes/tiny/data/pref_eval.jsonl with the tiny recipe's
    lengths: every row kept, one BOS, EOS last, header trained, 5 more trained tokens a side."""
    dataset = load_source(DataSource(path=str(PREF_EVAL), max_rows=20), "r")
    kept, report = prepare(dataset, tok, "preference", "p", 64, 40, tokenization="authors")
    _, default_report = prepare(dataset, tok, "preference", "p", 64, 40)
    # The means by hand: the replies' tokens plus <|eot_id|>, and 5 header tokens for "authors".
    for side in ("chosen", "rejected"):
        replies = [enc(tok, row[side][-1]["content"] + EOT_TEXT) for row in dataset]
        by_hand = sum(len(reply) for reply in replies) / 20
        assert default_report.mean_tokens[side] == pytest.approx(by_hand)
        assert report.mean_tokens[side] == pytest.approx(by_hand + 5)
    assert (report.rows_read, report.rows_kept, report.truncated) == (20, 20, 0)
    assert sorted(kept.column_names) == [
        "chosen_ids",
        "chosen_labels",
        "rejected_ids",
        "rejected_labels",
        "source_row",
    ]
    header = enc(tok, ASSISTANT_HEADER)
    for row in kept:
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_ids"], row[f"{side}_labels"]
            assert ids.count(BOS) == 1 and ids[0] == BOS and ids[-1] == labels[-1] == EOS
            assert trained(labels)[:5] == header
