"""A preference stage's objective: the recipe's loss name and hyperparameters applied to the
policy's (and, where needed, the reference's) per-sequence log-probs.

A table from loss name to a small function, each a few lines over the pure losses of
losses.py, so every loss is testable without a trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from simpo_cli import losses
from simpo_cli.losses import PreferenceLoss
from simpo_cli.recipe import PreferenceStage


class PairScores(NamedTuple):
    """Summed log-probs and response token counts of chosen and rejected, each [B]; for KTO
    also the summed log-probs of the mismatched completions of its KL term [B]."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    kl_sum: torch.Tensor | None = None

    @property
    def chosen_avg(self) -> torch.Tensor:
        return self.chosen_sum / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_tokens.clamp(min=1)


Objective = Callable[[PreferenceStage, PairScores, "PairScores | None"], PreferenceLoss]


def _simpo(s: PreferenceStage, p: PairScores, _: PairScores | None) -> PreferenceLoss:
    # length_normalize false is the paper's ablation: summed instead of averaged log-probs.
    if s.length_normalize:
        chosen, rejected = p.chosen_avg, p.rejected_avg
    else:
        chosen, rejected = p.chosen_sum, p.rejected_sum
    out = losses.simpo_loss(
        chosen, rejected, s.beta, s.resolved_gamma, s.label_smoothing, s.loss_type
    )
    if s.sft_weight:
        # The authors' added term: the chosen responses' per-token cross-entropy.
        out = out._replace(losses=out.losses + s.sft_weight * -p.chosen_avg)
    return out


def _dpo(s: PreferenceStage, p: PairScores, r: PairScores | None) -> PreferenceLoss:
    return losses.dpo_loss(
        p.chosen_sum, p.rejected_sum, r.chosen_sum, r.rejected_sum, s.beta, s.label_smoothing
    )


def _ipo(s: PreferenceStage, p: PairScores, r: PairScores | None) -> PreferenceLoss:
    return losses.ipo_loss(p.chosen_sum, p.rejected_sum, r.chosen_sum, r.rejected_sum, s.tau)


def _rdpo(s: PreferenceStage, p: PairScores, r: PairScores | None) -> PreferenceLoss:
    return losses.rdpo_loss(
        p.chosen_sum, p.rejected_sum, r.chosen_sum, r.rejected_sum,
        p.chosen_tokens.float(), p.rejected_tokens.float(), s.beta, s.alpha,
    )  # fmt: skip


def _kto(s: PreferenceStage, p: PairScores, r: PairScores | None) -> PreferenceLoss:
    # Each pair is split into a desirable (chosen) and an undesirable (rejected) example; the
    # pair's loss is the mean of the two, so the batch mean is KTO's mean over 2B examples.
    # z0 comes from the mismatched completions in kl_sum (the trainer passes every process's).
    z0 = losses.kto_kl_estimate(p.kl_sum, r.kl_sum)
    half = p.chosen_sum.shape[0]
    desirable = torch.arange(2 * half, device=p.chosen_sum.device) < half
    out = losses.kto_loss(
        torch.cat([p.chosen_sum, p.rejected_sum]),
        torch.cat([r.chosen_sum, r.rejected_sum]),
        desirable, z0, s.beta, s.desirable_weight, s.undesirable_weight,
    )  # fmt: skip
    pair_losses = (out.losses[:half] + out.losses[half:]) / 2
    return PreferenceLoss(pair_losses, out.rewards[:half], out.rewards[half:])


def _cpo(s: PreferenceStage, p: PairScores, _: PairScores | None) -> PreferenceLoss:
    return losses.cpo_loss(p.chosen_sum, p.rejected_sum, -p.chosen_avg, s.beta, s.lambda_)


def _orpo(s: PreferenceStage, p: PairScores, _: PairScores | None) -> PreferenceLoss:
    return losses.orpo_loss(p.chosen_avg, p.rejected_avg, -p.chosen_avg, s.lambda_)


def _rrhf(s: PreferenceStage, p: PairScores, _: PairScores | None) -> PreferenceLoss:
    return losses.rrhf_loss(p.chosen_avg, p.rejected_avg, -p.chosen_avg, s.lambda_)


def _slic(s: PreferenceStage, p: PairScores, _: PairScores | None) -> PreferenceLoss:
    return losses.slic_loss(p.chosen_sum, p.rejected_sum, -p.chosen_avg, s.delta, s.lambda_)


OBJECTIVES: dict[str, Objective] = {
    "simpo": _simpo,
    "dpo": _dpo,
    "ipo": _ipo,
    "rdpo": _rdpo,
    "kto": _kto,
    "cpo": _cpo,
    "orpo": _orpo,
    "rrhf": _rrhf,
    "slic": _slic,
}


def preference_objective(
    stage: PreferenceStage, policy: PairScores, reference: PairScores | None
) -> PreferenceLoss:
    """Per-pair losses and rewards of the stage's loss. `reference` is required exactly for the
    losses with a reference model (dpo, ipo, rdpo, kto)."""
    if stage.uses_reference and reference is None:
        raise ValueError(f"loss {stage.loss} needs reference log-probs")
    return OBJECTIVES[stage.loss](stage, policy, reference)
