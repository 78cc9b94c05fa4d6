"""Loading models: a stage's starting model (a previous stage's folder, a hub model or one built
from model.config), a checkpoint to evaluate on this process's device, and folders that hold a
model's whole weights for readers of files (vLLM, lm-eval, a base to quantize). A folder holding
only an adapter loads as its merged model (adapters.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

from simpo_cli.distributed import barrier, is_main_process, whole_weights
from simpo_cli.errors import UserError
from simpo_cli.launch import LAUNCH_ID
from simpo_cli.model.adapters import (
    RECIPE_FILE,
    adapter_folder,
    adapter_only,
    merged,
    quantization_config,
    read_base,
)
from simpo_cli.recipe import ModelSettings, Recipe


def load_model(recipe: Recipe, start_from: str | None, seed: int, quantized: bool = False):
    """The stage's starting model: a previous stage's output, the recipe's pretrained model, or
    a fresh model built from model.config (seeded, so every run builds the same weights).
    quantized: as model.quantization says (the base weights of QLoRA)."""
    return load_model_from(recipe.model, start_from, seed, quantized)


def load_model_from(
    settings: ModelSettings | None, start_from: str | None, seed: int, quantized: bool = False
):
    """load_model for model settings. A folder holding only an adapter (a stage's, or a bare
    peft one) loads as its base, loaded the same way, with the adapter merged in. Settings None:
    a folder's own dtype, or an adapter's recorded base settings."""
    source = start_from
    if source is None and settings is not None and settings.init == "pretrained":
        source = settings.name_or_path
    adapter = adapter_only(source)
    if adapter is not None:
        if quantized and settings is not None and settings.quantization:
            # the caller writes the merged model first (adapters.full_model_folder)
            raise ValueError(f"{source}: an adapter-only folder cannot be loaded quantized")
        recorded, base, base_seed = read_base(adapter)
        how = settings or recorded
        base_settings = recorded.model_copy(
            update={
                "dtype": how.dtype,
                "attn_implementation": how.attn_implementation,
                "trust_remote_code": how.trust_remote_code,
            }
        )
        with whole_weights():  # merged whole, even where ZeRO-3 would partition the base
            return merged(adapter, load_model_from(base_settings, base, base_seed))
    if settings is None:
        settings = ModelSettings(name_or_path=source)
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        settings.dtype, torch.float16
    )
    kwargs: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    if quantized and (config := quantization_config(settings)) is not None:
        kwargs["quantization_config"] = config
    if source is None:  # init: from_config
        if "quantization_config" in kwargs:
            raise UserError(
                "model.quantization: a model built from model.config has no pretrained weights "
                "to quantize; remove quantization or use init: pretrained"
            )
        set_seed(seed)
        config = dict(settings.config or {})
        model_type = config.pop("model_type")
        model_config = AutoConfig.for_model(model_type, **config)
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        raise UserError(
            f"model.name_or_path: cannot load '{source}': {str(err).splitlines()[0]}; give a "
            "local model folder or a reachable hub name"
        ) from None


def check_vocab(model, tokenizer) -> None:
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps the full shape here
    if rows < len(tokenizer):
        raise UserError(
            f"model.config.vocab_size: the model has {rows} embedding rows but the tokenizer "
            f"has {len(tokenizer)} tokens; set vocab_size to at least {len(tokenizer)}"
        )


DTYPES = ("auto", "float32", "bfloat16", "float16")


def eval_device() -> torch.device:
    """This process's GPU under a launch (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(dtype: str) -> torch.dtype:
    """auto: bfloat16 on a GPU, float32 on the CPU."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, dtype)


def load_checkpoint(model_dir: str, dtype: str = "auto"):
    """A model folder on this process's device, in eval mode; one line when it cannot load."""
    try:
        with whole_weights():  # after a ZeRO-3 stage in this process (the evaluate stage)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype))
    except OSError as err:
        raise UserError(f"{model_dir}: cannot load a model: {str(err).splitlines()[0]}") from None
    return model.to(eval_device()).eval()


