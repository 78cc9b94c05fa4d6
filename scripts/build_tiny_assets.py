"""Build the tokenizer and synthetic datasets for the tiny CPU demo recipe.

The tiny recipe trains a small model from scratch on a task whose right
answers are known exactly: sorting short lists of digits ("Sort: 7 2 9 4"
-> "2 4 7 9"). That makes it possible to check on a CPU, in minutes, whether
SFT and SimPO actually move the model toward correct answers. This script
writes, deterministically and without network access:

* ``recipes/tiny/tokenizer/``: a byte-level BPE tokenizer with Llama-3 style
  special tokens and chat template, trained on the generated texts;
* ``recipes/tiny/data/sft_{train,eval}.jsonl``: chat conversations;
* ``recipes/tiny/data/pref_{train,eval}.jsonl``: preference pairs in the
  HuggingFaceH4/ultrafeedback_binarized schema. A quarter of the rejected
  answers are a "length trap" (the right answer plus extra digits), so a
  length-biased reward would prefer them.
* ``recipes/tiny/benchmarks/sort_eval.json``: the first SORT_EVAL_ROWS prompts of
  pref_eval as AlpacaEval-format questions whose ``output`` is the right
  answer, so the evaluate stage can score greedy answers by exact match.

The digit lists of the eval files never occur in the train files.

Usage: python scripts/build_tiny_assets.py
"""

import hashlib
import json
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SEED = 1234
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
TOKENIZER_DIR = RECIPE_DIR / "tokenizer"
DATA_DIR = RECIPE_DIR / "data"
BENCHMARK_DIR = RECIPE_DIR / "benchmarks"

SFT_TRAIN_ROWS, SFT_EVAL_ROWS = 3000, 200
PREF_TRAIN_ROWS, PREF_EVAL_ROWS = 3000, 300
SORT_EVAL_ROWS = 100
MIN_DIGITS, MAX_DIGITS = 3, 6
TWO_TURN_FRACTION = 0.1
SYSTEM_FRACTION = 0.1

SYSTEM_PROMPT = "You sort digits."
REVERSE_PROMPT = "Now reverse it."
ROLES = ("system", "user", "assistant")

BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOS, PAD]
VOCAB_SIZE = 400
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

Digits = tuple[int, ...]
Message = dict[str, str]
Row = dict[str, Any]


# ---------------------------------------------------------------- the task


def random_digits(rng: random.Random) -> Digits:
    length = rng.randint(MIN_DIGITS, MAX_DIGITS)
    return tuple(rng.randrange(10) for _ in range(length))


def render(digits: Iterable[int]) -> str:
    return " ".join(str(d) for d in digits)


def sort_prompt(digits: Digits) -> str:
    return f"Sort: {render(digits)}"


def draw_held_out(rng: random.Random, count: int) -> list[Digits]:
    """Draw `count` distinct digit lists, kept out of every training file."""
    held_out: dict[Digits, None] = {}
    while len(held_out) < count:
        held_out[random_digits(rng)] = None
    return list(held_out)


def draw_train(rng: random.Random, count: int, excluded: set[Digits]) -> list[Digits]:
    """Draw `count` digit lists (repeats allowed) that are not in `excluded`."""
    drawn: list[Digits] = []
    while len(drawn) < count:
        digits = random_digits(rng)
        if digits not in excluded:
            drawn.append(digits)
    return drawn


# ---------------------------------------------------------------- SFT rows


def sft_row(rng: random.Random, digits: Digits) -> Row:
    ascending = sorted(digits)
    messages: list[Message] = []
    if rng.random() < SYSTEM_FRACTION:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    messages.append({"role": "user", "content": sort_prompt(digits)})
    messages.append({"role": "assistant", "content": render(ascending)})
    if rng.random() < TWO_TURN_FRACTION:
        messages.append({"role": "user", "content": REVERSE_PROMPT})
        messages.append({"role": "assistant", "content": render(reversed(ascending))})
    return {"messages": messages}


