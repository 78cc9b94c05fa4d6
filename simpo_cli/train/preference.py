"""The preference stage: SimPO and the baseline losses on pairs, with transformers' Trainer.

Trainer runs the loop, checkpointing, resume and DeepSpeed; this module adds what is
SimPO-specific: the paired forward pass, the loss, the authors' metric names, the reference
model's log-probs (live, or cached on disk) for the losses that need them, and the numbers
printed before and after training (held-out pairs; the greedy check of annotate.greedy_eval).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import uuid
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from simpo_cli.data import PreferenceCollator, add_mismatched_pairs
from simpo_cli.distributed import all_gather, barrier, is_main_process, say, world_size
from simpo_cli.errors import UserError
from simpo_cli.faults import GuardedTrainer
from simpo_cli.model.load import load_model, weights_identity, whole_for_decoding
from simpo_cli.onpolicy.annotate import greedy_check
from simpo_cli.outputs import StageDir
from simpo_cli.recipe import PreferenceStage, Recipe
from simpo_cli.train.logps import batch_layout, sequence_scores, unwrap
from simpo_cli.train.objectives import PairScores, preference_objective
from simpo_cli.train.trainer import SeededBatches

SFT_TERM_LOSSES = ("cpo", "orpo", "rrhf", "slic")


class PreferenceTrainer(SeededBatches, GuardedTrainer):
    """Trainer for preference losses on pairs stacked [chosen; rejected] by PreferenceCollator:
    one forward pass of the policy over both. Reference log-probs, for the losses that need
    them, come with the batch (cached pre-pass) or from `ref_model` (live)."""

    def __init__(
        self, *args, stage: PreferenceStage, ref_model=None, chunk_size: int = 0, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.chunk_size = chunk_size
        self.ref_model = None if ref_model is None else self._prepare_reference(ref_model)
        self.scoring_reference = False  # prediction_step returns summed log-probs when set
        # The loss of an optimizer step is the mean over all its pairs, on every process and
        # micro-batch, whatever their sizes: get_batch_samples counts the step's pairs and
        # compute_loss divides the sum of its pair losses by that count, so Trainer must not
        # divide again by the accumulation steps (nor pass a token count as the loss kwarg).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        # Per-micro-step pair metrics, kept on the device until the next log (one sync there,
        # not one .item() per metric per micro-step).
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    def _pair_scores(self, model, inputs) -> tuple[PairScores, torch.Tensor]:
        """The pairs' summed log-probs under `model`, and the mean logit of each sequence."""
        scores = sequence_scores(model, inputs, self.chunk_size)
        sums, counts = scores.sums, scores.counts
        if self.stage.loss == "kto":  # [chosen; rejected; mismatched] from the collator
            b = sums.shape[0] // 3
            pairs = PairScores(
                sums[:b], sums[b : 2 * b], counts[:b], counts[b : 2 * b], sums[2 * b :]
            )
            return pairs, scores.mean_logits
        half = sums.shape[0] // 2
        pairs = PairScores(sums[:half], sums[half:], counts[:half], counts[half:])
        return pairs, scores.mean_logits

    def _reference_scores(self, model, inputs, policy: PairScores) -> PairScores | None:
        if not self.stage.uses_reference:
            return None
        if "ref_chosen_logps" in inputs:
            return policy._replace(
                chosen_sum=inputs["ref_chosen_logps"],
                rejected_sum=inputs["ref_rejected_logps"],
                kl_sum=inputs.get("ref_kl_logps"),
            )
        with torch.no_grad():
            if self.ref_model is not None:
                reference, _ = self._pair_scores(self.ref_model, inputs)
            else:  # LoRA: the policy with its adapters switched off, no second model
                with unwrap(model).disable_adapter():
                    reference, _ = self._pair_scores(model, inputs)
        return reference

    def _objective(self, policy: PairScores, reference: PairScores | None):
        if self.stage.loss == "kto" and world_size() > 1:
            # KTO's reference point z0 estimates a KL over the whole batch: every process's
            # mismatched completions, as one process would see them (it carries no gradient).
            policy = policy._replace(kl_sum=all_gather(policy.kl_sum.detach()))
            reference = reference._replace(kl_sum=all_gather(reference.kl_sum))
        return preference_objective(self.stage, policy, reference)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step, and the number of pairs they hold on all
        processes together (the divisor of compute_loss)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        pairs = torch.tensor(float(sum(b["num_pairs"] for b in batches)), device=device)
        if world_size() > 1:
            torch.distributed.all_reduce(pairs)
        return batches, pairs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy, mean_logits = self._pair_scores(model, inputs)
        out = self._objective(policy, self._reference_scores(model, inputs, policy))
        if num_items_in_batch is None:  # outside training steps: this micro-batch's mean
            loss = out.losses.mean()
        else:
            # Sum over this micro-batch / pairs of the whole step; the processes' gradients are
            # averaged (DDP, DeepSpeed), hence the factor world_size.
            loss = out.losses.sum() * (world_size() / num_items_in_batch)
        self._store_pair_metrics(out, policy, mean_logits)
        return (loss, {"mean_logits": mean_logits}) if return_outputs else loss

    @torch.no_grad()
    def _store_pair_metrics(self, out, policy: PairScores, mean_logits: torch.Tensor):
        margins = out.chosen_rewards - out.rejected_rewards
        self._store("rewards/chosen", out.chosen_rewards.mean())
        self._store("rewards/rejected", out.rejected_rewards.mean())
        self._store("rewards/accuracies", (margins > 0).float().mean())
        self._store("rewards/margins", margins.mean())
        self._store("logps/chosen", policy.chosen_avg.mean())
        self._store("logps/rejected", policy.rejected_avg.mean())
        if self.stage.sft_weight or self.stage.loss in SFT_TERM_LOSSES:
            self._store("sft_loss", -policy.chosen_avg.mean())
        # Mean raw logit over response positions (the ones that predict a trained token).
        half = policy.chosen_sum.shape[0]
        self._store("logits/chosen", mean_logits[:half].mean())
        self._store("logits/rejected", mean_logits[half : 2 * half].mean())

    def _store(self, name: str, value: torch.Tensor) -> None:
        self._metrics[name].append(value.detach().float())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs get the mean of each pair metric since the previous log, all brought to
        # the host in one transfer.
        if "loss" in logs and self._metrics:
            names = list(self._metrics)
            means = torch.stack([torch.stack(self._metrics[n]).mean() for n in names]).tolist()
            logs.update(zip(names, means, strict=True))
            self._metrics.clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Per-pair results for Trainer's evaluation loop, which shards the data over the
        processes, runs DeepSpeed's inference set-up when needed, and gathers the results:
        [loss, chosen reward, rejected reward, chosen avg logp, rejected avg logp] per pair, or
        [chosen, rejected] summed log-probs in the reference pre-pass."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            policy, _ = self._pair_scores(model, inputs)
            if self.scoring_reference:
                sums = [policy.chosen_sum, policy.rejected_sum, policy.kl_sum]
                scores = torch.stack([x for x in sums if x is not None], dim=1)
            else:
                out = self._objective(policy, self._reference_scores(model, inputs, policy))
                scores = torch.stack(
                    [out.losses, out.chosen_rewards, out.rejected_rewards,
                     policy.chosen_avg, policy.rejected_avg], dim=1,
                )  # fmt: skip
        return None, scores, torch.zeros(scores.shape[0], device=scores.device)

    def summed_logps(self, dataset) -> list[list[float]]:
        """Summed log-probs of every pair's sequences under this trainer's model, in dataset
        order, one list per side: chosen, rejected (and KTO's mismatched). The reference
        pre-pass."""
        self.scoring_reference, metrics = True, self.compute_metrics
        self.compute_metrics = None
        try:
            scores = self.predict(dataset).predictions
        finally:
            self.scoring_reference, self.compute_metrics = False, metrics
        return [scores[:, column].tolist() for column in range(scores.shape[1])]

    def _prepare_reference(self, ref_model):
        """The live reference model, frozen, placed like the policy: under DeepSpeed its own
        inference engine (ZeRO-3 shards it too), else on the training device."""
        ref_model.eval().requires_grad_(False)
        if not self.is_deepspeed_enabled:
            return ref_model.to(self.args.device)
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        if config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}  # no sharding to gain without ZeRO-3
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        engine.eval()  # DeepSpeed's eval() returns None, not the engine
        return engine


