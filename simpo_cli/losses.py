"""Losses as pure tensor functions: no trainer, no config, no device logic.

Per-example outputs; the caller reduces. Shapes: B sequences (or pairs), T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, average: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each sequence's trained tokens under the model.

    Args:
        logits: [B, T, V] model outputs for input_ids [B, T].
        labels: [B, T] the input_ids with untrained positions (prompt, padding) set to -100.
            Labels are NOT shifted: logits at position t predict the token at t + 1.
        average: True gives the mean log-prob per trained token (SimPO's length-normalised
            likelihood); False gives the sum.

    Returns:
        (logps [B] float32, n_tokens [B] int64). A row with no trained tokens gets logp 0 and
        n_tokens 0: the data pipeline drops such rows, so callers never average them.

    This is the one place per-sequence log-probs are computed: a faster version (padding-free
    batches, chunked vocabulary projection) replaces this function and nothing else.
    """
    # Shift: the prediction for token t + 1 comes from position t.
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # -100 is not a valid index for gather; masked positions are zeroed below anyway.
    safe_labels = labels.masked_fill(~mask, 0)
    # Upcast before the log-softmax: in bf16 the normaliser over a large vocabulary loses the
    # precision that separates chosen from rejected.
    logits = logits.float()
    token_logps = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    token_logps = token_logps * mask
    n_tokens = mask.sum(-1)
    total = token_logps.sum(-1)
    if not average:
        return total, n_tokens
    return total / n_tokens.clamp(min=1), n_tokens


class PreferenceLoss(NamedTuple):
    """Per-pair outputs of a preference loss, each [B]."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid",
) -> PreferenceLoss:
    """SimPO: Simple Preference Optimization with a Reference-Free Reward.

    Meng, Xia and Chen, NeurIPS 2024, https://arxiv.org/abs/2405.14734, equation (6):

        r(x, y) = beta * avg_logp(y | x)
        loss    = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma )

    Variants from the authors' code, with z = beta * (avg_logp_w - avg_logp_l) - gamma:
        label smoothing eps: -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)
        hinge:               relu(1 - z)

    Args:
        chosen_logps: [B] average per-token log-prob of the preferred responses.
        rejected_logps: [B] average per-token log-prob of the dispreferred responses.
        beta: reward scale (2.0 to 10 in the paper).
        gamma: absolute target margin (gamma = beta * gamma_beta_ratio).
        label_smoothing: eps in [0, 0.5), sigmoid loss only.
        loss_type: "sigmoid" (the paper) or "hinge".

    Returns:
        PreferenceLoss with losses [B] and the rewards beta * avg_logp for chosen and rejected [B].
    """
    chosen_rewards = beta * chosen_logps
    rejected_rewards = beta * rejected_logps
    z = chosen_rewards - rejected_rewards - gamma
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:
        raise ValueError(f"unknown SimPO loss_type {loss_type!r}; use 'sigmoid' or 'hinge'")
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)