# --------------------------------------------------------- preference rows


def swap_adjacent(rng: random.Random, digits: Digits) -> list[int] | None:
    """Sorted answer with two adjacent, differing digits swapped."""
    answer = sorted(digits)
    positions = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if not positions:
        return None
    i = rng.choice(positions)
    answer[i], answer[i + 1] = answer[i + 1], answer[i]
    return answer


def replace_digit(rng: random.Random, digits: Digits) -> list[int] | None:
    """Sorted answer with one digit replaced by a different digit."""
    answer = sorted(digits)
    i = rng.randrange(len(answer))
    answer[i] = rng.choice([d for d in range(10) if d != answer[i]])
    return answer


def echo_input(rng: random.Random, digits: Digits) -> list[int] | None:
    """The input repeated unsorted (only possible when it is not sorted)."""
    return None if list(digits) == sorted(digits) else list(digits)


def length_trap(rng: random.Random, digits: Digits) -> list[int] | None:
    """The right answer followed by 2-4 extra digits: longer, and wrong."""
    return sorted(digits) + [rng.randrange(10) for _ in range(rng.randint(2, 4))]


Corruption = Callable[[random.Random, Digits], list[int] | None]
CORRUPTIONS: dict[str, Corruption] = {
    "swap": swap_adjacent,
    "replace": replace_digit,
    "echo": echo_input,
    "length_trap": length_trap,
}
SCORE_CHOSEN = 9.0
SCORE_REJECTED = {"swap": 4.0, "replace": 3.0, "echo": 2.0, "length_trap": 5.0}
KIND_OF_SCORE = {score: kind for kind, score in SCORE_REJECTED.items()}


def rejected_answer(rng: random.Random, digits: Digits) -> tuple[str, list[int]]:
    """Pick a corruption uniformly among those that apply to `digits`."""
    candidates = {kind: corrupt(rng, digits) for kind, corrupt in CORRUPTIONS.items()}
    kind = rng.choice([kind for kind, wrong in candidates.items() if wrong is not None])
    return kind, candidates[kind]


def final_reply(conversation: list[Message]) -> str:
    return conversation[-1]["content"]


def pref_row(rng: random.Random, digits: Digits) -> Row:
    prompt = sort_prompt(digits)
    chosen = render(sorted(digits))
    kind, wrong = rejected_answer(rng, digits)
    rejected = render(wrong)
    assert rejected != chosen, (prompt, kind)
    return {
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": rejected},
        ],
        "score_chosen": SCORE_CHOSEN,
        "score_rejected": SCORE_REJECTED[kind],
    }


# ---------------------------------------------------------------- datasets


def build_datasets(rng: random.Random) -> dict[str, list[Row]]:
    held_out = draw_held_out(rng, SFT_EVAL_ROWS + PREF_EVAL_ROWS)
    excluded = set(held_out)
    sft_train = draw_train(rng, SFT_TRAIN_ROWS, excluded)
    pref_train = draw_train(rng, PREF_TRAIN_ROWS, excluded)
    return {
        "sft_train": [sft_row(rng, d) for d in sft_train],
        "sft_eval": [sft_row(rng, d) for d in held_out[:SFT_EVAL_ROWS]],
        "pref_train": [pref_row(rng, d) for d in pref_train],
        "pref_eval": [pref_row(rng, d) for d in held_out[SFT_EVAL_ROWS:]],
    }


def sort_questions(pref_eval: Sequence[Row]) -> list[Row]:
    """Held-out prompts in AlpacaEval's format, each with its right answer as the reference
    `output` (what `exact_match: true` in the recipe's benchmark compares answers with)."""
    return [
        {
            "instruction": row["prompt"],
            "output": final_reply(row["chosen"]),
            "generator": "sorted",
            "dataset": "tiny_sort",
        }
        for row in pref_eval[:SORT_EVAL_ROWS]
    ]


