"""How many new tokens a benchmark's answers may take: never more than the model's context
leaves after the question (and, on MT-Bench, after the earlier turns with their answers).
Beyond it a model reads positions it was never trained on and writes noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from simpo_cli.errors import UserError
from simpo_cli.evaluate import benchmarks
from simpo_cli.evaluate.benchmarks import DecodingSettings, Question
from simpo_cli.onpolicy.sampling import render_prompt_ids

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
    line = (
        f"{settings.benchmark}: max_new_tokens {settings.max_new_tokens} capped to {cap}{per_turn}:"
        f" the model reads {context} tokens and question {tightest.question_id}'s prompt takes "
        f"{prompt_tokens} of them"
    )
    capped = replace(
        settings,
        max_new_tokens=cap,
        source=f"{settings.source}; max_new_tokens capped to {cap} by the model's context",
    )
    return capped, line
