"""scripts/gpu_check.py, the GPU acceptance command, on the CPU: every check's body run with the
GPU stood in at its boundaries (tests/gpu_stand_in.py), the one line and exit 77 without a GPU,
and the runner's handling of a check that fails, crashes, skips or runs out of time."""

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402
from gpu_checks.common import Findings, Skip  # noqa: E402

STATUS = ("pass", "fail", "skipped")


def check_lines(text: str) -> list[str]:
    """The script's one line per check (libraries may print their own lines too)."""
    return [line for line in text.splitlines() if line.split(" ", 1)[0] in STATUS]


def test_every_check_runs_its_body_and_passes_on_a_stand_in_gpu(tmp_path):
    """Each check runs on the CPU through the stand-ins (flash-attn's varlen kernel, vLLM's
    engine, bitsandbytes' 4- and 8-bit layers, NCCL as gloo, the GPU as the CPU) and passes, its
    key numbers in the report; a check that skipped or crashed fails this test, and so does one
    that passed without reaching its stand-in (the counts of what reached each)."""
    report_file = tmp_path / "report.json"
    stand_in = [sys.executable, str(ROOT / "tests" / "gpu_stand_in.py")]
    args = ["--output", str(report_file), "--work-dir", str(tmp_path / "work")]
    result = subprocess.run(
        stand_in + args, capture_output=True, text=True, cwd=tmp_path, timeout=1200
    )
    lines = check_lines(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert [line.split()[:2] for line in lines] == [["pass", name] for name in gpu_check.CHECKS]
    assert result.stdout.splitlines()[-1].startswith("6 passed, 0 skipped, 0 failed in ")

    report = json.loads(report_file.read_text())
    assert report["exit_code"] == 0 and report["tiny"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert [c["status"] for c in checks.values()] == ["pass"] * 6
    assert all(c["failures"] == [] and c["summary"] for c in checks.values())
    versions = report["versions"]
    assert versions["gpus"] == ["stand-in GPU (the CPU)"] and versions["torch"] == torch.__version__
    assert versions["flash-attn"] == "2.8.3" and versions["bitsandbytes"] == "0.48.0"

    packing = checks["packing"]["numbers"]
    assert packing["fp32_logp_diff"] < 1e-4 and packing["fp32_grad_diff"] < 1e-4
    assert (
        0
        < packing["bf16_flash_packed_logit_diff"]
        <= 2 * packing["bf16_sdpa_padded_logit_diff"] + 0.01
    )
    generation = checks["generation"]["numbers"]
    assert generation["prompts"] == 4 and generation["samples"] == 12
    assert generation["stage_gpus"] == 1 and generation["stage_pairs"] > 0
    lora = checks["lora"]["numbers"]
    assert lora["linear_4bit"] == lora["linear_8bit"] == lora["lora_b_moved"] == 14
    assert lora["layer_memory_ratio_4bit"] == 0.25 and lora["loss_last"] < lora["loss_first"]
    zero3 = checks["zero3"]["numbers"]
    assert zero3["processes"] == 1 and zero3["backend"] == "gloo" and zero3["saved"] == 21
    assert (
        "1 process on gloo (one GPU: no communication between GPUs)" in checks["zero3"]["summary"]
    )
    evaluation = checks["evaluation"]["numbers"]
    assert evaluation["default_dtype"] == "bfloat16" and evaluation["answers"] == 4
    assert "2 processes vs 1: not run (one GPU)" in checks["evaluation"]["summary"]
    speed = checks["speed"]["numbers"]
    assert speed["tokens_per_s"] > 0 and speed["trl_tokens_per_s"] > 0 and speed["mfu"] > 0
    assert speed["tokens_per_s_ratio"] == pytest.approx(
        speed["tokens_per_s"] / speed["trl_tokens_per_s"]
    )

    reached = report["stand_in"]
    assert reached["flash_attn"]["varlen"] > 0  # the packed rows went to the varlen kernel
    assert reached["bitsandbytes"]["quantize_4bit"] == 14  # one 4-bit load of 14 layers
    assert reached["bitsandbytes"]["quantize_int8"] == 14
    assert reached["vllm_engines"] == 2  # the check's own, then the generate stage's
    # the ids check, the run and the fresh run (the resumed one asks nothing), the stages
    assert reached["vllm_requests"] == 1 + 2 * 4 * 3 + (64 + 100) * 6
    assert reached["simpo_commands"] == [
        ["train", "tiny-onpolicy"],
        ["generate", "tiny-onpolicy"],
        ["annotate", "tiny-onpolicy"],
        ["eval", str(tmp_path / "work" / "evaluation" / "tiny-model")],
        ["eval", str(tmp_path / "work" / "evaluation" / "tiny-model")],
        ["eval", str(tmp_path / "work" / "evaluation" / "tiny-model")],
    ]
    assert reached["benchmark_runs"] == 2  # ours and TRL's


def test_without_a_gpu_it_says_so_in_one_line_and_exits_77(tmp_path):
    report_file = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(report_file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 77, result.stderr
    assert result.stdout == (
        f"skipped: no GPU (torch {torch.__version__}, a CPU-only build: "
        "torch.cuda.is_available() is False); nothing run\n"
    )
    report = json.loads(report_file.read_text())
    assert report["exit_code"] == 77 and report["checks"] == []
    assert report["versions"]["torch"] == torch.__version__


@pytest.fixture
def one_gpu(monkeypatch):
    """A stood-in GPU for the runner, whose checks are replaced by the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")


def fake_check(monkeypatch, name: str, run) -> None:
    module = types.ModuleType(f"gpu_checks.{name}")
    module.LIMIT_S, module.run = 1, run
    monkeypatch.setitem(sys.modules, f"gpu_checks.{name}", module)


def test_a_failure_a_crash_a_skip_and_a_timeout_each_stop_only_their_own_check(
    one_gpu, monkeypatch, tmp_path, capsys
):
    """In one process: a check whose expectation fails, one that raises (its exception's last
    line), one whose package is missing, one past its time limit (SIGALRM), then one that
    passes: each gets its line and the next one runs; exit 1."""

    def failing(ctx):
        found = Findings(summary=["max logit diff 0.9"])
        found.expect(False, "logits far apart")
        return found

    def crashing(ctx):
        raise ValueError("bad shapes\n[4, 8] vs [4, 9]")

    def skipping(ctx):
        raise Skip("vllm not installed (pip install vllm)")

    def hanging(ctx):
        time.sleep(30)

    def passing(ctx):
        assert ctx.tiny and ctx.work == tmp_path / "work" / "speed" and ctx.work.is_dir()
        return Findings(summary=["1.50x TRL's tokens/s"], numbers={"ratio": 1.5})

    checks = {
        "packing": failing,
        "generation": crashing,
        "lora": skipping,
        "zero3": hanging,
        "speed": passing,
    }
    for name, run in checks.items():
        fake_check(monkeypatch, name, run)
    report_file = tmp_path / "report.json"
    only = ",".join(checks)
    code = gpu_check.main(
        [
            "--in-process",
            "--tiny",
            "--only",
            only,
            "--output",
            str(report_file),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    lines = check_lines(capsys.readouterr().out)
    assert code == 1
    assert [line.split(None, 2)[:2] for line in lines] == [
        ["fail", "packing"],
        ["fail", "generation"],
        ["skipped", "lora"],
        ["fail", "zero3"],
        ["pass", "speed"],
    ]
    assert lines[0].endswith("s  logits far apart; max logit diff 0.9")
    assert lines[1].endswith("s  crashed: [4, 8] vs [4, 9]")
    assert lines[2].endswith("s  vllm not installed (pip install vllm)")
    assert lines[3].endswith("s  timed out after 1s")
    assert lines[4].endswith("s  1.50x TRL's tokens/s")
    report = json.loads(report_file.read_text())
    assert report["exit_code"] == 1
    assert [c["name"] for c in report["checks"]] == only.split(",")
    assert report["checks"][4]["numbers"] == {"ratio": 1.5}
    assert "ValueError: bad shapes" in (tmp_path / "work" / "logs" / "generation.log").read_text()


def test_skips_pass_unless_strict(one_gpu, monkeypatch, tmp_path, capsys):
    def skipping(ctx):
        raise Skip("bitsandbytes not installed (pip install bitsandbytes)")

    fake_check(monkeypatch, "lora", skipping)
    args = ["--in-process", "--only", "lora", "--output", str(tmp_path / "r.json")]
    assert gpu_check.main(args) == 0
    assert gpu_check.main([*args, "--strict"]) == 1
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith("0 passed, 1 skipped (--strict: failing)")
    )


def test_each_check_runs_in_a_process_of_its_own_killed_at_its_limit(
    one_gpu, monkeypatch, tmp_path, capsys
):
    """The default: a check runs as `gpu_check.py --run-check NAME` (here the generation check,
    which skips: no vLLM on this machine), its result read back from its folder; a check past
    its limit is killed (packing, with a limit of 0 s)."""
    from gpu_checks import packing

    monkeypatch.setattr(packing, "LIMIT_S", 0)
    report_file = tmp_path / "report.json"
    code = gpu_check.main(
        [
            "--only",
            "generation,packing",
            "--output",
            str(report_file),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    lines = check_lines(capsys.readouterr().out)
    assert code == 1
    assert lines[0].split(None, 2)[:2] == ["skipped", "generation"]
    assert lines[0].endswith("s  vllm not installed (pip install 'simpo-cli[gpu]')")
    assert lines[1].split(None, 2)[:2] == ["fail", "packing"] and lines[1].endswith(
        "timed out after 0s"
    )
    checks = json.loads(report_file.read_text())["checks"]
    assert checks[0]["log"] == str(tmp_path / "work" / "logs" / "generation.log")
