"""The launch: DeepSpeed configs, the `accelerate launch` command line, the arithmetic a dry
run prints (batch, steps, memory), and running the launcher. Building a command has no side
effects; `preflight` only checks the machine; `run` starts the processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from simpo_cli import stops
from simpo_cli.errors import (
    EXIT_ABORTED,
    EXIT_FAILURE,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    UserError,
)
from simpo_cli.recipe import (
    DEEPSPEED_DIR,
    TRAINING_STAGES,
    LaunchSettings,
    ModelSettings,
    Recipe,
    shipped_deepspeed_configs,
)

GIB = 1024**3


def deepspeed_config_path(value: str) -> Path:
    """A shipped DeepSpeed config by name (zero3), or a JSON file by path."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = DEEPSPEED_DIR / f"{value}.json"
    if shipped.is_file():
        return shipped
    raise UserError(
        f"launch.deepspeed: '{value}' is neither a JSON file nor a shipped config; use one of "
        f"{', '.join(shipped_deepspeed_configs())}, or a path"
    )


def read_deepspeed_config(value: str) -> dict:
    path = deepspeed_config_path(value)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: launch.deepspeed: line {err.lineno}: invalid JSON ({err.msg}); fix the file"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: launch.deepspeed: cannot read ({err}); fix the path") from None
    if not isinstance(config, dict):
        raise UserError(
            f"{path}: launch.deepspeed: not a DeepSpeed config; it holds one JSON object {{...}}"
        )
    if not isinstance(config.get("zero_optimization", {}), dict):
        raise UserError(
            f"{path}: launch.deepspeed: zero_optimization must be a mapping; fix the file"
        )
    return config


LAUNCHED_ENV = "SIMPO_LAUNCHED"
LAUNCH_ID = "SIMPO_LAUNCH_ID"  # one value per `simpo` command, inherited by its processes
# Exit codes with which training processes end after saying why (errors.py).
EXPLAINED_EXITS = (EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_ABORTED)


def inside_launch() -> bool:
    """True in a process started by a launcher: ours marks its children, and torchrun (under
    accelerate, SLURM scripts or by hand) sets LOCAL_RANK. Such a process never launches again."""
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


def needs_launch(launch: LaunchSettings) -> bool:
    return launch.world_size > 1 or launch.deepspeed is not None


def launch_command(recipe: Recipe, simpo_args: list[str]) -> list[str]:
    """The `accelerate launch` command that runs `simpo <simpo_args>` on every process.

    DeepSpeed is configured through the Trainer (TrainingArguments.deepspeed, where transformers
    fills the config's "auto" values from the recipe), so the launcher itself only starts
    processes: the same command serves data parallel and every ZeRO stage.
    """
    trained = [name for name in recipe.pipeline if name in TRAINING_STAGES]
    first = recipe.stage(trained[0]).training if trained else None
    precision = "bf16" if first and first.bf16 else "fp16" if first and first.fp16 else "no"
    return accelerate_command(recipe.launch, precision, simpo_args)


def accelerate_command(launch: LaunchSettings, precision: str, simpo_args: list[str]) -> list[str]:
    """`accelerate launch` with the launch settings, running `simpo <simpo_args>`."""
    command = [
        "accelerate", "launch",
        "--num_processes", str(launch.world_size),
        "--num_machines", str(launch.num_machines),
        "--machine_rank", str(launch.machine_rank),
        "--main_process_port", str(launch.main_process_port),
        "--mixed_precision", precision,
        "--dynamo_backend", "no",
    ]  # fmt: skip
    if launch.num_machines > 1:
        command += ["--main_process_ip", str(launch.main_process_ip)]
        command += ["--rdzv_backend", launch.rdzv_backend]
    if launch.world_size > 1:
        # torchrun-style processes. On a CPU-only machine too: accelerate's --cpu would start
        # a single process; the children select the CPU themselves (TrainingArguments.use_cpu).
        command += ["--multi_gpu"]
    return command + ["-m", "simpo_cli", *simpo_args]


