"""The recipe: one typed schema for the YAML file, its loading, `--set` overrides and errors.

Everything after `load_recipe` works on a validated `Recipe`; no other module reads raw YAML.
This module must not import torch: `simpo validate` and `simpo config show` answer from it alone.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from simpo_cli.errors import RecipeError
from simpo_cli.redact import redact, redact_setting

_HERE = Path(__file__).resolve().parent
# Installed, recipes/ and the DeepSpeed configs are package data inside simpo_cli/; in a source
# checkout they sit at the top of the repository.
RECIPES_DIR = _HERE / "recipes" if (_HERE / "recipes").is_dir() else _HERE.parent / "recipes"
DEEPSPEED_DIR = (
    _HERE / "deepspeed_configs"
    if (_HERE / "deepspeed_configs").is_dir()
    else _HERE.parent / "configs" / "deepspeed"
)
StageName = Literal["sft", "generate", "annotate", "preference", "evaluate"]
# In pipeline order: generate samples from the model before it; annotate scores those samples
# into pairs; preference trains on them (when its own data is not given); evaluate compares the
# models of the training stages.
STAGES: tuple[StageName, ...] = ("sft", "generate", "annotate", "preference", "evaluate")
TRAINING_STAGES: tuple[StageName, ...] = ("sft", "preference")
AUTHORS_SEEDS = [13, 21, 42, 79, 100]  # the SimPO authors' decode.py seeds


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
        None, description="Model config for init 'from_config' (keys of a config.json)."
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


class SFTData(Section):
    train: DataSource = Field(description="Training rows: `messages` lists or prompt/completion.")
    eval: DataSource | None = Field(None, description="Held-out rows, same formats.")
    max_length: PositiveInt = Field(2048, description="Tokens per example; longer ones are cut.")


class PreferenceData(Section):
    train: DataSource | None = Field(
        None,
        description="Training pairs: chosen/rejected (+ optional prompt); default with an "
        "annotate stage: its pairs.",
    )
    eval: DataSource | None = Field(None, description="Held-out pairs, same formats.")
    max_length: PositiveInt = Field(2048, description="Tokens of prompt + response.")
    max_prompt_length: PositiveInt = Field(1800, description="Tokens kept of a long prompt.")
    tokenization: Literal["default", "authors"] = Field(
        "default",
        description="'authors': the SimPO authors' convention for exact parity (assistant "
        "header counted as response tokens, their truncation); 'default': the header is prompt.",
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> PreferenceData:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}), or responses are cut to nothing; lower max_prompt_length"
            )
        return self


class PromptSource(DataSource):
    """Prompts to sample replies for: a data source plus the columns holding them."""

    column: str = Field("prompt", description="Column of prompt strings or message lists.")
    id_column: str = Field(
        "prompt_id", description="Column of prompt ids, if present; else a stable hash."
    )


class GenerateStage(Section):
    """Sample replies to prompts from the model of the stage before (else the recipe's model)."""

    prompts: PromptSource = Field(description="Prompts: hub name, file or saved folder.")
    eval_prompts: PromptSource | None = Field(
        None, description="Held-out prompts (e.g. the source's test split): the pairs' test split."
    )
    seeds: list[int] | None = Field(
        None, description="One sample per seed per prompt; default the authors' 13,21,42,79,100."
    )
    num_samples: PositiveInt | None = Field(
        None, description="Instead of seeds: this many samples, seeds 0..N-1."
    )
    temperature: float = Field(0.8, ge=0, description="0: greedy.")
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: PositiveInt = 4096
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto: vLLM when installed and a GPU is visible, else transformers."
    )
    tensor_parallel_size: PositiveInt = Field(
        1, description="vLLM: GPUs per engine (one engine per group of GPUs)."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM's share of a GPU.")

    @model_validator(mode="after")
    def _check_seeds(self) -> GenerateStage:
        if self.seeds is not None and self.num_samples is not None:
            raise ValueError(
                f"seeds ({self.seeds}) and num_samples ({self.num_samples}) are both set; "
                "give one of them"
            )
        problem = seeds_problem(self.seeds) if self.seeds is not None else None
        if problem:
            raise ValueError(problem)
        return self

    @property
    def sample_seeds(self) -> tuple[int, ...]:
        if self.num_samples is not None:
            return tuple(range(self.num_samples))
        return tuple(self.seeds if self.seeds is not None else AUTHORS_SEEDS)


def seeds_problem(seeds: list[int] | tuple[int, ...]) -> str | None:
    """What is wrong with a list of sampling seeds, or None."""
    if not seeds:
        return "seeds is empty; give at least one seed (or num_samples)"
    if len(set(seeds)) != len(seeds):
        return (
            f"seeds {list(seeds)} repeats a seed, which repeats its samples exactly; give "
            "distinct seeds"
        )
    return None


class RewardSettings(Section):
    """What scores a (prompt, reply): a reward model or a Python function, not both."""

    model: str | None = Field(
        None, description="Sequence-classification reward model: hub name or folder."
    )
    function: str | None = Field(
        None,
        description="'path/to/file.py:name' or 'package.module:name': (prompt messages, reply "
        "text) -> number.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the reward model's own code (ArmoRM needs it)."
    )
    batch_size: PositiveInt = Field(8, description="Replies per reward-model forward.")
    max_length: PositiveInt | None = Field(
        None, description="Reward-model tokens kept (the end of the reply); default all."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU."
    )

    @model_validator(mode="after")
    def _one_scorer(self) -> RewardSettings:
        if (self.model is None) == (self.function is None):
            raise ValueError(
                "set exactly one of model (a reward model) and function ('file.py:name')"
            )
        return self


class AnnotateStage(Section):
    """Score the generate stage's samples and keep the best and worst reply per prompt as pairs."""

    reward: RewardSettings
    selection: Literal["best_vs_worst", "best_vs_random"] = Field(
        "best_vs_worst", description="rejected = the lowest-scored reply, or a random other one."
    )
    min_margin: float = Field(0.0, ge=0, description="Drop pairs whose score gap is below this.")
    drop_truncated: bool = Field(
        True, description="Leave out replies cut at max_new_tokens before selecting."
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of pairs held out as the test split."
    )
    seed: int = Field(42, description="Seed of best_vs_random and of the held-out split.")
    greedy_eval: bool = Field(
        False,
        description="After the preference stage: greedy replies to generate.eval_prompts from "
        "the model before and after it, scored with this reward (printed, greedy_eval.json).",
    )
    success_reward: float | None = Field(
        None,
        description="With greedy_eval: also the share of replies scoring at least this (e.g. "
        "1.0 for an exact answer).",
    )


class BenchmarkSettings(Section):
    """One benchmark to answer: the files its official evaluator reads (benchmarks.py)."""

    name: Literal["alpaca_eval", "arena_hard", "mt_bench"]
    questions: str | None = Field(
        None,
        description="Question file in the official format, or hub name; default for "
        "alpaca_eval: the official eval set from the hub.",
    )
    family: Literal["llama3", "mistral-base", "mistral-instruct", "gemma2"] = Field(
        "llama3", description="The SimPO authors' AlpacaEval decoding for this model family."
    )
    arena_layout: Literal["v0.1", "current"] = Field(
        "v0.1", description="Arena-Hard answer layout: v0.1 (the paper's) or current."
    )
    temperature: float | None = Field(
        None, ge=0, description="Override the benchmark's temperature(s)."
    )
    max_new_tokens: PositiveInt | None = Field(
        None, description="Override the benchmark's answer length cap."
    )
    against: str | None = Field(
        None,
        description="Reward-model win rate against: 'reference' (AlpacaEval's reference "
        "outputs), an answer file or folder, or another checkpoint's label; needs reward.",
    )


class LmEvalSettings(Section):
    """lm-evaluation-harness tasks run on each checkpoint (optional extra `lm-eval`)."""

    tasks: list[str] = Field(min_length=1, description="Task names (lm_eval --tasks list).")
    include_path: str | None = Field(None, description="Folder of extra task YAML files.")
    limit: PositiveInt | None = Field(None, description="Examples per task (a quick look).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples.")
    apply_chat_template: bool = Field(True, description="Render with the model's chat template.")
    batch_size: PositiveInt = 8


class EvaluateStage(Section):
    """Evaluate checkpoints: held-out pairs, benchmark answer files, judge-free proxies and
    lm-eval tasks, in one comparison table with plots."""

    checkpoints: list[str] | None = Field(
        None,
        description="Stage names of this pipeline or model folders; default: every training "
        "stage's model.",
    )
    pairs: DataSource | None = Field(
        None, description="Preference pairs to score; default: the preference stage's data.eval."
    )
    reference: str | None = Field(
        None,
        description="Reference model (stage name or folder) for DPO's implicit reward accuracy.",
    )
    beta: PositiveFloat | None = Field(None, description="Default: each checkpoint's recipe.")
    gamma: float | None = Field(None, description="Absolute margin; default: the recipe's.")
    max_length: PositiveInt | None = Field(
        None, description="Pair tokens (prompt + response); default: the checkpoint's recipe."
    )
    max_prompt_length: PositiveInt | None = Field(
        None, description="Prompt tokens kept; default: the checkpoint's recipe."
    )
    tokenization: Literal["default", "authors"] | None = Field(
        None, description="Pair tokenization; default: the checkpoint's recipe."
    )
    batch_tokens: PositiveInt = Field(
        8192, description="Padded tokens per forward pass when scoring pairs."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU."
    )
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="Generation backend for benchmark answers."
    )
    benchmarks: list[BenchmarkSettings] = Field(default_factory=list)
    reward: RewardSettings | None = Field(
        None, description="Scorer of the benchmarks' reward-model win rates (`against`)."
    )
    lm_eval: LmEvalSettings | None = None

    @model_validator(mode="after")
    def _check_against(self) -> EvaluateStage:
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmarks: {names} lists a benchmark twice; list each once")
        if self.reward is None and any(b.against for b in self.benchmarks):
            raise ValueError(
                "benchmarks.against needs reward: the reward model or function that scores "
                "both sides (reward: {model: ...} or {function: file.py:name})"
            )
        return self


