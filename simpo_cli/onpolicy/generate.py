"""The generate stage: sample replies to the prompts from the policy (the model of the training
stage before, else the recipe's model), into DIR/generate/samples/<split>/.

Every process samples its share of the prompts into its own append-only shard (sampling.py),
so a re-run resumes where a kill left off, on any number of processes; the main process then
merges the shards, checks that every prompt has all its samples exactly once, and writes
samples/<split>.jsonl for the annotate stage.

Backends: transformers' generate (CPU, tests, small models; the processes of the launch split the
prompts) or vLLM on GPUs: one engine per process, each on its own GPUs
(`tensor_parallel_size` per engine). vLLM runs in a launch of its own (`simpo train` starts the
generate stage as a separate command when it uses vLLM): its engine sets up its own process
group and holds the GPU memory until the process ends, so no training may share its process.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from simpo_cli.data import load_tokenizer
from simpo_cli.distributed import barrier, rank, say, whole_weights, world_size
from simpo_cli.errors import UserError
from simpo_cli.model import adapters
from simpo_cli.model.load import load_model
from simpo_cli.onpolicy.sampling import (
    Prompt,
    SamplingSettings,
    TransformersBackend,
    VLLMBackend,
    generate_samples,
    merge_shards,
    needed_model_len,
    read_prompts,
    resolve_backend,
    saved_generation_config,
    stop_token_ids,
)
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import GenerateStage, Recipe, slice_bounds, split_problem
from simpo_cli.stops import stop_now, stop_requested

SPLITS = {"train": "prompts", "test": "eval_prompts"}


def samples_file(stage_dir: Path, split: str) -> Path:
    """The merged, checked samples of a split: what the annotate stage reads."""
    return stage_dir / "samples" / f"{split}.jsonl"


def run(
    recipe: Recipe,
    stage: GenerateStage,
    stage_dir: StageDir,
    start_from: str | None,
    prompt_split: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Sample every split's prompts; returns the stage summary (counts per split).
    `prompt_split`: (round, count) to sample only that round's slice of generate.prompts (the
    held-out eval_prompts are the same in every round)."""
    me, world = rank(), world_size()
    tokenizer = load_tokenizer(recipe.model, start_from)
    prompts: dict[str, list[Prompt]] = {}
    for split, key in SPLITS.items():
        source = getattr(stage, key)
        if source is not None:
            prompts[split] = read_prompts(
                source, source.column, f"generate.{key}", source.id_column
            )
    summary: dict[str, Any] = {}
    prompts["train"], summary["prompt_slice"] = round_slice(prompts["train"], prompt_split)
    backend_name = resolve_backend(stage.backend, "generate.backend")
    model_name = start_from or recipe.model.name_or_path or "model.config"
    part = summary["prompt_slice"]
    say(
        f"[generate] {', '.join(f'{len(p)} {split} prompts' for split, p in prompts.items())} x "
        f"{len(stage.sample_seeds)} samples on {backend_name}, {world} process(es)"
        + (
            f"; this round's slice: prompts {part['first']}-{part['last']} of {part['of']}"
            if prompt_split is not None
            else ""
        )
    )
    if backend_name == "vllm":
        backend: Any = _vllm_backend(recipe, stage, start_from, tokenizer, prompts)
        eos = stop_token_ids(tokenizer, saved_generation_config(model_name))
    else:
        backend = _transformers_backend(recipe, start_from, tokenizer)
        eos = stop_token_ids(tokenizer, backend.model.generation_config)
    settings = SamplingSettings(
        seeds=stage.sample_seeds,
        temperature=stage.temperature,
        top_p=stage.top_p,
        max_new_tokens=stage.max_new_tokens,
        stop_token_ids=tuple(eos),
    )
    folders = {split: stage_dir.path / "samples" / split for split in prompts}
    for split, split_prompts in prompts.items():
        generate_samples(
            backend, tokenizer, split_prompts, settings, folders[split], me, world, model_name,
            should_stop=stop_requested,
        )  # fmt: skip
        stop_now("generate", "the samples written so far are kept")
    _all_done(stage_dir.path / "samples", backend_name, me, world)
    summary |= {"backend": backend_name, "seeds": list(settings.seeds)}
    if me == 0:
        for split, split_prompts in prompts.items():
            records = merge_shards(folders[split], split_prompts, settings.seeds)
            _write_jsonl(samples_file(stage_dir.path, split), records)
            summary[split] = _counts(records)
            print(
                f"[generate] {split}: " + ", ".join(f"{k} {v}" for k, v in summary[split].items())
            )
    # The marker files stay: another process may still be looking for them (_all_done).
    return summary