def preference_metrics(prediction, sft_weight: float = 0.0) -> dict[str, float]:
    """Held-out metrics from the per-pair results [N, 5] gathered by prediction_step.
    rewards/accuracies is the authors' (a tie counts as wrong); rewards/ties is the share of
    pairs whose rewards are equal, which the printed summary sets apart. With SimPO's
    sft_weight the loss is the SimPO term plus sft_weight x the SFT term: both apart too."""
    scores = torch.as_tensor(prediction.predictions, dtype=torch.float64)
    margins = scores[:, 1] - scores[:, 2]
    metrics = {
        "loss": scores[:, 0].mean().item(),
        "rewards/accuracies": (margins > 0).double().mean().item(),
        "rewards/ties": (margins == 0).double().mean().item(),
        "rewards/margins": margins.mean().item(),
        "logps/chosen": scores[:, 3].mean().item(),
        "logps/rejected": scores[:, 4].mean().item(),
    }
    if sft_weight:
        sft = -scores[:, 3]  # the chosen responses' per-token cross-entropy
        metrics["simpo_loss"] = (scores[:, 0] - sft_weight * sft).mean().item()
        metrics["sft_loss"] = sft.mean().item()
    return metrics


def build_trainer(
    recipe: Recipe,
    name: str,
    stage: PreferenceStage,
    common: dict[str, Any],
    start_from: str | None,
    output_dir: Path,
    checkpoint: Path | None,
) -> PreferenceTrainer:
    """The stage's PreferenceTrainer; with a cached reference, also the callback that scores the
    pairs under the reference model before the first step."""
    tokenizer = common["processing_class"]
    layout = batch_layout(common["model"], stage.training, name)
    trainer = PreferenceTrainer(
        data_collator=PreferenceCollator(
            tokenizer.pad_token_id, layout.padding_free, layout.one_row
        ),
        compute_metrics=partial(preference_metrics, sft_weight=stage.sft_weight),
        stage=stage,
        ref_model=_live_reference(recipe, stage, start_from),
        chunk_size=layout.chunk_size,
        **common,
    )
    if stage.uses_reference and stage.reference.mode == "cached":
        trainer.add_callback(
            CachedReference(trainer, recipe, stage, start_from, output_dir, checkpoint is not None)
        )
    return trainer