class TrainingSettings(Section):
    """Optimisation settings, named as in transformers' TrainingArguments."""

    learning_rate: PositiveFloat = 1e-6
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
        "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
    ] = "cosine"  # fmt: skip
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    num_train_epochs: PositiveFloat = 1.0
    max_steps: int = Field(-1, ge=-1, description="-1: run num_train_epochs; else stop after N.")
    per_device_train_batch_size: PositiveInt = 2
    per_device_eval_batch_size: PositiveInt = 4
    gradient_accumulation_steps: PositiveInt | None = Field(
        None, description="Default 1, or derived from total_batch_size."
    )
    total_batch_size: PositiveInt | None = Field(
        None,
        description="Pairs (examples) per optimizer step across all processes; accumulation "
        "is derived from it, so the same recipe trains the same batch on 8, 4 or 2 GPUs.",
    )
    gradient_checkpointing: bool = False
    padding_free: bool = Field(
        True,
        description="Pack each micro-batch's sequences into one row without padding (attention "
        "kept within each sequence); false: pad every sequence to the longest.",
    )
    balanced_batches: bool = Field(
        False,
        description="Group each optimizer step's examples by length into micro-batches of "
        "about equal token cost, balanced across processes (transformers' batch_rebalance "
        "sampler): many short pairs or a few long ones per micro-batch. The examples per "
        "optimizer step stay per_device_train_batch_size x processes x accumulation; the loss "
        "stays their mean.",
    )
    logps_chunk_size: int = Field(
        256,
        ge=0,
        description="Trained tokens per chunk of the vocabulary projection: log-probs are "
        "computed chunk by chunk (recomputed in backward) for trained tokens only, so the fp32 "
        "logits of a micro-batch are never held whole; 0: full logits.",
    )
    bf16: bool = False
    fp16: bool = False
    seed: int = 42
    optim: str = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: PositiveFloat = 1e-8
    max_grad_norm: float = Field(1.0, ge=0)
    logging_steps: PositiveInt = 10
    save_steps: PositiveInt = 500
    save_total_limit: PositiveInt | None = 2
    eval_steps: PositiveInt | None = Field(
        None, description="Evaluate every N steps; default: at the end."
    )
    dataloader_num_workers: int = Field(0, ge=0)
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A step whose loss or gradient norm is NaN/inf: stop (exit 3, naming the "
        "step and its rows; the last good checkpoint is kept) or skip its update (counted in "
        "the metric nonfinite_skipped).",
    )

    @model_validator(mode="after")
    def _check_precision(self) -> TrainingSettings:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one (the paper uses bf16)")
        if self.max_steps == 0:
            raise ValueError("max_steps is 0; use -1 to train for num_train_epochs, or N > 0")
        return self