def run(command: list[str]) -> int:
    """Run an `accelerate launch ...` command in this process, wait for every training process,
    and return the run's exit code. When one process fails, torchrun's agent stops the others.
    SIGTERM, SIGUSR1 and Ctrl-C sent to this process reach the training processes, which save a
    checkpoint and exit 75 (stops.forwarding)."""
    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    assert command[:2] == ["accelerate", "launch"], command
    args = launch_command_parser().parse_args(command[2:])
    # The children must run in place, not launch again; torchrun's agent would answer SIGTERM
    # and SIGINT by killing the training processes 30 s later, whether or not their checkpoint
    # is written: those signals are ours. This process's environment is given back after, so
    # that it can launch again (a sweep's next point, the next stage run alone).
    children = {LAUNCHED_ENV: "1", "PET_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT"}
    with stops.forwarding() as stop, environment(children):
        try:
            accelerate_launch(args)
            return 0
        except ChildFailedError as err:
            codes = [failure.exitcode for failure in err.failures.values()]
            rank, first = err.get_first_failure()
            first_code = first.exitcode
        except subprocess.CalledProcessError as err:  # one process (DeepSpeed), no torchrun
            codes, rank, first_code = [err.returncode], 0, err.returncode
    code = run_exit_code(codes, stopping=bool(stop.signal))
    if code is not None:
        return code
    print(
        f"error: training process rank {rank} failed (exit code {first_code}) and the "
        "launcher stopped the others; its messages are above. Run the same command again "
        "to resume from the last checkpoint",
        file=sys.stderr,
    )
    return first_code if first_code > 0 else EXIT_FAILURE


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set while the block runs, then as they were."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_exit_code(codes: list[int], stopping: bool) -> int | None:
    """The run's exit code from its failed training processes' codes, when they explain
    themselves (rank 0 has printed why): all the same user error (2), non-finite step (3), stop
    after saving (75) or abort (130); or 75 when this launcher passed on a stop signal and each
    process saved or was killed by it (one that had not yet set up its handler). None: a crash."""
    if len(set(codes)) == 1 and codes[0] in EXPLAINED_EXITS:
        return codes[0]
    if stopping and all(code == EXIT_PREEMPTED or code < 0 for code in codes):
        return EXIT_PREEMPTED
    return None


def zero_stage(recipe: Recipe) -> int:
    """The ZeRO stage of the recipe's DeepSpeed config; 0 without DeepSpeed."""
    if recipe.launch.deepspeed is None:
        return 0
    config = read_deepspeed_config(recipe.launch.deepspeed)
    return int(config.get("zero_optimization", {}).get("stage", 0))


def preflight(launch: LaunchSettings, gpus: int) -> None:
    """Checks that turn a hang or a deep stack trace into one line: DeepSpeed missing, more
    processes than GPUs, a busy rendezvous port."""
    try:
        has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    except ValueError:  # present in sys.modules as None: imports of it fail
        has_deepspeed = False
    if launch.deepspeed is not None and not has_deepspeed:
        raise UserError(
            "launch.deepspeed: DeepSpeed is not installed (simpo-cli depends on it); pip install "
            "deepspeed, or drop --deepspeed to train with plain data parallel"
        )
    if gpus and launch.num_processes > gpus:
        raise UserError(
            f"launch.num_processes: {launch.num_processes} processes but this machine has "
            f"{gpus} GPU(s); pass --num-processes {gpus} (one process per GPU)"
        )
    if launch.machine_rank == 0 and not port_is_free(launch.main_process_port):
        raise UserError(
            f"launch.main_process_port: port {launch.main_process_port} is in use on this "
            "machine (another run?); pass --main-process-port with a free port, e.g. "
            f"{free_port()}"
        )


def port_is_free(port: int) -> bool:
    """Nothing listens on the port. Like the rendezvous store, ignore connections of a stopped
    run still in TIME_WAIT: a requeued job reuses its port at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- memory arithmetic


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes for model states (weights, gradients, optimizer) under a ZeRO stage."""

    gpu_bytes: int
    cpu_bytes: int
    stage: int
    offload: bool


