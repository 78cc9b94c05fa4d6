"""A checkpoint's answers to a benchmark's questions, in the files the official evaluators read
(benchmarks.py), generated with onpolicy/sampling.py's backends (`simpo eval --benchmark`, the
evaluate stage).

Each generation pass (MT-Bench: two turns, each at its categories' temperatures) samples into
its own folder under WORK_DIR/generation/, one request per question, seeded by the question id:
a re-run resumes where a stop left off and gives the same answers, on any number of processes
(each samples its share of the questions). Beside the answer file: the decoding settings used.
In WORK_DIR/judge_free.json: answer length in characters and tokens and the share cut at
max_new_tokens, which are proxies for the judges, not their scores. For questions whose
reference answer is the right one (`exact_match` in the recipe), the share of answers equal to it,
and a few answers of every checkpoint side by side (`side_by_side`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from simpo_cli.data import load_tokenizer
from simpo_cli.distributed import barrier, is_main_process, rank, say, world_size
from simpo_cli.errors import DataError, UserError
from simpo_cli.evaluate import benchmarks
from simpo_cli.evaluate.context import fit_to_context, model_context, pass_limit
from simpo_cli.model.load import load_checkpoint
from simpo_cli.onpolicy.sampling import (
    SamplingSettings,
    TransformersBackend,
    VLLMBackend,
    generate_samples,
    merge_shards,
    needed_model_len,
    resolve_backend,
    saved_generation_config,
    stop_token_ids,
)
from simpo_cli.recipe import ModelSettings

GREEDY_BELOW = 1e-4  # FastChat decodes greedily below this temperature


def answer_benchmark(
    model_dir: str,
    benchmark: str,
    output_dir: Path,
    work_dir: Path,
    questions: str | None = None,
    model_id: str | None = None,
    family: str = "llama3",
    layout: str = "v0.1",
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    backend: str = "auto",
    dtype: str = "auto",
    listed: list[benchmarks.Question] | None = None,
    exact_match: bool = False,
) -> dict[str, Any]:
    """Generate the answers and write the answer file into output_dir (main process); returns
    the summary also written to WORK_DIR/judge_free.json. `temperature` and `max_new_tokens`
    override the benchmark's defaults (a temperature given replaces MT-Bench's per-category
    ones). `exact_match`: also the share of answers equal to their question's reference."""
    benchmarks.check_benchmark(benchmark)
    model_id = model_id or Path(model_dir).resolve().name
    benchmarks.check_model_id(model_id)
    if layout not in benchmarks.ARENA_LAYOUTS:
        raise UserError(f"--arena-layout {layout}: use v0.1 or current")
    if listed is None:  # the caller may have read them already (the evaluate stage)
        listed = benchmarks.load_questions(benchmark, questions)
    if exact_match:
        check_references(listed)
    settings = benchmarks.decoding_defaults(benchmark, family)
    if temperature is not None:
        settings = dataclasses.replace(
            settings, temperature=temperature, category_temperatures={}, source="--temperature"
        )
    if max_new_tokens is not None:
        settings = dataclasses.replace(settings, max_new_tokens=max_new_tokens)
    count_tokens = None
    if benchmark == "arena_hard":  # needs tiktoken: fail before generating, not after
        count_tokens = benchmarks.tiktoken_counter(benchmarks.ARENA_TIKTOKEN_MODEL[layout])
    tokenizer = check_chat_template(model_dir)
    # Never more new tokens than the model's context leaves: beyond it, answers are noise.
    context = model_context(model_dir, tokenizer)
    settings, capped = fit_to_context(settings, listed, tokenizer, context)
    if capped is not None:
        say(f"[evaluate] {model_id}: {capped}")
    name = resolve_backend(backend)
    if name == "vllm" and world_size() > 1:
        raise UserError(
            "--backend vllm: benchmark answers run one vLLM engine, which batches every "
            "question itself; run with --num-processes 1"
        )
    engine, stops = _backend(model_dir, tokenizer, name, listed, settings, dtype)

    replies: dict[str, list[str]] = {q.prompt_id: [] for q in listed}
    samples: list[dict[str, Any]] = []
    for turn in range(benchmarks.max_turns(listed)):
        for temp, group in benchmarks.group_by_temperature(settings, listed).items():
            prompts = benchmarks.turn_prompts(group, turn, replies)
            if not prompts:
                continue
            sampling = SamplingSettings(
                seeds=(0,),
                temperature=temp if temp >= GREEDY_BELOW else 0.0,
                top_p=settings.top_p,
                max_new_tokens=pass_limit(settings, prompts, tokenizer, context, turn, model_id),
                stop_token_ids=tuple(stops),
            )
            folder = work_dir / "generation" / f"turn{turn + 1}-temperature{temp:g}"
            generate_samples(
                engine, tokenizer, prompts, sampling, folder, rank(), world_size(), model_dir
            )
            barrier()  # every share written before anyone merges
            for record in merge_shards(folder, prompts, sampling.seeds):
                sample = record["samples"][0]
                replies[record["prompt_id"]].append(sample["text"])
                samples.append(sample)

    del engine
    record = {"model": model_dir, "backend": name, "stop_token_ids": stops}
    path = benchmarks.answer_path(benchmark, output_dir, model_id)
    summary = _judge_free(samples, settings.max_new_tokens)
    summary |= {"benchmark": benchmark, "model_id": model_id, "answers": str(path)}
    if exact_match:
        summary |= exact_matches(listed, replies)
    if is_main_process():
        benchmarks.write_answers(
            benchmark, listed, replies, output_dir, model_id, layout, settings, record,
            count_tokens,
        )  # fmt: skip
        benchmarks.read_back(benchmark, output_dir, model_id, listed)
        (work_dir / "judge_free.json").write_text(json.dumps(summary, indent=2) + "\n")
    barrier()
    return summary


