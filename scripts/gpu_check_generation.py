"""Check the vLLM generation path on a real GPU (the CPU tests only reach its API boundary).

    python scripts/gpu_check_generation.py [--model LOCAL_MODEL_FOLDER] [--prompts 16]

Without --model it builds the tiny recipe's seeded model and saves it with the tiny tokenizer to
a temporary folder (no network needed). It then checks, on the real engine:
  1. the prompt vLLM received is exactly our token ids: one BOS, nothing re-tokenized;
  2. every prompt gets one sample per seed, finish reasons are stop/length, token counts are
     within max_new_tokens; the shards merge cleanly;
  3. a second run of the same command on the same folder generates nothing (resume);
  4. a fresh run into another folder gives the same samples (reported, not failed, when it
     differs: bit-exact vLLM needs VLLM_BATCH_INVARIANT=1 or VLLM_ENABLE_V1_MULTIPROCESSING=0);
  5. the stages through the CLI: `simpo train` of tiny-onpolicy's generate and annotate stages on
     this model with backend vllm, one engine per visible GPU (each process on its own GPU, the
     processes meeting through marker files), then the pairs dataset is there.
Exit codes: 0 all checks passed, 1 a check failed, 77 skipped (no GPU or vLLM not installed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from simpo_cli.data import load_tokenizer  # noqa: E402
from simpo_cli.errors import UserError  # noqa: E402
from simpo_cli.onpolicy.sampling import (  # noqa: E402
    SamplingSettings,
    VLLMBackend,
    generate_samples,
    merge_shards,
    needed_model_len,
    read_prompts,
    render_prompt_ids,
    resolve_backend,
    stop_token_ids,
)
from simpo_cli.recipe import RECIPES_DIR, DataSource, ModelSettings, load_recipe  # noqa: E402

SKIPPED = 77


def tiny_model(folder: Path) -> Path:
    """The tiny recipe's seeded model and tokenizer, saved where vLLM can load them."""
    from simpo_cli.model.load import load_model

    load_model(load_recipe("tiny"), None, 42).save_pretrained(folder)
    tokenizer = load_tokenizer(ModelSettings(name_or_path=str(RECIPES_DIR / "tiny" / "tokenizer")))
    tokenizer.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local model folder (default: the tiny recipe's model)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts from the tiny eval data")
    args = parser.parse_args()
    try:
        resolve_backend("vllm")
    except UserError as err:
        print(f"skipped: {err}", file=sys.stderr)
        return SKIPPED

    work = Path(tempfile.mkdtemp(prefix="gpu_check_generation-"))
    model = Path(args.model) if args.model else tiny_model(work / "model")
    tokenizer = load_tokenizer(ModelSettings(name_or_path=str(model)))
    data = RECIPES_DIR / "tiny" / "data" / "pref_eval.jsonl"
    prompts = read_prompts(DataSource(path=str(data), max_rows=args.prompts))
    settings = SamplingSettings(
        seeds=(13, 21, 42), max_new_tokens=32, stop_token_ids=tuple(stop_token_ids(tokenizer))
    )
    backend = VLLMBackend(
        str(model),
        max_model_len=needed_model_len(tokenizer, prompts, settings.max_new_tokens),
        gpu_memory_utilization=0.5,
        chunk_size=5,  # several chunks, so results are written as they come
    )
    failures: list[str] = []

    # 1. The engine received our ids, unchanged.
    from vllm import SamplingParams

    ids = render_prompt_ids(tokenizer, prompts[0])
    (output,) = backend.llm.generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=4), use_tqdm=False
    )
    if list(output.prompt_token_ids) != ids:
        failures.append(
            f"vLLM saw prompt ids {list(output.prompt_token_ids)[:8]}..., not {ids[:8]}"
        )
    bos = tokenizer.bos_token_id
    if bos is not None and list(output.prompt_token_ids)[:2] == [bos, bos]:
        failures.append("vLLM saw a double BOS")

    # 2. A full run, merged and checked.
    start = time.time()
    generate_samples(backend, tokenizer, prompts, settings, work / "a", model_name=str(model))
    records = merge_shards(work / "a", prompts, settings.seeds)
    took = time.time() - start
    samples = [s for r in records for s in r["samples"]]
    if any(s["finish_reason"] not in ("stop", "length") for s in samples):
        failures.append("a finish reason other than stop/length")
    if any(not 0 < s["tokens"] <= settings.max_new_tokens for s in samples):
        failures.append("a token count outside 1..max_new_tokens")
    stops = sum(s["finish_reason"] == "stop" for s in samples)
    print(f"{len(records)} prompts x {len(settings.seeds)} seeds in {took:.1f}s; {stops} stopped")
    print(f"first sample: {samples[0]}")

    # 3. Resume: nothing left to do.
    before = (work / "a" / "samples-rank0.jsonl").read_text()
    generate_samples(backend, tokenizer, prompts, settings, work / "a", model_name=str(model))
    if (work / "a" / "samples-rank0.jsonl").read_text() != before:
        failures.append("a second run on a finished folder wrote more records")

    # 4. Same seeds, same samples (informational).
    generate_samples(backend, tokenizer, prompts, settings, work / "b", model_name=str(model))
    same = merge_shards(work / "b", prompts, settings.seeds) == records
    print(f"a fresh run gives the same samples: {same}")

    # 5. The stages through the CLI, one vLLM engine per GPU.
    del backend  # free this process's engine first
    failures += check_stages(model, work / "stages")

    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


def check_stages(model: Path, out: Path) -> list[str]:
    import subprocess

    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:  # the CPU test's stand-in engine: the child processes would not see it
        print("stages through the CLI: skipped (no GPU counted)")
        return []
    command = [
        sys.executable, "-m", "simpo_cli", "train", "tiny-onpolicy", "-o", str(out),
        "--set", "pipeline=[generate, annotate]", "--set", "model.init=pretrained",
        "--set", f"model.name_or_path={model}", "--set", f"model.tokenizer={model}",
        "--set", "generate.backend=vllm", "--set", "generate.prompts.max_rows=64",
        "--set", "generate.gpu_memory_utilization=0.3", "--num-processes", str(gpus),
    ]  # fmt: skip
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    print(f"stages through the CLI on {gpus} GPU(s): exit {result.returncode} in "
          f"{time.time() - start:.0f}s")  # fmt: skip
    if result.returncode != 0:
        return [f"simpo train (vllm stages) failed: {result.stderr.strip()[-800:]}"]
    shards = sorted((out / "generate" / "samples" / "train").glob("samples-rank*.jsonl"))
    problems = []
    if len(shards) != gpus:
        problems.append(f"{len(shards)} shards for {gpus} processes")
    if not (out / "annotate" / "dataset" / "train.jsonl").is_file():
        problems.append("no pairs dataset after the annotate stage")
    return problems


if __name__ == "__main__":
    sys.exit(main())
