"""`simpo --version` and `simpo env`: what a bug report needs, read from the installed metadata,
torch and git, and still printed when one package's metadata is broken or git is absent."""

import json
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simpo_cli import environment

ROOT = Path(__file__).resolve().parent.parent
KEYS = [
    "simpo", "simpo commit", "Python", "platform", "torch", "torch CUDA", "cuDNN", "NCCL",
    "CUDA available", "GPUs", "transformers", "accelerate", "deepspeed", "datasets", "peft", "vllm",
    "flash-attn", "bitsandbytes", "lm-eval", "wandb", "huggingface_hub", "trl",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkout() -> str:
    """This checkout's commit as git itself gives it, `, dirty` added when tracked files have
    changes: what `simpo --version` must print (simpo is imported from this checkout)."""
    assert Path(environment.__file__).resolve().parent == ROOT / "simpo_cli"
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True)
    except OSError:
        pytest.skip("git is not installed")
    if head.returncode != 0:
        pytest.skip("the tests run outside a git checkout")
    status = ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    return head.stdout.decode().strip() + (", dirty" if dirty else "")


def env_lines(stdout: str) -> dict[str, str]:
    """`- key: value` lines after the heading, as a dict (every line must have that shape)."""
    heading, *lines = stdout.rstrip("\n").split("\n")
    assert heading.startswith("simpo environment")
    assert all(line.startswith("- ") and ": " in line for line in lines), lines
    return dict(line[2:].split(": ", 1) for line in lines)


def test_version(cli, checkout):
    result = cli("--version")
    assert result.code == 0, result.stderr
    assert result.stdout == f"simpo {metadata.version('simpo-cli')} (commit {checkout})\n"


def test_env_text_has_every_key(cli, checkout):
    result = cli("env")
    assert result.code == 0, result.stderr
    values = env_lines(result.stdout)
    assert list(values) == KEYS
    assert values["simpo commit"] == checkout.replace(", dirty", " (dirty)")
    assert values["Python"] == platform.python_version()
    assert values["torch"] == metadata.version("torch")
    assert values["transformers"] == metadata.version("transformers")
    assert values["CUDA available"] == ("yes" if torch.cuda.is_available() else "no")
    if not torch.cuda.is_available():
        assert values["GPUs"] == "none"
    if torch.version.cuda is None:
        assert values["torch CUDA"] == "none (CPU build)" and values["NCCL"] == "none"


def test_env_json_has_the_same_keys(cli):
    result = cli("env", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report) == KEYS
    assert report["CUDA available"] is torch.cuda.is_available()
    assert report["GPUs"] == [] or all({"name", "memory_gib"} == set(g) for g in report["GPUs"])
    assert report["deepspeed"] == metadata.version("deepspeed")


def test_gpus_and_cuda_libraries_as_torch_gives_them(cli, monkeypatch):
    """A CUDA build on a node with 8 GPUs, answered by torch's own functions patched (this
    machine has none): the versions as text, identical GPUs counted on one line."""
    h100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_045_870_592)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: h100)
    values = env_lines(cli("env").stdout)
    assert [values[key] for key in ("torch CUDA", "cuDNN", "NCCL", "CUDA available")] == [
        "12.4", "90100", "2.21.5", "yes",
    ]  # fmt: skip
    assert values["GPUs"] == "8 x NVIDIA H100 80GB HBM3 (79.2 GiB)"  # 85,045,870,592 / 2**30
    report = json.loads(cli("env", "--json").stdout)
    assert report["GPUs"] == [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2}] * 8

    def broken(index):
        raise RuntimeError("CUDA driver error: unknown error")

    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    result = cli("env")
    assert result.code == 0, result.stderr
    assert (
        env_lines(result.stdout)["GPUs"]
        == "unknown (RuntimeError: CUDA driver error: unknown error)"
    )


def test_absent_or_broken_packages_are_reported_not_raised(cli, monkeypatch):
    """One package absent, one whose metadata has no Version field, one whose metadata cannot
    be parsed: each gets its own value; the others are read as usual."""
    real = metadata.version

    def version(distribution):
        if distribution == "deepspeed":
            raise metadata.PackageNotFoundError(distribution)
        if distribution == "datasets":
            return None  # importlib.metadata's answer for a METADATA file without Version
        if distribution == "accelerate":
            raise ValueError("invalid header in METADATA")
        return real(distribution)

    monkeypatch.setattr(metadata, "version", version)
    result = cli("env")
    assert result.code == 0, result.stderr
    values = env_lines(result.stdout)
    assert values["deepspeed"] == "not installed"
    assert values["datasets"] == "installed, but its metadata holds no version"
    assert values["accelerate"] == "unreadable metadata (ValueError: invalid header in METADATA)"
    assert values["transformers"] == real("transformers")
    assert json.loads(cli("env", "--json").stdout)["deepspeed"] == "not installed"


def test_no_commit_without_git(cli, monkeypatch):
    real = subprocess.run

    def run(command, *args, **kwargs):
        if command[0] == "git":
            raise FileNotFoundError(2, "No such file or directory", "git")
        return real(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    assert re.fullmatch(r"simpo \S+\n", cli("--version").stdout)
    assert "simpo commit" not in env_lines(cli("env").stdout)


def test_no_commit_from_another_projects_checkout(monkeypatch):
    """simpo installed into a venv that sits inside some other git checkout: that checkout's
    commit is not simpo's."""
    real = subprocess.run

    def run(command, *args, **kwargs):
        if command[0] == "git" and "rev-parse" in command:
            return subprocess.CompletedProcess(command, 0, stdout="/some/project\n" + "a" * 40)
        return real(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    assert environment.source_commit() is None
