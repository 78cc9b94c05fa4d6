"""Evaluation on preference pairs: per-pair log-probs under a checkpoint, and what the paper
computes from them (section 5 of ../shared/reference/simpo.md):

- reward accuracy, mean margin and SimPO loss under the checkpoint's beta and gamma, and the
  SFT term apart (the chosen responses' per-token cross-entropy, which `sft_weight` adds to the
  training loss);
- the Spearman correlation between response length (tokens) and average log-prob over every
  response, chosen and rejected (the paper: 0.34 SimPO, 0.82 without length normalisation,
  0.59 DPO);
- with a reference model: DPO's implicit reward log pi(y|x) - log pi_ref(y|x) (summed over the
  response; accuracy and the share of pairs where it ranks chosen and rejected differently from
  the average log-prob, which is SimPO's reward).

A pair whose chosen and rejected rewards are equal is a tie, neither right nor wrong: accuracies
are over the pairs that are not tied, with the share of ties beside them, and a model whose
every pair ties (scored against itself as reference) reads IDENTICAL, not 0 % accurate.

Pairs go through the model in batches sized by a token budget (pairs of similar length
together). The batches are formed over the whole set first and dealt to the processes of a
launch in turn, so every pair meets the same batch, and gets the same numbers, on 1 process or
many. Used by the preference stage (held-out numbers before and after training), `simpo eval`
and the evaluate stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from simpo_cli.data import PreferenceCollator, load_source, load_tokenizer, prepare
from simpo_cli.distributed import gather_lists, rank, world_size
from simpo_cli.errors import UserError
from simpo_cli.losses import simpo_loss
from simpo_cli.model.load import load_checkpoint, resolve_dtype
from simpo_cli.recipe import DataSource, EvaluateStage, ModelSettings, PreferenceStage
from simpo_cli.train.logps import chunking_problem, sequence_scores


def token_budget_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of pairs grouped into batches whose padded size, 2 rows per pair times the longest
    row, stays within `batch_tokens` (a pair longer than the budget goes alone). Longest first:
    similar lengths waste little padding, and a budget too large for memory fails at once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and 2 * (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


EVAL_CHUNK = 1024
IDENTICAL = "identical"  # an accuracy over no untied pair: every pair ties


@torch.no_grad()
def score_pairs(model, dataset, pad_token_id: int, batch_tokens: int = 8192) -> dict[str, list]:
    """Summed log-prob and response token count of chosen and rejected, per pair, in dataset
    order, with the average (sum / tokens) beside them. Chosen and rejected of a batch go through
    the model in one forward pass. Every process of a launch scores its share of the batches and
    gets every pair's numbers back."""
    collate = PreferenceCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [
        max(len(dataset[i]["chosen_ids"]), len(dataset[i]["rejected_ids"]))
        for i in range(len(dataset))
    ]
    batches = token_budget_batches(lengths, batch_tokens)
    # Log-probs from the vocabulary projection of EVAL_CHUNK response tokens at a time: the fp32
    # logits of a whole batch are never held.
    chunk_size = 0 if chunking_problem(model) else EVAL_CHUNK
    mine: list[tuple[int, float, float, int, int]] = []
    for batch_rows in batches[rank() :: world_size()]:
        rows = [dataset[i] for i in batch_rows]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(rows).items()}
        scores = sequence_scores(model, batch, chunk_size)
        sums, n_tokens, half = scores.sums.tolist(), scores.counts.tolist(), len(rows)
        for k, i in enumerate(batch_rows):
            mine.append((i, sums[k], sums[half + k], n_tokens[k], n_tokens[half + k]))
    model.train(was_training)
    every = gather_lists(mine)
    every.sort()
    out: dict[str, list] = {}
    for side, column in (("chosen", 1), ("rejected", 2)):
        sums_ = [row[column] for row in every]
        tokens = [row[column + 2] for row in every]
        out[f"{side}_logps"] = [s / max(n, 1) for s, n in zip(sums_, tokens, strict=True)]
        out[f"{side}_logps_sum"] = sums_
        out[f"{side}_tokens"] = tokens
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks, ties given their mean
    rank. NaN when either side is constant or there are fewer than 2 values."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return math.nan
    return cov / math.sqrt(vx * vy)


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def accuracy_and_ties(margins: list[float]) -> tuple[float | str, float]:
    """(share of the untied pairs ranked right (margin > 0), share of tied pairs (margin 0));
    IDENTICAL for the first when every pair ties."""
    n = len(margins)
    tied = sum(m == 0 for m in margins)
    right = sum(m > 0 for m in margins)
    accuracy = right / (n - tied) if n > tied else IDENTICAL
    return accuracy, tied / max(n, 1)


