"""Check `simpo eval` on real GPUs (the CPU tests run fp32 on the CPU only).

    python scripts/gpu_check_evaluation.py [--model LOCAL_MODEL_FOLDER] [--pairs FILE]

Without --model it builds the tiny recipe's seeded model and saves it with the tiny tokenizer to
a temporary folder (no network needed); --pairs defaults to the tiny recipe's held-out pairs.
Through the CLI, it checks:
  1. on a GPU the default dtype is bfloat16, and its numbers stay near a float32 run of the same
     pairs (reward accuracy within 0.05; per-pair average log-probs within 0.1);
  2. with 2 or more GPUs, `--num-processes 2` gives the per-pair numbers of 1 process;
  3. benchmark answers (AlpacaEval format, the tiny questions) on the transformers backend in
     bf16, read back with the official reader's rules; with vLLM installed, the same on the vLLM
     backend, and the share of greedy answers the two backends agree on (reported, not failed).
Exit codes: 0 all checks passed, 1 a check failed, 77 skipped (no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from simpo_cli.data import load_tokenizer  # noqa: E402
from simpo_cli.evaluate.benchmarks import load_questions, read_back  # noqa: E402
from simpo_cli.recipe import RECIPES_DIR, ModelSettings, load_recipe  # noqa: E402

SKIPPED = 77
QUESTIONS = RECIPES_DIR / "tiny" / "benchmarks" / "alpaca_eval.json"


def tiny_model(folder: Path) -> Path:
    """The tiny recipe's seeded model and tokenizer, saved as a checkpoint folder."""
    from simpo_cli.model.load import load_model

    load_model(load_recipe("tiny"), None, 42).save_pretrained(folder)
    tokenizer = load_tokenizer(ModelSettings(name_or_path=str(RECIPES_DIR / "tiny" / "tokenizer")))
    tokenizer.save_pretrained(folder)
    return folder


def simpo(*args) -> subprocess.CompletedProcess:
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "simpo_cli", *map(str, args)], capture_output=True, text=True
    )
    print(f"  simpo {' '.join(map(str, args[:3]))} ...: exit {result.returncode} in "
          f"{time.time() - start:.1f}s")  # fmt: skip
    if result.returncode != 0:
        print(result.stdout[-2000:] + result.stderr[-2000:])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local model folder (default: the tiny recipe's model)")
    parser.add_argument("--pairs", default=str(RECIPES_DIR / "tiny" / "data" / "pref_eval.jsonl"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no GPU: skipped")
        return SKIPPED
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else tiny_model(work / "tiny-model")

        print("1. bf16 by default, close to float32")
        runs = {}
        for dtype in ("auto", "float32"):
            out = work / f"pairs-{dtype}.json"
            if simpo("eval", model, "--pairs", args.pairs, "--pairs-output", out, "--dtype",
                     dtype).returncode:  # fmt: skip
                failures.append(f"eval --dtype {dtype} failed")
                continue
            runs[dtype] = json.loads(out.read_text())
        if len(runs) == 2:
            auto, fp32 = runs["auto"], runs["float32"]
            if auto["summary"]["dtype"] != "bfloat16":
                failures.append(f"default dtype on GPU is {auto['summary']['dtype']}")
            gap = abs(auto["summary"]["reward_accuracy"] - fp32["summary"]["reward_accuracy"])
            worst = max(
                abs(a[k] - b[k])
                for a, b in zip(auto["pairs"], fp32["pairs"], strict=True)
                for k in ("chosen_logps", "rejected_logps")
            )
            print(f"  reward accuracy bf16 vs fp32: gap {gap:.4f}; worst log-prob gap {worst:.4f}")
            if gap > 0.05 or worst > 0.1:
                failures.append(f"bf16 far from fp32 (accuracy gap {gap}, log-prob gap {worst})")

        if torch.cuda.device_count() >= 2:
            print("2. 2 processes give the numbers of 1")
            one, two = work / "one", work / "two"
            ok = all(
                simpo("eval", model, "--pairs", args.pairs, "-o", out, *extra).returncode == 0
                for out, extra in ((one, []), (two, ["--num-processes", "2"]))
            )
            label = model.resolve().name
            if ok:
                a = json.loads((one / "checkpoints" / label / "pairs.json").read_text())["pairs"]
                b = json.loads((two / "checkpoints" / label / "pairs.json").read_text())["pairs"]
                print(f"  identical per-pair numbers: {a == b}")
                if a != b:
                    failures.append("2 processes differ from 1")
            else:
                failures.append("eval on 1 or 2 processes failed")
        else:
            print("2. skipped: one GPU")

        print("3. benchmark answers on the GPU backends")
        questions = load_questions("alpaca_eval", str(QUESTIONS))
        answers = {}
        import importlib.util

        backends = ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
        for backend in backends:
            out = work / f"answers-{backend}"
            result = simpo("eval", model, "--benchmark", "alpaca_eval", "--questions", QUESTIONS,
                           "-o", out, "--backend", backend, "--temperature", "0",
                           "--max-new-tokens", "32", "--model-id", "m")  # fmt: skip
            if result.returncode:
                failures.append(f"benchmark answers on {backend} failed")
                continue
            rows = read_back("alpaca_eval", out / "alpaca_eval" / "m", "m", questions)
            answers[backend] = [row["output"] for row in rows]
            print(f"  {backend}: {len(rows)} answers read back; first: {rows[0]['output']!r:.60}")
        if len(answers) == 2:
            same = sum(a == b for a, b in zip(*answers.values(), strict=True))
            print(f"  greedy answers equal on both backends: {same} of {len(questions)}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    for failure in failures:
        print(f"  FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
