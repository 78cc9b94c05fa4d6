"""How many new tokens a benchmark's answers may take: never more than the model's context
leaves after the question (and, on MT-Bench, after the earlier turns with their answers).
Beyond it a model reads positions it was never trained on and writes noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from simpo_cli.distributed import say
from simpo_cli.errors import UserError
from simpo_cli.evaluate import benchmarks
from simpo_cli.evaluate.benchmarks import DecodingSettings, Question
from simpo_cli.onpolicy.sampling import Prompt, render_prompt_ids

# A tokenizer's model_max_length when no limit was saved with it (transformers' sentinel, 1e30).
UNSET_LENGTH = 10**9


def model_context(model_dir: str, tokenizer) -> int | None:
    """The most positions the model reads: its config's max_position_embeddings (or n_positions,
    as GPT-2 names it), else the tokenizer's model_max_length when one was saved; None when
    neither says."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config = getattr(config, "text_config", None) or config  # a multimodal model's text part
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and 0 < length < UNSET_LENGTH else None


def fit_to_context(
    settings: DecodingSettings, questions: Sequence[Question], tokenizer, context: int | None
) -> tuple[DecodingSettings, str | None]:
    """`settings` with max_new_tokens lowered, if need be, so that every question's whole
    conversation fits the model's `context`: its prompts (all its turns, as the last pass renders
    them) plus one answer of max_new_tokens per turn. Returns the settings and the line that
    says what was capped (None when nothing was). A question that leaves no room is a UserError.
    """
    if context is None:
        return settings, None
    room = []  # (tokens per answer, prompt tokens, question)
    for question in questions:
        last = len(question.turns) - 1
        [prompt] = benchmarks.turn_prompts([question], last, {question.prompt_id: [""] * last})
        prompt_tokens = len(render_prompt_ids(tokenizer, prompt))
        room.append(((context - prompt_tokens) // len(question.turns), prompt_tokens, question))
    cap, prompt_tokens, tightest = min(room, key=lambda entry: entry[0])
    if cap < 1:
        raise UserError(
            f"{tightest.where}: {settings.benchmark} question {tightest.question_id} leaves no "
            f"room for an answer in the model's context of {context} tokens; give shorter "
            "questions or evaluate a model with a longer context"
        )
    if settings.max_new_tokens <= cap:
        return settings, None
    turns = benchmarks.max_turns(questions)
    per_turn = f" per turn ({turns} turns share what is left)" if turns > 1 else ""
    takes = "turns take" if len(tightest.turns) > 1 else "prompt takes"
    line = (
        f"{settings.benchmark}: max_new_tokens {settings.max_new_tokens} capped to {cap}{per_turn}:"
        f" the model reads {context} tokens and question {tightest.question_id}'s {takes} "
        f"{prompt_tokens} of them before any answer"
    )
    capped = replace(
        settings,
        max_new_tokens=cap,
        source=f"{settings.source}; max_new_tokens capped to {cap} by the model's context",
    )
    return capped, line


def pass_limit(
    settings: DecodingSettings,
    prompts: Sequence[Prompt],
    tokenizer,
    context: int | None,
    turn: int,
    model_id: str,
) -> int:
    """max_new_tokens for one generation pass: settings' (fit_to_context's), or less when the
    longest of the pass's prompts leaves less. Only a later turn can: its history holds earlier
    answers, which may tokenize longer than they were generated (a byte-level model's broken
    characters come back as several tokens each). Says so in one line when it lowers it; at
    least 1 (a prompt past the context still gets its answer, cut at once)."""
    if context is None or not prompts:
        return settings.max_new_tokens
    lengths = [(len(render_prompt_ids(tokenizer, p)), p.prompt_id) for p in prompts]
    longest, prompt_id = max(lengths)
    limit = max(1, min(settings.max_new_tokens, context - longest))
    if limit < settings.max_new_tokens:
        say(
            f"[evaluate] {model_id}: {settings.benchmark} turn {turn + 1}: max_new_tokens "
            f"{settings.max_new_tokens} capped to {limit} for {len(prompts)} question"
            f"{'s' if len(prompts) > 1 else ''}: question "
            f"{prompt_id}'s history (its earlier answers as tokenized again) takes {longest} of "
            f"the model's {context} tokens"
        )
    return limit
