"""The evaluate stage's section: the checkpoints, pairs, benchmarks and lm-eval tasks it runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from simpo_cli.recipe.common import DataSource, PositiveFloat, PositiveInt, Section
from simpo_cli.recipe.onpolicy import RewardSettings


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
    exact_match: bool = Field(
        False,
        description="Score each answer by exact match (outer whitespace aside) with its "
        "question's reference answer (alpaca_eval's `output`): for questions whose reference is "
        "the right answer.",
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
        for bench in self.benchmarks:
            if bench.exact_match and bench.name != "alpaca_eval":
                raise ValueError(
                    f"benchmarks: exact_match on {bench.name}: only alpaca_eval questions carry a "
                    "reference answer (`output`); remove exact_match or use alpaca_eval questions"
                )
        return self