class SFTTraining(TrainingSettings):
    learning_rate: PositiveFloat = 2e-5


class SFTStage(Section):
    """Supervised fine-tuning: causal-LM loss on every assistant turn."""

    data: SFTData
    training: SFTTraining = Field(default_factory=SFTTraining)


LossName = Literal["simpo", "dpo", "ipo", "rdpo", "kto", "cpo", "orpo", "rrhf", "slic"]

# The hyperparameters each loss takes, with their defaults (the paper's names: beta, tau,
# lambda, alpha, delta). A hyperparameter given for a loss that does not use it is an error.
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "simpo": {
        "beta": 2.0,
        "gamma_beta_ratio": 0.5,
        "loss_type": "sigmoid",
        "label_smoothing": 0.0,
        "sft_weight": 0.0,
        "length_normalize": True,
    },
    "dpo": {"beta": 0.1, "label_smoothing": 0.0, "reference": {}},
    "ipo": {"tau": 0.1, "reference": {}},
    "rdpo": {"beta": 0.1, "alpha": 0.1, "reference": {}},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "reference": {}},
    "cpo": {"beta": 0.1, "lambda": 1.0},
    "orpo": {"lambda": 0.1},
    "rrhf": {"lambda": 1.0},
    "slic": {"delta": 1.0, "lambda": 1.0},
}
LOSS_PARAMETERS = sorted({key for params in LOSS_DEFAULTS.values() for key in params} | {"gamma"})


class ReferenceSettings(Section):
    """The frozen reference policy of DPO, IPO, R-DPO and KTO."""

    mode: Literal["cached", "live"] = Field(
        "cached",
        description="'cached': reference log-probs computed once before training and stored "
        "on disk, so training holds one model; 'live': a second model in memory.",
    )
    model: str | None = Field(None, description="Reference model; default: the stage's start.")


class PreferenceStage(Section):
    """Preference optimisation of the policy on chosen/rejected pairs: SimPO or a baseline."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    loss: LossName = Field(
        "simpo", description="simpo, dpo, ipo, rdpo, kto, cpo, orpo, rrhf, slic."
    )
    beta: PositiveFloat | None = Field(
        None, description="Reward scale (simpo 2.0; dpo, rdpo, cpo 0.1)."
    )
    gamma_beta_ratio: float | None = Field(
        None, ge=0, description="SimPO margin as gamma/beta (the authors' form); default 0.5."
    )
    gamma: float | None = Field(
        None, ge=0, description="SimPO margin as gamma (the paper's equation); not with the ratio."
    )
    loss_type: Literal["sigmoid", "hinge"] | None = Field(None, description="SimPO variant.")
    label_smoothing: float | None = Field(None, ge=0, lt=0.5, description="simpo, dpo.")
    sft_weight: float | None = Field(None, ge=0, description="SimPO: weight of a CE on chosen.")
    length_normalize: bool | None = Field(
        None, description="SimPO: average log-probs over tokens (false: sums, an ablation)."
    )
    tau: PositiveFloat | None = Field(None, description="IPO regularisation (default 0.1).")
    lambda_: float | None = Field(
        None,
        ge=0,
        alias="lambda",
        description="Weight of the SFT/odds term: cpo, orpo, rrhf, slic.",
    )
    alpha: float | None = Field(None, ge=0, description="R-DPO length penalty (default 0.1).")
    delta: PositiveFloat | None = Field(None, description="SLiC-HF hinge margin (default 1.0).")
    desirable_weight: PositiveFloat | None = Field(None, description="KTO lambda_D (1.0).")
    undesirable_weight: PositiveFloat | None = Field(None, description="KTO lambda_U (1.0).")
    reference: ReferenceSettings | None = Field(None, description="dpo, ipo, rdpo, kto.")
    data: PreferenceData
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    @model_validator(mode="before")
    @classmethod
    def _fill_loss_defaults(cls, raw: Any) -> Any:
        """Reject hyperparameters the chosen loss does not take; fill the ones it does."""
        if not isinstance(raw, dict) or raw.get("loss", "simpo") not in LOSS_DEFAULTS:
            return raw
        loss = raw.get("loss", "simpo")
        defaults = LOSS_DEFAULTS[loss]
        allowed = set(defaults) | ({"gamma"} if loss == "simpo" else set())
        wrong = [k for k in LOSS_PARAMETERS if raw.get(k) is not None and k not in allowed]
        if wrong:
            users = {k: [n for n, p in LOSS_DEFAULTS.items() if k in p] or ["simpo"] for k in wrong}
            raise ValueError(
                "; ".join(f"{k} applies to {', '.join(users[k])}, not {loss}" for k in wrong)
                + f"; remove it (loss {loss} takes {', '.join(sorted(allowed))})"
            )
        filled = dict(raw)
        for key, value in defaults.items():
            if key == "gamma_beta_ratio" and raw.get("gamma") is not None:
                continue  # the margin was given as gamma
            if filled.get(key) is None:
                filled[key] = value
        return filled

    @model_validator(mode="after")
    def _check_margin(self) -> PreferenceStage:
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            raise ValueError(
                f"gamma ({self.gamma}) and gamma_beta_ratio ({self.gamma_beta_ratio}) are both "
                "set; give the margin once: gamma = beta * gamma_beta_ratio"
            )
        if self.label_smoothing and self.loss_type == "hinge":
            raise ValueError("label_smoothing applies to loss_type sigmoid only; set it to 0")
        return self

    @property
    def resolved_gamma(self) -> float:
        """SimPO's absolute target margin gamma (0 for other losses)."""
        if self.loss != "simpo":
            return 0.0
        if self.gamma is not None:
            return self.gamma
        return (self.beta or 0.0) * (self.gamma_beta_ratio or 0.0)

    @property
    def uses_reference(self) -> bool:
        return self.reference is not None


