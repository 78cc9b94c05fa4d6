"""The GPU acceptance command: every check that needs a GPU, one line each, and a JSON report.

    python scripts/gpu_check.py                    # all checks; report in ./gpu_check.json
    python scripts/gpu_check.py --only packing,lora --output /tmp/report.json

The checks, one module each in scripts/gpu_checks/ (its docstring says what it checks and the
limits it holds). Nothing is downloaded: every model is built from a config, with the tiny
recipe's tokenizer.
  packing     bf16 packed batches on flash-attention's variable-length kernel against padded
              ones; float32 packed + chunked log-probs and gradients against padded; memory
  generation  vLLM: our token ids unchanged, samples per seed, resume; the generate and
              annotate stages through `simpo train`, one engine per GPU
  lora        4-bit QLoRA: layers, memory, SimPO steps with gradient checkpointing on frozen
              4-bit weights, the merge into the base reloaded in bf16; 8-bit steps
  zero3       DeepSpeed ZeRO-3 on NCCL (2 processes with 2+ GPUs; with one GPU, 1 process, as
              the line says): log-probs and gradients equal to no ZeRO, bf16 steps, the save
  evaluation  `simpo eval`: bf16 by default and close to float32, 2 processes equal to 1 (2+
              GPUs), benchmark answers
  speed       tokens/s, peak memory and MFU of `simpo preference` against TRL's CPOTrainer on a
              1B-parameter Llama (passes at >= 1.0x TRL's tokens/s in <= its memory)

Each check runs in its own process under its own time limit, in seconds: packing 45,
generation 140, lora 45, zero3 60, evaluation 60, speed 110 (460 in all: the whole command ends
within 8 minutes on one H100 even if every check runs out of time). A check that fails, crashes
or runs out of time is recorded (a crash with its exception's last line) and the next one runs.

Output: one line per check, `pass`, `fail` or `skipped`, its seconds and its key numbers or why;
then a total. The JSON report (--output) holds each check's status, numbers, failures, time,
limit and log file, with the versions of Python, torch, CUDA, cuDNN, the driver, the GPUs and
the libraries. The work folder (models, runs, one log per check) is a temporary one, removed
when nothing failed (--work-dir names one, kept).

Exit codes: 0 no check failed; a check is skipped only when an optional package it needs is not
installed (vllm, flash_attn, bitsandbytes, peft, deepspeed, trl; the line gives the pip
command), and --strict counts a skip as a failure. 1 a check failed. 77 no GPU: one line,
nothing run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no download: every model is built from a config
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # gpu_checks/ and benchmark_speed.py, also when run by runpy
    sys.path.insert(0, str(SCRIPTS))

CHECKS = ("packing", "generation", "lora", "zero3", "evaluation", "speed")
NO_GPU = 77


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("gpu_check.json"),
        help="the JSON report (default: %(default)s in the current folder)",
    )
    parser.add_argument("--only", help=f"comma-separated checks to run, of {', '.join(CHECKS)}")
    parser.add_argument(
        "--work-dir", type=Path, help="models, runs and logs (default: a new temporary folder)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="a skipped check (optional package missing) fails the run",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the smallest shapes: a smoke test of the checks' code; speed not judged",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every check in this process (no isolation between them; for "
        "tests with a stand-in GPU, and for debugging)",
    )
    parser.add_argument("--run-check", help=argparse.SUPPRESS)  # a check's own process
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"--only: no check {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_check:  # in the check's own process (run_isolated)
        entry = run_check(args.run_check, args.work_dir, args.tiny)
        (args.work_dir / args.run_check / "result.json").write_text(json.dumps(entry))
        sys.stdout.flush()
        sys.stderr.flush()
        # Now: a thread or an engine left behind must not hold the exit (the parent ends what
        # this process started).
        os._exit(0)
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        why = f"no GPU (torch {torch.__version__}, {build}: torch.cuda.is_available() is False)"
        print(f"skipped: {why}; nothing run")
        write(
            args.output, {"exit_code": NO_GPU, "reason": why, "versions": versions(), "checks": []}
        )
        return NO_GPU
    keep = args.work_dir is not None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    report = {"versions": versions(), "tiny": args.tiny, "work_dir": str(work), "checks": []}
    start = time.time()
    for name in args.names:
        limit = importlib.import_module(f"gpu_checks.{name}").LIMIT_S
        log = work / "logs" / f"{name}.log"
        # A fresh folder for the check, also in a --work-dir used before.
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir()
        began = time.time()
        run = run_in_process if args.in_process else run_isolated
        entry = {"name": name, **run(name, work, args.tiny, limit, log)}
        entry.update(seconds=round(time.time() - began, 1), limit_s=limit, log=str(log))
        report["checks"].append(entry)
        print(line(entry), flush=True)
    statuses = [c["status"] for c in report["checks"]]
    failed, skipped = statuses.count("fail"), statuses.count("skipped")
    code = 1 if failed or (args.strict and skipped) else 0
    report.update(exit_code=code, seconds=round(time.time() - start, 1))
    write(args.output, report)
    kept = keep or failed
    if not kept:
        shutil.rmtree(work, ignore_errors=True)
    strict = " (--strict: failing)" if args.strict and skipped else ""
    logs = f"; logs in {work / 'logs'}" if kept else ""
    print(
        f"{statuses.count('pass')} passed, {skipped} skipped{strict}, {failed} failed in "
        f"{time.time() - start:.0f}s; report {args.output}{logs}"
    )
    return code


def line(entry: dict) -> str:
    """One line: status, check, seconds, then what failed and the key numbers, or why skipped."""
    parts = (
        [*entry.get("failures", []), entry["summary"]]
        if entry["status"] == "fail"
        else [entry["summary"]]
    )
    text = "; ".join(p for p in parts if p)
    return f"{entry['status']:<8} {entry['name']:<11} {entry.get('seconds', 0):>4.0f}s  {text}"


def run_check(name: str, work: Path, tiny: bool) -> dict:
    """Run check `name` in this process: its status, summary, failures and numbers. A missing
    optional package skips it; an exception (SystemExit included) fails it with the
    exception's last line, its traceback in the log."""
    from gpu_checks.common import Context, Skip

    module = importlib.import_module(f"gpu_checks.{name}")
    try:
        found = module.run(Context(work=work / name, tiny=tiny))
    except Skip as why:
        return {"status": "skipped", "summary": str(why)}
    except TimeLimit as err:
        return {"status": "fail", "summary": str(err)}
    except (Exception, SystemExit) as err:
        traceback.print_exc()
        lines = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()
        return {
            "status": "fail",
            "summary": f"crashed: {lines[-1] if lines else type(err).__name__}",
        }
    return {
        "status": "fail" if found.failures else "pass",
        "summary": "; ".join(found.summary),
        "failures": found.failures,
        "numbers": found.numbers,
    }