def round_slice(
    prompts: list[Prompt], prompt_split: tuple[int, int] | None
) -> tuple[list[Prompt], dict[str, Any]]:
    """The prompts a round samples (all of them without a split) and what they are, for the
    round's record: their place among the prompts (1-based, inclusive), how many, and the
    sha256 of their ids in order (equal hashes: the same prompts)."""
    start, stop = 0, len(prompts)
    if prompt_split is not None:
        round_, count = prompt_split
        problem = split_problem(len(prompts), count)
        if problem is not None:
            raise UserError(
                f"generate.prompts: {len(prompts)} prompts, duplicates removed; {problem}"
            )
        start, stop = slice_bounds(len(prompts), count, round_)
    chosen = prompts[start:stop]
    digest = hashlib.sha256("\n".join(p.prompt_id for p in chosen).encode()).hexdigest()
    return chosen, {
        "mode": "all" if prompt_split is None else "split",
        "first": start + 1,
        "last": stop,
        "of": len(prompts),
        "prompts": len(chosen),
        "ids_sha256": digest,
    }


def _counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [s for r in records for s in r["samples"]]
    cut = sum(s["finish_reason"] == "length" for s in samples)
    return {
        "prompts": len(records),
        "samples": len(samples),
        "cut_at_max_new_tokens": cut,
        "mean_tokens": round(sum(s["tokens"] for s in samples) / max(len(samples), 1), 2),
    }


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(path)


def _transformers_backend(recipe: Recipe, start_from: str | None, tokenizer) -> TransformersBackend:
    with whole_weights():  # after a ZeRO-3 stage in this process: one whole model per process
        model = load_model(recipe, start_from, recipe.first_stage_seed())
    if torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return TransformersBackend(model, tokenizer)


def _vllm_backend(
    recipe: Recipe,
    stage: GenerateStage,
    start_from: str | None,
    tokenizer,
    prompts: dict[str, list[Prompt]],
) -> VLLMBackend:
    """One engine on this process's GPUs: LOCAL_RANK's block of tensor_parallel_size devices."""
    model = start_from or recipe.model.name_or_path
    if model is None or (start_from is None and recipe.model.init == "from_config"):
        raise UserError(
            "generate.backend: vllm loads a saved model; model.init from_config has none: train "
            "a stage before generate, or set generate.backend: transformers"
        )
    if adapters.adapter_only(start_from) is not None:
        raise UserError(
            f"generate.backend: vllm loads a whole model, but {start_from} holds only a LoRA "
            "adapter (model.lora.merge: false); remove merge: false (that stage then writes its "
            "merged model) or set generate.backend: transformers"
        )
    tp = stage.tensor_parallel_size
    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count()
    if (local + 1) * tp > gpus:
        raise UserError(
            f"generate.tensor_parallel_size {tp} x launch.num_processes "
            f"{recipe.launch.num_processes} needs {recipe.launch.num_processes * tp} GPUs on "
            f"each machine, {gpus} visible; set launch.num_processes to {max(gpus // tp, 1)}"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(local * tp + i) for i in range(tp))
    longest = max(needed_model_len(tokenizer, p, stage.max_new_tokens) for p in prompts.values())
    context = _context_length(model, recipe.model.trust_remote_code)
    if context is not None and longest > context:
        # A reply that would run past the model's context ends there, as "length".
        say(f"[generate] longest prompt + max_new_tokens is {longest} tokens; capped at the "
            f"model's context, {context}")  # fmt: skip
        longest = context
    # The engine starts its own process group: the launcher's variables would make it join ours.
    # They are put back once it has started (this process's rank is read from them).
    hidden = {name: os.environ.pop(name) for name in LAUNCH_VARIABLES if name in os.environ}
    try:
        return VLLMBackend(
            model,
            max_model_len=longest,
            tokenizer=start_from or recipe.model.tokenizer or model,
            tensor_parallel_size=tp,
            gpu_memory_utilization=stage.gpu_memory_utilization,
            dtype=recipe.model.dtype,
            seed=recipe.first_stage_seed(),
        )
    finally:
        os.environ.update(hidden)


LAUNCH_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID",
)  # fmt: skip


def _context_length(model: str, trust_remote_code: bool) -> int | None:
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception:
        return None
    config = getattr(config, "text_config", config)
    return getattr(config, "max_position_embeddings", None)


def _all_done(folder: Path, backend_name: str, me: int, world: int) -> None:
    """Wait until every process has finished sampling. vLLM processes share no process group
    (see the module docstring): they meet through marker files instead. A marker left by an
    earlier attempt means that process's share (the same share: the world size is in the name)
    was already complete."""
    if backend_name != "vllm" or world == 1:
        barrier()
        return
    (folder / f"done-rank{me}-of{world}").write_text("")
    while not all((folder / f"done-rank{r}-of{world}").exists() for r in range(world)):
        time.sleep(2)
