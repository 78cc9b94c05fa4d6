"""Evaluation on preference pairs: per-pair average log-probs, reward accuracy, margin, SimPO loss.

Used by the preference stage (held-out numbers before and after training) and by `simpo eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from simpo_cli.data import PreferenceCollator, load_source, load_tokenizer, prepare
from simpo_cli.errors import UserError
from simpo_cli.losses import sequence_logps, simpo_loss
from simpo_cli.recipe import DataSource, ModelSettings, PreferenceStage


@torch.no_grad()
def score_pairs(model, dataset, pad_token_id: int, batch_size: int) -> dict[str, list]:
    """Average per-token log-prob and response token count of chosen and rejected, per pair, in
    dataset order. Chosen and rejected of a batch go through the model in one forward pass."""
    collate = PreferenceCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list] = {k: [] for k in ("chosen_logps", "rejected_logps")}
    out |= {"chosen_tokens": [], "rejected_tokens": []}
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        logps, n_tokens = sequence_logps(logits, batch["labels"])
        half = len(rows)
        out["chosen_logps"] += logps[:half].tolist()
        out["rejected_logps"] += logps[half:].tolist()
        out["chosen_tokens"] += n_tokens[:half].tolist()
        out["rejected_tokens"] += n_tokens[half:].tolist()
    model.train(was_training)
    return out


def summarize(scores: dict[str, list], stage: PreferenceStage) -> dict[str, float]:
    """Reward accuracy (gamma not subtracted), mean reward margin and mean SimPO loss."""
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
    return {
        "pairs": len(chosen),
        "reward_accuracy": (margins > 0).double().mean().item(),
        "reward_margin": margins.mean().item(),
        "loss": result.losses.mean().item(),
        "beta": stage.beta,
        "gamma": stage.resolved_gamma,
    }


def evaluate_model_dir(
    model_dir: str,
    pairs: str,
    split: str = "train",
    output: str | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
    tokenization: str | None = None,
) -> dict[str, Any]:
    """`simpo eval`: score every pair of `pairs` under the model in `model_dir`.

    beta, gamma, the max lengths and the tokenization come from the flags, else from the
    resolved_recipe.yaml the preference stage wrote beside the model (a model trained with the
    authors' tokenization is scored with it), else the SimPO defaults.
    """
    from transformers import AutoModelForCausalLM

    stage = _stage_settings(
        Path(model_dir), pairs, split, beta, gamma, max_length, max_prompt_length, tokenization
    )
    settings = ModelSettings(name_or_path=model_dir)
    tokenizer = load_tokenizer(settings)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except OSError as err:
        raise UserError(f"{model_dir}: cannot load a model: {str(err).splitlines()[0]}") from None
    raw = load_source(stage.data.train, "--pairs")
    data = stage.data
    dataset, report = prepare(
        raw,
        tokenizer,
        "preference",
        f"--pairs ({pairs})",
        data.max_length,
        data.max_prompt_length,
        data.tokenization,
    )
    if report.dropped:
        print("\n".join(report.lines()))
    scores = score_pairs(model, dataset, tokenizer.pad_token_id, batch_size)
    summary = summarize(scores, stage)
    summary |= {
        "tokenization": data.tokenization,
        "dropped": dict(report.dropped),
        "model": model_dir,
        "data": pairs,
    }
    records = [
        dict(zip(scores, values, strict=True)) for values in zip(*scores.values(), strict=True)
    ]
    result = {"summary": summary, "pairs": records}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _stage_settings(
    model_dir, pairs, split, beta, gamma, max_length, max_prompt_length, tokenization
):
    """A PreferenceStage for evaluation: flags over the stage's saved recipe over defaults."""
    import yaml

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
    data["train"] = DataSource(path=pairs, split=split)
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