class LoggingSettings(Section):
    report_to: list[Literal["wandb", "tensorboard"]] = Field(
        default_factory=list, description="Trackers besides metrics.jsonl (always written)."
    )
    project: str = Field("simpo", description="wandb project name.")
    run_name: str | None = Field(None, description="Run name; default: recipe name + stage.")

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


class Recipe(Section):
    name: str = Field("recipe", description="Recipe name; default: the file's name.")
    description: str | None = None
    output_dir: str | None = Field(None, description="Where stages write; default outputs/<name>.")
    model: ModelSettings
    pipeline: list[StageName] = Field(
        default_factory=lambda: ["sft", "preference"], description="Stages run by `simpo train`."
    )
    sft: SFTStage | None = None
    generate: GenerateStage | None = None
    annotate: AnnotateStage | None = None
    preference: PreferenceStage | None = None
    evaluate: EvaluateStage | None = None
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    launch: LaunchSettings = Field(default_factory=LaunchSettings)
    # Where each key path's value came from ("recipe" or "--set"); absent keys are defaults.
    _origins: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_pipeline(self) -> Recipe:
        if not self.pipeline:
            raise ValueError("pipeline is empty; list the stages to run, e.g. [sft, preference]")
        if len(set(self.pipeline)) != len(self.pipeline):
            raise ValueError(f"pipeline {self.pipeline} repeats a stage; list each once")
        if self.pipeline != sorted(self.pipeline, key=STAGES.index):
            raise ValueError(
                f"pipeline {self.pipeline} is out of order; stages run in the order "
                f"{', '.join(STAGES)}"
            )
        for stage in self.pipeline:
            if getattr(self, stage) is None:
                raise ValueError(f"pipeline runs '{stage}' but the recipe has no {stage}: section")
        if "annotate" in self.pipeline and "generate" not in self.pipeline:
            raise ValueError(
                "pipeline runs annotate without generate; add generate before it (annotate "
                "scores the generate stage's samples)"
            )
        if (
            self.preference is not None
            and self.preference.data.train is None
            and "annotate" not in self.pipeline
        ):
            raise ValueError(
                "preference.data.train: required key is missing; add it, or run an annotate "
                "stage before preference (pipeline: [generate, annotate, preference])"
            )
        if (
            self.annotate is not None
            and self.annotate.greedy_eval
            and (self.generate is None or self.generate.eval_prompts is None)
        ):
            raise ValueError(
                "annotate.greedy_eval: needs held-out prompts; set generate.eval_prompts"
            )
        if "evaluate" in self.pipeline:
            self._check_evaluate()
        self._check_continued_adapter()
        problems = [
            p for name in TRAINING_STAGES if getattr(self, name) for p in self._batch_problems(name)
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _check_continued_adapter(self) -> None:
        """A continued adapter switched off is the first stage's base, not the preference
        stage's start: no live reference from it."""
        lora = self.model.lora
        stage = self.preference
        if lora is None or not lora.continue_adapter or stage is None:
            return
        if "preference" not in self.pipeline or self.model_stage_before("preference") is None:
            return
        if stage.uses_reference and stage.reference.mode == "live" and not stage.reference.model:
            raise ValueError(
                "preference.reference.mode: live with model.lora.continue_adapter would score the "
                f"reference as the adapters switched off, which is the model before "
                f"{self.model_stage_before('preference')}, not this stage's start; use "
                "reference.mode: cached (the start's log-probs, computed once) or set "
                "reference.model"
            )

    def _check_evaluate(self) -> None:
        stage = self.evaluate
        assert stage is not None
        if not self.evaluate_checkpoints():
            raise ValueError(
                "evaluate: no checkpoints to evaluate; run a training stage before it, or list "
                "model folders in evaluate.checkpoints"
            )
        if self.evaluate_pairs() is None and not stage.benchmarks and stage.lm_eval is None:
            raise ValueError(
                "evaluate: nothing to evaluate; set evaluate.pairs (or preference.data.eval), "
                "evaluate.benchmarks or evaluate.lm_eval"
            )
        labels = [label for label, _ in self.evaluate_checkpoints()]
        for i, bench in enumerate(stage.benchmarks):
            against = bench.against
            if against in TRAINING_STAGES and against not in labels:
                raise ValueError(
                    f"evaluate.benchmarks.{i}.against: '{against}' is not among the checkpoints "
                    f"evaluated ({', '.join(labels)}); add it to evaluate.checkpoints"
                )

    def evaluate_checkpoints(self) -> list[tuple[str, str]]:
        """(label, stage name or model folder) of each checkpoint the evaluate stage compares:
        evaluate.checkpoints, else every training stage before it. A training stage's name
        stands for its folder in the output directory (pipeline.stage_folder)."""
        stage = self.evaluate
        if stage is None:
            return []
        if stage.checkpoints is not None:
            return [
                (entry if entry in TRAINING_STAGES else Path(entry).name, entry)
                for entry in stage.checkpoints
            ]
        before = (
            self.pipeline[: self.pipeline.index("evaluate")] if "evaluate" in self.pipeline else []
        )
        return [(name, name) for name in before if name in TRAINING_STAGES]

    def evaluate_pairs(self) -> DataSource | None:
        """The pairs the evaluate stage scores: its own, else the preference stage's held-out
        pairs."""
        if self.evaluate is None:
            return None
        if self.evaluate.pairs is not None:
            return self.evaluate.pairs
        return self.preference.data.eval if self.preference is not None else None

    def _batch_problems(self, name: StageName) -> list[str]:
        t = self.stage(name).training
        if t.total_batch_size is None:
            return []
        world = self.launch.world_size
        per_step = t.per_device_train_batch_size * world
        where = f"{name}.training.total_batch_size: {t.total_batch_size}"
        if t.total_batch_size % per_step:
            fits = [
                b for b in range(1, t.total_batch_size + 1) if t.total_batch_size % (b * world) == 0
            ]
            fix = (
                f"with {world} processes, per_device_train_batch_size "
                f"{_or_list(fits[:8])} would work"
                if fits
                else f"no per-device batch divides it over {world} processes; use a "
                f"total_batch_size that is a multiple of {world}"
            )
            return [
                f"{where} is not a multiple of per_device_train_batch_size "
                f"{t.per_device_train_batch_size} x {world} processes = {per_step}; {fix}"
            ]
        derived = t.total_batch_size // per_step
        if t.gradient_accumulation_steps not in (None, derived):
            return [
                f"{where} needs gradient_accumulation_steps {derived} with {world} processes x "
                f"per_device_train_batch_size {t.per_device_train_batch_size}, but "
                f"{t.gradient_accumulation_steps} is set; remove one of the two"
            ]
        return []

    def accumulation_steps(self, name: StageName) -> int:
        """Gradient accumulation of a stage: given, derived from total_batch_size, or 1."""
        t = self.stage(name).training
        if t.total_batch_size is not None:
            return t.total_batch_size // (t.per_device_train_batch_size * self.launch.world_size)
        return t.gradient_accumulation_steps or 1

    def total_batch(self, name: StageName) -> int:
        t = self.stage(name).training
        return (
            t.per_device_train_batch_size * self.launch.world_size * self.accumulation_steps(name)
        )

    def stage(self, name: StageName) -> Any:
        """The section of a stage: SFTStage, GenerateStage, AnnotateStage, PreferenceStage or
        EvaluateStage."""
        if name not in STAGES:
            raise RecipeError([f"{name}: no such stage; the stages are {', '.join(STAGES)}"])
        section = getattr(self, name)
        if section is None:
            raise RecipeError([f"recipe '{self.name}' has no {name}: section; add one to run it"])
        return section

    def first_stage_seed(self) -> int:
        """The seed a model built from model.config is initialised with: the first training
        stage's (a generate stage before it samples from the same model)."""
        for name in self.pipeline:
            if name in TRAINING_STAGES:
                return self.stage(name).training.seed
        return 42

    def origin(self, key: tuple[str, ...]) -> str:
        """Where a key's value came from: "recipe", "--set", "annotate stage" or "default"."""
        return self._origins.get(key, "default")

    def model_stage_before(self, name: StageName) -> StageName | None:
        """The training stage whose model `name` starts from or samples from: the nearest one
        before it in the pipeline, or None for the recipe's model."""
        if name not in self.pipeline:
            return None
        before = self.pipeline[: self.pipeline.index(name)]
        return next((s for s in reversed(before) if s in TRAINING_STAGES), None)

    def connect_stages(self, output_dir: Path) -> None:
        """Point a preference stage without data at the annotate stage's pairs in output_dir
        (its train split, and its test split when annotate holds pairs out)."""
        stage = self.preference
        if stage is None or stage.data.train is not None or self.annotate is None:
            return
        if "annotate" not in self.pipeline:
            return
        folder = str((output_dir / "annotate" / "dataset").resolve())
        stage.data.train = DataSource(path=folder, split="train")
        held_out = self.annotate.eval_fraction > 0 or (
            self.generate is not None and self.generate.eval_prompts is not None
        )
        if stage.data.eval is None and held_out:
            stage.data.eval = DataSource(path=folder, split="test")
        for split in ("train", "eval"):
            key = ("preference", "data", split)
            if getattr(stage.data, split) is not None and key not in self._origins:
                self._origins[key] = "annotate stage"

    def dump(self) -> dict[str, Any]:
        """The recipe as YAML keys (aliases such as `lambda`), defaults filled."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_yaml(self) -> str:
        """The recipe as YAML, secrets redacted (see redact.py): what resolved_recipe.yaml,
        `config show` and `--dry-run` show."""
        return yaml.safe_dump(
            redact(self.dump()), sort_keys=False, default_flow_style=None, width=100
        )


def _or_list(values: list[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def stage_identity(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    """The part of a (dumped) recipe that decides a stage's result: the model and the sections of
    this stage and every stage before it. Names, output folders and logging do not count, nor
    training.on_nonfinite: a run stopped on a bad step may switch to skip and resume."""
    pipeline = list(recipe.get("pipeline") or [])
    before = pipeline[: pipeline.index(stage) + 1] if stage in pipeline else [stage]
    sections = {name: _without_on_nonfinite(recipe.get(name)) for name in before}
    return {"model": recipe.get("model"), **sections}


def _without_on_nonfinite(section: Any) -> Any:
    if not isinstance(section, dict) or not isinstance(section.get("training"), dict):
        return section
    training = {k: v for k, v in section["training"].items() if k != "on_nonfinite"}
    return {**section, "training": training}


# --------------------------------------------------------------------------- loading


def shipped_deepspeed_configs() -> list[str]:
    return sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package (recipes/<name>/recipe.yaml)."""
    return sorted(p.parent.name for p in RECIPES_DIR.glob("*/recipe.yaml"))


def shipped_recipe_dir(name: str) -> Path:
    """The folder of a shipped recipe; an unknown name is one RecipeError with a "did you mean"."""
    names = shipped_recipes()
    if name in names:
        return RECIPES_DIR / name
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "`simpo recipes list` shows them"
    raise RecipeError([f"{name}: no shipped recipe of that name; {hint}"])


def recipe_summary(recipe: Recipe) -> tuple[str, str, str]:
    """(model, method, key hyperparameters) of a recipe, one entry per stage of its pipeline, for
    `simpo recipes list`: e.g. ("meta-llama/...", "simpo", "beta=2.5 gamma/beta=0.55 lr=1e-06")."""
    model = (
        recipe.model.name_or_path
        or f"{recipe.model.init} ({(recipe.model.config or {}).get('model_type')})"
    )
    methods, settings = [], []
    for name in recipe.pipeline:
        stage = recipe.stage(name)
        shown: list[str] = []
        if isinstance(stage, PreferenceStage):
            methods.append(stage.loss)
            for key, default in LOSS_DEFAULTS[stage.loss].items():
                value = getattr(stage, "lambda_" if key == "lambda" else key)
                if key == "gamma_beta_ratio":
                    shown.append(
                        f"gamma={stage.gamma:g}"
                        if stage.gamma is not None
                        else f"gamma/beta={value:g}"
                    )
                elif key == "reference":
                    shown.append(f"ref={value.mode}")
                elif key in ("beta", "tau", "alpha", "lambda", "delta") or value != default:
                    shown.append(
                        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    )
        elif isinstance(stage, GenerateStage):
            methods.append("generate")
            shown.append(f"samples={len(stage.sample_seeds)} T={stage.temperature:g}")
        elif isinstance(stage, AnnotateStage):
            methods.append("annotate")
            shown.append(f"reward={stage.reward.model or stage.reward.function}")
        elif isinstance(stage, EvaluateStage):
            methods.append("evaluate")
        else:
            methods.append("sft")
        if name in TRAINING_STAGES:
            shown.append(f"lr={stage.training.learning_rate:g}")
        if shown:
            settings.append(" ".join(shown))
    lora = recipe.model.lora
    if lora is not None:
        quantized = f" {recipe.model.quantization}" if recipe.model.quantization else ""
        settings.append(f"lora r={lora.r}{quantized}")
    return model, " -> ".join(methods), "; ".join(settings)


def copy_recipe(name: str, dest: Path) -> list[tuple[Path, str | None]]:
    """Copy a shipped recipe's folder into `dest` to edit it. A file or folder the recipe names
    outside its folder (the Gemma-2 recipes share one chat template; tiny-onpolicy uses tiny's
    tokenizer and data) is copied beside it and recipe.yaml rewritten to point there. Nothing
    is overwritten: if any target exists, RecipeError and nothing is written. Returns (file
    written, where it came from when outside the folder)."""
    source = shipped_recipe_dir(name)
    plan: dict[Path, tuple[Path, str | None]] = {
        dest / path.relative_to(source): (path, None)
        for path in sorted(source.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }
    text = (source / "recipe.yaml").read_text()
    for ref in _outside_references(read_yaml(source / "recipe.yaml"), source):
        outside = (source / ref).resolve()
        if outside.is_dir():  # a tokenizer folder shared with another recipe
            for path in sorted(outside.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    plan[dest / outside.name / path.relative_to(outside)] = (path, ref)
        else:
            plan[dest / outside.name] = (outside, ref)
        # Rewrite the value, not the header comments that describe the shipped layout.
        text = "\n".join(
            line if line.lstrip().startswith("#") else line.replace(ref, outside.name)
            for line in text.split("\n")
        )
    if dest.exists() and not dest.is_dir():
        raise RecipeError([f"{dest}: exists and is not a folder; give a folder to copy into"])
    existing = next((target for target in plan if target.exists()), None)
    if existing is not None:
        raise RecipeError(
            [f"{existing}: already exists; nothing was copied (choose a new folder or remove it)"]
        )
    for target, (path, _) in plan.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        if target == dest / "recipe.yaml":
            target.write_text(text)
        else:
            target.write_bytes(path.read_bytes())
    return [(target, origin) for target, (_, origin) in plan.items()]


def _outside_references(raw: dict[str, Any], folder: Path) -> list[str]:
    """Relative paths in a raw recipe that name an existing file or folder outside `folder`."""
    model = raw.get("model") or {}
    values = [model.get(key) for key in ("name_or_path", "tokenizer", "chat_template")]
    for stage in STAGES:
        section = raw.get(stage) or {}
        data = section.get("data") or {}
        for source in (data.get("train"), data.get("eval"), *_prompt_sources(section)):
            values.append(source.get("path") if isinstance(source, dict) else source)
    evaluate = raw.get("evaluate") or {}
    if isinstance(evaluate, dict):
        pairs = evaluate.get("pairs")
        values.append(pairs.get("path") if isinstance(pairs, dict) else pairs)
        values += [
            b.get("questions") for b in evaluate.get("benchmarks") or [] if isinstance(b, dict)
        ]
        values.append((evaluate.get("lm_eval") or {}).get("include_path"))
    for section in (raw.get("annotate") or {}, evaluate):
        function = ((section if isinstance(section, dict) else {}).get("reward") or {}).get(
            "function"
        )
        if isinstance(function, str) and function.rpartition(":")[0].endswith(".py"):
            values.append(function.rpartition(":")[0])
    inside = folder.resolve()
    refs = []
    for value in values:
        if not isinstance(value, str) or Path(value).is_absolute() or "\n" in value:
            continue
        target = (folder / value).resolve()
        if target.exists() and inside not in target.parents and value not in refs:
            refs.append(value)
    return refs


def _prompt_sources(section: Any) -> list[Any]:
    if not isinstance(section, dict):
        return []
    return [section.get("prompts"), section.get("eval_prompts")]


def find_recipe(ref: str) -> Path:
    """A recipe path as given, a folder holding recipe.yaml, or a shipped recipe's name."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / "recipe.yaml").is_file():
        return path / "recipe.yaml"
    shipped = RECIPES_DIR / ref / "recipe.yaml"
    if "/" not in ref and shipped.is_file():
        return shipped
    names = ", ".join(shipped_recipes()) or "none"
    raise RecipeError(
        [f"{ref}: no such recipe file, and no shipped recipe of that name (shipped: {names})"]
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value), the value parsed as YAML (so 2.5 is a float)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise RecipeError(
            [f"--set {text}: expected KEY.PATH=VALUE, e.g. --set preference.beta=2.5"]
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[tuple[str, ...], str]:
    """Set each override into `raw` in place; return {key path: the --set text} for messages."""
    origins: dict[tuple[str, ...], str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list):  # evaluate.benchmarks.0.max_new_tokens: an item by index
                node = node[_list_index(node, key, text, ".".join(keys[:i]))]
                continue
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if isinstance(child, str) and key in ("train", "eval", "prompts", "eval_prompts"):
                # A data source written as a bare path: `--set sft.data.train.max_rows=100`.
                child = node[key] = {"path": child}
            if not isinstance(child, (dict, list)):
                where = ".".join(keys[: i + 1])
                raise RecipeError([f"--set {text}: {where} is a value, not a section"])
            node = child
        if isinstance(node, list):
            node[_list_index(node, keys[-1], text, ".".join(keys[:-1]))] = value
        else:
            node[keys[-1]] = value
        origins[tuple(keys)] = f"--set {text}"
    return origins


def _list_index(items: list, key: str, text: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        last = len(items) - 1
        raise RecipeError([f"--set {text}: {where} is a list of {len(items)}; index 0 to {last}"])
    return int(key)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise RecipeError([f"{path}: cannot read the recipe: {err.strerror}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError([f"{path}:{where}: invalid YAML: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            [f"{path}: a recipe is a mapping of keys (model:, sft:, ...), not a list"]
        )
    return raw


def load_recipe(ref: str, overrides: list[str] | None = None) -> Recipe:
    """Find, read, override, validate and resolve a recipe; RecipeError lists every problem."""
    path = find_recipe(ref)
    raw = read_yaml(path)
    in_file = set(_key_paths(raw))
    origins = apply_overrides(raw, list(overrides or []))
    raw.setdefault("name", path.parent.name if path.name == "recipe.yaml" else path.stem)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_errors(err, str(path), origins)) from None
    recipe._origins = {key: "recipe" for key in in_file} | {key: "--set" for key in origins}
    return resolve_paths(recipe, path.parent)


def _key_paths(raw: Any, prefix: tuple[str, ...] = ()):
    """The key path of every value (not section) written in a raw YAML mapping."""
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from _key_paths(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key))


def settings_table(recipe: Recipe, stage: StageName) -> list[str]:
    """Every resolved setting of a stage, one per line, with where it came from: the recipe
    file, a --set override, or the default."""
    section = recipe.stage(stage)
    rows: list[tuple[str, str, str]] = []

    def walk(model: BaseModel, path: tuple[str, ...]) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            key = (*path, field.alias or name)
            if isinstance(value, DataSource):
                value = value.path + ("" if value.split == "train" else f" [{value.split}]")
            if isinstance(value, BaseModel):
                walk(value, key)
                continue
            if isinstance(value, list) and value and isinstance(value[0], BaseModel):
                for i, item in enumerate(value):  # evaluate.benchmarks: one block each
                    walk(item, (*key, str(i)))
                continue
            if value is None:
                continue
            # The key itself or a section above it; for a data source shown as one value
            # (`train: {path, max_rows}`), a key below it.
            origin = next(
                (
                    recipe._origins[key[:i]]
                    for i in range(len(key), 0, -1)
                    if key[:i] in recipe._origins
                ),
                min(
                    (o for k, o in recipe._origins.items() if k[: len(key)] == key),
                    default="default",  # "--set" sorts before "recipe": an override shows
                ),
            )
            rows.append((".".join(key), redact_setting(key[-1], str(value)), origin))

    walk(section, (stage,))
    if isinstance(section, PreferenceStage) and section.loss == "simpo":
        how = "gamma" if section.gamma is not None else "beta x gamma_beta_ratio"
        rows.insert(2, (f"{stage}.gamma (resolved)", f"{section.resolved_gamma:g}", how))
    width = max(len(key) for key, _, _ in rows)
    value_width = min(max(len(value) for _, value, _ in rows), 16)
    return [f"  {k:<{width}}  {v:<{value_width}}  {o}" for k, v, o in rows]


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make local paths absolute: a relative path names a file beside the recipe, else in the
    current folder. Strings that are neither stay as they are: hub model or dataset names."""

    def local(value: str | None) -> str | None:
        if value is not None and value.startswith("~"):
            value = str(Path(value).expanduser())
        if value is None or Path(value).is_absolute():
            return value
        for candidate in (base / value, Path.cwd() / value):
            if candidate.exists():
                return str(candidate.resolve())
        return value

    model = recipe.model
    model.name_or_path = local(model.name_or_path)
    model.tokenizer = local(model.tokenizer)
    if model.chat_template and model.chat_template.endswith(".jinja"):
        model.chat_template = local(model.chat_template)
    for source in data_sources(recipe):
        source.path = local(source.path)
    rewards = [recipe.annotate.reward if recipe.annotate is not None else None]
    evaluate = recipe.evaluate
    if evaluate is not None:
        rewards.append(evaluate.reward)
        # A training stage's name stands for its output folder; anything else is a path.
        if evaluate.checkpoints is not None:
            evaluate.checkpoints = [
                e if e in TRAINING_STAGES else local(e) for e in evaluate.checkpoints
            ]
        if evaluate.reference not in TRAINING_STAGES:
            evaluate.reference = local(evaluate.reference)
        labels = [label for label, _ in recipe.evaluate_checkpoints()]
        for bench in evaluate.benchmarks:
            bench.questions = local(bench.questions)
            if bench.against not in ("reference", *labels):
                bench.against = local(bench.against)
        if evaluate.lm_eval is not None:
            evaluate.lm_eval.include_path = local(evaluate.lm_eval.include_path)
    for reward in rewards:
        if reward is None:
            continue
        reward.model = local(reward.model)
        if reward.function is not None:
            # "file.py:name": the file beside the recipe; "package.module:name" stays.
            target, sep, attribute = reward.function.rpartition(":")
            if sep and target.endswith(".py"):
                reward.function = f"{local(target)}:{attribute}"
    return recipe


def data_sources(recipe: Recipe) -> list[DataSource]:
    """Every data source of the recipe's stages (prompts included), in stage order."""
    sources: list[DataSource | None] = []
    for name in STAGES:
        stage = getattr(recipe, name)
        if isinstance(stage, GenerateStage):
            sources += [stage.prompts, stage.eval_prompts]
        elif isinstance(stage, EvaluateStage):
            sources.append(stage.pairs)
        elif stage is not None and hasattr(stage, "data"):
            sources += [stage.data.train, stage.data.eval]
    return [source for source in sources if source is not None]


# --------------------------------------------------------------------------- error messages

_FIXES = {
    "missing": "add it",
    "float_parsing": "give a number, e.g. 2.0",
    "float_type": "give a number, e.g. 2.0",
    "int_parsing": "give a whole number",
    "int_type": "give a whole number",
    "int_from_float": "give a whole number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "give a string (quote it)",
    "list_type": "give a list, e.g. [a, b]",
    "dict_type": "give a mapping of keys",
    "model_type": "give a mapping of keys",
    "model_attributes_type": "give a mapping of keys",
    "greater_than": "raise it",
    "greater_than_equal": "raise it",
    "less_than": "lower it",
    "less_than_equal": "lower it",
}


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Names of the keys allowed in the section at `loc` (for "did you mean")."""
    model: Any = Recipe
    for part in loc:
        fields = getattr(model, "model_fields", {})
        field = next((f for n, f in fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    return [f.alias or name for name, f in getattr(model, "model_fields", {}).items()]


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def format_errors(
    err: ValidationError, source: str, origins: dict[tuple[str, ...], str] | None = None
) -> list[str]:
    """One line per problem: where, key path, value, constraint and the fix."""
    origins = origins or {}
    lines = []
    for item in err.errors(include_url=False):
        loc = tuple(p for p in item["loc"] if p != "function-after[...]")
        kind = item["type"]
        key = _dotted(loc)
        where = origins.get(tuple(str(p) for p in loc), source)
        message = item["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            allowed = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            lines.append(f"{where}: {key}: unknown key; {hint}")
        elif kind == "missing":
            lines.append(f"{where}: {key}: required key is missing; add it")
        elif kind == "value_error":
            # A section's validator may report several problems, one per line; top-level
            # messages name their keys themselves.
            for part in message.split("\n"):
                lines.append(f"{where}: {part}" if not loc else f"{where}: {key}: {part}")
        else:
            value = item.get("input")
            fix = _FIXES.get(kind, "")
            if kind == "literal_error":
                options = str(item.get("ctx", {}).get("expected", "")).replace("'", "")
                close = difflib.get_close_matches(
                    str(value), [o.strip() for o in options.replace(" or ", ",").split(",")], n=1
                )
                fix = f"did you mean '{close[0]}'?" if close else f"use one of {options}"
            constraint = message[0].lower() + message[1:] if message else kind
            lines.append(f"{where}: {key} = {value!r}: {constraint}" + (f"; {fix}" if fix else ""))
    return lines