def training_rows(stage: PreferenceStage, dataset):
    """The tokenized pairs as the loss reads them: KTO also scores mismatched pairs."""
    if stage.loss == "kto":
        return add_mismatched_pairs(dataset, stage.data.max_length)
    return dataset


# --------------------------------------------------------------------------- before and after


def before_training(recipe: Recipe, name: str, trainer, tokenizer, stage_dir: StageDir, resuming):
    """The greedy check of the start model (annotate.greedy_eval), kept in greedy_before.json
    for the comparison after training; a resumed run has it already."""
    if resuming:
        return
    before = _greedy_check(recipe, name, trainer, tokenizer)
    if before is not None and is_main_process():
        stage_dir.write_json("greedy_before.json", before)


def after_training(recipe: Recipe, name: str, trainer, tokenizer, stage_dir: StageDir, summary):
    """Held-out pairs and the greedy check, before and after training, side by side; the
    greedy numbers go into the stage summary."""
    stage = recipe.stage("preference")
    if "eval" in summary:
        _print_before_after(
            name,
            stage.loss if stage.loss != "simpo" else "SimPO",
            stage.sft_weight,
            _read_json(stage_dir.path / "eval_before.json"),
            summary["eval"],
        )
    after = _greedy_check(recipe, name, trainer, tokenizer)
    if after is not None:
        summary["greedy_eval"] = after
        _print_greedy(name, _read_json(stage_dir.path / "greedy_before.json"), after)


