"""Fixtures shared by the data tests: the shipped tiny tokenizer, loaded as the CLI loads it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, in the worker and in the runs
    # it starts (torch would otherwise take a thread per core in each, four on two cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from simpo_cli.data import load_tokenizer  # noqa: E402
from simpo_cli.recipe import RECIPES_DIR, ModelSettings  # noqa: E402

TINY_TOKENIZER = RECIPES_DIR / "tiny" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    """The shipped tiny tokenizer as the CLI loads it (never mutated: see `fresh_tok`)."""
    return load_tokenizer(ModelSettings(name_or_path=str(TINY_TOKENIZER)))


@pytest.fixture
def fresh_tok():
    """A private copy for tests that change the chat template."""
    return load_tokenizer(ModelSettings(name_or_path=str(TINY_TOKENIZER)))


def save_tiny_model(folder):
    """The tiny recipe's seeded model and its tokenizer, saved as a checkpoint folder."""
    from simpo_cli.model.load import load_model
    from simpo_cli.recipe import load_recipe

    recipe = load_recipe("tiny")
    load_model(recipe, None, 42).save_pretrained(folder)
    load_tokenizer(recipe.model).save_pretrained(folder)
    return folder


def simpo_executable() -> str:
    """The installed `simpo` command (the entry point a user or a job runs), beside this Python;
    SIMPO overrides it."""
    from pathlib import Path

    return os.environ.get("SIMPO") or str(Path(sys.executable).parent / "simpo")


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """The tiny recipe's seeded model, saved as a folder (a module's runs all start from it)."""
    return save_tiny_model(tmp_path_factory.mktemp("start") / "model")


def count_sampled_prompts(monkeypatch) -> list[str]:
    """The prompt ids the transformers sampler is asked for from now on, in order: what tells a
    resume (only what is missing is sampled) from a restart that writes the same files."""
    from simpo_cli.onpolicy.sampling import TransformersBackend

    asked: list[str] = []
    draw = TransformersBackend.generate

    def generate(self, requests, settings):
        asked.extend(request.prompt_id for request in requests)
        return draw(self, requests, settings)

    monkeypatch.setattr(TransformersBackend, "generate", generate)
    return asked


# The signals a training command takes over (simpo_cli.faults).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def errors(self) -> list[str]:
        """The `error: ` lines (stderr may also hold progress bars and library warnings)."""
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `simpo ARGS...` through the real entry point (argument parsing, the error-to-exit-code
    mapping) in this process; never as a launched child unless a test says so."""
    from simpo_cli import launch
    from simpo_cli.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)

    def run(*args) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["simpo", *map(str, args)])
        code = run_main(main)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def run_main(main) -> int:
    """Call the CLI's main() as the command would and return its exit code. A training command
    takes over the stop signals (checkpoint, then exit): they are given back after, so that
    Ctrl-C still stops pytest."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        main()
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
