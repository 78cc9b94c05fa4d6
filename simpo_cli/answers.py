"""`simpo eval MODEL --benchmark ...`: a checkpoint's answers to a benchmark's questions, in the
files the official evaluators read (benchmarks.py), generated with generation.py's backends.

Each generation pass (MT-Bench: two turns, each at its categories' temperatures) samples into
its own folder under OUTPUT_DIR/generation/, one request per question, seeded by the question id:
a re-run resumes where a stop left off and gives the same answers. Beside the answer file:
the decoding settings used, and judge-free numbers (answer length in characters and tokens, the
share cut at max_new_tokens), which are proxies for the judges, not their scores.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from simpo_cli import benchmarks
from simpo_cli.data import load_tokenizer
from simpo_cli.errors import UserError
from simpo_cli.generation import (
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
    questions: str | None = None,
    model_id: str | None = None,
    family: str = "llama3",
    layout: str = "v0.1",
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Generate and write the answers; returns the summary also written to
    OUTPUT_DIR/judge_free.json. `temperature` and `max_new_tokens` override the benchmark's
    defaults (a temperature given replaces MT-Bench's per-category ones)."""
    benchmarks.check_benchmark(benchmark)
    model_id = model_id or Path(model_dir).resolve().name
    benchmarks.check_model_id(model_id)
    if layout not in benchmarks.ARENA_LAYOUTS:
        raise UserError(f"--arena-layout {layout}: use v0.1 or current")
    listed = benchmarks.load_questions(benchmark, questions)
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
    tokenizer = load_tokenizer(ModelSettings(name_or_path=model_dir))
    engine, stops = _backend(model_dir, tokenizer, resolve_backend(backend), listed, settings)

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
                max_new_tokens=settings.max_new_tokens,
                stop_token_ids=tuple(stops),
            )
            folder = output_dir / "generation" / f"turn{turn + 1}-temperature{temp:g}"
            generate_samples(engine, tokenizer, prompts, sampling, folder, model_name=model_dir)
            for record in merge_shards(folder, prompts, sampling.seeds):
                sample = record["samples"][0]
                replies[record["prompt_id"]].append(sample["text"])
                samples.append(sample)

    record = {"model": model_dir, "backend": engine.name, "stop_token_ids": stops}
    path = benchmarks.write_answers(
        benchmark, listed, replies, output_dir, model_id, layout, settings, record, count_tokens
    )  # fmt: skip
    benchmarks.read_back(benchmark, output_dir, model_id, listed)
    summary = _judge_free(samples, settings.max_new_tokens)
    summary |= {"benchmark": benchmark, "model_id": model_id, "answers": str(path)}
    (output_dir / "judge_free.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _backend(model_dir, tokenizer, name, questions, settings):
    """The generation backend and the stop ids (the tokenizer's EOS and generation_config's)."""
    import torch
    from transformers import AutoModelForCausalLM

    if name == "vllm":
        prompts = benchmarks.turn_prompts(questions, 0, {})
        engine = VLLMBackend(
            model_dir, max_model_len=needed_model_len(tokenizer, prompts, settings.max_new_tokens)
        )
        return engine, stop_token_ids(tokenizer, saved_generation_config(model_dir))
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except OSError as err:
        raise UserError(f"{model_dir}: cannot load a model: {str(err).splitlines()[0]}") from None
    if torch.cuda.is_available():
        model = model.to("cuda")
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
