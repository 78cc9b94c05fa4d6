"""Compute cost of SimPO against DPO, side by side, on the same model and data.

Runs the real preference stage (`simpo preference tiny` with overrides) per method, each in its
own process (a first run for memory, a later one for time), and prints time per optimizer step
and peak memory as ratios to SimPO:

    simpo        one model, one forward pass over chosen + rejected
    dpo-live     a second (reference) model in memory, a second forward pass every step
    dpo-cached   reference log-probs computed once before training (its time is reported
                 apart), then one model and one pass per step, like SimPO

Peak memory is the training process's resident set above what it held after importing the
libraries, in its first run (Linux: /proc/self/clear_refs resets the high-water mark); time per
step comes from a later run of the same process. The default model is the
tiny recipe's architecture widened to about 20M parameters so that model state, not the Python
runtime, dominates; on a GPU the same script measures GPU time and memory of the same code.

    python scripts/compare_compute.py              # about 3 minutes on 2 CPU cores
    python scripts/compare_compute.py --steps 3    # a quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = {
    "simpo": [],
    "dpo-live": ["preference.loss=dpo", "preference.reference.mode=live"],
    "dpo-cached": ["preference.loss=dpo", "preference.reference.mode=cached"],
}
WIDE_MODEL = [
    "model.config.hidden_size=384",
    "model.config.intermediate_size=1024",
    "model.config.num_hidden_layers=8",
    "model.config.num_attention_heads=6",
    "model.config.num_key_value_heads=6",
]

# Runs in the child: import everything, reset the peak-RSS counter, train, report.
CHILD = """
import json, shutil, sys, time
from pathlib import Path
from simpo_cli.recipe import load_recipe
from simpo_cli.run.pipeline import run_stage
from simpo_cli.train.preference import CachedReference

# The pre-pass timed where it runs (a difference of two runs' times can come out below 0 on a
# loaded machine).
prepass = []
score = CachedReference._score

def timed_score(self, scorer):
    start = time.perf_counter()
    score(self, scorer)
    prepass.append(time.perf_counter() - start)

CachedReference._score = timed_score

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

def train_seconds(stage_dir):
    logs = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    train = next(m for m in logs if "train_runtime" in m)
    return train["train_runtime"], train["step"]

recipe = load_recipe("tiny", json.loads(sys.argv[1]))
out = Path(sys.argv[2])
cached = recipe.preference.uses_reference and recipe.preference.reference.mode == "cached"
# Memory from the first run, which starts from the process after imports; time from later
# runs, once one-off costs (allocator growth, lazy initialisation) are paid.
Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
base = status("VmRSS")
run_stage(recipe, "preference", out)
peak = status("VmHWM") - base
if cached:
    # The pre-pass of a warm run that must recompute the stored reference log-probs.
    shutil.rmtree(out / "reference_logps")
    prepass.clear()
    run_stage(recipe, "preference", out, overwrite=True)
    prepass_s = sum(prepass)
train_s, steps = train_seconds(run_stage(recipe, "preference", out, overwrite=True))
result = {"peak_bytes": peak, "train_s": train_s, "steps": steps}
result["prepass_s"] = prepass_s if cached else None
print("RESULT " + json.dumps(result))
"""


def measure(name: str, steps: int, model_sets: list[str], workdir: Path) -> dict:
    sets = [
        "pipeline=[preference]",
        "preference.data.eval=null",
        f"preference.data.train.max_rows={16 * steps}",  # one epoch of `steps` steps
        f"preference.training.max_steps={steps}",
        "preference.sft_weight=null",  # SimPO as the paper's; the other losses take none
        "preference.training.logging_steps=1",
        "preference.training.save_steps=100000",
        *model_sets,
        *METHODS[name],
    ]
    if name != "simpo":
        sets += ["preference.gamma_beta_ratio=null", "preference.beta=0.1"]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(sets), str(workdir / name)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per method")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny recipe's own 0.1M-parameter model"
    )
    args = parser.parse_args()
    model_sets = [] if args.tiny else WIDE_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: measure(name, args.steps, model_sets, Path(tmp)) for name in METHODS}
    base = results["simpo"]
    print(f"{args.steps} optimizer steps of 16 pairs each (one epoch), per method, own process")
    print("| method | s/step | time vs SimPO | peak MiB | memory vs SimPO | one-off pre-pass s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        per_step = r["train_s"] / r["steps"]
        prepass = "-" if r["prepass_s"] is None else f"{r['prepass_s']:.1f}"
        print(
            f"| {name} | {per_step:.3f} | {per_step / (base['train_s'] / base['steps']):.2f}x | "
            f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f}x | "
            f"{prepass} |"
        )
    print(
        "s/step = Trainer's train_runtime / steps (a warm run); peak = resident memory of a "
        "first run above the process after imports; pre-pass = the cached reference "
        "log-probs, computed once per data set"
    )


if __name__ == "__main__":
    main()
