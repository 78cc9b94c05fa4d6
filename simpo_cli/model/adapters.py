"""LoRA and QLoRA: adapters (peft) on the frozen, optionally quantized (bitsandbytes) weights.

A stage with `model.lora` trains only the adapters. It saves them under DIR/<stage>/adapter/,
with base.json, the record of the model they sit on. Where a model leaves training (the last
training stage, the stage generate samples from; `model.lora.merge` decides) it also writes the
merged model at DIR/<stage>/, which from_pretrained and vLLM load as a plain model.

Any folder holding an adapter, a stage's or a bare peft one, loads as its merged model:
`load_model` merges it in memory (after merging its base, if that is an adapter too), and
`full_model_folder` writes the merged model into a scratch folder for readers that need files
(vLLM, lm-eval, a base to quantize). The next training stage puts fresh adapters on the merged
model, or with `model.lora.continue_adapter` trains the same adapter on the same base further.
peft and bitsandbytes are optional extras, imported here only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from simpo_cli.errors import UserError
from simpo_cli.launch import meta_model, zero_stage
from simpo_cli.recipe import TRAINING_STAGES, ModelSettings

ADAPTER_DIR = "adapter"
BASE_RECORD = "base.json"  # in the adapter folder: the model the adapter sits on
RECIPE_FILE = "resolved_recipe.yaml"  # a stage folder's recipe (outputs.StageDir)


def check_combination(recipe) -> None:
    """Refuse, before anything starts, what adapters are not built for here: quantized weights
    under ZeRO-3 (bitsandbytes' packed 4-bit storage would be partitioned as if it were
    bf16)."""
    settings = recipe.model
    if settings.lora is not None and settings.quantization and zero_stage(recipe) == 3:
        raise UserError(
            f"model.quantization {settings.quantization} with launch.deepspeed "
            f"{recipe.launch.deepspeed} (ZeRO-3) is not supported; quantized weights fit whole "
            "on each GPU: use --deepspeed zero2 or plain data parallel (no --deepspeed)"
        )


def check_targets(recipe) -> None:
    """Refuse, before anything starts, a model.lora.target_modules entry that names no layer of
    the recipe's model, which peft would meet with a traceback once a stage had loaded it. Read
    from the model built on the meta device from its config (every training stage trains that
    architecture); where the config cannot be read here, add_adapters checks the loaded model."""
    lora = recipe.model.lora
    if lora is None or lora.target_modules == "all-linear":
        return
    model = meta_model(recipe.model)
    if model is not None:
        _check_targets(model, lora.target_modules)


def _check_targets(model, targets: list[str]) -> None:
    import torch

    names = [name for name, _ in model.named_modules()]
    # peft's rule for a list: an entry matches a module of that name or ending in ".<entry>".
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not missing:
        return
    linear = dict.fromkeys(
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    raise UserError(
        f"model.lora.target_modules: the model ({type(model).__name__}) has no layer "
        f"{' or '.join(repr(t) for t in missing)}; its linear layers are {', '.join(linear)}; "
        "list some of those, or use all-linear"
    )


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError(
            "model.lora: peft is not installed; pip install 'simpo-cli[lora]' (or peft), or "
            "remove model.lora to train every weight"
        ) from None
    return peft


def quantization_config(settings: ModelSettings):
    """bitsandbytes settings for from_pretrained (QLoRA: NF4 with bf16 compute and double
    quantization, as in Dettmers et al. 2023), or None without model.quantization."""
    if settings.quantization is None:
        return None
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"model.quantization: {settings.quantization} needs a CUDA GPU (bitsandbytes); on "
            "this machine remove it and train the LoRA adapters on full-precision weights"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "model.quantization: bitsandbytes is not installed; pip install "
            "'simpo-cli[qlora]' (or bitsandbytes)"
        ) from None
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def add_adapters(model, settings: ModelSettings, gradient_checkpointing: bool, seed: int):
    """The model with fresh LoRA adapters, only they trainable (peft's PeftModel). Their
    random initialisation is seeded: a rerun, or a resumed run, starts from the same ones."""
    from transformers import set_seed

    peft = _peft()
    lora = settings.lora
    if lora.target_modules != "all-linear":
        _check_targets(model, lora.target_modules)
    model = _prepare(model, settings, gradient_checkpointing)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    set_seed(seed)
    return peft.get_peft_model(model, config)


def _prepare(model, settings: ModelSettings, gradient_checkpointing: bool):
    peft = _peft()
    if settings.quantization:
        # Casts norms to fp32 and makes the (frozen) embeddings' output require grad, so
        # checkpointed layers still pass gradients to the adapters.
        return peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, frozen) parameters of a model (whole sizes, also of ZeRO-3 partitions)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    trainable = sum(n for n, grad in sizes if grad)
    return trainable, sum(n for n, grad in sizes if not grad)


def _partitioned(model) -> bool:
    """Whether ZeRO-3 holds the model's weights partitioned over the processes."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def _whole_adapters(model) -> Iterator[None]:
    """The adapters' weights whole on every process for the while (ZeRO-3 partitions them)."""
    if not _partitioned(model):
        yield
        return
    import deepspeed

    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters(lora, modifier_rank=None):
        yield


def is_adapted(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def writes_merged(recipe, name: str) -> bool:
    """Whether training stage `name` writes the merged model beside its adapter: as
    model.lora.merge says, by default where the model leaves training (the pipeline's last
    training stage, a stage run outside the pipeline, the stage generate samples from)."""
    lora = recipe.model.lora
    if lora.merge is not None:
        return lora.merge
    training = [stage for stage in recipe.pipeline if stage in TRAINING_STAGES]
    if name not in training or name == training[-1]:
        return True
    return "generate" in recipe.pipeline and recipe.model_stage_before("generate") == name


def adapter_folder(path: str | Path | None) -> Path | None:
    """The adapter of a folder: a stage's adapter/ or a bare peft adapter folder; None for a
    hub name, a missing path or a folder without one."""
    if path is None:
        return None
    folder = Path(path)
    for candidate in (folder / ADAPTER_DIR, folder):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def has_model(folder: Path) -> bool:
    """A model folder, or a folder holding an adapter (read as its merged model)."""
    return (folder / "config.json").is_file() or adapter_folder(folder) is not None


def adapter_only(path: str | Path | None) -> Path | None:
    """The adapter of a folder that holds no merged model (no config.json), else None: such a
    folder loads only by merging its adapter into its base."""
    if path is None or (Path(path) / "config.json").is_file():
        return None
    return adapter_folder(path)


def base_record(settings: ModelSettings, start_from: str | None, stage: str | None, seed: int):
    """base.json of an adapter put on `start_from` (None: the recipe's model, a hub name or
    folder, or built from model.config with `seed`); `stage` is the training stage whose
    folder start_from is, found beside the adapter's own stage even after the run folder
    moved."""
    model = settings.model_dump(
        include={"name_or_path", "init", "config", "tokenizer", "dtype", "attn_implementation",
                 "trust_remote_code"}
    )  # fmt: skip
    return {
        "start_from": str(Path(start_from).resolve()) if start_from else None,
        "stage": stage if start_from else None,
        "model": model,
        "seed": seed,
    }


def read_base(adapter: Path) -> tuple[ModelSettings, str | None, int]:
    """(model settings, start_from, seed) that load an adapter's base with load_model_from:
    from its base.json, or for a bare peft adapter from base_model_name_or_path."""
    record_file = adapter / BASE_RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        settings = ModelSettings(**record["model"])
        start_from = record["start_from"]
        if record["stage"]:
            # DIR/<stage>/adapter -> DIR/<previous stage>
            sibling = adapter.resolve().parent.parent / record["stage"]
            if (sibling / "stage_complete.json").is_file():
                start_from = str(sibling)
        if start_from is not None and not Path(start_from).is_dir():
            raise UserError(
                f"{record_file}: the adapter's base model {start_from} is gone; put that stage "
                "folder back, or evaluate a stage saved with model.lora.merge: true"
            )
        return settings, start_from, record["seed"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{adapter / 'adapter_config.json'}: names no base model (base_model_name_or_path); "
            "set it to the model the adapter was trained on"
        )
    return ModelSettings(name_or_path=base), None, 0


def merged(adapter: Path, base) -> Any:
    """The base model with the adapter merged into its weights (a plain transformers model)."""
    peft = _peft()
    return peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()


def continue_adapters(base, adapter: Path, settings: ModelSettings, gradient_checkpointing: bool):
    """The base with a saved adapter loaded trainable, prepared like add_adapters."""
    peft = _peft()
    base = _prepare(base, settings, gradient_checkpointing)
    return peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)


def save(
    model,
    folder: Path,
    tokenizer: Any,
    record: dict[str, Any],
    merge: bool,
    full_precision_base: Callable[[], Any],
) -> None:
    """The adapters into folder/adapter/ with their base record, and with `merge` the merged
    model into folder. Every process of a launch calls this; the main one writes. The adapters
    are merged into the model's own weights, in place (call this last), or into
    `full_precision_base()` when those are quantized (merging into 4- or 8-bit weights would
    round) or partitioned by ZeRO-3 (a whole copy is loaded on the CPU of the main process)."""
    from simpo_cli.distributed import barrier, is_main_process, whole_weights

    adapter = folder / ADAPTER_DIR
    with _whole_adapters(model):
        if is_main_process():
            model.save_pretrained(adapter)
    if is_main_process():
        tokenizer.save_pretrained(adapter)
        (adapter / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if merge and is_main_process():
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(
            model, "is_loaded_in_8bit", False
        )
        if quantized or _partitioned(model):
            why = "quantized" if quantized else "partitioned by ZeRO-3"
            print(f"merging the adapter into the base reloaded whole in full precision (the "
                  f"trained weights are {why})", flush=True)  # fmt: skip
            with whole_weights():
                merged(adapter, full_precision_base()).save_pretrained(folder)
        else:
            model.merge_and_unload().save_pretrained(folder)
    barrier()
