"""The training stages' sections: SFT and preference optimisation (SimPO and the baseline losses),
their data and their optimisation settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from simpo_cli.recipe.common import DataSource, PositiveFloat, PositiveInt, Section


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
