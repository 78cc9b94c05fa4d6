"""LoRA (model.lora, simpo_cli/model/adapters.py) on the tiny model: only the adapters train, the
merged model scores like the adapted one, and the combinations this machine or this tool cannot run
are one-line errors before anything starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simpo_cli.data import PreferenceCollator, load_source, load_tokenizer, prepare
from simpo_cli.errors import EXIT_PREEMPTED
from simpo_cli.model.load import load_model, load_model_from
from simpo_cli.outputs import CHECKPOINT_DONE
from simpo_cli.recipe import load_recipe
from simpo_cli.train.logps import sequence_scores

ROOT = Path(__file__).resolve().parent.parent
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
    # the 4 shipped AlpacaEval-format questions, not the recipe's 100 held-out prompts
    f"evaluate.benchmarks.0.questions={ROOT / 'recipes/tiny/benchmarks/alpaca_eval.json'}",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """`simpo train tiny --set model.lora.r=8 ...` through the real CLI."""
    out = tmp_path_factory.mktemp("lora") / "out"
    args = [arg for s in LORA_SETS for arg in ("--set", s)]
    result = subprocess.run(
        [sys.executable, "-m", "simpo_cli", "train", "tiny", "-o", str(out), *args],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[sft] LoRA r=8: 19,456 trainable adapter parameters on 119,104 frozen" in result.stdout
    return load_recipe("tiny", LORA_SETS), out


def test_the_last_stage_writes_the_merged_model_the_sft_stage_its_adapter_only(lora_run):
    """model.lora.merge by default: only the last training stage writes the merged model; the
    SFT stage keeps its adapter and base record, and the preference stage and the evaluate
    stage merge it as they load it (in memory, and in a scratch folder removed afterwards)."""
    _, out = lora_run
    for stage in ("sft", "preference"):
        assert (out / stage / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / stage / "adapter" / "adapter_config.json").is_file()
    assert not (out / "sft" / "config.json").exists()
    assert not list((out / "sft").glob("*.safetensors"))
    base = json.loads((out / "sft" / "adapter" / "base.json").read_text())
    assert base["start_from"] is None and base["model"]["init"] == "from_config"
    assert base["seed"] == 42
    on_sft = json.loads((out / "preference" / "adapter" / "base.json").read_text())
    assert on_sft["stage"] == "sft" and on_sft["start_from"] == str((out / "sft").resolve())
    saved = load_file(out / "preference" / "model.safetensors")
    assert not any("lora" in name for name in saved), "the merged model holds no adapters"
    table = (out / "evaluate" / "comparison.md").read_text()
    assert "| tiny-sft |" in table and "| tiny-preference |" in table
    assert not (out / "evaluate" / "checkpoints" / "tiny-sft" / "merged_model").exists()
    assert not (out / "evaluate" / "merged_reference").exists()  # the reference: sft, merged


def test_lora_trains_the_adapters_only(lora_run):
    """What the preference stage wrote holds its start's weights, untrained: the merged model
    in its folder is, layer by layer, the start plus alpha/r x B @ A of the saved adapter (to
    1e-6; a trained base would have moved by about the learning rate, 1e-2) and bitwise the
    start everywhere else (embeddings, norms); and every adapter moved (B starts at zero)."""
    _, out = lora_run
    stage = out / "preference"
    start = load_model_from(None, str(out / "sft"), 0).state_dict()  # SFT's adapter merged
    merged = load_file(stage / "model.safetensors")
    adapter = load_file(stage / "adapter" / "adapter_model.safetensors")
    config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    prefix = "base_model.model."
    adapted = {
        name.removeprefix(prefix).replace(".lora_A.", ".") for name in adapter if ".lora_A." in name
    }
    # all-linear: q, k, v, o, gate, up, down in each of the 2 layers (not the output head)
    assert len(adapted) == 14 and adapted <= merged.keys()
    assert merged.keys() == start.keys() - {"lm_head.weight"}  # the head is the tied embedding
    for name, tensor in merged.items():
        if name not in adapted:
            assert torch.equal(tensor, start[name]), f"{name} changed"
            continue
        a = adapter[prefix + name.replace(".weight", ".lora_A.weight")]
        b = adapter[prefix + name.replace(".weight", ".lora_B.weight")]
        assert b.abs().max() > 0, f"{name}: the adapter did not move"
        torch.testing.assert_close(tensor, start[name] + scale * (b @ a), rtol=0, atol=1e-6)


def test_merged_model_scores_like_the_adapted_one(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, out = lora_run
    stage = out / "preference"
    merged = AutoModelForCausalLM.from_pretrained(stage).eval()
    start = load_model_from(None, str(out / "sft"), 0)
    adapted = PeftModel.from_pretrained(start, stage / "adapter").eval()
    tokenizer = load_tokenizer(recipe.model)
    source = recipe.preference.data.train.model_copy(update={"max_rows": 8})
    pairs, _ = prepare(load_source(source, "t"), tokenizer, "preference", "t", 64, 40)
    batch = PreferenceCollator(tokenizer.pad_token_id, padding_free=True)(list(pairs))
    with torch.no_grad():
        a = sequence_scores(adapted, batch, chunk_size=16).sums
        m = sequence_scores(merged, batch, chunk_size=16).sums
        base = sequence_scores(load_model_from(None, str(out / "sft"), 0), batch, 16).sums
    torch.testing.assert_close(m, a, rtol=0, atol=1e-5)
    assert (a - base).abs().max() > 1e-2, "training moved nothing"


def test_merge_default_is_where_a_model_leaves_training():
    from simpo_cli.model.adapters import writes_merged

    tiny = load_recipe("tiny", ["model.lora.r=8"])  # sft, preference, evaluate
    assert [writes_merged(tiny, s) for s in ("sft", "preference")] == [False, True]
    onpolicy = load_recipe("tiny-onpolicy", ["model.lora.r=8"])  # generate samples from sft
    assert [writes_merged(onpolicy, s) for s in ("sft", "preference")] == [True, True]
    for value in (True, False):
        recipe = load_recipe("tiny", ["model.lora.r=8", f"model.lora.merge={str(value).lower()}"])
        assert [writes_merged(recipe, s) for s in ("sft", "preference")] == [value, value]


def _scores(model, recipe, rows=None):
    tokenizer = load_tokenizer(recipe.model)
    source = recipe.preference.data.eval.model_copy(update={"max_rows": rows})
    pairs, _ = prepare(load_source(source, "t"), tokenizer, "preference", "t", 64, 40)
    batch = PreferenceCollator(tokenizer.pad_token_id, padding_free=True)(list(pairs))
    with torch.no_grad():
        return sequence_scores(model.eval(), batch, chunk_size=16).sums[: len(pairs)]  # chosen


@pytest.fixture(scope="module")
def continued(lora_run, tmp_path_factory):
    """The preference stage of lora_run again, continuing the SFT adapter (no fresh adapters)
    and keeping the adapter only (model.lora.merge false)."""
    import shutil

    recipe, out = lora_run
    again = tmp_path_factory.mktemp("continued") / "out"
    shutil.copytree(out, again)
    sets = [*LORA_SETS, "model.lora.continue_adapter=true", "model.lora.merge=false"]
    args = [arg for s in sets for arg in ("--set", s)]
    result = subprocess.run(
        [sys.executable, "-m", "simpo_cli", "preference", "tiny", "-o", str(again),
         "--overwrite", *args],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return load_recipe("tiny", sets), out, again, result.stdout


def test_continue_adapter_trains_the_sft_adapter_on_from_the_sft_model(continued):
    """model.lora.continue_adapter: the preference stage loads the SFT adapter, trainable, on
    the SFT stage's base: it starts as the SFT model (the held-out numbers before training
    equal those of fresh adapters on the merged SFT model) and its adapter keeps SFT's base."""
    from peft import PeftModel

    recipe, out, again, stdout = continued
    assert f"[preference] LoRA: continuing the adapter of {again / 'sft' / 'adapter'}" in stdout
    assert "[preference] adapter only (model.lora.merge)" in stdout
    stage = again / "preference"
    assert not (stage / "config.json").exists()
    assert (stage / "adapter" / "base.json").read_text() == (
        out / "sft" / "adapter" / "base.json"
    ).read_text()
    before = json.loads((stage / "eval_before.json").read_text())
    fresh = json.loads((out / "preference" / "eval_before.json").read_text())
    assert before["eval_loss"] == pytest.approx(fresh["eval_loss"], abs=1e-5)
    sft = load_file(again / "sft" / "adapter" / "adapter_model.safetensors")
    trained = load_file(stage / "adapter" / "adapter_model.safetensors")
    assert sft.keys() == trained.keys()
    assert max((trained[k] - sft[k]).abs().max() for k in sft) > 1e-3, "the adapter moved"
    # One adapter on the from_config base (seeded) scores like the stage's adapter-only folder.
    adapted = PeftModel.from_pretrained(load_model(recipe, None, 42), stage / "adapter")
    torch.testing.assert_close(
        _scores(load_model_from(None, str(stage), 0), recipe),
        _scores(adapted, recipe), rtol=0, atol=1e-5,
    )  # fmt: skip


