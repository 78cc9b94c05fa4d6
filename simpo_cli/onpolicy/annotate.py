"""The annotate stage: score the generate stage's samples with a reward model or a Python
function, keep the best and worst reply of each prompt as a pair (binarize.py), and write the
pairs into DIR/annotate/dataset/ (save_to_disk folder plus JSONL, in the published schema) with
a report. The preference stage reads them when its own data is not given.

Every process scores its share of the prompts; the main process gathers the scores, selects and
writes. Also here: the greedy check of a policy on held-out prompts, scored with the same reward
(`annotate.greedy_eval`), which the preference stage runs before and after training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from simpo_cli.distributed import gather_lists, is_main_process, rank, say, world_size
from simpo_cli.errors import DataError
from simpo_cli.model.load import eval_device
from simpo_cli.onpolicy.binarize import binarize, write_dataset
from simpo_cli.onpolicy.generate import samples_file
from simpo_cli.onpolicy.rewards import (
    FunctionScorer,
    RewardModelScorer,
    ScoreItem,
    Scorer,
    score_records,
    split_for_rank,
)
from simpo_cli.onpolicy.sampling import (
    Request,
    SamplingSettings,
    TransformersBackend,
    read_prompts,
    render_prompt_ids,
    split_prompts,
    stop_token_ids,
)
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import AnnotateStage, Recipe, RewardSettings
from simpo_cli.stops import stop_now, stop_requested


def dataset_folder(stage_dir: Path) -> Path:
    return stage_dir / "dataset"


def make_scorer(
    reward: RewardSettings,
    function_key: str = "annotate.reward.function",
    model_key: str = "annotate.reward.model",
) -> Scorer:
    """The scorer of `reward`; the keys name its settings (or flags) in error messages."""
    if reward.function is not None:
        return FunctionScorer.from_spec(reward.function, function_key)
    assert reward.model is not None
    return RewardModelScorer(
        reward.model,
        trust_remote_code=reward.trust_remote_code,
        dtype=None if reward.dtype == "auto" else reward.dtype,
        batch_size=reward.batch_size,
        max_length=reward.max_length,
        device=str(eval_device()),  # this process's GPU under a launch
        key=model_key,
    )


def read_samples(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(
            f"{path}: no samples; run the generate stage first (`simpo generate` or `simpo train`)"
        )
    # Split on newlines only: replies may hold U+2028 and other characters splitlines() breaks at.
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines if line.strip()]


def gather_scores(records: list[dict[str, Any]], scorer: Scorer) -> list[list[float]]:
    """Scores of every record: each process scores its share, the shares are gathered in rank
    order (split_for_rank's blocks are in record order), so every process returns all of them."""

    share = split_for_rank(records, rank(), world_size())
    mine = score_records(share, scorer, is_main_process(), should_stop=stop_requested)
    stop_now("annotate", "scoring starts over on the next run (nothing was written)")
    return gather_lists(mine)


def run(
    recipe: Recipe, stage: AnnotateStage, stage_dir: StageDir, generate_dir: Path
) -> dict[str, Any]:
    """Score, select and write the pairs of the samples in generate_dir (the generate stage's
    folder); returns the stage summary (rows per split and the selection report)."""
    splits = {"train": samples_file(generate_dir, "train")}
    if samples_file(generate_dir, "test").is_file():
        splits["test"] = samples_file(generate_dir, "test")
    records = {split: read_samples(path) for split, path in splits.items()}
    scorer = make_scorer(stage.reward)
    scores = {split: gather_scores(records[split], scorer) for split in records}
    cut = getattr(scorer, "cut", 0)
    if not is_main_process():
        return {}
    choose = {
        "selection": stage.selection,
        "min_margin": stage.min_margin,
        "drop_truncated": stage.drop_truncated,
        "seed": stage.seed,
    }
    rows, report = binarize(records["train"], scores["train"], **choose)
    test_rows, test_report = None, None
    if "test" in records:
        test_rows, test_report = binarize(records["test"], scores["test"], **choose)
    folder = dataset_folder(stage_dir.path)
    if folder.exists():  # written by an earlier attempt of this stage that did not finish
        shutil.rmtree(folder)
    sizes = write_dataset(
        rows,
        folder,
        eval_fraction=stage.eval_fraction if test_rows is None else 0.0,
        seed=stage.seed,
        test_rows=test_rows,
        report=report,
    )
    lines = [f"[annotate] {line}" for line in report.lines()]
    if test_report is not None:
        lines.append(f"[annotate] held-out prompts: {test_report.lines()[0]}")
    if cut:
        lines.append(f"[annotate] {cut} replies longer than reward.max_length were cut")
    lines.append(
        f"[annotate] pairs: {', '.join(f'{n} {split}' for split, n in sizes.items())} in {folder}"
    )
    say("\n".join(lines))
    summary: dict[str, Any] = {"pairs": sizes, "report": report.to_dict()}
    if test_report is not None:
        summary["test_report"] = test_report.to_dict()
    stage_dir.write_json("report.json", summary)
    return summary


# --------------------------------------------------------------------------- greedy check


def greedy_check(recipe: Recipe, model, tokenizer) -> dict[str, float] | None:
    """Greedy replies of `model` to the held-out prompts (generate.eval_prompts), scored with the
    annotate stage's reward: their mean, and with annotate.success_reward the share of replies
    scoring at least that. Every process decodes its share; returns the numbers on every
    process, or None when the recipe does not ask for it (annotate.greedy_eval)."""
    annotate = recipe.annotate
    if annotate is None or recipe.generate is None or not annotate.greedy_eval:
        return None
    scores = [reply["reward"] for reply in greedy_replies(recipe, model, tokenizer)]
    result: dict[str, float] = {"prompts": len(scores), "mean_reward": sum(scores) / len(scores)}
    if annotate.success_reward is not None:
        result["success"] = sum(score >= annotate.success_reward for score in scores) / len(scores)
    return result


def greedy_replies(
    recipe: Recipe, model, tokenizer, scorer: Scorer | None = None
) -> list[dict[str, Any]]:
    """Greedy replies of `model` to the held-out prompts (generate.eval_prompts, at most
    generate.max_new_tokens new tokens), each scored with the annotate stage's reward (or
    `scorer`), in prompt order on every process: {"prompt_id", "prompt" (messages), "text",
    "tokens", "reward"}. Every process decodes and scores its share."""
    generate, annotate = recipe.generate, recipe.annotate
    assert generate is not None and annotate is not None
    source = generate.eval_prompts
    assert source is not None  # the recipe's validator checks it
    prompts = read_prompts(source, source.column, "generate.eval_prompts", source.id_column)
    share = split_prompts(prompts, rank(), world_size())
    settings = SamplingSettings(
        seeds=(0,),
        temperature=0.0,
        max_new_tokens=generate.max_new_tokens,
        stop_token_ids=tuple(stop_token_ids(tokenizer, model.generation_config)),
    )
    backend = TransformersBackend(model, tokenizer)
    requests = [Request(p.prompt_id, render_prompt_ids(tokenizer, p), 0) for p in share]
    training = model.training
    samples = backend.generate(requests, settings)
    model.train(training)
    scorer = scorer or make_scorer(annotate.reward)
    items = [
        ScoreItem(p.prompt_id, p.messages, s.text) for p, s in zip(share, samples, strict=True)
    ]
    scores = scorer(items) if items else []
    mine = [
        {"prompt_id": p.prompt_id, "prompt": p.messages, "text": s.text, "tokens": s.tokens,
         "reward": float(score)}
        for p, s, score in zip(share, samples, scores, strict=True)
    ]  # fmt: skip
    replies = {reply["prompt_id"]: reply for reply in gather_lists(mine)}
    return [replies[p.prompt_id] for p in prompts]