def rate(value: float | str) -> str:
    """An accuracy as the pair summaries print it: 4 decimals, or IDENTICAL."""
    return value if isinstance(value, str) else f"{value:.4f}"


def summarize(
    scores: dict[str, list], stage: PreferenceStage, reference: dict[str, list] | None = None
) -> dict[str, float]:
    """Reward accuracy over the untied pairs (gamma not subtracted) and the share of ties, mean
    reward margin, mean SimPO loss (the SimPO term alone) and mean SFT loss (the chosen
    responses' per-token cross-entropy: the term sft_weight scales); the length / average
    log-prob Spearman over every response; with `reference` (the same pairs scored by the
    reference model), DPO's implicit reward accuracy and ties, its mean log-ratio margin (beta
    1) and the share of pairs where it disagrees with the average log-prob's ranking."""
    chosen = torch.tensor(scores["chosen_logps"], dtype=torch.float64)
    rejected = torch.tensor(scores["rejected_logps"], dtype=torch.float64)
    result = simpo_loss(
        chosen,
        rejected,
        beta=stage.beta,
        gamma=stage.resolved_gamma,
        label_smoothing=stage.label_smoothing,
        loss_type=stage.loss_type,
    )
    margins = result.chosen_rewards - result.rejected_rewards
    lengths = scores["chosen_tokens"] + scores["rejected_tokens"]
    accuracy, ties = accuracy_and_ties(margins.tolist())
    summary = {
        "pairs": len(chosen),
        "reward_accuracy": accuracy,
        "reward_ties": ties,
        "reward_margin": margins.mean().item(),
        "loss": result.losses.mean().item(),
        "sft_loss": -chosen.mean().item(),
        "beta": stage.beta,
        "gamma": stage.resolved_gamma,
        "spearman_length_logp": spearman(
            [float(n) for n in lengths], scores["chosen_logps"] + scores["rejected_logps"]
        ),
        "mean_chosen_tokens": sum(scores["chosen_tokens"]) / max(len(chosen), 1),
        "mean_rejected_tokens": sum(scores["rejected_tokens"]) / max(len(chosen), 1),
    }
    if reference is not None:
        summary |= implicit_reward_summary(scores, reference)
    return summary


def implicit_reward_summary(scores: dict[str, list], reference: dict[str, list]) -> dict:
    """DPO's implicit reward, log pi(y|x) - log pi_ref(y|x) summed over the response (beta left
    out: it scales the margin, never the ranking): accuracy over the untied pairs and the share
    of ties, the mean margin, and the share of the pairs ranked by both (neither tied) that it
    ranks differently from the average log-prob. IDENTICAL where every pair ties."""
    n = len(scores["chosen_logps_sum"])
    if reference["chosen_tokens"] != scores["chosen_tokens"]:
        raise UserError(
            "--reference: its tokenizer splits the responses differently from the model's; "
            "give the reference the model was trained from (the same tokenizer)"
        )
    implicit = [
        (scores["chosen_logps_sum"][i] - reference["chosen_logps_sum"][i])
        - (scores["rejected_logps_sum"][i] - reference["rejected_logps_sum"][i])
        for i in range(n)
    ]
    likelihood = [scores["chosen_logps"][i] - scores["rejected_logps"][i] for i in range(n)]
    accuracy, ties = accuracy_and_ties(implicit)
    ranked = [(a, b) for a, b in zip(implicit, likelihood, strict=True) if a != 0 and b != 0]
    disagree = sum((a > 0) != (b > 0) for a, b in ranked)
    return {
        "implicit_reward_accuracy": accuracy,
        "implicit_reward_ties": ties,
        "implicit_logratio_margin": sum(implicit) / max(n, 1),
        "implicit_likelihood_disagreement": (
            disagree / len(ranked) if ranked else IDENTICAL if ties == 1 else 0.0
        ),
    }


