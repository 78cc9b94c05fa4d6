"""The on-policy stages' sections: generate (sample replies to prompts) and annotate (score them
into pairs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from simpo_cli.recipe.common import DataSource, PositiveInt, Section

AUTHORS_SEEDS = [13, 21, 42, 79, 100]  # the SimPO authors' decode.py seeds


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