def _greedy_check(recipe: Recipe, name: str, trainer, tokenizer) -> dict | None:
    if recipe.annotate is None or not recipe.annotate.greedy_eval:
        return None
    # Under ZeRO-3 each process decodes with the whole model gathered (its size once more).
    engine = trainer.model_wrapped if trainer.model_wrapped is not trainer.model else None
    with whole_for_decoding(trainer.model, engine):
        return greedy_check(recipe, trainer.model, tokenizer)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _print_greedy(name: str, before: dict | None, after: dict) -> None:
    rows = [("mean reward", "mean_reward")]
    if "success" in after:
        rows.append(("success rate", "success"))
    lines = [
        f"[{name}] held-out prompts, greedy    before     after   ({after['prompts']} prompts)"
    ]
    for label, key in rows:
        first = f"{before[key]:>8.4f}" if before else "       -"
        lines.append(f"[{name}]   {label:<24} {first}  {after[key]:>8.4f}")
    say("\n".join(lines))


def _print_before_after(
    name: str, loss: str, sft_weight: float, before: dict | None, after: dict
) -> None:
    """Held-out numbers before and after: reward accuracy over the pairs whose rewards differ
    (ties apart, when there are any), and the loss; with sft_weight, the SimPO term, the SFT
    term and their sum apart, so that each names exactly what it reports (`simpo eval`'s SimPO
    loss is the SimPO term)."""
    if not before:
        return
    rows: list[tuple[str, Any, Any]] = [
        ("reward accuracy (untied)", _untied_accuracy(before), _untied_accuracy(after))
    ]
    if before.get("eval_rewards/ties") or after.get("eval_rewards/ties"):
        rows.append(
            ("reward ties", before.get("eval_rewards/ties", 0.0), after["eval_rewards/ties"])
        )
    if sft_weight and "eval_simpo_loss" in after and "eval_simpo_loss" in before:
        rows += [
            (f"{loss} loss", before["eval_simpo_loss"], after["eval_simpo_loss"]),
            ("SFT loss (chosen NLL)", before["eval_sft_loss"], after["eval_sft_loss"]),
            (f"total (+ {sft_weight:g} x SFT)", before["eval_loss"], after["eval_loss"]),
        ]
    else:  # (with sft_weight: a run started before the terms were kept apart)
        label = f"{loss} loss" if not sft_weight else f"total (+ {sft_weight:g} x SFT)"
        rows.append((label, before["eval_loss"], after["eval_loss"]))
    lines = [f"[{name}] {'held-out pairs':<26} {'before':>9}  {'after':>9}"]
    for label, first, last in rows:
        lines.append(f"[{name}]   {label:<24} {_number(first):>9}  {_number(last):>9}")
    say("\n".join(lines))


def _untied_accuracy(metrics: dict) -> float | str:
    """The share of right pairs among those whose rewards differ; "identical" when none do."""
    ties = metrics.get("eval_rewards/ties", 0.0)
    if ties >= 1:
        return "identical"
    return metrics["eval_rewards/accuracies"] / (1 - ties)


def _number(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4f}"


# --------------------------------------------------------------------------- reference model


def _reference_source(recipe: Recipe, stage: PreferenceStage, start_from: str | None) -> str | None:
    """The reference model's folder or hub name; None: the recipe's seeded from_config model."""
    if stage.reference.model:
        return stage.reference.model
    if start_from is None and recipe.model.init == "from_config":
        return None
    return start_from or recipe.model.name_or_path


def _live_reference(recipe: Recipe, stage: PreferenceStage, start_from: str | None):
    """The live reference model; None when there is none, or when it is the LoRA policy's own
    base (its adapters switched off)."""
    if not stage.uses_reference or stage.reference.mode != "live":
        return None
    if recipe.model.lora is not None and not stage.reference.model:
        return None
    source = _reference_source(recipe, stage, start_from)
    return load_model(recipe, source, stage.training.seed)