def run_isolated(name: str, work: Path, tiny: bool, limit: int, log: Path) -> dict:
    """The check in a process of its own (a fresh CUDA context; a crash, a hang or a leftover
    engine stays there), killed with everything it started when its time is up."""
    result = work / name / "result.json"
    command = [sys.executable, __file__, "--run-check", name, "--work-dir", str(work)]
    with log.open("w") as out:
        process = subprocess.Popen(
            command + ["--tiny"] * tiny,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on Ctrl-C: end the check's session, whatever it left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # vLLM engines, launched processes
            process.wait()
    if result.is_file():
        return json.loads(result.read_text())
    if timed_out:
        return {"status": "fail", "summary": f"timed out after {limit}s"}
    tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return {
        "status": "fail",
        "summary": f"crashed (exit {process.returncode}): {tail[-1].strip() if tail else ''}",
    }


class TimeLimit(Exception):
    pass


def run_in_process(name: str, work: Path, tiny: bool, limit: int, log: Path) -> dict:
    """The check in this process, its output into its log, stopped by SIGALRM at its limit."""

    def stop(signum, frame):
        raise TimeLimit(f"timed out after {limit}s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(limit)
    try:
        with log.open("w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return run_check(name, work, tiny)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def versions() -> dict:
    """What the numbers were measured with."""
    import platform
    from importlib import metadata

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpus else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "driver": None,
        "commit": None,
    }
    for dist in (
        "simpo-cli",
        "transformers",
        "accelerate",
        "datasets",
        "peft",
        "deepspeed",
        "trl",
        "vllm",
        "flash-attn",
        "bitsandbytes",
    ):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    commands = {
        "driver": ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        "commit": ["git", "-C", str(SCRIPTS), "rev-parse", "HEAD"],
    }
    for key, command in commands.items():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                found[key] = out.stdout.strip().splitlines()[0]
    return found


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
