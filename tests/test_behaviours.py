"""Behaviours of the CLI that the other test files leave out: --overwrite and the refusal to
resume another recipe's stage, the reference cache's invalidation, `simpo eval --beta/--gamma`,
`simpo data inspect`, the "previous stage not finished" error, --mixed-precision and the
multi-machine flags on their way to the children, and the GPU-count pre-flight check.

Most tests run the real CLI entry point (`simpo_cli.cli.main`) in this process, on tiny runs
(a few pairs, one or two steps), so the suite pays for importing torch once; the simulated
two-machine launch runs the real processes.
"""

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from simpo_cli import launch
from simpo_cli.recipe import RECIPES_DIR, load_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_DATA = RECIPES_DIR / "tiny" / "data"

# A SimPO stage alone, two optimizer steps of 8 pairs, a checkpoint after each step. beta and
# gamma differ from the defaults so that `simpo eval` shows where its numbers come from.
RUN_SETS = [
    "pipeline=[preference]",
    "preference.beta=2.5",
    "preference.gamma_beta_ratio=0.4",  # gamma 1.0
    "preference.data.train.max_rows=16",
    "preference.data.eval=null",
    "preference.training.max_steps=2",
    "preference.training.per_device_train_batch_size=8",
    "preference.training.total_batch_size=null",
    "preference.training.logging_steps=1",
    "preference.training.save_steps=1",
]


