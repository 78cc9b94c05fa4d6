"""What this machine runs: simpo's version and commit, Python, torch with its CUDA libraries and
GPUs, and the libraries a run uses (`simpo --version`, `simpo env`, the reproducibility record).

Library versions come from their installed metadata (importlib.metadata), never from importing
them: vllm and deepspeed take seconds to import and print while they do. torch is imported,
because only torch knows its CUDA, cuDNN and NCCL versions and the GPUs it sees. Whatever one
package's install looks like, the report still prints: a problem becomes that package's value.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from simpo_cli import __version__

DISTRIBUTION = "simpo-cli"
NOT_INSTALLED = "not installed"
# Distribution names, as importlib.metadata reads them (it takes lm_eval and lm-eval, flash_attn
# and flash-attn alike). The module names differ for two: flash_attn, lm_eval.
LIBRARIES = (
    "transformers", "accelerate", "deepspeed", "datasets", "peft", "vllm", "flash-attn",
    "bitsandbytes", "lm-eval", "wandb", "huggingface_hub", "trl",
)  # fmt: skip
GIT_TIMEOUT_S = 5  # a hung git (a network filesystem, a lock) must not hang `simpo env`
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Commit:
    """The git commit of the simpo source tree; dirty when tracked files have changes."""

    sha: str
    dirty: bool

    def __str__(self) -> str:
        return self.sha + (" (dirty)" if self.dirty else "")


def installed_version(distribution: str) -> str:
    """The version in a distribution's installed metadata, "not installed", or what is wrong
    with its metadata (never an exception: `simpo env` is what a user runs when things break)."""
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED
    except Exception as err:  # a broken dist-info folder raises whatever its parser meets
        return f"unreadable metadata ({type(err).__name__}: {err})"
    if not isinstance(version, str) or not version.strip():
        return "installed, but its metadata holds no version"
    return version


def simpo_version() -> str:
    """The installed simpo-cli's version; the package's own when it runs uninstalled (a checkout
    on PYTHONPATH)."""
    version = installed_version(DISTRIBUTION)
    return __version__ if version == NOT_INSTALLED else version


def source_commit() -> Commit | None:
    """The commit of the checkout simpo is imported from, or None: installed into
    site-packages (even in a venv inside some other repository), git missing, or git failing."""
    root = PACKAGE_DIR.parent
    found = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    if found is None or len(found.splitlines()) != 2:
        return None
    toplevel, sha = found.splitlines()
    if Path(toplevel).resolve() != root:
        return None  # the package sits inside another project's checkout, not in its own
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    return Commit(sha, dirty=bool(changes))


def _git(where: Path, *args: str) -> str | None:
    """git's stdout, stripped, or None when git is absent, fails or hangs."""
    try:
        done = subprocess.run(
            ["git", "-C", str(where), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def version_line() -> str:
    """`simpo --version`: `simpo 0.1.0`, with the commit when run from a checkout."""
    commit = source_commit()
    if commit is None:
        return f"simpo {simpo_version()}"
    return f"simpo {simpo_version()} (commit {commit.sha}{', dirty' if commit.dirty else ''})"


def environment_report() -> dict[str, Any]:
    """Every key `simpo env` prints, in its order. Versions are strings ("not installed" when
    absent); "CUDA available" is a bool and "GPUs" a list of {name, memory_gib} (or why they
    are unknown)."""
    report: dict[str, Any] = {"simpo": simpo_version()}
    commit = source_commit()
    if commit is not None:
        report["simpo commit"] = str(commit)
    report["Python"] = platform.python_version()
    report["platform"] = platform.platform()
    report.update(torch_report())
    report.update({name: installed_version(name) for name in LIBRARIES})
    return report


def torch_report() -> dict[str, Any]:
    """torch's version, the CUDA, cuDNN and NCCL it was built with ("none" when built without),
    whether CUDA is available, and the GPUs it sees."""
    version = installed_version("torch")
    report: dict[str, Any] = {
        "torch": version,
        "torch CUDA": "none",
        "cuDNN": "none",
        "NCCL": "none",
        "CUDA available": False,
        "GPUs": [],
    }
    if version == NOT_INSTALLED:
        return report
    try:
        import torch
    except Exception as err:  # a broken CUDA library fails the import: that is the report
        report["torch"] = f"{version} (import failed: {type(err).__name__}: {err})"
        return report
    report["torch CUDA"] = _ask(lambda: torch.version.cuda or _rocm(torch) or "none (CPU build)")
    report["cuDNN"] = _ask(lambda: _cudnn(torch))
    if torch.version.cuda:
        report["NCCL"] = _ask(lambda: _dotted(torch.cuda.nccl.version()))
    try:
        report["CUDA available"] = bool(torch.cuda.is_available())
        if report["CUDA available"]:
            report["GPUs"] = _gpus(torch)
    except Exception as err:  # a driver that fails to answer: say so in place of the GPUs
        report["GPUs"] = f"unknown ({type(err).__name__}: {err})"
    return report


def _ask(question: Callable[[], str]) -> str:
    """torch's answer, or "unknown" with the reason when it raises (a half-installed library)."""
    try:
        return question()
    except Exception as err:
        return f"unknown ({type(err).__name__}: {err})"


def _cudnn(torch: Any) -> str:
    return str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"


def _rocm(torch: Any) -> str:
    hip = getattr(torch.version, "hip", None)
    return f"none (ROCm {hip} build)" if hip else ""


def _dotted(version: Any) -> str:
    """NCCL's version as torch gives it, (2, 21, 5) or 22105, as text."""
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _gpus(torch: Any) -> list[dict[str, Any]]:
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return gpus


def report_text(report: dict[str, Any]) -> str:
    """The report as lines to paste into an issue: a heading, then `- key: value`."""
    lines = ["simpo environment (paste this into a bug report)"]
    for key, value in report.items():
        lines.append(f"- {key}: {_plain(key, value)}")
    return "\n".join(lines)


def _plain(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "GPUs" and isinstance(value, list):
        return _gpu_groups(value)
    return str(value)


def _gpu_groups(gpus: list[dict[str, Any]]) -> str:
    """`8 x NVIDIA H100 80GB HBM3 (79.1 GiB)`; GPUs that differ are listed one group each."""
    if not gpus:
        return "none"
    groups: dict[tuple[str, float], int] = {}
    for gpu in gpus:
        key = (gpu["name"], gpu["memory_gib"])
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{n} x {name} ({memory} GiB)" for (name, memory), n in groups.items())
