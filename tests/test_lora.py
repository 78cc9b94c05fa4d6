"""LoRA (model.lora, simpo_cli/adapters.py) on the tiny model: only the adapters train, the merged
model scores like the adapted one, and the combinations this machine or this tool cannot run
are one-line errors before anything starts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from simpo_cli.data import PreferenceCollator, load_source, load_tokenizer, prepare
from simpo_cli.logps import sequence_scores
from simpo_cli.recipe import load_recipe
from simpo_cli.training import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The tiny pipeline, shortened: SFT, then SimPO from the merged SFT model, then evaluation.
LORA_SETS = [
    "model.lora.r=8",
    "sft.data.train.max_rows=64",
    "preference.data.train.max_rows=32",
    "preference.data.eval.max_rows=32",
    "preference.training.max_steps=4",
    "preference.training.learning_rate=0.01",
    "preference.training.total_batch_size=null",
    "preference.training.per_device_train_batch_size=8",
    "preference.training.logging_steps=1",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """`simpo train tiny --set model.lora.r=8 ...` through the real CLI."""
    out = tmp_path_factory.mktemp("lora") / "out"
    args = [arg for s in LORA_SETS for arg in ("--set", s)]
    result = subprocess.run(
        [sys.executable, "-m", "simpo_cli.cli", "train", "tiny", "-o", str(out), *args],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[sft] LoRA r=8: 19,456 trainable adapter parameters on 119,104 frozen" in result.stdout
    return load_recipe("tiny", LORA_SETS), out


def test_each_stage_saves_its_adapter_and_the_merged_model(lora_run):
    _, out = lora_run
    for stage in ("sft", "preference"):
        assert (out / stage / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / stage / "adapter" / "adapter_config.json").is_file()
        saved = load_file(out / stage / "model.safetensors")
        assert not any("lora" in name for name in saved), "the merged model holds no adapters"
    table = (out / "evaluate" / "comparison.md").read_text()
    assert "| tiny-sft |" in table and "| tiny-preference |" in table


def test_lora_trains_the_adapters_only(lora_run):
    """The adapter saved beside the merged model holds the trained LoRA matrices; the base
    weights under it are bitwise those of the starting model, and every adapted layer moved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = lora_run
    stage = out / "preference"
    start = AutoModelForCausalLM.from_pretrained(out / "sft")  # the stage's start: merged SFT
    before = {k: v.clone() for k, v in start.state_dict().items()}
    adapted = PeftModel.from_pretrained(start, stage / "adapter")
    lora_b = 0
    for name, tensor in adapted.state_dict().items():
        if "lora_" in name:
            lora_b += int("lora_B" in name and tensor.abs().max() > 0)
            continue
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(tensor, before[base_name]), f"{name} changed"
    # all-linear: q, k, v, o, gate, up, down in each of the 2 layers (not the output head)
    assert lora_b == 14


