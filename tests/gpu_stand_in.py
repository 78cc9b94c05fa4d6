"""scripts/gpu_check.py with a GPU stood in at its boundaries, so that every check runs its body
on the CPU (tests/test_gpu_check.py runs this file in a process of its own: the stand-ins stay
there).

    python tests/gpu_stand_in.py --output REPORT.json --work-dir DIR [--only CHECKS]

The stand-ins:
- torch.cuda answers as one GPU would (is_available, device_count, a name; synchronize and the
  memory counters do nothing; current_device is "cpu", where transformers then places a
  quantized model); the checks' device is "cpu" (gpu_checks.common.DEVICE), and so is where
  simpo_cli (model.load.eval_device) and peft (infer_device) put models;
- flash-attn and bitsandbytes are the small packages in tests/stand_ins/, installed on sys.path
  with package metadata (transformers and peft look for them by it); vLLM is test_generation's
  FakeVLLM, its replies digits, which the annotate stage's reward tells apart;
- the NCCL backend is gloo, and DeepSpeed runs on its CPU accelerator (without its
  shared-memory op, a C++ build that NCCL does not have and gloo does not need);
- `python -m simpo_cli ...` subprocesses run the CLI in this process, where the stand-ins
  hold; the speed check's runs (`benchmark_speed.py
  --child`, a process each on a GPU machine) run here too, seeing no GPU, as they would as
  processes of their own here;
- each check's time limit is 600 s: the limits are an H100's.
It runs the checks at their --tiny sizes in this process, adds to the report what reached each
stand-in (`stand_in`: kernel calls, quantizations, engine requests, CLI commands), and exits
with the script's code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS.parent / "scripts"
CPU_LIMIT_S = 600
PACKAGES = {"flash_attn": ("flash-attn", "2.8.3"), "bitsandbytes": ("bitsandbytes", "0.48.0")}


def install_packages(site: Path) -> None:
    """tests/stand_ins/ on sys.path, and in `site` the metadata that makes its packages
    installed distributions to importlib.metadata (before transformers first looks)."""
    for module, (name, version) in PACKAGES.items():
        info = site / f"{module}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "top_level.txt").write_text(module + "\n")
    sys.path[:0] = [str(TESTS / "stand_ins"), str(site)]


def stand_in_gpu(monkeypatch) -> dict:
    """Install the stand-ins; returns the records of what reached them."""
    import torch

    cuda = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "get_device_name": lambda *a: "stand-in GPU (the CPU)",
        "current_device": lambda: "cpu",
        "set_device": lambda *a: None,
        "synchronize": lambda *a: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda *a: None,
        "max_memory_allocated": lambda *a: 1,
    }
    for name, stand_in in cuda.items():
        monkeypatch.setattr(torch.cuda, name, stand_in)
    # Imported after: transformers notes once whether CUDA is there.
    import deepspeed  # noqa: F401  (imports deepspeed.comm.torch, patched below)
    import gpu_check
    import peft  # noqa: F401  (imports the peft modules that import infer_device by name)
    from gpu_checks import common
    from test_generation import FakeVLLM

    from simpo_cli.model import load
    from simpo_cli.onpolicy import annotate

    monkeypatch.setattr(common, "DEVICE", "cpu")
    monkeypatch.setattr(common, "DIST_BACKEND", "gloo")
    for module in (load, annotate):
        monkeypatch.setattr(module, "eval_device", lambda: torch.device("cpu"))
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "peft" and hasattr(module, "infer_device"):
            monkeypatch.setattr(module, "infer_device", lambda: "cpu")
    comm = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch is torch)
    monkeypatch.setattr(comm, "build_shm_op", lambda: None)
    for name in gpu_check.CHECKS:
        monkeypatch.setattr(importlib.import_module(f"gpu_checks.{name}"), "LIMIT_S", CPU_LIMIT_S)

    vllm = FakeVLLM()

    def digits(i, prompt_ids, seed):
        """Replies of digits, which the annotate stage's reward (sorted digits) tells apart."""
        answer = FakeVLLM.answer(i, prompt_ids, seed)
        answer.outputs[0].text = " ".join(str(seed)[-4:])
        return answer

    vllm.answer = digits
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the generate stage sets it per process
    commands = in_process_cli(monkeypatch)
    runs = benchmark_runs_in_process(monkeypatch)
    return {"vllm": vllm, "commands": commands, "benchmark_runs": runs}


def in_process_cli(monkeypatch) -> list[list[str]]:
    """Stand in for subprocess.run on `python -m simpo_cli ARGS`: run the CLI in this
    process, signal handlers and argv put back after; returns the ARGS of every call. Other
    commands (git, for the reproducibility record) run as they would."""
    from conftest import run_main

    from simpo_cli import launch
    from simpo_cli.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    commands: list[list[str]] = []
    real = subprocess.run

    def run(command, *args, **kwargs):
        if list(command[:3]) != [sys.executable, "-m", "simpo_cli"]:
            return real(command, *args, **kwargs)
        commands.append(list(command[3:]))
        argv = sys.argv
        sys.argv = ["simpo", *command[3:]]
        try:
            code = run_main(main)
        finally:
            sys.argv = argv
        return subprocess.CompletedProcess(command, code, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    return commands


def benchmark_runs_in_process(monkeypatch) -> list[str]:
    """`python scripts/benchmark_speed.py --child SPEC` runs in this process, with no GPU to
    see and transformers' Trainer (which the run instruments) put back after; returns the
    specs run."""
    import benchmark_speed
    import torch
    import transformers

    other = subprocess.run  # in_process_cli's, which runs every other command
    runs: list[str] = []

    def run(command, *args, **kwargs):
        if list(command[1:3]) != [benchmark_speed.__file__, "--child"]:
            return other(command, *args, **kwargs)
        runs.append(command[3])
        with monkeypatch.context() as inside:
            inside.setattr(torch.cuda, "is_available", lambda: False)
            for name in ("train", "_get_train_sampler"):
                inside.setattr(transformers.Trainer, name, getattr(transformers.Trainer, name))
            benchmark_speed.child(Path(command[3]))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", run)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--only", help="the checks to run (default: all)")
    args = parser.parse_args()
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported
    install_packages(args.work_dir / "stand-in-site")
    sys.path[:0] = [str(SCRIPTS), str(TESTS)]
    import gpu_check
    import pytest

    only = ["--only", args.only] if args.only else []
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = stand_in_gpu(monkeypatch)
        files = ["--output", str(args.output), "--work-dir", str(args.work_dir)]
        code = gpu_check.main(["--in-process", "--tiny", *files, *only])
    flash_attn, bitsandbytes = (importlib.import_module(m) for m in PACKAGES)
    report = json.loads(args.output.read_text())
    report["stand_in"] = {
        "flash_attn": flash_attn.CALLS,
        "bitsandbytes": bitsandbytes.functional.CALLS,
        "vllm_engines": len(seen["vllm"].engines),
        "vllm_requests": sum(len(prompts) for prompts, _ in seen["vllm"].calls),
        "simpo_commands": [command[:2] for command in seen["commands"]],
        "benchmark_runs": len(seen["benchmark_runs"]),
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