def as_args(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


RUN_ARGS = as_args(RUN_SETS)
# Batch totals the tiny recipe states for 1 or 2 processes; other layouts drop them.
NO_TOTAL = ["sft.training.total_batch_size=null", "preference.training.total_batch_size=null"]


@pytest.fixture
def launched(monkeypatch) -> list[list[str]]:
    """The accelerate commands `simpo` hands to launch.run, which starts nothing here."""
    commands: list[list[str]] = []
    monkeypatch.setattr(launch, "run", lambda command: commands.append(command) or 0)
    return commands


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def plan(stdout: str) -> tuple[dict, list[str] | None]:
    """A --dry-run's resolved recipe, and its accelerate command (None: runs in place)."""
    recipe_text, rest = stdout.split("\n\nlaunch:\n", 1)
    commands = [line.strip() for line in rest.splitlines() if "accelerate launch" in line]
    assert len(commands) == (0 if "runs in this process (no launcher)" in rest else 1), rest
    return yaml.safe_load(recipe_text), shlex.split(commands[0]) if commands else None


def accelerate_args(command: list[str]):
    """The command as the launcher reads it: accelerate's own parser, as launch.run uses it."""
    from accelerate.commands.launch import launch_command_parser

    assert command[:2] == ["accelerate", "launch"]
    return launch_command_parser().parse_args(command[2:])


def set_values(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """An output folder holding a finished preference stage (RUN_SETS); copy it to change it."""
    from simpo_cli.run.pipeline import run_stage

    out = tmp_path_factory.mktemp("finished") / "out"
    run_stage(load_recipe("tiny", RUN_SETS), "preference", out)
    return out


# --------------------------------------------------------------------------- --overwrite


def test_overwrite_reruns_a_finished_stage_from_scratch(cli, finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    stage = out / "preference"
    (stage / "left_by_the_old_run.txt").write_text("old")
    (out / "notes.txt").write_text("mine")
    (out / "other").mkdir()
    (out / "other" / "keep.txt").write_text("mine too")
    lines_before = len(metrics(stage))

    result = cli("preference", "tiny", "-o", out, *RUN_ARGS, "--overwrite")
    assert result.code == 0, result.stderr[-3000:]
    assert "already finished" not in result.stdout, "--overwrite skipped the finished stage"
    assert not (stage / "left_by_the_old_run.txt").exists(), "the old stage folder was kept"
    assert (stage / "stage_complete.json").is_file()
    # A fresh metrics.jsonl: the old run's lines are not kept in front of the new ones.
    assert len(metrics(stage)) == lines_before
    assert snapshot(out / "other") == {"keep.txt": b"mine too"}, "a folder beside it was lost"
    assert (out / "notes.txt").is_file(), "a file outside the stage folder was lost"


def test_an_unfinished_stage_of_another_recipe_is_refused_until_overwrite(
    cli, finished_run, tmp_path
):
    """A stopped run (checkpoints, no stage_complete.json) made with beta 2.5: a command with
    beta 3 must neither resume it nor touch it; with --overwrite it starts over with beta 3."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    stage = out / "preference"
    (stage / "stage_complete.json").unlink()
    (stage / "model.safetensors").unlink()
    assert (stage / "checkpoint-2" / "trainer_state.json").is_file()
    (stage / "left_by_the_old_run.txt").write_text("old")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)

    beta3 = [*RUN_ARGS, "--set", "preference.beta=3"]
    result = cli("preference", "tiny", "-o", out, *beta3)
    assert result.code == 2, result.stdout[-2000:]
    assert "Traceback" not in result.stderr
    assert result.errors() == [
        f"error: {stage}: holds a run of the 'preference' stage made with a different recipe "
        "(preference.beta: 2.5 -> 3.0); pass --overwrite to start it over, or choose another "
        "--output-dir"
    ]
    assert snapshot(out) == before, "the refused folder was changed"

    result = cli("preference", "tiny", "-o", out, *beta3, "--overwrite")
    assert result.code == 0, result.stderr[-3000:]
    assert not (stage / "left_by_the_old_run.txt").exists()
    assert yaml.safe_load((stage / "resolved_recipe.yaml").read_text())["preference"]["beta"] == 3
    # The new run trains with beta 3: SimPO's logged reward is beta x the average log-prob.
    steps = [m for m in metrics(stage) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["rewards/chosen"] == pytest.approx(3 * m["logps/chosen"], rel=1e-5)
    assert (out / "notes.txt").is_file(), "a file outside the stage folder was lost"


# --------------------------------------------------------------------------- previous stage


def test_a_stage_whose_previous_stage_is_not_finished_is_one_line_exit_2(cli, tmp_path):
    out = tmp_path / "fresh"
    small = as_args(
        ["preference.data.train.max_rows=8", "preference.data.eval=null",
         "preference.training.max_steps=1", "preference.training.total_batch_size=8",
         "preference.training.warmup_ratio=0"]
    )  # fmt: skip
    expected = (
        f"error: stage 'preference' starts from the 'sft' stage's model, which is not finished "
        f"in {out / 'sft'}; run `simpo train` (all stages) or `simpo sft` first"
    )
    result = cli("preference", "tiny", "-o", out, *small)
    assert result.code == 2, result.stdout[-2000:]
    assert result.errors() == [expected]
    assert not (out / "preference").exists()

    # A stopped SFT run (a checkpoint, no stage_complete.json) is not finished either.
    (out / "sft" / "checkpoint-1").mkdir(parents=True)
    (out / "sft" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    result = cli("preference", "tiny", "-o", out, *small)
    assert result.code == 2, result.stdout[-2000:]
    assert result.errors() == [expected]
    assert not (out / "preference").exists()


# --------------------------------------------------------------------------- reference cache

DPO_SETS = [
    "pipeline=[preference]",
    "preference.loss=dpo",
    "preference.gamma_beta_ratio=null",
    "preference.sft_weight=null",
    "preference.data.eval=null",
    "preference.training.max_steps=1",
    "preference.training.warmup_ratio=0",  # a step at learning rate 0 is refused
    # One step over all 8 pairs: every cached log-prob enters the first loss.
    "preference.training.per_device_train_batch_size=8",
    "preference.training.total_batch_size=null",
    "preference.training.logging_steps=1",
]


def test_reference_logps_are_recomputed_when_model_template_or_data_change(tmp_path):
    """Each run changes one thing from the first (model seed, a start folder, that folder's
    weights rewritten in place, the chat template, one data row) and must compute a new cache
    file; the unchanged run reuses the old one. Whether computed or reused, the cached
    reference must be the policy's starting model on these pairs, so the first DPO loss is
    exactly log 2; log-probs reused from another model, template or data would move it."""
    from simpo_cli.model.load import load_model
    from simpo_cli.run.pipeline import run_stage

    rows = (TINY_DATA / "pref_train.jsonl").read_text().splitlines()[:8]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cache = out / "reference_logps"

    def run(*extra: str) -> dict[str, int]:
        recipe = load_recipe("tiny", [*DPO_SETS, f"preference.data.train={pairs}", *extra])
        stage_dir = run_stage(recipe, "preference", out, overwrite=True)
        first = next(m for m in metrics(stage_dir) if "loss" in m)
        assert first["loss"] == pytest.approx(math.log(2), rel=1e-6), extra
        return {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}

    seen = run()
    assert len(seen) == 1
    assert run() == seen, "the unchanged run did not reuse its cached log-probs"

    def changed(what: str, *extra: str) -> None:
        nonlocal seen
        files = run(*extra)
        assert len(files) == len(seen) + 1 and seen.items() <= files.items(), what
        seen = files

    changed("from_config seed", "preference.training.seed=7")

    folder = tmp_path / "start"
    tiny = load_recipe("tiny")
    load_model(tiny, None, 123).save_pretrained(folder)
    from_folder = ["model.init=pretrained", "model.config=null", f"model.name_or_path={folder}"]
    changed("a start folder", *from_folder)
    load_model(tiny, None, 124).save_pretrained(folder)  # same path, same sizes, new weights
    changed("the folder's weights rewritten", *from_folder)

    template = (RECIPES_DIR / "tiny" / "tokenizer" / "chat_template.jinja").read_text()
    assert template.count("<|end_header_id|>\\n\\n") == 2
    other = tmp_path / "template.jinja"
    other.write_text(template.replace("<|end_header_id|>\\n\\n", "<|end_header_id|>\\n"))
    changed("the chat template", f"model.chat_template={other}")

    first = json.loads(rows[0])
    first["rejected"][-1]["content"] += " 1"
    pairs.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    changed("a data row")


# --------------------------------------------------------------------------- simpo eval


@pytest.mark.parametrize(
    ("flags", "beta", "gamma"),
    [([], 2.5, 1.0), (["--beta", "3", "--gamma", "0.7"], 3.0, 0.7)],
    ids=["stage-settings", "flags"],
)
def test_eval_summary_under_beta_and_gamma(cli, finished_run, tmp_path, flags, beta, gamma):
    """The summary against the per-pair average log-probs of the same output: rewards are
    beta x average log-prob, margin = chosen - rejected reward, accuracy = share of margins
    > 0 (gamma not subtracted), loss = mean -log sigmoid(margin - gamma). Without flags beta
    and gamma are the stage's (2.5 and 0.4 x 2.5); the flags replace them."""
    rows = (TINY_DATA / "pref_eval.jsonl").read_text().splitlines()[:12]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    scores = tmp_path / "scores.json"
    model = finished_run / "preference"
    result = cli("eval", model, "--pairs", pairs, "--pairs-output", scores, *flags)
    assert result.code == 0, result.stderr[-3000:]
    output = json.loads(scores.read_text())
    summary = output["summary"]
    assert summary["pairs"] == 12 and len(output["pairs"]) == 12
    assert (summary["beta"], summary["gamma"]) == pytest.approx((beta, gamma))

    margins = [beta * (p["chosen_logps"] - p["rejected_logps"]) for p in output["pairs"]]
    assert 0 < sum(m > 0 for m in margins) < 12, "a degenerate model tells nothing"
    assert summary["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 12)
    assert summary["reward_margin"] == pytest.approx(sum(margins) / 12, rel=1e-9)
    # -log sigmoid(x) = log(1 + exp(-x))
    loss = sum(math.log1p(math.exp(-(m - gamma))) for m in margins) / 12
    assert summary["loss"] == pytest.approx(loss, rel=1e-9)


# --------------------------------------------------------------------------- simpo data inspect

# Row 3 of each training file (checked against the data below), rendered by the tiny template:
# every header, the prompt and the generation prompt masked; the reply and its <|eot_id|>
# trained. ↵ marks each newline.
PREFERENCE_ROW_3 = {
    "chosen": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>↵\n↵\n"
    "Sort: 2 5 7 9 0 4<|eot_id|><|start_header_id|>assistant<|end_header_id|>↵\n↵\n"
    "⟦0 2 4 5 7 9<|eot_id|>⟧",
    "rejected": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>↵\n↵\n"
    "Sort: 2 5 7 9 0 4<|eot_id|><|start_header_id|>assistant<|end_header_id|>↵\n↵\n"
    "⟦2 5 7 9 0 4<|eot_id|>⟧",
}
SFT_ROW_3 = {
    "example": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>↵\n↵\n"
    "You sort digits.<|eot_id|><|start_header_id|>user<|end_header_id|>↵\n↵\n"
    "Sort: 1 3 0<|eot_id|><|start_header_id|>assistant<|end_header_id|>↵\n↵\n"
    "⟦0 1 3<|eot_id|>⟧",
}


def _sections(stdout: str) -> dict[str, tuple[str, str]]:
    """{side: (counts line, token display)} from `simpo data inspect` output."""
    parts = stdout.rstrip("\n").split("\n--- ")[1:]
    sections = {}
    for part in parts:
        header, shown = part.split("\n", 1)
        side, counts = header.split(": ", 1)
        sections[side] = (counts, shown)
    return sections


@pytest.mark.parametrize(
    ("stage", "expected", "replies"),
    [
        ("preference", PREFERENCE_ROW_3, {"chosen": "0 2 4 5 7 9", "rejected": "2 5 7 9 0 4"}),
        ("sft", SFT_ROW_3, {"example": "0 1 3"}),
    ],
)
def test_data_inspect_marks_exactly_the_reply(cli, tok, stage, expected, replies):
    row = json.loads(
        (TINY_DATA / f"{'pref' if stage == 'preference' else 'sft'}_train.jsonl")
        .read_text()
        .splitlines()[3]
    )
    for side, reply in replies.items():  # the expectations above are this row's
        assert (row["messages"] if side == "example" else row[side])[-1]["content"] == reply

    result = cli("data", "inspect", "tiny", "--stage", stage, "--row", "3", "--no-color")
    assert result.code == 0, result.stderr[-2000:]
    header = result.stdout.splitlines()[0]
    assert header.startswith(f"{stage}.data.train: ") and "row 3 " in header
    sections = _sections(result.stdout)
    assert set(sections) == set(expected)
    for side, text in expected.items():
        counts, shown = sections[side]
        assert shown == text, side
        # Counts worked out independently: the trained tokens are the reply's and <|eot_id|>.
        plain = text.replace("↵\n", "\n").replace("⟦", "").replace("⟧", "")
        total = len(tok(plain, add_special_tokens=False).input_ids)
        trained = len(tok(replies[side] + "<|eot_id|>", add_special_tokens=False).input_ids)
        assert counts == (
            f"{total} tokens, {trained} trained, {total - trained} masked; BOS count 1; "
            "ends with EOS: yes"
        )


@pytest.mark.parametrize(("stage", "rows"), [("preference", 1500), ("sft", 3000)])
def test_data_inspect_row_out_of_range_is_one_line_exit_2(cli, stage, rows):
    result = cli("data", "inspect", "tiny", "--stage", stage, "--row", rows, "--no-color")
    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: --row {rows}: {stage}.data.train has {rows} rows; choose 0..{rows - 1}\n"
    )


# --------------------------------------------------------------------------- --mixed-precision


@pytest.mark.parametrize(
    ("flag", "recipe_sets", "bf16", "fp16"),
    [
        ("fp16", [], False, True),
        # `no` wins over a recipe that asks for bf16.
        ("no", ["sft.training.bf16=true", "preference.training.bf16=true"], False, False),
    ],
)
def test_mixed_precision_reaches_every_stage_and_the_children(
    cli, monkeypatch, tmp_path, flag, recipe_sets, bf16, fp16
):
    from simpo_cli.train.trainer import training_arguments

    out = tmp_path / "out"
    args = ["train", "tiny", "-o", out, "--mixed-precision", flag, *as_args(recipe_sets)]

    def precisions(recipe: dict) -> dict:
        return {s: (recipe[s]["training"]["bf16"], recipe[s]["training"]["fp16"]) for s in
                ("sft", "preference")}  # fmt: skip

    every = {"sft": (bf16, fp16), "preference": (bf16, fp16)}

    # One process: the stages run here, from this recipe.
    result = cli(*args, "--dry-run")
    assert result.code == 0, result.stderr
    recipe, command = plan(result.stdout)
    assert command is None and precisions(recipe) == every

    # Two processes: the launcher's precision, and what each child makes of its arguments.
    result = cli(*args, "--dry-run", "--num-processes", "2")
    assert result.code == 0, result.stderr
    recipe, command = plan(result.stdout)
    assert precisions(recipe) == every
    parsed = accelerate_args(command)
    assert parsed.mixed_precision == flag
    child = parsed.training_script_args
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")
    result = cli(*child, "--dry-run")
    assert result.code == 0, result.stderr
    child_recipe, child_command = plan(result.stdout)
    assert child_command is None, "a child launched again"
    assert precisions(child_recipe) == every
    # ...and the Trainer of each stage gets it.
    loaded = load_recipe(child[1], set_values(child))
    for stage in ("sft", "preference"):
        training = training_arguments(loaded, stage, tmp_path, eval_on_start=False)
        assert (training.bf16, training.fp16) == (bf16, fp16), stage


# --------------------------------------------------------------------------- several machines


def test_machine_flags_reach_the_launcher_and_the_children(cli, launched, monkeypatch, tmp_path):
    """On machine 1 of 2: the launcher gets the machine's rank and machine 0's address; the
    children get every launch setting but the rank (one command line for all machines) and
    re-parse it into the recipe the launcher planned, so they expect 2 processes in all."""
    out = tmp_path / "out"
    port = launch.free_port()
    flags = ["--num-processes", "1", "--num-machines", "2", "--machine-rank", "1",
             "--main-process-ip", "10.0.0.7", "--main-process-port", str(port)]  # fmt: skip
    result = cli("train", "tiny", "-o", out, *flags)
    assert result.code == 0, result.stderr[-2000:]
    (command,) = launched
    parsed = accelerate_args(command)
    assert (parsed.num_processes, parsed.num_machines, parsed.machine_rank) == (2, 2, 1)
    assert (parsed.main_process_ip, parsed.main_process_port) == ("10.0.0.7", port)
    assert parsed.rdzv_backend == "static"
    assert parsed.module and parsed.training_script == "simpo_cli"
    child = parsed.training_script_args
    assert child[:4] == ["train", "tiny", "--output-dir", str(out)]
    launch_sets = [s for s in set_values(child) if s.startswith("launch.")]
    assert sorted(launch_sets) == sorted(
        ["launch.num_processes=1", "launch.num_machines=2", "launch.main_process_ip=10.0.0.7",
         f"launch.main_process_port={port}"]
    )  # fmt: skip

    result = cli("train", "tiny", "-o", out, *flags, "--dry-run")
    assert result.code == 0, result.stderr
    planned, _ = plan(result.stdout)
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")
    result = cli(*child, "--dry-run")
    assert result.code == 0, result.stderr
    assert "1 process(es) per machine x 2 machine(s) = 2" in result.stdout
    recipe, child_command = plan(result.stdout)
    assert child_command is None, "a child launched again"
    assert recipe["launch"] == {**planned["launch"], "machine_rank": 0}
    recipe.pop("launch"), planned.pop("launch")
    assert recipe == planned


@pytest.mark.slow
def test_two_machines_on_localhost_train_one_stage_together(tmp_path):
    """Machine 0 and machine 1 simulated on this host (1 CPU process each, static rendezvous on
    127.0.0.1): the two launches form one 2-process run that writes one finished stage."""
    out = tmp_path / "out"
    port = launch.free_port()
    sets = [
        "pipeline=[preference]", "preference.data.train.max_rows=16", "preference.data.eval=null",
        "preference.training.max_steps=1", "preference.training.warmup_ratio=0",
        "preference.training.per_device_train_batch_size=4",
        "preference.training.total_batch_size=null", "preference.training.logging_steps=1",
    ]  # fmt: skip
    machines = []
    for rank in (0, 1):
        command = [
            sys.executable, "-m", "simpo_cli", "preference", "tiny", "-o", str(out),
            "--num-processes", "1", "--num-machines", "2", "--machine-rank", str(rank),
            "--main-process-ip", "127.0.0.1", "--main-process-port", str(port), *as_args(sets),
        ]  # fmt: skip
        machines.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            )
        )
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=240))
    except subprocess.TimeoutExpired:
        # Where each process waits: PYTHONFAULTHANDLER prints every thread's stack on SIGABRT.
        hung = [psutil.Process(m.pid) for m in machines if m.poll() is None]
        hung += [child for front in list(hung) for child in front.children(recursive=True)]
        for process in hung:
            process.send_signal(signal.SIGABRT)
        psutil.wait_procs(hung, timeout=10)
        for process in hung:
            if process.is_running():
                process.kill()
        said = [machine.communicate() for machine in machines[len(outputs) :]]
        stacks = [
            "\n".join(line for line in err.splitlines() if not line.startswith("Extension modules"))
            for _, err in outputs + said
        ]
        tails = [
            f"machine {rank}:\n{out[-1500:]}\n{stack[-8000:]}"
            for rank, ((out, _), stack) in enumerate(zip(outputs + said, stacks, strict=True))
        ]
        pytest.fail("the two machines did not finish within 240 s\n" + "\n".join(tails))
    finally:
        for machine in machines:
            if machine.poll() is None:
                os.killpg(machine.pid, signal.SIGKILL)
                machine.wait()
    for rank, (machine, (stdout, stderr)) in enumerate(zip(machines, outputs, strict=True)):
        assert machine.returncode == 0, (rank, stderr[-3000:])
        assert f"--num_machines 2 --machine_rank {rank} " in stdout
    stage = out / "preference"
    assert json.loads((stage / "reproducibility.json").read_text())["world_size"] == 2
    assert (stage / "stage_complete.json").is_file()
    steps = [m["step"] for m in metrics(stage) if "loss" in m]
    assert steps == [1], "each step logged once, by the global rank 0"