def write_jsonl(path: Path, rows: Sequence[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def conversations(row: Row) -> list[list[Message]]:
    if "messages" in row:
        return [row["messages"]]
    return [row["chosen"], row["rejected"]]


def corpus(datasets: dict[str, list[Row]]) -> list[str]:
    """Every message text of every dataset, plus the chat role words."""
    texts = list(ROLES)
    for rows in datasets.values():
        for row in rows:
            texts.extend(m["content"] for conv in conversations(row) for m in conv)
    return texts


def check_held_out(datasets: dict[str, list[Row]]) -> None:
    def first_prompts(name: str) -> set[str]:
        return {
            next(m["content"] for m in conv if m["role"] == "user")
            for row in datasets[name]
            for conv in conversations(row)
        }

    train = first_prompts("sft_train") | first_prompts("pref_train")
    for name in ("sft_eval", "pref_eval"):
        assert not first_prompts(name) & train, f"{name} prompts leak into training data"


# --------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Byte-level BPE; digits stay single tokens (at most fused with one space)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
            ),
        ]
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # no stale files from older transformers versions
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(path)


def check_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Reload the saved tokenizer and check the properties the recipe relies on."""
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    assert tok("x")["input_ids"][-1] != tok.bos_token_id

    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": " Sort: 7 2 9 4\n"},
        {"role": "assistant", "content": "2 4 7 9"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou sort digits.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSort: 7 2 9 4<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 4 7 9<|eot_id|>"
    ), text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == text

    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)

    for digit in "0123456789":
        assert digit in tok.get_vocab(), f"digit {digit} is not a token"
    digits = "0 1 2 3 4 5 6 7 8 9 9 8 7"
    assert len(tok(digits, add_special_tokens=False)["input_ids"]) == len(digits.split())
    return tok


# ----------------------------------------------------------------- summary


def token_count(tok: PreTrainedTokenizerFast, conversation: list[Message]) -> int:
    # In transformers 5, apply_chat_template(tokenize=True) returns a dict by default.
    text = tok.apply_chat_template(conversation, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def summarize(datasets: dict[str, list[Row]], tok: PreTrainedTokenizerFast) -> None:
    for name, rows in datasets.items():
        print(f"{DATA_DIR.name}/{name}.jsonl: {len(rows)} rows")
    print(f"{BENCHMARK_DIR.name}/sort_eval.json: {SORT_EVAL_ROWS} questions")
    print(f"tokenizer: vocab size {len(tok)} (incl. {len(SPECIAL_TOKENS)} special tokens)")
    for name in ("pref_train", "pref_eval"):
        rows = datasets[name]
        longer = sum(len(final_reply(r["rejected"])) > len(final_reply(r["chosen"])) for r in rows)
        kinds = Counter(KIND_OF_SCORE[r["score_rejected"]] for r in rows)
        print(f"{name}: rejected longer than chosen in {longer / len(rows):.1%}; {dict(kinds)}")
    lengths = [token_count(tok, r["chosen"]) for r in datasets["pref_train"]]
    mean = sum(lengths) / len(lengths)
    print(f"rendered prompt+chosen: {mean:.1f} tokens on average, {max(lengths)} at most")


def main() -> None:
    rng = random.Random(SEED)
    datasets = build_datasets(rng)
    check_held_out(datasets)
    for name, rows in datasets.items():
        write_jsonl(DATA_DIR / f"{name}.jsonl", rows)
    questions = sort_questions(datasets["pref_eval"])
    (BENCHMARK_DIR / "sort_eval.json").write_text(
        json.dumps(questions, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    save_tokenizer(train_tokenizer(corpus(datasets)), TOKENIZER_DIR)
    summarize(datasets, check_tokenizer(TOKENIZER_DIR))


if __name__ == "__main__":
    main()