def model_states_memory(
    n_params: int, largest_layer: int, stage: int, offload: bool, gpus_per_node: int, nodes: int
) -> MemoryEstimate:
    """Model-state memory per GPU with mixed-precision Adam, following DeepSpeed's estimators
    (estimate_zero2/3_model_states_mem_needs; bytes per parameter, N = all GPUs):

        no ZeRO: 16          (fp32 weights 4 + grads 4 + Adam 8, every GPU holds all)
        ZeRO-1:  4 + 16/N    (16-bit weights and grads; fp32 master, grads and Adam sharded)
        ZeRO-2:  2 + 18/N    (16-bit weights; 16-bit and fp32 grads, master and Adam sharded)
        ZeRO-3:  4 x largest layer + 18/N   (everything sharded; one layer gathered at a time)
        ZeRO-3 + offload of parameters and optimizer: 4 x largest layer on the GPU, the rest
        (18 per parameter per node, x1.5 buffer) in CPU memory.
    """
    total = gpus_per_node * nodes
    p = n_params
    if stage == 3 and offload:
        return MemoryEstimate(4 * largest_layer, int(p * 18 / nodes * 1.5), 3, True)
    gpu = {
        0: 16 * p,
        1: 4 * p + 16 * p // total,
        2: 2 * p + 18 * p // total,
        3: 4 * largest_layer + 18 * p // total,
    }[stage]
    return MemoryEstimate(int(gpu), 0, stage, False)


def logits_bytes(
    per_device_batch: int, max_length: int, vocab: int, paired: bool, chunk_size: int = 0
) -> int:
    """fp32 logits held at once (log-softmax is taken in fp32): the peak that grows with the
    vocabulary. Full logits: every position of a micro-batch at max_length (a preference batch
    holds chosen and rejected, twice the rows). Chunked (logps_chunk_size): one chunk of trained
    tokens."""
    tokens = per_device_batch * (2 if paired else 1) * max_length
    if chunk_size:
        tokens = min(tokens, chunk_size)
    return tokens * vocab * 4


class ParameterCount(NamedTuple):
    total: int
    largest: int  # the largest layer's
    vocab: int
    trainable: int  # all of them, or with model.lora the adapters'
    linear: int  # in linear layers but the output head: what bitsandbytes quantizes


def meta_model(settings: ModelSettings):
    """The recipe's model from its config alone: built on the meta device, no weights read.
    None when the config cannot be read here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if settings.init == "from_config":
            config = dict(settings.config or {})
            config = AutoConfig.for_model(config.pop("model_type"), **config)
        else:
            config = AutoConfig.from_pretrained(
                settings.name_or_path, trust_remote_code=settings.trust_remote_code
            )
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=settings.trust_remote_code
            )
    except Exception:  # offline hub name, unknown architecture, a folder with an adapter only
        return None


def count_parameters(recipe: Recipe) -> ParameterCount | None:
    """The parameters of the recipe's model, from its config alone (meta_model). None when the
    config cannot be read here."""
    import torch

    settings = recipe.model
    model = meta_model(settings)
    if model is None:  # the estimate is skipped
        return None
    sizes = {id(p): p.numel() for p in model.parameters()}  # tied weights count once
    vocab = model.get_input_embeddings().weight.shape[0]
    total = sum(sizes.values())
    head = model.get_output_embeddings()
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    ]
    trainable = total if settings.lora is None else lora_parameters(linears, settings.lora)
    linear = sum(module.weight.numel() for _, module in linears)
    return ParameterCount(total, max(sizes.values()), vocab, trainable, linear)


def lora_parameters(linears, lora) -> int:
    """Parameters of the LoRA adapters peft would add on the (name, linear layer) pairs of a
    model but its output head: r x (in + out) per targeted layer (all-linear: every one)."""
    return sum(
        lora.r * (module.in_features + module.out_features)
        for name, module in linears
        if lora.target_modules == "all-linear" or name.split(".")[-1] in lora.target_modules
    )
