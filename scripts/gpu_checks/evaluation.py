"""evaluation: `simpo eval` in bf16 on the GPU (the CPU tests run float32 on the CPU only).

On the tiny recipe's seeded model saved with its tokenizer, through the CLI:
  1. on a GPU the default dtype is bfloat16, and its numbers stay near a float32 run of the
     same pairs (the tiny held-out pairs): reward accuracy within 0.05, per-pair log-probs
     within 0.1;
  2. with 2 or more GPUs, `--num-processes 2` gives the per-pair numbers of 1 process;
  3. benchmark answers (AlpacaEval format, the tiny questions) on the transformers backend in
     bf16, read back with the official reader's rules. (vLLM's engine, which the vllm backend
     uses for answers too, is checked by the generation check.)
"""

from __future__ import annotations

import json

import torch

from gpu_checks import common
from gpu_checks.common import Context, Findings

LIMIT_S = 60


def save_tiny_model(folder):
    from simpo_cli.data import load_tokenizer
    from simpo_cli.model.load import load_model
    from simpo_cli.recipe import load_recipe

    recipe = load_recipe("tiny")
    load_model(recipe, None, 42).save_pretrained(folder)
    load_tokenizer(recipe.model).save_pretrained(folder)
    return folder


def run(ctx: Context) -> Findings:
    from simpo_cli.evaluate.benchmarks import load_questions, read_back
    from simpo_cli.recipe import RECIPES_DIR

    found = Findings()
    work = ctx.work
    model = save_tiny_model(work / "tiny-model")
    pairs = RECIPES_DIR / "tiny" / "data" / "pref_eval.jsonl"
    if ctx.tiny:  # the first 40 pairs
        lines = pairs.read_text().splitlines(keepends=True)[:40]
        pairs = work / "pairs.jsonl"
        pairs.write_text("".join(lines))

    # 1. bf16 by default, close to float32
    runs = {}
    for dtype in ("auto", "float32"):
        out = work / f"pairs-{dtype}.json"
        result = common.simpo(
            "eval", model, "--pairs", pairs, "--pairs-output", out, "--dtype", dtype
        )
        if found.expect(
            result.returncode == 0,
            f"eval --dtype {dtype}: exit {result.returncode}: {common.last_line(result.stderr)}",
        ):
            runs[dtype] = json.loads(out.read_text())
    if len(runs) == 2:
        auto, fp32 = runs["auto"], runs["float32"]
        dtype = auto["summary"]["dtype"]
        found.expect(dtype == "bfloat16", f"the default dtype on a GPU is {dtype}, not bfloat16")
        gap = abs(auto["summary"]["reward_accuracy"] - fp32["summary"]["reward_accuracy"])
        worst = max(
            abs(a[k] - b[k])
            for a, b in zip(auto["pairs"], fp32["pairs"], strict=True)
            for k in ("chosen_logps", "rejected_logps")
        )
        found.expect(
            gap <= 0.05 and worst <= 0.1,
            f"bf16 far from fp32: reward accuracy gap {gap:.3f} (limit 0.05), "
            f"log-prob gap {worst:.3f} (limit 0.1)",
        )
        found.note(
            f"{len(auto['pairs'])} pairs, default {dtype}: reward accuracy "
            f"{auto['summary']['reward_accuracy']:.3f} vs fp32 "
            f"{fp32['summary']['reward_accuracy']:.3f}, worst log-prob gap {worst:.3f}"
        )
        found.numbers.update(
            default_dtype=dtype,
            pairs=len(auto["pairs"]),
            reward_accuracy_gap=gap,
            worst_logp_gap=worst,
        )

    # 2. 2 processes give the numbers of 1
    if torch.cuda.device_count() >= 2:
        outs = {1: work / "one", 2: work / "two"}
        codes = [
            common.simpo(
                "eval", model, "--pairs", pairs, "-o", out, "--num-processes", n
            ).returncode
            for n, out in outs.items()
        ]
        if found.expect(codes == [0, 0], f"eval on 1 and 2 processes: exit {codes}"):
            read = {
                n: json.loads((out / "checkpoints" / model.name / "pairs.json").read_text())
                for n, out in outs.items()
            }
            same = read[1]["pairs"] == read[2]["pairs"]
            found.expect(same, "eval on 2 processes differs from 1")
            found.note(f"2 processes give 1's per-pair numbers: {same}")
    else:
        found.note("2 processes vs 1: not run (one GPU)")

    # 3. benchmark answers on the transformers backend in bf16
    questions_file = RECIPES_DIR / "tiny" / "benchmarks" / "alpaca_eval.json"
    questions = load_questions("alpaca_eval", str(questions_file))
    out = work / "answers"
    result = common.simpo(
        "eval",
        model,
        "--benchmark",
        "alpaca_eval",
        "--questions",
        questions_file,
        "-o",
        out,
        "--backend",
        "transformers",
        "--temperature",
        "0",
        "--max-new-tokens",
        8 if ctx.tiny else 32,
        "--model-id",
        "m",
    )
    if found.expect(
        result.returncode == 0,
        f"benchmark answers: exit {result.returncode}: {common.last_line(result.stderr)}",
    ):
        rows = read_back("alpaca_eval", out / "alpaca_eval" / "m", "m", questions)
        found.expect(len(rows) == len(questions), f"{len(rows)} answers for {len(questions)}")
        found.note(f"{len(rows)} AlpacaEval answers read back")
        found.numbers["answers"] = len(rows)
    return found