def scratch_folder(tag: str, near: Path | None = None) -> Path:
    """A folder name for a merged model written for the while: in `near` or the system's
    temporary folder, the same for every process of one command."""
    command = os.environ.get(LAUNCH_ID) or str(os.getpid())
    return (near or Path(tempfile.gettempdir())) / f".simpo-merged-{tag}-{command}"


@contextmanager
def full_model_folder(
    path: str | None, scratch: Path, load: Callable[[], Any] | None = None
) -> Iterator[str | None]:
    """A folder holding path's whole model: path itself, or for an adapter-only folder its
    merged model written into `scratch` (with the tokenizer) and removed afterwards. Every
    process of a launch enters; the main one writes. `load` builds the merged model (default:
    as recorded in base.json, in its own dtype)."""
    adapter = adapter_only(path)
    if adapter is None:  # a model folder, a hub name or None
        yield path
        return
    if is_main_process():
        shutil.rmtree(scratch, ignore_errors=True)
        with whole_weights():
            model = load() if load is not None else load_model_from(None, path, 0)
        model.save_pretrained(scratch)
        settings, base, _ = read_base(adapter)
        for source in (path, adapter, base, settings.tokenizer, settings.name_or_path):
            if source is None:
                continue
            try:
                AutoTokenizer.from_pretrained(source).save_pretrained(scratch)
                break
            except Exception:  # noqa: BLE001 - a bare adapter may carry none: its base's
                continue
        # The stage's settings (evaluation reads its beta, gamma and tokenization there).
        for stage_folder in (Path(path), adapter.parent):
            if (stage_folder / RECIPE_FILE).is_file():
                shutil.copy(stage_folder / RECIPE_FILE, scratch / RECIPE_FILE)
                break
        del model
    barrier()
    try:
        yield str(scratch)
    finally:
        barrier()
        if is_main_process():
            shutil.rmtree(scratch, ignore_errors=True)


def weights_identity(source: str) -> dict[str, Any]:
    """What decides a saved model's weights, cheaply: a folder's weight files and config (name,
    size, modification time; its adapter's too), or a hub name as given."""
    folder = Path(source)
    if not folder.is_dir():
        return {"name": source}
    adapter = adapter_folder(folder)
    files = sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for where in [folder] + ([adapter] if adapter not in (None, folder) else [])
        for p in where.iterdir()
        if p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "base.json")
    )
    return {"folder": str(folder.resolve()), "files": files}


@contextmanager
def whole_for_decoding(model, engine=None) -> Iterator[None]:
    """Every weight of a ZeRO-3-partitioned `model` whole on this process for the while, for
    decoding. Under ZeRO-3 a forward gathers each layer's shards from all processes at once, so
    processes that decode their own prompts, each for as many steps as its replies need, would
    wait on each other forever. Here each process holds the whole model once more (DeepSpeed's
    GatheredParameters) and, when the DeepSpeed `engine` has hooked the modules (training has
    started), the hooks that gather and release layers are taken off, so that a forward reads
    the gathered weights and gathers nothing; they are put back as DeepSpeed first put them.
    A model not partitioned is used as it is. (DeepSpeed's engine internals, as of 0.19:
    tests/test_launch.py::test_zero3_processes_decode_alone_between_training_steps decodes
    through this on 2 processes between training steps.)"""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is not None:
        # Layers the engine prefetched for a next step are in flight, neither whole nor
        # gathered again: wait for them (DeepSpeed's own reset between steps does this).
        offload.get_param_coordinator()._clean_inflight_param_registry()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if offload is not None:
            offload._remove_module_hooks()
        try:
            yield
        finally:
            if offload is not None:
                offload.forward_hooks, offload.backward_hooks = [], []
                offload.setup_zero_stage3_hooks()
                # setup_zero_stage3_hooks stacks the module a second time: keep one entry.
                stack = parameter_offload.FWD_MODULE_STACK
                if sum(entry is offload.module for entry in stack) > 1:
                    stack.remove(offload.module)