def test_merged_model_scores_like_the_adapted_one(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, out = lora_run
    stage = out / "preference"
    merged = AutoModelForCausalLM.from_pretrained(stage).eval()
    start = AutoModelForCausalLM.from_pretrained(out / "sft")
    adapted = PeftModel.from_pretrained(start, stage / "adapter").eval()
    tokenizer = load_tokenizer(recipe.model)
    source = recipe.preference.data.train.model_copy(update={"max_rows": 8})
    pairs, _ = prepare(load_source(source, "t"), tokenizer, "preference", "t", 64, 40)
    batch = PreferenceCollator(tokenizer.pad_token_id, padding_free=True)(list(pairs))
    with torch.no_grad():
        a = sequence_scores(adapted, batch, chunk_size=16).sums
        m = sequence_scores(merged, batch, chunk_size=16).sums
        base = sequence_scores(AutoModelForCausalLM.from_pretrained(out / "sft"), batch, 16).sums
    torch.testing.assert_close(m, a, rtol=0, atol=1e-5)
    assert (a - base).abs().max() > 1e-2, "training moved nothing"


def test_quantization_on_the_cpu_is_one_line(tmp_path, cli):
    result = cli("preference", "tiny", "-o", tmp_path, "--set", "pipeline=[preference]",
                 "--set", "model.lora.r=8", "--set", "model.quantization=4bit")  # fmt: skip
    assert result.code == 2
    assert result.errors() == [
        "error: model.quantization: 4bit needs a CUDA GPU (bitsandbytes); on this machine "
        "remove it and train the LoRA adapters on full-precision weights"
    ]


def test_lora_under_zero3_is_refused_before_launch(tmp_path, cli):
    sets = ["--set", "pipeline=[preference]", "--set", "model.lora.r=8"]
    result = cli("preference", "tiny", "-o", tmp_path, *sets,
                 "--deepspeed", "zero3", "--num-processes", "2")  # fmt: skip
    assert result.code == 2
    assert result.errors() == [
        "error: model.lora with launch.deepspeed zero3 (ZeRO-3) is not supported; adapters are "
        "small enough for --deepspeed zero2 or plain data parallel (no --deepspeed)"
    ]
    assert "launching" not in result.stdout


def test_dpo_reference_is_the_base_model_with_the_adapters_off(tmp_path):
    """DPO's live reference under LoRA is no second model: the policy with its adapters
    switched off, which scores exactly like a separately loaded base model."""
    from transformers import TrainingArguments

    from simpo_cli import adapters
    from simpo_cli.stages.preference import PreferenceTrainer, _live_reference

    recipe = load_recipe("tiny", ["pipeline=[preference]", "model.lora.r=8",
                                  "preference.loss=dpo", "preference.gamma_beta_ratio=null",
                                  "preference.reference.mode=live"])  # fmt: skip
    stage = recipe.preference
    assert _live_reference(recipe, stage, None) is None
    model = adapters.add_adapters(load_model(recipe, None, 42), recipe.model, False, seed=0)
    with torch.no_grad():  # move the policy away from its base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = PreferenceTrainer(model=model, args=args, stage=stage, chunk_size=16)
    tokenizer = load_tokenizer(recipe.model)
    source = stage.data.train.model_copy(update={"max_rows": 6})
    pairs, _ = prepare(load_source(source, "t"), tokenizer, "preference", "t", 64, 40)
    batch = PreferenceCollator(tokenizer.pad_token_id, padding_free=True)(list(pairs))
    with torch.no_grad():
        policy, _ = trainer._pair_scores(model, batch)
        reference = trainer._reference_scores(model, batch, policy)
        base, _ = trainer._pair_scores(load_model(recipe, None, 42), batch)
    torch.testing.assert_close(reference.chosen_sum, base.chosen_sum, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference.rejected_sum, base.rejected_sum, rtol=0, atol=1e-5)
    assert (policy.chosen_sum - base.chosen_sum).abs().max() > 1e-2


@pytest.mark.slow
def test_lora_resume_after_a_stop_equals_a_run_never_stopped(tmp_path):
    """SIGTERM mid-run saves a checkpoint (the adapters and their optimizer state); the rerun
    resumes from it and ends with the adapters and merged weights of a run never stopped."""
    import signal

    from conftest import save_tiny_model
    from test_faults import ONE_PROCESS, command, run, stop_with

    start = save_tiny_model(tmp_path / "start")
    lora = ["model.lora.r=8", "preference.data.train.max_rows=120", *ONE_PROCESS]  # 15 steps
    straight = tmp_path / "straight"
    assert run(command(straight, start, lora)).returncode == 0

    out = tmp_path / "out"
    code, stderr = stop_with(signal.SIGTERM, command(out, start, lora), out / "preference")
    assert code == 75, stderr[-3000:]
    result = run(command(out, start, lora))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        got = load_file(out / "preference" / name)
        expected = load_file(straight / "preference" / name)
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), f"{name}: {key}"


# 10 steps of 8 pairs. No adapter dropout: its random masks differ between 1 and 2 processes.
DISTRIBUTED_SETS = ["model.lora.r=8", "model.lora.dropout=0", "preference.data.train.max_rows=80"]


@pytest.fixture(scope="module")
def lora_single(tmp_path_factory):
    """(start model, a 1-process LoRA run of 10 steps)."""
    from conftest import save_tiny_model
    from test_faults import command, run

    start = save_tiny_model(tmp_path_factory.mktemp("start") / "model")
    one = tmp_path_factory.mktemp("one") / "out"
    sets = [*DISTRIBUTED_SETS, "preference.training.per_device_train_batch_size=8"]
    result = run(command(one, start, sets))
    assert result.returncode == 0, result.stderr[-3000:]
    return start, one


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "zero2"])
def test_lora_on_two_processes_matches_one(tmp_path, lora_single, deepspeed):
    """Adapters under 2-process data parallel and ZeRO-2 train like 1 process at the same total
    batch: the same losses and the same merged weights after 10 steps."""
    from test_faults import command, run

    from simpo_cli.launch import free_port

    start, one = lora_single
    two = tmp_path / "two"
    flags = ["--num-processes", "2", "--main-process-port", str(free_port())]
    flags += ["--deepspeed", deepspeed] if deepspeed else []
    per_device = "preference.training.per_device_train_batch_size=4"
    result = run(command(two, start, [*DISTRIBUTED_SETS, per_device], *flags))
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(out):
        lines = (out / "preference" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    assert len(losses(one)) == 10
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    a = load_file(two / "preference" / "model.safetensors")
    b = load_file(one / "preference" / "model.safetensors")
    for name, tensor in b.items():
        torch.testing.assert_close(a[name], tensor, rtol=0, atol=1e-5)