class CachedReference(TrainerCallback):
    """Reference log-probs computed once and kept on disk under output_dir/reference_logps/,
    keyed by the reference model, the tokenized pairs and the tokenization. They ride along in
    the batches (PreferenceCollator looks them up by pair_id), so training holds one model.

    When the reference is the stage's starting model, the pass runs at the start of training:
    through Trainer's prediction loop, inside the DeepSpeed engine that training uses (ZeRO-3
    included), sharded over the processes and gathered in order. A separate reference model
    is scored before training by a trainer of its own."""

    def __init__(self, trainer, recipe, stage, start_from, output_dir: Path, resuming: bool):
        self.trainer = trainer
        self.table: list[tuple[float, float] | None] = []
        self.todo: list[tuple[str, Any, Path]] = []
        source = _reference_source(recipe, stage, start_from)
        identity = _model_identity(source, recipe)
        for attr in ("train_dataset", "eval_dataset"):
            dataset = getattr(trainer, attr)
            if dataset is None:
                continue
            first = len(self.table)
            dataset = dataset.add_column("pair_id", list(range(first, first + len(dataset))))
            setattr(trainer, attr, dataset)
            self.table += [None] * len(dataset)
            key = _reference_key(identity, dataset, trainer.processing_class)
            path = output_dir / "reference_logps" / f"{key}.json"
            if path.is_file():
                self._fill(first, json.loads(path.read_text())["sides"])
                say(f"[preference] reference log-probs of {len(dataset)} pairs from {path}")
            elif resuming and not stage.reference.model:
                raise UserError(
                    f"{path}: the cached reference log-probs of this run are gone and the model "
                    "has moved on since; pass --overwrite to start the stage over"
                )
            else:
                self.todo.append((attr, first, path))
        trainer.data_collator.reference = self.table
        if stage.reference.model and self.todo:
            model = load_model(recipe, source, stage.training.seed)
            layout = batch_layout(model, stage.training, "reference")
            scorer = PreferenceTrainer(
                model=model,
                args=trainer.args,
                # The policy's collator (it holds the reference table), laid out for this model.
                data_collator=dataclasses.replace(
                    trainer.data_collator,
                    padding_free=layout.padding_free,
                    one_row=layout.one_row,
                ),
                processing_class=trainer.processing_class,
                stage=stage,
                chunk_size=layout.chunk_size,
            )
            self._score(scorer)

    def on_train_begin(self, args, state, control, **kwargs):
        self._score(self.trainer)

    def _score(self, scorer: PreferenceTrainer) -> None:
        for attr, first, path in self.todo:
            dataset = getattr(self.trainer, attr)
            say(f"[preference] computing reference log-probs of {len(dataset)} pairs")
            sides = scorer.summed_logps(dataset)
            self._fill(first, sides)
            if is_main_process():
                # Whole or not at all: the points of a sweep on SLURM share the folder, and one
                # may read the file while another writes the same numbers.
                path.parent.mkdir(parents=True, exist_ok=True)
                written = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
                written.write_text(json.dumps({"sides": sides}))
                os.replace(written, path)
        self.todo = []
        barrier()

    def _fill(self, first: int, sides: list[list[float]]) -> None:
        for offset, pair in enumerate(zip(*sides, strict=True)):
            self.table[first + offset] = pair


def _model_identity(source: str | None, recipe: Recipe) -> dict[str, Any]:
    """What decides the reference model's weights, cheaply: a folder's weight files (name, size,
    modification time), a hub name, or the seeded config of a from_config model."""
    if source is None:
        return {"from_config": recipe.model.config, "seed": recipe.first_stage_seed()}
    return weights_identity(source)


def _reference_key(identity: dict[str, Any], dataset, tokenizer) -> str:
    """sha256 of the model identity, the chat template and every pair's token ids (which fix
    the data, the truncation and the tokenization)."""
    import numpy as np

    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    digest.update((tokenizer.chat_template or "").encode())
    columns = [c for c in dataset.column_names if c.endswith(("_ids", "_labels"))]
    for column in sorted(columns):
        for row in dataset[column]:
            digest.update(np.asarray(row, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:32]
