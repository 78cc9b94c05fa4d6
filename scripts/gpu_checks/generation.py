"""generation: the vLLM generation path on a real engine (the CPU tests reach its API boundary
only), then the generate and annotate stages through the CLI.

On a Llama-architecture model built from a config with the tiny recipe's tokenizer (head size
64, which vLLM's attention kernels take; the tiny recipe's 16 is not among them), saved to a
folder for vLLM:
  1. the prompt vLLM received is exactly our token ids: one BOS, nothing re-tokenized;
  2. every prompt gets one sample per seed, finish reasons are stop/length, token counts are
     within max_new_tokens; the shards merge cleanly;
  3. a second run of the same call on the same folder generates nothing (resume);
  4. a fresh run into another folder gives the same samples (reported, not failed: bit-exact
     vLLM needs VLLM_BATCH_INVARIANT=1 or VLLM_ENABLE_V1_MULTIPROCESSING=0);
  5. `simpo train tiny-onpolicy` with pipeline [generate, annotate] on this model, backend
     vllm, one process per visible GPU (each its own engine): one shard per process and the
     pairs dataset written.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from gpu_checks import common
from gpu_checks.common import Context, Findings

LIMIT_S = 140
PROMPTS = {"full": 16, "tiny": 4}
STAGE_PROMPTS = 64  # generate.prompts.max_rows of the stages through the CLI


def save_model(folder: Path) -> Path:
    """The tiny recipe's model config with a head size of 64, seeded, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from simpo_cli.data import load_tokenizer
    from simpo_cli.recipe import load_recipe

    recipe = load_recipe("tiny")
    config = dict(recipe.model.config)
    config.update(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    model.save_pretrained(folder)
    load_tokenizer(recipe.model).save_pretrained(folder)
    return folder


def run(ctx: Context) -> Findings:
    common.need("vllm", "pip install 'simpo-cli[gpu]'")
    from simpo_cli.data import load_tokenizer
    from simpo_cli.onpolicy.sampling import (
        SamplingSettings,
        VLLMBackend,
        generate_samples,
        merge_shards,
        needed_model_len,
        read_prompts,
        render_prompt_ids,
        stop_token_ids,
    )
    from simpo_cli.recipe import RECIPES_DIR, DataSource, ModelSettings

    found = Findings()
    work = ctx.work
    model = save_model(work / "model")
    tokenizer = load_tokenizer(ModelSettings(name_or_path=str(model)))
    data = RECIPES_DIR / "tiny" / "data" / "pref_eval.jsonl"
    count = PROMPTS["tiny" if ctx.tiny else "full"]
    prompts = read_prompts(DataSource(path=str(data), max_rows=count))
    settings = SamplingSettings(
        seeds=(13, 21, 42), max_new_tokens=32, stop_token_ids=tuple(stop_token_ids(tokenizer))
    )
    start = time.time()
    backend = VLLMBackend(
        str(model),
        max_model_len=needed_model_len(tokenizer, prompts, settings.max_new_tokens),
        gpu_memory_utilization=0.4,
        chunk_size=5,  # several chunks, so results are written as they come
    )
    found.numbers["engine_start_s"] = time.time() - start

    # 1. The engine received our ids, unchanged.
    from vllm import SamplingParams

    ids = render_prompt_ids(tokenizer, prompts[0])
    (output,) = backend.llm.generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=4), use_tqdm=False
    )
    seen = list(output.prompt_token_ids)
    found.expect(seen == ids, f"vLLM saw prompt ids {seen[:8]}..., not {ids[:8]}...")
    bos = tokenizer.bos_token_id
    found.expect(bos is None or seen[:2] != [bos, bos], "vLLM saw a double BOS")

    # 2. A full run, merged and checked.
    start = time.time()
    generate_samples(backend, tokenizer, prompts, settings, work / "a", model_name=str(model))
    records = merge_shards(work / "a", prompts, settings.seeds)
    took = time.time() - start
    samples = [s for r in records for s in r["samples"]]
    found.expect(
        all(s["finish_reason"] in ("stop", "length") for s in samples),
        "a finish reason other than stop/length",
    )
    found.expect(
        all(0 < s["tokens"] <= settings.max_new_tokens for s in samples),
        "a token count outside 1..max_new_tokens",
    )
    stops = sum(s["finish_reason"] == "stop" for s in samples)
    print(f"first sample: {samples[0]}", flush=True)

    # 3. Resume: nothing left to do.
    shard = work / "a" / "samples-rank0.jsonl"
    before = shard.read_text()
    generate_samples(backend, tokenizer, prompts, settings, work / "a", model_name=str(model))
    found.expect(shard.read_text() == before, "a second run on a finished folder wrote more")

    # 4. Same seeds, same samples (informational).
    generate_samples(backend, tokenizer, prompts, settings, work / "b", model_name=str(model))
    same = merge_shards(work / "b", prompts, settings.seeds) == records
    found.note(
        f"{len(records)} prompts x {len(settings.seeds)} seeds in {took:.1f}s, {stops} "
        f"stopped, a fresh run the same: {same}"
    )
    found.numbers.update(
        prompts=len(records),
        samples=len(samples),
        stopped=stops,
        generate_s=took,
        fresh_run_same=same,
    )

    # 5. The stages through the CLI, one vLLM engine per GPU; this process's engine goes first.
    del backend, output
    gc.collect()
    check_stages(model, work / "stages", found)
    return found


def check_stages(model: Path, out: Path, found: Findings) -> None:
    gpus = torch.cuda.device_count()
    start = time.time()
    result = common.simpo(
        "train",
        "tiny-onpolicy",
        "-o",
        out,
        "--set",
        "pipeline=[generate, annotate]",
        "--set",
        "model.init=pretrained",
        "--set",
        f"model.name_or_path={model}",
        "--set",
        f"model.tokenizer={model}",
        "--set",
        "generate.backend=vllm",
        "--set",
        f"generate.prompts.max_rows={STAGE_PROMPTS}",
        "--set",
        "generate.gpu_memory_utilization=0.3",
        "--num-processes",
        gpus,
    )
    took = time.time() - start
    if not found.expect(
        result.returncode == 0,
        f"simpo train (generate, annotate on vllm) exit {result.returncode}: "
        f"{common.last_line(result.stderr)}",
    ):
        return
    shards = sorted((out / "generate" / "samples" / "train").glob("samples-rank*.jsonl"))
    found.expect(len(shards) == gpus, f"{len(shards)} sample shards for {gpus} processes")
    pairs = out / "annotate" / "dataset" / "train.jsonl"
    if found.expect(pairs.is_file(), "no pairs dataset after the annotate stage"):
        count = len(pairs.read_text().splitlines())
        found.note(
            f"generate + annotate through the CLI on {gpus} GPU(s): {count} pairs in {took:.0f}s"
        )
        found.numbers.update(stage_gpus=gpus, stage_pairs=count, stages_s=took)