def check_chat_template(model_dir: str):
    """The checkpoint's tokenizer, which must have a chat template: questions are rendered as
    the model was trained, never as plain text."""
    tokenizer = load_tokenizer(ModelSettings(name_or_path=model_dir))
    if not tokenizer.chat_template:
        raise UserError(
            f"{model_dir}: the tokenizer has no chat template, so questions cannot be rendered "
            "as the model was trained; save the tokenizer with its template (chat_template.jinja "
            "or tokenizer_config.json's chat_template) or evaluate the stage folder simpo wrote"
        )
    return tokenizer


def _backend(model_dir, tokenizer, name, questions, settings, dtype):
    """The generation backend and the stop ids (the tokenizer's EOS and generation_config's)."""
    if name == "vllm":
        prompts = benchmarks.turn_prompts(questions, 0, {})
        engine = VLLMBackend(
            model_dir, max_model_len=needed_model_len(tokenizer, prompts, settings.max_new_tokens)
        )
        return engine, stop_token_ids(tokenizer, saved_generation_config(model_dir))
    model = load_checkpoint(model_dir, dtype)
    return TransformersBackend(model, tokenizer), stop_token_ids(tokenizer, model.generation_config)


def _judge_free(samples: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """Proxies, not judge scores: mean answer length and the share cut at max_new_tokens, per
    generated turn."""
    count = max(len(samples), 1)
    return {
        "turns_generated": len(samples),
        "mean_characters": sum(len(s["text"]) for s in samples) / count,
        "mean_tokens": sum(s["tokens"] for s in samples) / count,
        "cut_at_max_new_tokens": sum(s["finish_reason"] == "length" for s in samples) / count,
        "max_new_tokens": max_new_tokens,
        "note": "judge-free proxies; the benchmark's score needs its GPT-4 judge",
    }


def check_references(questions: list[benchmarks.Question]) -> None:
    """Exact match needs every question's reference answer: DataError naming the first that
    has none."""
    for question in questions:
        if question.reference is None:
            raise DataError(
                f"{question.where}: no reference answer (`output`) to compare answers with "
                "(exact_match); give every question its right answer in `output`, or leave "
                "exact_match out"
            )


def same_answer(reply: str, reference: str) -> bool:
    """Equal but for the whitespace around them (a reply may start with the space a tokenizer
    fused to its first word)."""
    return reply.strip() == reference.strip()


def exact_matches(
    questions: list[benchmarks.Question], replies: dict[str, list[str]]
) -> dict[str, Any]:
    """How many final replies equal their question's reference: {"exact_match": share,
    "exact_matches": count, "questions": how many were scored}."""
    matched = sum(same_answer(replies[q.prompt_id][-1], q.reference or "") for q in questions)
    count = len(questions)
    return {"exact_match": matched / max(count, 1), "exact_matches": matched, "questions": count}


def side_by_side(
    benchmark: str,
    questions: list[benchmarks.Question],
    replies: dict[str, dict[str, list[str]]],
    shown: int = 5,
    width: int = 30,
) -> list[str]:
    """Lines showing the first `shown` questions with their reference and each checkpoint's
    final reply (`replies`: {label: {prompt_id: one reply per turn}}), marked `=` when it equals
    the reference, then each checkpoint's exact-match count. Replies are quoted, so a leading
    space or a newline shows."""

    def quoted(text: str) -> str:
        text = json.dumps(text, ensure_ascii=False)
        return text if len(text) <= width else text[: width - 4] + '..."'

    pad = max(len(label) for label in replies)
    lines = [
        f"{benchmark}: the first {min(shown, len(questions))} of {len(questions)} questions "
        "(= marks an answer equal to the reference)"
    ]
    for question in questions[:shown]:
        reference = question.reference or ""
        lines.append(f"  {quoted(question.turns[-1])}  reference {quoted(reference)}")
        for label, answers in replies.items():
            reply = answers[question.prompt_id][-1]
            mark = "=" if same_answer(reply, reference) else " "
            lines.append(f"    {label:<{pad}}  {mark} {quoted(reply)}")
    for label, answers in replies.items():
        numbers = exact_matches(questions, answers)
        lines.append(
            f"{benchmark} exact match: {label:<{pad}}  {numbers['exact_match']:.2f} "
            f"({numbers['exact_matches']} of {numbers['questions']})"
        )
    return lines