def evaluate_model_dir(
    model_dir: str,
    pairs: str | DataSource,
    split: str = "train",
    output: str | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    batch_tokens: int = 8192,
    tokenization: str | None = None,
    dtype: str = "auto",
    reference: str | None = None,
    named: tuple[str, str | None] | None = None,
) -> dict[str, Any]:
    """Score every pair of `pairs` (a path or hub name read at `split`, or a data source with
    its own split and max_rows) under the model in `model_dir` (and `reference`, when given).
    `named`: the (model, reference) the summary names, when those folders are merged copies of
    adapters.

    beta, gamma, the max lengths and the tokenization come from the flags, else from the
    resolved_recipe.yaml the preference stage wrote beside the model (a model trained with the
    authors' tokenization is scored with it), else the SimPO defaults. Every process of a launch
    runs this and gets the whole result; only the main process writes `output`.
    """
    stage = _stage_settings(
        Path(model_dir), pairs, split, beta, gamma, max_length, max_prompt_length, tokenization
    )
    tokenizer = load_tokenizer(ModelSettings(name_or_path=model_dir))
    model = load_checkpoint(model_dir, dtype)
    raw = load_source(stage.data.train, "--pairs")
    data = stage.data
    dataset, report = prepare(
        raw,
        tokenizer,
        "preference",
        f"--pairs ({stage.data.train.path})",
        data.max_length,
        data.max_prompt_length,
        data.tokenization,
    )
    if report.dropped and rank() == 0:
        print("\n".join(report.lines()))
    scores = score_pairs(model, dataset, tokenizer.pad_token_id, batch_tokens)
    del model
    reference_scores = None
    if reference is not None:
        reference_model = load_checkpoint(reference, dtype)
        reference_scores = score_pairs(
            reference_model, dataset, tokenizer.pad_token_id, batch_tokens
        )
        del reference_model
    summary = summarize(scores, stage, reference_scores)
    summary |= {
        "tokenization": data.tokenization,
        "dropped": dict(report.dropped),
        "model": named[0] if named else model_dir,
        "data": stage.data.train.path,
        "reference": named[1] if named else reference,
        "dtype": str(resolve_dtype(dtype)).removeprefix("torch."),
        "processes": world_size(),
    }
    if reference_scores is not None:
        scores |= {f"reference_{k}": v for k, v in reference_scores.items() if "sum" in k}
    records = [
        dict(zip(scores, values, strict=True)) for values in zip(*scores.values(), strict=True)
    ]
    result = {"summary": summary, "pairs": records}
    if output and rank() == 0:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_pairs(
    model_dir: str,
    settings: EvaluateStage,
    output: str | None,
    reference: str | None,
    named: tuple[str, str | None] | None = None,
) -> dict[str, Any]:
    """`evaluate_model_dir` on settings.pairs with the evaluate stage's (or the flags') pair
    settings."""
    assert settings.pairs is not None
    return evaluate_model_dir(
        model_dir,
        settings.pairs,
        output=output,
        beta=settings.beta,
        gamma=settings.gamma,
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        batch_tokens=settings.batch_tokens,
        tokenization=settings.tokenization,
        dtype=settings.dtype,
        reference=reference,
        named=named,
    )


def _stage_settings(
    model_dir, pairs, split, beta, gamma, max_length, max_prompt_length, tokenization
):
    """A PreferenceStage for evaluation: flags over the stage's saved recipe over defaults."""
    saved: dict[str, Any] = {}
    recipe_file = model_dir / "resolved_recipe.yaml"
    if recipe_file.is_file():
        saved = (yaml.safe_load(recipe_file.read_text()) or {}).get("preference") or {}
    if saved.get("loss", "simpo") != "simpo":
        # Scores are SimPO's (likelihood) rewards whatever the model was trained with; keep
        # only the data settings of another loss.
        saved = {"data": saved.get("data") or {}}
    margin = {"gamma": gamma} if gamma is not None else {}
    if not margin and saved:
        margin = {k: saved[k] for k in ("gamma", "gamma_beta_ratio") if saved.get(k) is not None}
    data = dict(saved.get("data") or {})
    data.pop("eval", None)
    data["train"] = pairs if isinstance(pairs, DataSource) else DataSource(path=pairs, split=split)
    if max_length is not None:
        data["max_length"] = max_length
    if max_prompt_length is not None:
        data["max_prompt_length"] = max_prompt_length
    if tokenization is not None:
        data["tokenization"] = tokenization
    if "max_length" in data and "max_prompt_length" not in data:
        data["max_prompt_length"] = max(1, data["max_length"] // 2)
    keep = ("loss", "loss_type", "label_smoothing")
    fields = {k: saved[k] for k in keep if k in saved} | margin
    fields["beta"] = beta if beta is not None else saved.get("beta", 2.0)
    try:
        return PreferenceStage(data=data, **fields)
    except Exception as err:  # pydantic ValidationError: flags out of range
        first = str(err).splitlines()[-1].strip()
        raise UserError(f"simpo eval: invalid settings: {first}") from None
