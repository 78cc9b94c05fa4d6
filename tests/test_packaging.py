"""Installs that match the use (pyproject.toml): `pip install -e .` brings what every run may
need (DeepSpeed, wandb), the `gpu` extra everything else a shipped recipe or command can ask for,
and every `pip install` a message or the README gives names an extra that exists."""

import ast
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
NARROW = sorted(set(EXTRAS) - {"gpu", "dev"})  # one feature each: vllm, lora, qlora, ...

# `pip install 'simpo-cli[lora]'`, `pip install -q -e ".[dev]"`, `pip install tiktoken`, and the
# package a hint names as the alternative: `(or peft)`.
INSTALL = re.compile(
    r"pip install\s+(?:-[\w-]+\s+)*"  # options: -e, -q, --upgrade
    r"""['"]?((?:simpo-cli|\.)\[[^\]]*\]|[A-Za-z][\w.-]*)"""  # 'simpo-cli[lora]', ".[gpu]", peft
)
ALTERNATIVE = re.compile(r"\(or ([A-Za-z][\w.-]*)\)")
EXTRA = re.compile(r"(?:simpo-cli|\.)\[([^\]]*)\]")


def name(requirement: str) -> str:
    """The distribution name of a requirement, normalized (PEP 503): `lm_eval>=0.4` -> lm-eval."""
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    return re.sub(r"[-_.]+", "-", found[0]).lower()


def names(requirements: list[str]) -> set[str]:
    return {name(requirement) for requirement in requirements}


def install_hints() -> list[tuple[str, str]]:
    """(where, text) of every string in the package and scripts that says `pip install`:
    error messages (adjacent literals are one string to the parser) and docstrings."""
    hints = []
    for path in sorted([*(ROOT / "simpo_cli").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if "pip install" in node.value:
                    hints.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.value))
    return hints


def named_packages(text: str) -> tuple[set[str], set[str]]:
    """(extras, plain packages) that a text tells the user to install."""
    extras, packages = set(), set()
    for target in INSTALL.findall(text):
        extra = EXTRA.fullmatch(target)
        if extra:
            extras |= {part.strip() for part in extra[1].split(",")}
        else:
            packages.add(name(target))
    packages |= {name(package) for package in ALTERNATIVE.findall(text)}
    return extras, packages


def test_deepspeed_and_wandb_come_with_every_install():
    plain = names(PROJECT["dependencies"])
    assert {"deepspeed", "wandb", "torch"} <= plain
    assert "deepspeed" not in EXTRAS and "wandb" not in EXTRAS
    torch = next(r for r in PROJECT["dependencies"] if name(r) == "torch")
    assert "==" not in torch, "torch stays a range: the CPU path installs its wheel first"


def test_gpu_extra_holds_every_narrow_extra():
    """`.[gpu]` is a superset of each one-feature extra, with the same version bounds."""
    assert {"vllm", "lora", "qlora", "lm-eval", "plot", "tensorboard"} <= set(NARROW)
    for extra in NARROW:
        missing = set(EXTRAS[extra]) - set(EXTRAS["gpu"])
        assert not missing, f"extra {extra}: {sorted(missing)} not in gpu (or bounds differ)"
    assert {"vllm", "peft", "bitsandbytes", "lm-eval", "tiktoken"} <= names(EXTRAS["gpu"])


def test_every_install_hint_is_satisfied_by_the_gpu_extra():
    """Every message that says `pip install ...` names an extra that exists, and after
    `pip install -e ".[gpu]"` (flash-attn aside) no such message can appear."""
    # flash-attn is the one separate step (README: its wheels must match torch and CUDA).
    on_gpu = names(PROJECT["dependencies"]) | names(EXTRAS["gpu"]) | {"flash-attn"}
    hints = install_hints()
    assert len(hints) >= 8, hints  # the scan finds the messages (peft, vllm, lm-eval, ...)
    seen = set()
    for where, text in hints:
        extras, packages = named_packages(text)
        assert extras or packages, f"{where}: a pip install the test cannot read: {text!r}"
        for extra in extras:
            assert extra in EXTRAS, f"{where}: no extra [{extra}] in pyproject.toml: {text!r}"
            packages |= names(EXTRAS[extra])
        assert packages <= on_gpu, f"{where}: {sorted(packages - on_gpu)} not in [gpu]: {text!r}"
        seen |= packages
    assert {"deepspeed", "wandb", "peft", "bitsandbytes", "vllm", "tiktoken"} <= seen


def test_readme_and_makefile_name_existing_extras():
    """`pip install ...[extra]` in the README, the Makefile and CI (wrapped lines included)."""
    found = {}
    for path in (ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run"):
        for extra in named_packages(path.read_text())[0]:
            found.setdefault(extra, path.name)
    assert "gpu" in found and "dev" in found
    unknown = {extra: where for extra, where in found.items() if extra not in EXTRAS}
    assert not unknown, f"extras that pyproject.toml does not define: {unknown}"