def test_simpo_eval_reads_an_adapter_folder_as_its_merged_model(continued, tmp_path, cli):
    """`simpo eval` of a stage's adapter/ (adapter only, its base built from model.config) and
    of a bare peft adapter (base_model_name_or_path) scores the merged model, with no merged
    copy left behind."""
    from peft import PeftModel

    recipe, _, again, _ = continued
    pairs = str(recipe.preference.data.eval.path)
    out = tmp_path / "scores.json"
    result = cli("eval", again / "preference" / "adapter", "--pairs", pairs, "--pairs-output", out)
    assert result.code == 0, result.stderr[-2000:]
    got = json.loads(out.read_text())
    adapted = PeftModel.from_pretrained(
        load_model(recipe, None, 42), again / "preference" / "adapter"
    )
    expected = _scores(adapted, recipe)
    assert got["summary"]["beta"] == recipe.preference.beta  # the stage's recipe was read
    assert got["summary"]["model"] == str(again / "preference" / "adapter")  # not the copy
    sums = [p["chosen_logps_sum"] for p in got["pairs"]]
    assert sums == pytest.approx(expected.tolist(), abs=1e-4)

    # A bare peft adapter: a seeded random adapter on a saved model folder.
    from conftest import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    bare = adapters_on(base, recipe, tmp_path / "bare")
    lengths = ["--max-length", "64", "--max-prompt-length", "40"]  # the tiny recipe's
    result = cli("eval", bare, "--pairs", pairs, *lengths, "--pairs-output", out)
    assert result.code == 0, result.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    expected = _scores(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), bare), recipe
    )
    sums = [p["chosen_logps_sum"] for p in json.loads(out.read_text())["pairs"]]
    assert sums == pytest.approx(expected.tolist(), abs=1e-4)
    assert not list(tmp_path.glob(".simpo-merged-*")), "the merged copies are removed"


