"""The on-policy stages end to end: generate and annotate in a recipe's pipeline, through the real
CLI (`simpo train`, `simpo generate`, `simpo annotate`), the tiny-onpolicy recipe, a reward model
built from a config and loaded through the real loading path, 2 processes, and the one-line
errors of what a user can get wrong."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import count_sampled_prompts

from simpo_cli.errors import RecipeError
from simpo_cli.launch import free_port
from simpo_cli.recipe import RECIPES_DIR, load_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A small tiny-onpolicy: a short SFT, 40 prompts x 4 samples, 12 held out, a few SimPO steps.
SMALL = [
    "--set", "sft.data.train.max_rows=640",
    "--set", "generate.prompts.max_rows=40",
    "--set", "generate.eval_prompts.max_rows=12",
    "--set", "generate.num_samples=4",
    "--set", "generate.max_new_tokens=16",
]  # fmt: skip
SCHEMA = [
    "prompt_id", "prompt", "chosen", "rejected", "all_generated_responses", "all_rm_scores",
    "score_chosen", "score_rejected", "chosen_index", "rejected_index", "finish_reasons",
    "response_tokens", "seeds",
]  # fmt: skip


def simpo(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *args], capture_output=True, text=True, **kwargs
    )


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


@pytest.fixture(scope="module")
def onpolicy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("onpolicy") / "run"
    result = simpo("train", "tiny-onpolicy", "-o", str(out), *SMALL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_pipeline_runs_every_stage_in_order(onpolicy_run):
    out, stdout = onpolicy_run
    for stage in ("sft", "generate", "annotate", "preference"):
        assert (out / stage / "stage_complete.json").is_file(), stage
    order = [stdout.index(f"[{stage}] finished") for stage in ("sft", "generate", "annotate")]
    assert order == sorted(order) and order[-1] < stdout.index("[preference] finished")
    # generate sampled from the SFT stage's model; preference started from it too
    assert f"[generate] samples from: {out / 'sft'}" in stdout
    assert f"[preference] start model: {out / 'sft'}" in stdout


def test_generate_writes_every_sample_of_every_prompt(onpolicy_run):
    out, _ = onpolicy_run
    train = jsonl(out / "generate" / "samples" / "train.jsonl")
    source = jsonl(RECIPES_DIR / "tiny" / "data" / "pref_train.jsonl")[:40]
    wanted = list(dict.fromkeys(row["prompt_id"] for row in source))  # deduplicated, in order
    assert [r["prompt_id"] for r in train] == wanted
    for record in train:
        assert [s["seed"] for s in record["samples"]] == [0, 1, 2, 3]
        for sample in record["samples"]:
            assert sample["finish_reason"] in ("stop", "length")
            assert 1 <= sample["tokens"] <= 16
    assert len(jsonl(out / "generate" / "samples" / "test.jsonl")) == 12


def test_annotate_writes_the_published_schema_scored_by_the_recipe_function(onpolicy_run):
    import datasets

    out, stdout = onpolicy_run
    folder = out / "annotate" / "dataset"
    loaded = datasets.load_from_disk(str(folder))
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].column_names == SCHEMA
    rows = jsonl(folder / "train.jsonl")
    assert len(rows) == loaded["train"].num_rows > 0
    sys.path.insert(0, str(RECIPES_DIR / "tiny-onpolicy"))
    try:
        from reward import sorted_digits
    finally:
        sys.path.pop(0)
    samples = {r["prompt_id"]: r for r in jsonl(out / "generate" / "samples" / "train.jsonl")}
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        texts = [s["text"] for s in samples[row["prompt_id"]]["samples"]]
        assert row["all_generated_responses"] == texts
        assert row["all_rm_scores"] == [sorted_digits(prompt, t) for t in texts]
        assert row["chosen"] == prompt + [
            {"role": "assistant", "content": texts[row["chosen_index"]]}
        ]
        # replies cut at max_new_tokens (drop_truncated) and empty ones are left out of the
        # selection
        usable = [
            score
            for score, reason, text in zip(
                row["all_rm_scores"], row["finish_reasons"], texts, strict=True
            )
            if reason == "stop" and text.strip()
        ]
        assert row["score_chosen"] == max(usable) > row["score_rejected"] == min(usable)
    report = json.loads((folder / "report.json").read_text())
    assert report["prompts"] == 40 and report["pairs"] == len(rows)
    assert sum(report["dropped"].values()) + report["pairs"] == 40
    assert "chosen longer than rejected" in stdout
    # The preference stage (and evaluate) read the folder after: it holds what annotate wrote.
    assert not list(folder.rglob("cache-*")), "a later stage wrote cache files into the dataset"


def test_preference_trains_on_the_annotate_pairs_and_prints_the_greedy_check(onpolicy_run):
    import yaml

    out, stdout = onpolicy_run
    resolved = yaml.safe_load((out / "preference" / "resolved_recipe.yaml").read_text())
    dataset = str((out / "annotate" / "dataset").resolve())
    assert resolved["preference"]["data"]["train"] == {"path": dataset, "split": "train"}
    assert resolved["preference"]["data"]["eval"]["split"] == "test"
    assert "annotate stage" in stdout  # the settings table says where the data came from
    before = json.loads((out / "preference" / "greedy_before.json").read_text())
    after = json.loads((out / "preference" / "stage_complete.json").read_text())["greedy_eval"]
    assert before["prompts"] == after["prompts"] == 12
    for numbers in (before, after):
        assert 0.0 <= numbers["success"] <= numbers["mean_reward"] <= 1.0
    assert "held-out prompts, greedy" in stdout and "success rate" in stdout


def test_rerun_skips_and_a_changed_reward_is_refused(onpolicy_run, tmp_path):
    out, _ = onpolicy_run
    again = simpo("train", "tiny-onpolicy", "-o", str(out), *SMALL)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[generate] already finished" in again.stdout
    assert "[annotate] already finished" in again.stdout
    other = simpo(
        "annotate", "tiny-onpolicy", "-o", str(out), *SMALL, "--set", "annotate.min_margin=0.5"
    )
    assert other.returncode == 2
    assert (
        "holds a run of the 'annotate' stage made with a different recipe (annotate.min_margin: "
        in other.stderr
    )


def test_two_processes_give_the_same_samples_and_pairs(onpolicy_run, tmp_path):
    """generate and annotate split over 2 processes: no prompt lost or duplicated, and the same
    samples and pairs as one process (each sample depends on its prompt and seed only)."""
    out, _ = onpolicy_run
    two = tmp_path / "two"
    two.mkdir()
    shutil.copytree(out / "sft", two / "sft")
    result = simpo(
        "train", "tiny-onpolicy", "-o", str(two), *SMALL,
        "--set", "pipeline=[sft, generate, annotate]", "--num-processes", "2",
        "--main-process-port", str(free_port()),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    shards = sorted(p.name for p in (two / "generate" / "samples" / "train").glob("*.jsonl"))
    assert shards == ["samples-rank0.jsonl", "samples-rank1.jsonl"]
    for name in ("generate/samples/train.jsonl", "generate/samples/test.jsonl"):
        assert jsonl(two / name) == jsonl(out / name), name
    for name in ("train.jsonl", "test.jsonl"):
        assert jsonl(two / "annotate" / "dataset" / name) == jsonl(
            out / "annotate" / "dataset" / name
        )


def test_generate_resumes_after_a_kill(onpolicy_run, tmp_path, cli, monkeypatch):
    """kill -9 in the middle of `simpo generate`, then SIGTERM in the middle of the same command,
    then the same command again: it samples only the prompts not written yet, and ends with the
    same samples as the uninterrupted run, every prompt once."""
    import signal
    import time

    out, _ = onpolicy_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(out / "sft", run / "sft")
    command = [sys.executable, "-m", "simpo_cli", "generate", "tiny-onpolicy", "-o", str(run)]
    process = subprocess.Popen(
        [*command, *SMALL], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shard = run / "generate" / "samples" / "train" / "samples-rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not shard.is_file() or len(jsonl(shard)) < 10):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 10 <= len(jsonl(shard)) < 41, "the kill landed outside generation"

    # SIGTERM (a scheduler's stop): the prompt in hand is finished, exit 75, samples kept.
    process = subprocess.Popen(
        [*command, *SMALL], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    done = len(jsonl(shard))
    while time.time() < deadline and len(jsonl(shard)) < done + 5:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr[-2000:]
    assert "[generate] stopped by SIGTERM; the samples written so far are kept" in stderr
    assert done + 5 <= len(jsonl(shard)) < 41

    # The last run in this process, its sampling counted: sampling every prompt again would
    # give the same files (each sample is seeded by its prompt), so only the count tells a
    # resume from a restart.
    written = {record["prompt_id"] for record in jsonl(shard)[1:]}  # [0]: the settings header
    asked = count_sampled_prompts(monkeypatch)
    result = cli("generate", "tiny-onpolicy", "-o", str(run), *SMALL)
    assert result.code == 0, result.stderr[-2000:]
    expected = [
        record["prompt_id"]
        for split in ("train", "test")  # test: the held-out prompts, not started before
        for record in jsonl(out / "generate" / "samples" / f"{split}.jsonl")
        if record["prompt_id"] not in written
        for _ in range(4)  # generate.num_samples
    ]
    assert asked == expected
    for split in ("train", "test"):
        name = f"generate/samples/{split}.jsonl"
        assert jsonl(run / name) == jsonl(out / name)


def test_annotate_stops_on_a_signal_and_scores_everything_again(
    onpolicy_run, tmp_path, cli, monkeypatch
):
    """SIGTERM while `simpo annotate` scores: it stops after the batch in hand with exit 75 and
    writes nothing; the same command then scores every sample again (none of the stopped run's
    scores is kept), replaces what an unfinished attempt left in annotate/dataset/, and writes
    the pairs of an uninterrupted run."""
    import signal

    from simpo_cli.onpolicy.rewards import FunctionScorer
    from simpo_cli.stops import REQUEST

    out, _ = onpolicy_run
    scored: list[int] = []  # items per call of the reward function's scorer
    stop = True  # the first run is stopped
    score = FunctionScorer.__call__

    def scoring(self, items):
        scored.append(len(items))
        if stop and len(scored) == 1:
            # The signal, sent to this process as a scheduler would: the handler of
            # `simpo annotate` turns it into a stop request.
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGTERM)
        return score(self, items)

    monkeypatch.setattr(FunctionScorer, "__call__", scoring)
    # This process's stop state, as a new process has it; put back after.
    monkeypatch.setattr(REQUEST, "signal", 0)
    monkeypatch.setattr(REQUEST, "interrupts", 0)
    run = tmp_path / "run"
    result = _annotate_again(out, run, cli=cli)
    assert result.code == 75, result.stderr[-2000:]
    assert (
        "[annotate] stopped by SIGTERM; scoring starts over on the next run (nothing was "
        "written); run the same command again to go on"
    ) in result.stderr
    assert scored == [64]  # the first batch (the reward function's batch_size), then the stop
    assert not (run / "annotate" / "dataset").exists()
    assert not (run / "annotate" / "stage_complete.json").exists()

    stop = False
    scored.clear()
    REQUEST.signal = REQUEST.interrupts = 0  # a new process's
    leftover = run / "annotate" / "dataset" / "train" / "leftover.arrow"  # a killed attempt's
    leftover.parent.mkdir(parents=True)
    leftover.write_text("torn")
    again = ["--set", "annotate.greedy_eval=false"]  # as _annotate_again
    result = cli("annotate", "tiny-onpolicy", "-o", str(run), *SMALL, *again)
    assert result.code == 0, result.stderr[-2000:]
    samples = sum(
        len(record["samples"])
        for split in ("train", "test")
        for record in jsonl(out / "generate" / "samples" / f"{split}.jsonl")
    )
    assert sum(scored) == samples == 40 * 4 + 12 * 4
    assert not leftover.exists()
    for name in ("train.jsonl", "test.jsonl"):
        assert jsonl(run / "annotate" / "dataset" / name) == jsonl(
            out / "annotate" / "dataset" / name
        )


# --------------------------------------------------------------------------- reward models


def _annotate_again(out: Path, run: Path, *sets: str, cli=None):
    """`simpo annotate` with other reward settings, in a new folder holding copies of the
    fixture run's finished sft and generate stages; through `cli` (in this process) when
    given, else in a new process."""
    run.mkdir()
    for stage in ("sft", "generate"):
        shutil.copytree(out / stage, run / stage)
    extra = [arg for s in (*sets, "annotate.greedy_eval=false") for arg in ("--set", s)]
    return (cli or simpo)("annotate", "tiny-onpolicy", "-o", str(run), *SMALL, *extra)


def _reward_model(folder: Path, num_labels: int = 1, auto_map: bool = False) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=4, pad_token_id=5, num_labels=num_labels,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(RECIPES_DIR / "tiny" / "tokenizer").save_pretrained(folder)
    if auto_map:
        path = folder / "config.json"
        raw = json.loads(path.read_text())
        raw["auto_map"] = {"AutoModelForSequenceClassification": "modeling_rm.RM"}
        path.write_text(json.dumps(raw))
    return folder


def test_annotate_with_a_reward_model_through_the_real_loading_path(onpolicy_run, tmp_path):
    """A sequence-classification model with a scalar head, saved to a folder, scores every
    sample; the chosen reply is the one it scores highest."""
    from simpo_cli.onpolicy.rewards import RewardModelScorer, ScoreItem

    out, _ = onpolicy_run
    rm = _reward_model(tmp_path / "rm")
    run = tmp_path / "run"
    result = _annotate_again(
        out, run, f"annotate.reward.model={rm}", "annotate.reward.function=null"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = jsonl(run / "annotate" / "dataset" / "train.jsonl")
    assert rows
    scorer = RewardModelScorer(str(rm))
    row = rows[0]
    prompt = [{"role": "user", "content": row["prompt"]}]
    alone = [
        scorer([ScoreItem(row["prompt_id"], prompt, t)])[0] for t in row["all_generated_responses"]
    ]
    assert row["all_rm_scores"] == pytest.approx(alone, abs=1e-5)
    assert row["chosen_index"] == max(range(len(alone)), key=lambda j: (alone[j], -j))


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("two_labels", "has no scalar head (num_labels is 2, need 1)"),
        ("remote", "needs its own model code (auto_map in its config.json); set trust_remote_code"),
    ],
)
def test_unusable_reward_models_are_one_line(cli, onpolicy_run, tmp_path, kind, expected):
    out, _ = onpolicy_run
    rm = _reward_model(tmp_path / "rm", 2 if kind == "two_labels" else 1, kind == "remote")
    run = tmp_path / "run"
    result = _annotate_again(
        out, run, f"annotate.reward.model={rm}", "annotate.reward.function=null", cli=cli
    )
    assert result.code == 2, result.stderr[-2000:]
    assert len(result.errors()) == 1 and expected in result.errors()[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "annotate" / "dataset").exists()


# --------------------------------------------------------------------------- user errors


def _function_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "reward_fn.py"
    path.write_text(body)
    return f"{path}:score"


@pytest.mark.parametrize(
    "body, expected, names_prompt",
    [
        ("def score(prompt, response):\n    return 'high'\n", "returned str 'high'", True),
        (
            "def score(prompt, response):\n    raise ValueError('bad reply')\n",
            "raised ValueError: bad reply; fix the function",
            True,
        ),
        ("def other(prompt, response):\n    return 1.0\n", "has no 'score'", False),
        ("import not_a_module_anywhere\n", "not_a_module_anywhere", False),
    ],
)
def test_reward_function_problems_are_one_line(
    cli, onpolicy_run, tmp_path, body, expected, names_prompt
):
    out, _ = onpolicy_run
    spec = _function_file(tmp_path, body)
    result = _annotate_again(out, tmp_path / "run", f"annotate.reward.function={spec}", cli=cli)
    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(result.errors()) == 1 and expected in result.errors()[0], result.stderr
    assert "Traceback" not in result.stderr
    assert ("on prompt " in result.stderr) == names_prompt  # the prompt id it failed on
    assert not (tmp_path / "run" / "annotate" / "dataset").exists()


def test_missing_prompts_column_is_one_line_and_nothing_is_written(cli, tmp_path):
    result = cli(
        "generate", "tiny-onpolicy", "-o", str(tmp_path / "run"), *SMALL,
        "--set", "pipeline=[generate, annotate, preference]",
        "--set", "generate.prompts.column=question",
    )  # fmt: skip
    assert result.code == 2
    [line] = result.errors()
    assert "has no column 'question'" in line and "pref_train.jsonl" in line


@pytest.mark.parametrize(
    "installed, expected",
    [
        (True, "needs a CUDA GPU and none is visible; set backend: transformers on CPU"),
        (False, "not installed; pip install 'simpo-cli[vllm]', or set backend: transformers"),
    ],
)
def test_vllm_without_a_gpu_is_one_line(cli, tmp_path, monkeypatch, installed, expected):
    """generate.backend: vllm on this CPU machine, with vLLM installed (a stand-in module) or
    not: one line naming the key, the reason and the fix."""
    import torch
    from test_generation import FakeVLLM

    monkeypatch.setitem(sys.modules, "vllm", FakeVLLM() if installed else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli(
        "generate", "tiny-onpolicy", "-o", str(tmp_path / "run"), *SMALL,
        "--set", "pipeline=[generate, annotate, preference]", "--set", "generate.backend=vllm",
    )  # fmt: skip
    assert result.code == 2
    [line] = result.errors()
    assert line == f"error: generate.backend: vllm: {expected}"


def test_annotate_before_generate_names_the_command_to_run(cli, tmp_path):
    result = cli("annotate", "tiny-onpolicy", "-o", str(tmp_path / "run"), *SMALL)
    assert result.code == 2
    [line] = result.errors()
    assert "'generate' stage's samples, which is not finished" in line
    assert "`simpo generate` first" in line


def test_reward_function_file_missing_is_caught_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    result = simpo(
        "train", "tiny-onpolicy", "-o", str(out), *SMALL,
        "--set", "annotate.reward.function=no_such_file.py:score",
    )  # fmt: skip
    assert result.returncode == 2
    assert "annotate.reward.function: no such file" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["generate.seeds=[1, 1]", "generate.num_samples=null"], "repeats a seed"),
        (["generate.seeds=[1, 2]"], "seeds ([1, 2]) and num_samples (6) are both set"),
        (["annotate.reward.model=some/rm"], "set exactly one of model"),
        (["annotate.reward.function=null"], "set exactly one of model"),
        (["pipeline=[sft, annotate, preference]"], "annotate without generate"),
        (["pipeline=[sft, preference]"], "preference.data.train: required key is missing"),
        (["pipeline=[annotate, generate]"], "out of order"),
        (["generate.eval_prompts=null"], "annotate.greedy_eval: needs held-out prompts"),
        (["annotate.selection=best"], "use one of best_vs_worst or best_vs_random"),
    ],
)
def test_recipe_errors_name_the_key(sets, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny-onpolicy", sets)
    assert expected in "\n".join(err.value.messages)


def test_dry_run_shows_the_on_policy_stages(cli, tmp_path):
    result = cli("train", "tiny-onpolicy", "-o", str(tmp_path / "run"), "--dry-run")
    assert result.code == 0, result.stderr
    assert (
        "generate ->" in result.stdout and "x 6 samples (seeds [0, 1, 2, 3, 4, 5])" in result.stdout
    )
    assert "reward " in result.stdout and "sorted_digits; best_vs_worst" in result.stdout
    assert "data: the annotate stage's pairs" in result.stdout
    assert not (tmp_path / "run").exists()


def test_copied_recipe_brings_its_shared_files_and_runs_from_there(tmp_path):
    dest = tmp_path / "mine"
    result = simpo("recipes", "copy", "tiny-onpolicy", str(dest))
    assert result.returncode == 0, result.stderr
    for name in ("recipe.yaml", "reward.py", "tokenizer/tokenizer.json", "pref_train.jsonl"):
        assert (dest / name).is_file(), name
    copied = load_recipe(str(dest))
    assert copied.model.tokenizer == str((dest / "tokenizer").resolve())
    assert copied.generate.prompts.path == str((dest / "pref_train.jsonl").resolve())
    assert copied.annotate.reward.function == f"{(dest / 'reward.py').resolve()}:sorted_digits"


def test_with_vllm_each_stage_runs_as_its_own_command(onpolicy_run, tmp_path, monkeypatch):
    """A vLLM engine keeps its GPUs until its process ends, so `simpo train` runs the stages one
    command each when the generate stage uses vLLM. Here vLLM is stood in (a fake module and a
    visible GPU, in this process only), so generate.backend auto resolves to vllm in `simpo
    train`; its children, which have neither, then sample with transformers on this CPU."""
    import torch
    from test_generation import FakeVLLM
    from typer.testing import CliRunner

    from simpo_cli import cli

    out, _ = onpolicy_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(out / "sft", run / "sft")
    commands = []
    real = subprocess.run

    def recording_run(args, *rest, **kwargs):
        commands.append(args[3])  # [python, -m, simpo_cli, STAGE, ...]
        return real(args, *rest, capture_output=True, text=True, **kwargs)

    monkeypatch.setitem(sys.modules, "vllm", FakeVLLM())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_recipe("tiny-onpolicy").generate.backend == "auto"
    monkeypatch.setattr(subprocess, "run", recording_run)
    sets = [*SMALL, "--set", "pipeline=[sft, generate, annotate]"]
    result = CliRunner().invoke(cli.app, ["train", "tiny-onpolicy", "-o", str(run), *sets])
    assert result.exit_code == 0, result.output
    assert commands == ["sft", "generate", "annotate"]
    assert (run / "annotate" / "dataset" / "train.jsonl").is_file()
    assert jsonl(run / "generate" / "samples" / "train.jsonl") == jsonl(
        out / "generate" / "samples" / "train.jsonl"
    )


def test_generate_stage_on_vllm_at_its_api_boundary(onpolicy_run, tmp_path, monkeypatch):
    """The generate stage with backend vllm, against a stand-in engine (vLLM needs a GPU): the
    engine loads the previous stage's model with a context capped at the model's, starts with
    the launcher's variables hidden (it would join our process group) and put back after, and
    its samples are merged into the stage's files."""
    import torch
    from test_generation import FakeVLLM

    from simpo_cli.onpolicy.generate import _all_done
    from simpo_cli.onpolicy.sampling import request_seed
    from simpo_cli.run.pipeline import run_stage

    out, _ = onpolicy_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(out / "sft", run / "sft")
    fake = FakeVLLM()
    seen_env = []
    engine = fake.LLM

    class RecordingLLM(engine):
        def __init__(self, **kwargs):
            seen_env.append({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
            super().__init__(**kwargs)

    fake.LLM = RecordingLLM
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sets = [s for s in SMALL if s != "--set"] + ["generate.backend=vllm"]
    recipe = load_recipe("tiny-onpolicy", sets)
    run_stage(recipe, "generate", run)

    (kwargs,) = fake.engines
    assert kwargs["model"] == kwargs["tokenizer"] == str(run / "sft")
    assert kwargs["tensor_parallel_size"] == 1 and kwargs["gpu_memory_utilization"] == 0.9
    assert kwargs["dtype"] == "float32" and kwargs["seed"] == 42  # model.dtype, sft's seed
    assert kwargs["max_model_len"] <= 128  # the tiny model's context
    assert seen_env == [{"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None}]
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"

    # What the engine was asked, request by request (one call per split: 40 and 12 prompts x 4
    # seeds), and the files written from its answers: as the transformers run of the fixture
    # writes them (same prompts, order, keys, seeds, settings header), with the engine's texts.
    cpu_samples = out / "generate" / "samples"
    cpu = {split: jsonl(cpu_samples / f"{split}.jsonl") for split in ("train", "test")}
    [cpu_header] = jsonl(cpu_samples / "train" / "samples-rank0.jsonl")[:1]
    stops = cpu_header["generation"]["stop_token_ids"]
    assert stops  # the tiny template's end of turn
    assert [len(prompts) for prompts, _ in fake.calls] == [160, 48]
    for (prompts, params), split in zip(fake.calls, ("train", "test"), strict=True):
        expected = [(r["prompt_id"], seed) for r in cpu[split] for seed in (0, 1, 2, 3)]
        assert [p.__dict__ for p in params] == [
            {
                "n": 1,
                "seed": request_seed(seed, prompt_id),
                "temperature": 0.7,  # tiny-onpolicy's generate settings
                "top_p": 1.0,
                "max_tokens": 16,  # SMALL's max_new_tokens
                "stop_token_ids": stops,
                "skip_special_tokens": True,
            }
            for prompt_id, seed in expected
        ]
        answers = [
            fake.answer(i, prompt["prompt_token_ids"], p.seed).outputs[0]
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
        ]
        records = jsonl(run / "generate" / "samples" / f"{split}.jsonl")
        assert [(r["prompt_id"], r["prompt"]) for r in records] == [
            (r["prompt_id"], r["prompt"]) for r in cpu[split]
        ]
        assert [s for r in records for s in r["samples"]] == [
            {
                "seed": seed,
                "text": answer.text,
                "finish_reason": answer.finish_reason,
                "tokens": len(answer.token_ids),
            }
            for (_, seed), answer in zip(expected, answers, strict=True)
        ]
        assert [set(s) for r in cpu[split] for s in r["samples"]] == [
            set(s) for r in records for s in r["samples"]
        ]
    [header] = jsonl(run / "generate" / "samples" / "train" / "samples-rank0.jsonl")[:1]
    assert header == {"generation": {**cpu_header["generation"], "model": str(run / "sft")}}
    summary = json.loads((run / "generate" / "stage_complete.json").read_text())
    cpu_summary = json.loads((out / "generate" / "stage_complete.json").read_text())
    assert summary["backend"] == "vllm" and summary["train"]["prompts"] == 40
    assert set(summary) == set(cpu_summary) and summary["seeds"] == cpu_summary["seeds"]

    # Processes of a vLLM launch meet through marker files: rank 0 waits for rank 1's.
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / "done-rank1-of2").write_text("")
    _all_done(markers, "vllm", 0, 2)
    assert sorted(p.name for p in markers.iterdir()) == ["done-rank0-of2", "done-rank1-of2"]

    # ... and the other processes wait for the stage folder through a file named by the launch.
    from simpo_cli.launch import LAUNCH_ID
    from simpo_cli.outputs import StageDir
    from simpo_cli.run.pipeline import _folder_ready

    monkeypatch.setenv(LAUNCH_ID, "abc")
    folder = StageDir(tmp_path / "stage")
    folder.path.mkdir()
    _folder_ready(folder)  # rank 0 leaves the file
    assert (folder.path / ".ready-abc").is_file()
    monkeypatch.setenv("RANK", "1")
    _folder_ready(folder)  # rank 1 finds it and goes on


@pytest.mark.slow
def test_tiny_onpolicy_improves_the_models_own_greedy_answers(tmp_path):
    """The shipped recipe as `simpo train tiny-onpolicy` runs it: the policy's greedy answers to
    the held-out prompts score better after the preference stage than before (measured here:
    success 0.43 -> 0.60, mean reward 0.62 -> 0.74; asserted with room for other CPUs)."""
    out = tmp_path / "run"
    result = simpo("train", "tiny-onpolicy", "-o", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before = json.loads((out / "preference" / "greedy_before.json").read_text())
    after = json.loads((out / "preference" / "stage_complete.json").read_text())["greedy_eval"]
    assert after["prompts"] == 100
    assert after["success"] >= before["success"] + 0.08, (before, after)
    assert after["mean_reward"] >= before["mean_reward"] + 0.05, (before, after)
