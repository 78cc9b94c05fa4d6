"""Launching: the accelerate command, batch arithmetic, the dry-run plan, pre-flight failures,
and real 2-process runs on the CPU (data parallel, ZeRO-3) against a 1-process run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from simpo_cli.errors import EXIT_FAILURE, RecipeError, UserError
from simpo_cli.launch import (
    free_port,
    launch_command,
    model_states_memory,
    preflight,
    read_deepspeed_config,
)
from simpo_cli.recipe import LaunchSettings, load_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def simpo(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *args], capture_output=True, text=True, **kwargs
    )


# --------------------------------------------------------------------------- the command

# The tiny recipe states total batch sizes for 1 or 2 processes; tests of other layouts drop them.
NO_TOTAL = ["sft.training.total_batch_size=null", "preference.training.total_batch_size=null"]


def test_launch_command_for_two_nodes_of_eight_gpus_with_zero3():
    sets = [
        "launch.num_processes=8",
        "launch.num_machines=2",
        "launch.machine_rank=1",
        "launch.main_process_ip=10.1.2.3",
        "launch.deepspeed=zero3",
        "preference.training.bf16=true",
        "sft.training.bf16=true",
        *NO_TOTAL,
    ]
    recipe = load_recipe("tiny", sets)
    child = ["train", "tiny", "--output-dir", "runs/x", *[a for s in sets for a in ("--set", s)]]
    assert launch_command(recipe, child) == [
        "accelerate", "launch",
        "--num_processes", "16",
        "--num_machines", "2",
        "--machine_rank", "1",
        "--main_process_port", "29500",
        "--mixed_precision", "bf16",
        "--dynamo_backend", "no",
        "--main_process_ip", "10.1.2.3",
        "--rdzv_backend", "static",
        "--multi_gpu",
        "-m", "simpo_cli", *child,
    ]  # fmt: skip


def test_shipped_deepspeed_configs_fill_auto_values_from_the_recipe():
    for name, stage in (("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        config = read_deepspeed_config(name)
        assert config["zero_optimization"]["stage"] == stage
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping", "train_batch_size"):  # fmt: skip
            assert config[key] == "auto", (name, key)
        assert config["bf16"]["enabled"] == "auto"
    assert read_deepspeed_config("zero3")["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]
    with pytest.raises(UserError, match="use one of zero1, zero2, zero3, zero3_offload"):
        read_deepspeed_config("zero4")


# --------------------------------------------------------------------------- batch arithmetic


def test_total_batch_size_derives_accumulation_on_any_number_of_gpus():
    for processes, machines, expected in ((8, 1, 8), (4, 1, 16), (2, 1, 32), (8, 2, 4)):
        recipe = load_recipe(
            "tiny",
            [
                "preference.training.total_batch_size=128",
                "preference.training.per_device_train_batch_size=2",
                f"launch.num_processes={processes}",
                f"launch.num_machines={machines}",
                "launch.main_process_ip=10.0.0.1",
                "sft.training.total_batch_size=null",
            ],
        )
        assert recipe.accumulation_steps("preference") == expected
        assert recipe.total_batch("preference") == 128


def test_total_batch_size_that_does_not_divide_says_what_would():
    with pytest.raises(RecipeError) as info:
        load_recipe(
            "tiny",
            [
                "preference.training.total_batch_size=128",
                "preference.training.per_device_train_batch_size=3",
                "launch.num_processes=8",
                "sft.training.total_batch_size=null",
            ],
        )
    (line,) = info.value.messages
    assert line.endswith(
        "preference.training.total_batch_size: 128 is not a multiple of "
        "per_device_train_batch_size 3 x 8 processes = 24; with 8 processes, "
        "per_device_train_batch_size 1, 2, 4, 8 or 16 would work"
    )


def test_total_batch_size_and_a_different_accumulation_conflict():
    with pytest.raises(RecipeError) as info:
        load_recipe(
            "tiny",
            [
                "preference.training.total_batch_size=64",
                "preference.training.per_device_train_batch_size=4",
                "preference.training.gradient_accumulation_steps=2",
                "launch.num_processes=4",
                "sft.training.total_batch_size=null",
            ],
        )
    assert "needs gradient_accumulation_steps 4 with 4 processes" in info.value.messages[0]


def test_launch_settings_errors():
    with pytest.raises(RecipeError) as info:
        load_recipe("tiny", ["launch.num_machines=2", "launch.machine_rank=2"])
    joined = "\n".join(info.value.messages)
    assert "machine_rank (2) must be below num_machines (2)" in joined
    with pytest.raises(RecipeError) as info:
        load_recipe("tiny", ["launch.num_machines=2"])
    assert "main_process_ip is required with num_machines > 1" in info.value.messages[0]


# --------------------------------------------------------------------------- memory estimate


def test_memory_estimate_matches_deepspeed_estimators():
    """Our per-GPU model-state bytes equal DeepSpeed's own estimators for ZeRO-2 and ZeRO-3
    (an 8B model with a 525M-parameter largest layer, 8 GPUs x 2 nodes)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest = 8_030_000_000, 525_000_000
    _, zero2_gpu = estimate_zero2_model_states_mem_needs(params, 8, 2, cpu_offload=False)
    assert model_states_memory(params, largest, 2, False, 8, 2).gpu_bytes == zero2_gpu
    _, zero3_gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest, 8, 2, cpu_offload=False, zero_init=True
    )
    assert model_states_memory(params, largest, 3, False, 8, 2).gpu_bytes == zero3_gpu
    cpu, offload_gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest, 8, 2, cpu_offload=True, cpu_offload_params=True, zero_init=True
    )
    offload = model_states_memory(params, largest, 3, True, 8, 2)
    assert (offload.gpu_bytes, offload.cpu_bytes) == (offload_gpu, cpu)
    # Without ZeRO every GPU holds 16 bytes per parameter.
    assert model_states_memory(params, largest, 0, False, 8, 2).gpu_bytes == 16 * params