def adapters_on(base, recipe, folder):
    """A peft adapter with random (non-zero) B saved alone, naming `base` as its base model."""
    from transformers import AutoModelForCausalLM

    from simpo_cli.model import adapters

    model = adapters.add_adapters(
        AutoModelForCausalLM.from_pretrained(base), recipe.model, False, 0
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def test_vllm_generation_from_an_adapter_only_stage_is_one_line(continued):
    from simpo_cli.errors import UserError
    from simpo_cli.onpolicy.generate import _vllm_backend

    recipe, _, again, _ = continued
    recipe = load_recipe("tiny-onpolicy", ["model.lora.r=8"])
    with pytest.raises(UserError) as err:
        _vllm_backend(recipe, recipe.generate, str(again / "preference"), None, {})
    assert str(err.value) == (
        f"generate.backend: vllm loads a whole model, but {again / 'preference'} holds only a "
        "LoRA adapter (model.lora.merge: false); remove merge: false (that stage then writes its "
        "merged model) or set generate.backend: transformers"
    )


def test_continued_adapter_refuses_a_live_dpo_reference(tmp_path, cli):
    sets = ["model.lora.r=8", "model.lora.continue_adapter=true", "preference.loss=dpo",
            "preference.gamma_beta_ratio=null", "preference.sft_weight=null",
            "preference.reference.mode=live"]  # fmt: skip
    result = cli("train", "tiny", "-o", tmp_path, "--dry-run",
                 *[arg for s in sets for arg in ("--set", s)])  # fmt: skip
    assert result.code == 2
    assert result.errors()[-1].endswith(
        "preference.reference.mode: live with model.lora.continue_adapter would score the "
        "reference as the adapters switched off, which is the model before sft, not this "
        "stage's start; use reference.mode: cached (the start's log-probs, computed once) or "
        "set reference.model"
    ), result.errors()


def test_dry_run_says_what_each_stage_saves_and_which_run_it_would_stop(lora_run, cli):
    _, out = lora_run
    sets = [arg for s in LORA_SETS for arg in ("--set", s)]
    result = cli("train", "tiny", "-o", out, "--dry-run", *sets)
    assert result.code == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert f"  sft -> {out / 'sft'} (finished, will be skipped; --overwrite reruns it)" in lines
    assert (
        "    LoRA: fresh adapters; saves adapter/ only (model.lora.merge), merged as it is read"
        in lines
    )
    assert "    LoRA: fresh adapters; saves adapter/ and the merged model" in lines
    # The same folder without LoRA: the run would stop there; the dry run says so.
    result = cli("train", "tiny", "-o", out, "--dry-run")
    [stops] = [line for line in result.stdout.splitlines() if line.startswith("  sft -> ")]
    assert stops.startswith(
        f"  sft -> {out / 'sft'} (stops: {out / 'sft'}: holds a run of the 'sft' stage made "
        "with a different recipe (model.lora."
    ) and stops.endswith("; pass --overwrite to start it over, or choose another --output-dir)")
    result = cli("train", "tiny", "-o", out, "--dry-run", "--overwrite")
    assert f"  sft -> {out / 'sft'} (starts over: --overwrite)" in result.stdout.splitlines()


def test_dry_run_counts_quantized_weights_by_hand(tmp_path, cli):
    """The tiny model: embeddings 320 x 64 = 20,480 (tied head), norms 5 x 64 = 320, linear
    layers 2 x (q 4,096 + k 2,048 + v 2,048 + o 4,096 + 3 x 12,288) = 98,304; 119,104 in all.
    4bit: the 20,800 others in fp32 (83,200 B) and NF4 at 4.127 bits (50,712 B): 133,912 B =
    130.8 KiB. Adapters: r 8 x (in + out) = 19,456 parameters x 16 B (weight, gradient, Adam's
    two moments, fp32) = 311,296 B = 304.0 KiB."""
    result = cli("train", "tiny", "-o", tmp_path, "--dry-run", "--set", "model.lora.r=8",
                 "--set", "model.quantization=4bit")  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert (
        "LoRA r=8 (all-linear): 19.5k trainable adapter parameters on 119k frozen (16.34%)"
        in result.stdout
    )
    assert (
        "memory per GPU for model states (no ZeRO, 1 GPU(s)): 434.8 KiB: frozen weights "
        "130.8 KiB (4bit), adapters with gradients and Adam 304.0 KiB" in result.stdout
    )


def test_quantization_on_the_cpu_is_one_line(tmp_path, cli):
    result = cli("preference", "tiny", "-o", tmp_path, "--set", "pipeline=[preference]",
                 "--set", "model.lora.r=8", "--set", "model.quantization=4bit")  # fmt: skip
    assert result.code == 2
    assert result.errors() == [
        "error: model.quantization: 4bit needs a CUDA GPU (bitsandbytes); on this machine "
        "remove it and train the LoRA adapters on full-precision weights"
    ]


def test_quantization_under_zero3_is_refused_before_launch(tmp_path, cli):
    sets = ["--set", "pipeline=[preference]", "--set", "model.lora.r=8",
            "--set", "model.quantization=4bit"]  # fmt: skip
    from simpo_cli.launch import free_port

    result = cli("preference", "tiny", "-o", tmp_path, *sets, "--deepspeed", "zero3",
                 "--num-processes", "2", "--main-process-port", str(free_port()))  # fmt: skip
    assert result.code == 2
    assert result.errors() == [
        "error: model.quantization 4bit with launch.deepspeed zero3 (ZeRO-3) is not supported; "
        "quantized weights fit whole on each GPU: use --deepspeed zero2 or plain data parallel "
        "(no --deepspeed)"
    ]
    assert "launching" not in result.stdout


MISSING_TARGET = (
    "model.lora.target_modules: the model (LlamaForCausalLM) has no layer 'v_prj' or 'mlp.up'; "
    "its linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
    "lm_head; list some of those, or use all-linear"
)


def test_a_target_module_the_model_lacks_is_one_line_before_anything_starts(tmp_path, cli):
    """A target_modules entry that names no layer (peft: NoMatchingPeftModuleError, a
    traceback, after the stage folder was started over) is refused at the start, from the
    model built on the meta device: exit 2, one line, an earlier run's folders untouched even
    with --overwrite. A dotted suffix of a layer's name (self_attn.q_proj) is a match."""
    out = tmp_path / "out"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    targets = "model.lora.target_modules=[self_attn.q_proj, v_prj, mlp.up]"
    sets = ["--set", "model.lora.r=8", "--set", targets]
    for extra in (["--overwrite"], ["--dry-run"]):
        result = cli("train", "tiny", "-o", out, *sets, *extra)
        assert result.code == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert result.errors() == [f"error: {MISSING_TARGET}"]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert sorted(p.name for p in out.iterdir()) == ["sft"]


def test_adapters_on_a_loaded_model_check_the_targets_before_peft():
    """Where the start cannot build the model from its config (a hub model not in the cache, a
    folder holding only an adapter), the loaded model is checked before peft sees it."""
    from simpo_cli.errors import UserError
    from simpo_cli.model import adapters

    sets = ["model.lora.r=8", "model.lora.target_modules=[self_attn.q_proj, v_prj, mlp.up]"]
    recipe = load_recipe("tiny", sets)
    model = load_model(recipe, None, 42)
    with pytest.raises(UserError) as err:
        adapters.add_adapters(model, recipe.model, False, 0)
    assert str(err.value) == MISSING_TARGET
    fine = load_recipe(
        "tiny", ["model.lora.r=8", "model.lora.target_modules=[q_proj, mlp.up_proj]"]
    )
    adapted = adapters.add_adapters(model, fine.model, False, 0)
    assert adapters.trainable_parameters(adapted)[0] == 2 * 8 * ((64 + 64) + (64 + 192))


def test_dpo_reference_is_the_base_model_with_the_adapters_off(tmp_path):
    """DPO's live reference under LoRA is no second model: the policy with its adapters
    switched off, which scores exactly like a separately loaded base model."""
    from transformers import TrainingArguments

    from simpo_cli.model import adapters
    from simpo_cli.train.preference import PreferenceTrainer, _live_reference

    recipe = load_recipe("tiny", ["pipeline=[preference]", "model.lora.r=8",
                                  "preference.loss=dpo", "preference.gamma_beta_ratio=null",
                                  "preference.sft_weight=null",
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


# 10 steps of 8 pairs. No adapter dropout: its random masks differ between 1 and 2 processes.
DISTRIBUTED_SETS = ["model.lora.r=8", "model.lora.dropout=0", "preference.data.train.max_rows=80"]


@pytest.fixture(scope="module")
def start_folder(tmp_path_factory):
    """The tiny recipe's seeded model, saved as a folder."""
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("start") / "model")


@pytest.fixture(scope="module")
def lora_single(tmp_path_factory, start_folder):
    """(start model, a 1-process LoRA run of 10 steps)."""
    from test_faults import command, run

    start = start_folder
    one = tmp_path_factory.mktemp("one") / "out"
    sets = [*DISTRIBUTED_SETS, "preference.training.per_device_train_batch_size=8"]
    result = run(command(one, start, sets))
    assert result.returncode == 0, result.stderr[-3000:]
    return start, one


# test_faults' run, shortened: 12 steps of 8 pairs from a model folder, one process; adapter
# dropout as by default (its masks draw on the random state a checkpoint saves and a resume
# restores).
STOP_SETS = [
    "model.lora.r=8",
    "preference.data.train.max_rows=96",
    "preference.training.per_device_train_batch_size=8",
]


def _preference(cli, out: Path, start: Path):
    """`simpo preference tiny` of STOP_SETS, in this process (no second start-up)."""
    from test_faults import SETS

    sets = [*SETS, f"model.name_or_path={start}", *STOP_SETS]
    return cli("preference", "tiny", "-o", out, *[arg for s in sets for arg in ("--set", s)])


def test_lora_stopped_and_resumed_ends_bitwise_like_a_run_never_stopped(
    tmp_path, start_folder, cli, monkeypatch
):
    """SIGTERM mid-run saves a checkpoint (the adapter, optimizer, scheduler and random state);
    the rerun resumes from it and ends with the adapter and the merged model of a run never
    stopped, bitwise. Both runs put their adapters on the start model separately: the seeded
    initialisation is part of what this compares."""
    import signal
    import threading
    import time

    from test_faults import logged_steps

    from simpo_cli.stops import REQUEST

    straight = tmp_path / "straight"
    result = _preference(cli, straight, start_folder)
    assert result.code == 0, result.stderr[-3000:]

    out = tmp_path / "out"
    stage = out / "preference"
    done = threading.Event()

    def stop_after_step_3():  # the signal a user or a container runtime sends, to this process
        deadline = time.monotonic() + 300
        while not done.is_set() and time.monotonic() < deadline:
            if len(logged_steps(stage)) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    # The stop lands in this test's own request: later tests get the request as it was.
    monkeypatch.setattr(REQUEST, "signal", 0)
    monkeypatch.setattr(REQUEST, "interrupts", 0)
    watcher = threading.Thread(target=stop_after_step_3, daemon=True)
    watcher.start()
    try:
        result = _preference(cli, out, start_folder)
    finally:
        done.set()
        watcher.join()
    assert result.code == EXIT_PREEMPTED, result.stderr[-3000:]
    step = json.loads((stage / "stopped.json").read_text())["step"]
    assert 3 <= step < 12, "stopped after the step it was in, before the end"
    assert not (stage / "adapter").exists()
    # The rerun is a new command: a new process would start with no stop request.
    REQUEST.signal = REQUEST.interrupts = 0
    result = _preference(cli, out, start_folder)
    assert result.code == 0, result.stderr[-3000:]
    assert f"resuming from {stage / f'checkpoint-{step}'} (step {step})" in result.stdout
    assert [m["step"] for m in logged_steps(stage)] == list(range(1, 13)), "each step once"
    for file in ("adapter/adapter_model.safetensors", "model.safetensors"):
        got, expected = load_file(stage / file), load_file(straight / "preference" / file)
        assert got.keys() == expected.keys() and expected, file
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), f"{file}: {name}"
    trained = load_file(straight / "preference" / "adapter" / "adapter_model.safetensors")
    assert all(t.abs().max() > 0 for name, t in trained.items() if "lora_B" in name), "B moved"


@pytest.mark.slow
def test_lora_on_two_processes_matches_one(tmp_path, lora_single):
    """Adapters under 2-process data parallel train like 1 process at the same total batch:
    the same losses and the same merged weights after 10 steps."""
    from test_faults import command, run

    from simpo_cli.launch import free_port

    start, one = lora_single
    two = tmp_path / "two"
    flags = ["--num-processes", "2", "--main-process-port", str(free_port())]
    per_device = "preference.training.per_device_train_batch_size=4"
    result = run(command(two, start, [*DISTRIBUTED_SETS, per_device], *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_losses(one)) == 10
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    _assert_same_merged(two, one)


@pytest.mark.slow
def test_lora_under_zero3_stopped_and_resumed_matches_one_process(tmp_path, lora_single):
    """ZeRO-3 with every weight partitioned, the adapters' too (no persistence threshold).
    SIGTERM to the `simpo` command only, as a user or a container runtime sends it: the
    launcher passes it on, both processes agree on the step, save their shards and exit 75.
    The rerun resumes from that checkpoint and ends with the losses, adapter and merged model
    (merged into a whole copy of the base) of 1 process."""
    import signal

    from test_faults import command, run, stop_with

    from simpo_cli.launch import free_port

    start, one = lora_single
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    out = tmp_path / "two"
    sets = [*DISTRIBUTED_SETS, "preference.training.per_device_train_batch_size=4"]

    def args():
        flags = ["--num-processes", "2", "--main-process-port", str(free_port())]
        return command(out, start, sets, *flags, "--deepspeed", str(tmp_path / "zero3.json"))

    stage = out / "preference"
    code, stderr = stop_with(signal.SIGTERM, args(), stage)
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    assert stderr.count("[preference] stopped by SIGTERM after step") == 1, "rank 0 says it"
    note = json.loads((stage / "stopped.json").read_text())
    checkpoint = stage / note["checkpoint"]
    assert (checkpoint / CHECKPOINT_DONE).is_file()
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    assert len(list(checkpoint.glob("global_step*/*optim_states.pt"))) == 2, "both ranks' shards"
    result = run(args())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoint} (step {note['step']})" in result.stdout
    assert _losses(out) == pytest.approx(_losses(one), rel=1e-5)
    _assert_same_merged(out, one)
    a = load_file(out / "preference" / "adapter" / "adapter_model.safetensors")
    b = load_file(one / "preference" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(b) == 28  # lora_A and lora_B of 14 layers
    for name, tensor in b.items():
        torch.testing.assert_close(a[name], tensor, rtol=0, atol=1e-5)


def _losses(out):
    lines = (out / "preference" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def _assert_same_merged(out, expected):
    a = load_file(out / "preference" / "model.safetensors")
    b = load_file(expected / "preference" / "model.safetensors")
    assert a.keys() == b.keys()
    for name, tensor in b.items():
        torch.testing.assert_close(a[name], tensor, rtol=0, atol=1e-5)