# --------------------------------------------------------------------------- GPU pre-flight


def test_more_processes_than_the_gpus_torch_reports_is_one_line_exit_2(
    cli, launched, monkeypatch, tmp_path
):
    """The GPU count comes from torch, here made to report 2 GPUs: 4 processes are refused
    before anything starts, 2 are launched on the GPUs; with no GPU, 4 run on the CPU."""
    import torch

    args = ["train", "tiny", "-o", tmp_path / "out", "--main-process-port", launch.free_port()]
    args += as_args(NO_TOTAL)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    result = cli(*args, "--num-processes", "4")
    assert result.code == 2
    assert result.errors() == [
        "error: launch.num_processes: 4 processes but this machine has 2 GPU(s); pass "
        "--num-processes 2 (one process per GPU)"
    ]
    assert launched == [], "launched despite the check"

    result = cli(*args, "--num-processes", "2")
    assert result.code == 0, result.stderr
    assert len(launched) == 1 and accelerate_args(launched[0]).num_processes == 2
    assert "no GPU here" not in result.stdout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = cli(*args, "--num-processes", "4")
    assert result.code == 0, result.stderr
    assert len(launched) == 2 and accelerate_args(launched[1]).num_processes == 4
    assert "no GPU here: running 4 processes on the CPU" in result.stdout