def test_dry_run_for_eight_gpus_prints_a_command_to_paste(tmp_path):
    out = tmp_path / "out"
    result = simpo(
        "train", "tiny", "--dry-run", "--output-dir", str(out),
        "--num-processes", "8", "--deepspeed", "zero3", "--mixed-precision", "bf16",
        "--all-settings",
        "--set", "preference.training.total_batch_size=128",
        "--set", "preference.training.per_device_train_batch_size=2",
        "--set", "sft.training.total_batch_size=128",
        "--set", "sft.training.per_device_train_batch_size=4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "8 process(es) per machine x 1 machine(s) = 8; DeepSpeed zero3 (ZeRO-3)" in text
    command = next(line.strip() for line in text.splitlines() if "accelerate launch" in line)
    assert command.startswith(
        "accelerate launch --num_processes 8 --num_machines 1 --machine_rank 0 "
        "--main_process_port 29500 --mixed_precision bf16 --dynamo_backend no --multi_gpu "
        f"-m simpo_cli train tiny --output-dir {out} "
    )
    assert "--set launch.deepspeed=zero3" in command
    assert "--set logging.all_settings=true" in command  # each process prints every setting
    assert "--set preference.training.bf16=True" in command
    assert "2 per device x 8 process(es) x 8 accumulation step(s) = 128 per optimizer step" in text
    assert "4 per device x 8 process(es) x 4 accumulation step(s) = 128 per optimizer step" in text
    # 1500 of the shipped pairs / 128 per step -> 12 steps per epoch; 3000 SFT rows -> 24 per
    # epoch, 36 in its 1.5 epochs.
    assert "optimizer steps: 12 per epoch (1500 rows, before dropped rows); 12 in all" in text
    assert "optimizer steps: 24 per epoch (3000 rows, before dropped rows); 36 in all" in text
    assert "memory per GPU for model states (ZeRO-3, 8 GPU(s))" in text
    assert "WARNING" not in text
    assert not out.exists()


def test_dry_run_warns_when_it_will_not_fit(tmp_path):
    result = simpo(
        "preference", "tiny", "--dry-run", "--output-dir", str(tmp_path / "o"),
        "--set", "pipeline=[preference]", "--set", "launch.gpu_memory_gb=0.001",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING: preference needs about" in result.stdout
    assert "more than launch.gpu_memory_gb (0.001)" in result.stdout


# --------------------------------------------------------------------------- pre-flight


def test_busy_port_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(
            UserError, match=f"port {port} is in use on this machine .*; pass --main-process-port"
        ):
            preflight(LaunchSettings(num_processes=2, main_process_port=port), gpus=0)


def test_more_processes_than_gpus_is_a_clear_error():
    with pytest.raises(UserError, match="8 processes but this machine has 2 GPU"):
        preflight(LaunchSettings(num_processes=8), gpus=2)


def test_missing_deepspeed_is_one_line_exit_2(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['deepspeed'] = None  # as on a machine without DeepSpeed\n"
        "from simpo_cli.cli import main\n"
        f"sys.argv = ['simpo', 'train', 'tiny', '-o', {str(tmp_path)!r}, '--deepspeed', 'zero2']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: launch.deepspeed: DeepSpeed is not installed")
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- 2 processes on CPU

BASE_SETS = [
    "pipeline=[preference]",
    "model.init=pretrained",
    "model.config=null",
    "preference.data.train.max_rows=320",
    "preference.training.total_batch_size=16",
    "preference.training.logging_steps=1",
    "preference.training.save_steps=10",
]


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """The tiny recipe's seeded model saved as a folder: every run below starts from exactly
    these weights (a from_config model created sharded under ZeRO-3 draws other random
    numbers)."""
    from simpo_cli.data import load_tokenizer
    from simpo_cli.model.load import load_model

    folder = tmp_path_factory.mktemp("start") / "model"
    recipe = load_recipe("tiny")
    load_model(recipe, None, 42).save_pretrained(folder)
    load_tokenizer(recipe.model).save_pretrained(folder)
    return folder


def _train(out: Path, start: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [*BASE_SETS, f"model.name_or_path={start}"]
    args = [a for s in sets for a in ("--set", s)]
    return simpo("preference", "tiny", "-o", str(out), *args, *extra)


def _losses(out: Path) -> tuple[list[float], list[float]]:
    lines = [json.loads(x) for x in (out / "preference" / "metrics.jsonl").read_text().splitlines()]
    train = [m["loss"] for m in lines if "loss" in m]
    held_out = [m["eval_loss"] for m in lines if "eval_loss" in m]
    return train, held_out


PADDED_FULL_LOGITS = ["--set", "preference.training.padding_free=false",
                      "--set", "preference.training.logps_chunk_size=0"]  # fmt: skip


# SFT (2 steps of 32 rows) then SimPO (20 steps of 16 pairs) in one command: the SimPO stage starts
# from the model the SFT stage saved (under ZeRO-3, consolidated from every rank's partitions).
PIPELINE_SETS = [
    *BASE_SETS,
    "pipeline=[sft, preference]",
    "sft.data.train.max_rows=64",
    "sft.training.num_train_epochs=1",
    "sft.training.total_batch_size=32",
    "sft.training.per_device_train_batch_size=16",
]


def own_port() -> list[str]:
    """A port free now: the default (29500) may be held by another worker's run, and two
    launches that pass the port check together would rendezvous on one port."""
    return ["--main-process-port", str(free_port())]


def _train_pipeline(out: Path, start: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [*PIPELINE_SETS, f"model.name_or_path={start}"]
    args = [a for s in sets for a in ("--set", s)]
    return simpo("train", "tiny", "-o", str(out), *args, *extra)


@pytest.fixture(scope="module")
def single(tmp_path_factory, start_model):
    """One process, padded batches and full logits (the plain transformers path)."""
    out = tmp_path_factory.mktemp("single") / "out"
    one_batch = ["--set", "preference.training.per_device_train_batch_size=16"]
    result = _train_pipeline(out, start_model, *PADDED_FULL_LOGITS, *one_batch)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, start_model, single):
    """2 processes with the default packed batches and chunked log-probs, 4 pairs per
    micro-batch and 2 accumulation steps, train like 1 process on padded batches of 16 pairs
    with full logits: SFT, then SimPO from the SFT model. (Under ZeRO-3:
    test_zero3_trains_like_one_process.)"""
    out = tmp_path / "out"
    extra = ["--num-processes", "2", "--set", "preference.training.per_device_train_batch_size=4"]
    result = _train_pipeline(out, start_model, *extra, *own_port())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching: accelerate launch --num_processes 2" in result.stdout
    _assert_trains_like(out, single, None, 1e-5)


def _assert_trains_like(out: Path, single: Path, deepspeed: str | None, tolerance: float):
    """The 2-process run in `out` trained like the 1-process one: the same data order and total
    batch of 16 pairs, so only the order of floating-point sums differs (packed rows and chunked
    log-probs against padded full logits; gradients averaged over 2 processes; ZeRO-3 gathers
    and reduces in buckets): per-step losses agree to float32 rounding accumulated over 20
    steps. The saved model loads, and is what training left (the last checkpoint's weights)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one_train, one_eval = _losses(single)
    two_train, two_eval = _losses(out)
    assert len(two_train) == len(one_train) == 20, "each step logged once, by rank 0 only"
    assert two_train == pytest.approx(one_train, rel=tolerance)
    assert two_eval == pytest.approx(one_eval, rel=tolerance)
    record = json.loads((out / "preference" / "reproducibility.json").read_text())
    assert record["world_size"] == 2

    saved = load_file(out / "preference" / "model.safetensors")
    assert all(t.numel() > 0 for t in saved.values()), "an empty tensor was saved"
    model = AutoModelForCausalLM.from_pretrained(out / "preference")
    loaded = model.state_dict()
    for name, tensor in saved.items():
        assert loaded[name].shape == tensor.shape and (loaded[name] == tensor).all()
    trained = _trained_weights(out / "preference" / "checkpoint-20", deepspeed)
    for name, tensor in trained.items():
        # The tiny model ties lm_head to the embedding; the saved file holds it once.
        saved_name = "model.embed_tokens.weight" if name == "lm_head.weight" else name
        assert (saved[saved_name] == tensor).all(), name
    reference = load_file(single / "preference" / "model.safetensors")
    for name, tensor in reference.items():
        assert (saved[name] - tensor).abs().max() < 1e-4, name


def _trained_weights(checkpoint: Path, deepspeed: str | None) -> dict:
    """The weights as training left them: the optimizer's copy in the last checkpoint (ZeRO:
    the fp32 partitions of every rank, consolidated by DeepSpeed's own tool)."""
    if deepspeed is None:
        from safetensors.torch import load_file

        return load_file(checkpoint / "model.safetensors")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


@pytest.mark.slow
def test_zero3_trains_like_one_process(tmp_path, start_model, single):
    """`simpo train` of SFT then SimPO in one 2-process ZeRO-3 launch (every weight partitioned,
    lm_head included) trains like the 1-process run: the same losses, held-out losses and
    weights; each stage's model is consolidated and loads, and only rank 0 reports. (A ZeRO-3
    run stopped and resumed: test_lora.py, test_lora_under_zero3_stopped_and_resumed_...)"""
    from transformers import AutoModelForCausalLM

    extra = ["--num-processes", "2", "--deepspeed", "zero3",
             "--set", "preference.training.per_device_train_batch_size=4"]  # fmt: skip
    out = tmp_path / "out"
    result = _train_pipeline(out, start_model, *extra, *own_port())
    assert result.returncode == 0, result.stderr[-3000:]
    sft = AutoModelForCausalLM.from_pretrained(out / "sft")
    assert sft.model.embed_tokens.weight.shape == (320, 64)
    assert json.loads((out / "sft" / "reproducibility.json").read_text())["world_size"] == 2
    for stage in ("sft", "preference"):
        assert result.stdout.count(f"[{stage}] finished") == 1, "only rank 0 reports"
    _assert_trains_like(out, single, "zero3", 1e-4)
    before = json.loads((out / "preference" / "eval_before.json").read_text())
    after = json.loads((out / "preference" / "stage_complete.json").read_text())["eval"]
    assert after["eval_loss"] < before["eval_loss"]


@pytest.mark.slow
def test_a_dying_rank_stops_the_others(tmp_path, start_model):
    """Kill one worker of a 2-process run: the launcher stops the other instead of leaving it
    waiting in a collective, says what happened, and exits 1 (README "Exit codes": a process
    killed by a signal has no exit code of its own to pass on)."""
    sets = [*BASE_SETS, f"model.name_or_path={start_model}"]
    args = [sys.executable, "-m", "simpo_cli", "preference", "tiny", "-o", str(tmp_path)]
    args += [a for s in sets for a in ("--set", s)]
    args += ["--num-processes", "2", "--set", "preference.data.train.max_rows=3000"]
    args += ["--set", "preference.training.per_device_train_batch_size=8"]
    args += ["--main-process-port", str(free_port())]  # other runs may hold the default one
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = tmp_path / "preference" / "metrics.jsonl"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if metrics.is_file() and '"loss"' in metrics.read_text():
            break
        time.sleep(0.1)
    if process.poll() is not None:
        stderr = process.stderr.read()[-3000:]
        pytest.fail(f"the run ended (exit code {process.returncode}) before a step: {stderr}")
    # This run's workers only: other runs on the machine may have workers of the same ranks.
    survivor, victim = (_worker_pid(rank, parent=process.pid) for rank in (0, 1))
    assert survivor is not None and victim is not None, "the run's workers were not found"
    os.kill(victim, signal.SIGKILL)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the launcher did not stop after a rank died")
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert process.returncode == EXIT_FAILURE, (process.returncode, errors)
    assert "error: training process rank 1 failed (exit code -9)" in stderr
    assert not psutil.pid_exists(survivor), "rank 0 was left running"


@pytest.mark.parametrize(("exit_code", "expected"), [(7, 7), (-9, EXIT_FAILURE)])
def test_a_crashed_process_s_exit_code_ends_the_run(monkeypatch, capsys, exit_code, expected):
    """torchrun's agent reports rank 1 failed with `exit_code` (a negative one: killed by that
    signal): the run ends with that exit code, or 1 when there is none (README "Exit codes").
    The children's environment is set while they run and this process's given back after: a
    sweep launches its next point from the same process."""
    import accelerate.commands.launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from simpo_cli import launch

    failure = ProcessFailure(local_rank=1, pid=4242, exitcode=exit_code, error_file="")
    crash = ChildFailedError("simpo_cli.cli", {1: failure})
    seen = []

    def crashed(args) -> None:
        seen.append((launch.inside_launch(), os.environ["PET_SIGNALS_TO_HANDLE"]))
        raise crash

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", crashed)
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM")
    command = launch.accelerate_command(LaunchSettings(num_processes=2), "no", ["preference"])
    assert launch.run(command) == expected
    assert seen == [(True, "SIGHUP,SIGQUIT")]
    assert not launch.inside_launch() and os.environ["PET_SIGNALS_TO_HANDLE"] == "SIGTERM"
    assert f"error: training process rank 1 failed (exit code {exit_code})" in (
        capsys.readouterr().err
    )


def _worker_pid(rank: int, parent: int | None = None) -> int | None:
    """The training process of `rank`: among `parent`'s descendants where given."""
    entries = Path("/proc").iterdir()
    if parent is not None:
        entries = [Path(f"/proc/{p.pid}") for p in psutil.Process(parent).children(recursive=True)]
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"simpo_cli" in cmdline and f"RANK={rank}".encode() in environ:
            if b"LOCAL_RANK=" + str(rank).encode() in environ:
                return int(entry.name)
    return None


@pytest.mark.slow
def test_reference_losses_under_zero3_match_one_process(tmp_path, start_model):
    """KTO on 2 processes under ZeRO-3 trains like 1 process at the same total batch, with the
    reference's log-probs cached by a pre-pass run inside the training engine and with a live
    reference model (its own inference engine). KTO's reference scores chosen, rejected and
    mismatched completions, and its z0 is the KL estimate over the whole batch: gathered from
    both processes. The first step's loss is 0.5 (policy == reference: r = z0 = 0)."""
    # 5 steps of 16 pairs; held-out z0 is per evaluation step too: 8 pairs a step in every run.
    kto = ["--set", "preference.loss=kto", "--set", "preference.gamma_beta_ratio=null",
           "--set", "preference.sft_weight=null",
           "--set", "preference.data.train.max_rows=80",
           "--set", "preference.data.eval.max_rows=48"]  # fmt: skip
    one = tmp_path / "one"
    result = _train(one, start_model, *kto,
                    "--set", "preference.training.per_device_train_batch_size=16",
                    "--set", "preference.training.per_device_eval_batch_size=8")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    two = ["--num-processes", "2", "--deepspeed", "zero3",
           "--set", "preference.training.per_device_train_batch_size=8",
           "--set", "preference.training.per_device_eval_batch_size=4"]  # fmt: skip
    runs = {}
    for mode in ("cached", "live"):
        out = tmp_path / mode
        result = _train(out, start_model, *kto, *two, "--set", f"preference.reference.mode={mode}",
                        *own_port())  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = _losses(out)
    assert runs["cached"][0] == pytest.approx(runs["live"][0], rel=1e-5)
    assert runs["cached"][1] == pytest.approx(runs["live"][1], rel=1e-5)
    assert runs["cached"][0] == pytest.approx(_losses(one)[0], rel=1e-4)
    assert runs["cached"][1] == pytest.approx(_losses(one)[1], rel=1e-4)
    assert runs["cached"][0][0] == pytest.approx(0.5, rel=1e-5)
    assert len(list((tmp_path / "cached" / "reference_logps").glob("*.json"))) == 2
    assert len(list((one / "reference_logps").glob("*.json"))) == 2


def test_dry_run_memory_follows_the_speed_keys(tmp_path, cli):
    """The logits line of --dry-run: one chunk of trained tokens by default, the whole
    micro-batch at max_length with logps_chunk_size 0; and how batches are laid out."""
    args = [
        "preference",
        "tiny",
        "--dry-run",
        "-o",
        tmp_path / "o",
        "--set",
        "pipeline=[preference]",
    ]
    chunked = cli(*args, "--set", "preference.training.logps_chunk_size=64")
    assert chunked.code == 0, chunked.stderr
    # 64 tokens x 320 words x 4 bytes; full: 8 pairs x 2 sides x 64 tokens x 320 x 4.
    assert (
        "preference: fp32 logits held at once: 80.0 KiB (chunks of 64 trained tokens, vocabulary "
        "320; full logits of a micro-batch at max_length: 1.2 MiB); batches packed without "
        "padding" in chunked.stdout
    )
    full = cli(*args, "--set", "preference.training.logps_chunk_size=0",
               "--set", "preference.training.padding_free=false")  # fmt: skip
    assert full.code == 0, full.stderr
    assert (
        "preference: fp32 logits of one micro-batch at max_length: 1.2 MiB (vocabulary 320; "
        "logps_chunk_size 0); batches padded to the longest" in full.stdout
    )


@pytest.mark.slow
def test_zero3_packed_chunked_logps_and_gradients(tmp_path):
    """Under 2-process ZeRO-3 with every weight partitioned (lm_head gathered by its hooks for
    the chunks and again for their recomputation), packed batches with chunked log-probs give
    the per-sequence log-probs and gradients of padded full logits without DeepSpeed, within
    1e-5, for the Llama-style (tied embeddings) and Gemma-2-style (softcapping) models."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    worker = Path(__file__).parent / "zero3_logps_worker.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), str(worker)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    # The two processes share stdout, so their lines may run into each other.
    verdicts = re.findall(r"rank \d (\w+) \w+: log-prob diff \S+, gradient diff \S+ (ok|MISMATCH)",
                          result.stdout)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(verdicts) == [("gemma2", "ok")] * 2 + [("llama", "ok")] * 2, result.stdout


@pytest.mark.slow
def test_zero3_processes_decode_alone_between_training_steps(tmp_path):
    """tests/zero3_decode_worker.py under torchrun with 2 processes: between ZeRO-3 training
    steps each process decodes greedily for its own number of tokens with the weights gathered
    whole (model/load.py whole_for_decoding, what the rounds' greedy check runs in); the tokens
    are those of the same weights without DeepSpeed, DeepSpeed's hooks are back after, and the
    next two steps' losses match. Without whole_for_decoding the processes' gathers mismatch."""
    worker = Path(__file__).parent / "zero3_decode_worker.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), str(worker)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    line = r"rank (\d): decoded (\d+) tokens equal, hooks restored, .*? (ok|MISMATCH)"
    verdicts = re.findall(line, result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(verdicts) == [("0", "3", "ok"), ("1", "9", "ok")], result.stdout
