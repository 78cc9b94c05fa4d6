"""What every recipe shares: the section base, stage names, the model, data sources, logging and
launch settings."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from simpo_cli.recipe.shipped import shipped_deepspeed_configs
from simpo_cli.redact import secret_keys

StageName = Literal["sft", "generate", "annotate", "preference", "evaluate"]
# In pipeline order: generate samples from the model before it; annotate scores those samples
# into pairs; preference trains on them (when its own data is not given); evaluate compares the
# models of the training stages.
STAGES: tuple[StageName, ...] = ("sft", "generate", "annotate", "preference", "evaluate")
TRAINING_STAGES: tuple[StageName, ...] = ("sft", "preference")


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class LoraSettings(Section):
    """LoRA adapters (peft) trained in place of the full weights, in every training stage."""

    r: PositiveInt = Field(16, description="Rank of the adapters.")
    alpha: PositiveFloat = Field(32.0, description="Scale numerator (lora_alpha); scale alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Layers that get adapters: every linear layer but the output head, or a "
        "list of module names (e.g. [q_proj, v_proj]).",
    )
    merge: bool | None = Field(
        None,
        description="Also write the merged model beside the adapter. Default: where a model "
        "leaves training (the pipeline's last training stage, and the stage generate samples "
        "from); false: adapters only (the next stage, generate and evaluate merge as they load).",
    )
    continue_adapter: bool = Field(
        False,
        description="The next training stage trains the previous stage's adapter further, on "
        "the same base, instead of fresh adapters on the previous stage's merged model.",
    )


class ModelSettings(Section):
    """The policy model the first stage starts from, and how to load it."""

    name_or_path: str | None = Field(
        None, description="Hub model name or local folder (required when init is 'pretrained')."
    )
    init: Literal["pretrained", "from_config"] = Field(
        "pretrained",
        description="'pretrained' loads weights; 'from_config' builds a randomly initialised "
        "model from `config` (seeded by the first stage's training.seed).",
    )
    config: dict[str, Any] | None = Field(
        None,
        description="Model config for init 'from_config' (keys of a config.json; saved with "
        "every checkpoint, so a secret here is refused).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer name or folder; default: the model's."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the weights are loaded in."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; default: transformers' choice."
    )
    chat_template: str | None = Field(
        None, description="Chat template override: a .jinja file or the template text itself."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository.")
    lora: LoraSettings | None = Field(
        None,
        description="Train LoRA adapters instead of every weight; each stage saves the adapter "
        "(adapter/) and the merged model.",
    )
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="Load the frozen base weights quantized (bitsandbytes, GPU): QLoRA."
    )

    @field_validator("config")
    @classmethod
    def _no_secrets_in_config(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        # transformers writes model.config to config.json, with the model and with every
        # checkpoint, where it cannot be redacted: a secret there is refused, never written.
        problems = [
            f"{key} {why}; transformers saves model.config in config.json, with the model and "
            "in every checkpoint; remove it, and give credentials through environment "
            "variables (HF_TOKEN, WANDB_API_KEY, ...)"
            for key, why in secret_keys(config or {}).items()
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return config

    @model_validator(mode="after")
    def _check_init(self) -> ModelSettings:
        if self.quantization and self.lora is None:
            raise ValueError(
                f"quantization {self.quantization} needs lora: quantized weights cannot be "
                "trained, only adapters on them; add lora: {r: 16} or remove quantization"
            )
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError(
                "name_or_path is required when init is 'pretrained'; set model.name_or_path "
                "to a hub name or a local model folder"
            )
        if self.init == "from_config":
            if not self.config or "model_type" not in self.config:
                raise ValueError(
                    "init 'from_config' needs model.config with a model_type (e.g. llama) and "
                    "the architecture's sizes"
                )
            if not (self.tokenizer or self.name_or_path):
                raise ValueError("init 'from_config' needs model.tokenizer (a tokenizer folder)")
        return self


class DataSource(Section):
    """Where rows come from: a hub dataset name, a .json/.jsonl/.parquet file or a saved folder."""

    path: str = Field(description="Hub dataset name, local data file, or save_to_disk folder.")
    split: str = Field("train", description="Split to read (hub datasets and saved DatasetDicts).")
    subset: str | None = Field(None, description="Hub dataset configuration name, if any.")
    max_rows: PositiveInt | None = Field(None, description="Read only the first N rows.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        # `train: data/pairs.jsonl` is shorthand for `train: {path: data/pairs.jsonl}`.
        return {"path": value} if isinstance(value, str) else value


class LoggingSettings(Section):
    report_to: list[Literal["wandb", "tensorboard"]] = Field(
        default_factory=list, description="Trackers besides metrics.jsonl (always written)."
    )
    project: str = Field("simpo", description="wandb project name.")
    run_name: str | None = Field(None, description="Run name; default: recipe name + stage.")
    all_settings: bool = Field(
        False,
        description="Print every setting of a stage as it starts, defaults included; default: "
        "those the recipe or --set gives (resolved_recipe.yaml holds them all).",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        if value in (None, "none", []):
            return []
        return [value] if isinstance(value, str) else value


class LaunchSettings(Section):
    """How the training processes are launched. One process runs in place; more processes, or
    DeepSpeed, re-launch `simpo` through `accelerate launch`."""

    num_processes: PositiveInt = Field(1, description="Processes (GPUs) per machine.")
    num_machines: PositiveInt = Field(1, description="Machines (nodes) in the run.")
    machine_rank: int = Field(0, ge=0, description="This machine's rank, 0..num_machines-1.")
    main_process_ip: str | None = Field(None, description="Address of machine 0 (multi-node).")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Rendezvous port.")
    rdzv_backend: Literal["static", "c10d"] = Field(
        "static", description="'c10d' for an elastic rendezvous endpoint (SLURM), else static."
    )
    deepspeed: str | None = Field(
        None, description="DeepSpeed config: zero1, zero2, zero3, zero3_offload, or a JSON path."
    )
    gpu_memory_gb: PositiveFloat = Field(80, description="Per-GPU memory, for the fit check.")

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed(cls, value: str | None) -> str | None:
        shipped = shipped_deepspeed_configs()
        if value is None or value in shipped or value.endswith(".json"):
            return value
        close = difflib.get_close_matches(value, shipped, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "or give a path to a .json file"
        raise ValueError(
            f"'{value}' is not a shipped DeepSpeed config ({', '.join(shipped)}); {hint}"
        )

    @model_validator(mode="after")
    def _check_machines(self) -> LaunchSettings:
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"machine_rank ({self.machine_rank}) must be below num_machines "
                f"({self.num_machines}); machines are numbered from 0"
            )
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError(
                "main_process_ip is required with num_machines > 1: the address of machine 0"
            )
        return self
