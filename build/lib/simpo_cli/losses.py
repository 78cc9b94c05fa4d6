"""Losses as pure tensor functions: no trainer, no config, no device logic.

Per-example outputs; the caller reduces. Shapes: B sequences (or pairs), T tokens, V vocabulary,
N unpaired examples (KTO).

Besides SimPO, the baselines of the SimPO paper (Table 3): DPO, IPO, R-DPO, CPO, ORPO, RRHF,
SLiC-HF and KTO. Every formula is written from its paper; tests/test_losses_baselines.py checks
them against hand-worked numbers and, where TRL 1.16 has the same loss, against TRL's code.
TRL 1.16 has no R-DPO (only LD-DPO's `ld_alpha`, a different length method), no RRHF and no
SLiC-HF (its "hinge" losses are max(0, 1 - beta * margin), a rescaled SLiC hinge without the
likelihood term); its DPOTrainer also dropped conservative-DPO label smoothing from the sigmoid
loss (CPOTrainer still has it).

Conventions shared by the baselines:
    logp      summed log-prob of a response's tokens (`sequence_logps(..., average=False)`)
    avg_logp  mean log-prob per response token (`sequence_logps(..., average=True)`)
    nll       per-token mean negative log-likelihood of the chosen response, i.e. -avg_logp of
              the chosen response, as TRL's CPOTrainer computes it (its cross-entropy over the
              chosen response tokens); see each function for what its paper wrote.
"""

from __future__ import annotations

import math
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


# --- Baselines from the SimPO paper's Table 3 -----------------------------------------------------


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO: Direct Preference Optimization.

    Rafailov et al., NeurIPS 2023, https://arxiv.org/abs/2305.18290, equation (7):

        h    = (logp_w - ref_logp_w) - (logp_l - ref_logp_l)
        loss = -log sigmoid(beta * h)

    Label smoothing eps is conservative DPO (cDPO; Mitchell, "A note on DPO with noisy
    preferences", https://ericmitchell.ai/cdpo.pdf): the label is flipped with probability eps,

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    Args:
        chosen_logps, rejected_logps: [B] summed log-probs of the responses under the policy.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen reference model.
        beta: KL strength.
        label_smoothing: eps in [0, 0.5); 0 is the paper's loss.

    Returns:
        PreferenceLoss: losses [B] and the implicit rewards beta * (logp - ref_logp) [B].
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    z = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    tau: float,
) -> PreferenceLoss:
    """IPO: Identity Preference Optimization (the "Psi-PO with identity" of Azar et al.).

    Azar et al., AISTATS 2024, https://arxiv.org/abs/2310.12036, equation (17):

        h    = (logp_w - ref_logp_w) - (logp_l - ref_logp_l)
        loss = (h - 1 / (2 * tau))^2

    A squared loss that regresses the log-ratio gap onto 1 / (2 tau) instead of pushing it to
    infinity. Normalisation is the caller's choice and matters here: the paper writes h with
    sequence log-probs (sums), while TRL's DPOTrainer (loss_type="ipo") divides each log-ratio
    by its response's token count first, a choice TRL says it confirmed with the IPO authors.
    Pass sums for the literal equation (17), or per-token averages of (logp - ref_logp) for the
    normalised form (then tau is on a per-token scale).

    Args:
        chosen_logps, rejected_logps: [B] policy log-probs (summed, or averaged: see above).
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model.
        tau: regularisation strength (TRL passes it as `beta`).

    Returns:
        PreferenceLoss: losses [B] and, for logging, tau * (logp - ref_logp) [B] (what TRL logs
        as rewards, with its beta = tau).
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    losses = (h - 1 / (2 * tau)) ** 2
    chosen_rewards = tau * (chosen_logps - ref_chosen_logps)
    rejected_rewards = tau * (rejected_logps - ref_rejected_logps)
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)


def rdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    alpha: float,
) -> PreferenceLoss:
    """R-DPO: length-regularised DPO.

    Park, Rafailov, Ermon and Finn, "Disentangling Length from Quality in Direct Preference
    Optimization", Findings of ACL 2024, https://arxiv.org/abs/2403.19159, equation (9) (the
    R-DPO objective, as written in the SimPO paper's Table 3):

        h    = (logp_w - ref_logp_w) - (logp_l - ref_logp_l)
        loss = -log sigmoid( beta * h + alpha * (|y_w| - |y_l|) )

    The sign is PLUS, which is the length penalty. R-DPO solves the RLHF problem with the
    reward r(x, y) - alpha * |y|, so the policy's implicit reward becomes
    beta * log(pi / pi_ref) = r - alpha * |y| (+ a prompt-only term). Putting r back into the
    Bradley-Terry likelihood gives r_w - r_l = beta * h + alpha * (|y_w| - |y_l|). Effect: when
    the chosen response is the longer one, alpha * (|y_w| - |y_l|) > 0 already explains part of
    the preference, the loss saturates sooner and the policy is pushed less towards that
    (longer) response; when the chosen one is shorter, the policy must open a larger log-ratio
    gap. Length can no longer buy preference. Writing MINUS alpha * (...) instead would reward
    longer chosen responses, the opposite of the paper.

    Args:
        chosen_logps, rejected_logps: [B] summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model.
        chosen_lengths, rejected_lengths: [B] response token counts (int or float tensors).
        beta: KL strength, as in DPO.
        alpha: length penalty per response token.

    Returns:
        PreferenceLoss: losses [B] and DPO's implicit rewards beta * (logp - ref_logp) [B]
        (without the length term).
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    length_gap = chosen_lengths.to(chosen_rewards.dtype) - rejected_lengths.to(chosen_rewards.dtype)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards + alpha * length_gap)
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
    lambda_: float,
) -> PreferenceLoss:
    """CPO: Contrastive Preference Optimization.

    Xu et al., ICML 2024, https://arxiv.org/abs/2401.08417: L_CPO = L_prefer + L_NLL, with
    L_prefer the reference-free DPO loss (its equation (3), as TRL cites it); in the SimPO
    paper's Table 3 form:

        loss = -log sigmoid( beta * (logp_w - logp_l) ) + lambda_ * nll_w

    Normalisation: the preference term uses SUMMED log-probs (as in the paper and TRL's
    CPOTrainer with loss_type="sigmoid"). The paper writes L_NLL = -log pi(y_w | x), a sequence
    sum, with weight 1; TRL's CPOTrainer (cpo_alpha) uses the cross-entropy averaged over the
    chosen response's tokens. We follow TRL: chosen_nll is the per-token mean NLL of the chosen
    response (-avg_logp_w). TRL averages the NLL over all chosen tokens of the batch, while this
    function is per example: the two agree when the caller reduces chosen_nll with a
    token-weighted mean (or the responses have equal lengths).

    Args:
        chosen_logps, rejected_logps: [B] summed log-probs under the policy.
        chosen_nll: [B] per-token mean negative log-likelihood of the chosen response.
        beta: preference temperature.
        lambda_: weight of the likelihood term (1.0 in the paper; TRL's cpo_alpha).

    Returns:
        PreferenceLoss: losses [B] and the rewards beta * logp [B], as TRL logs them.
    """
    chosen_rewards = beta * chosen_logps
    rejected_rewards = beta * rejected_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards) + lambda_ * chosen_nll
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)


# Largest average log-prob ORPO lets through, so that 1 - p > 0. In float32 a confident model
# gives per-token log-probs of exactly 0 (the log-softmax rounds), and log(1 - exp(0)) = -inf.
_ORPO_MAX_AVG_LOGP = -1e-7


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range.

    Two forms, each used where it does not cancel (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): near 0, 1 - exp(x) loses every digit, but -expm1(x) keeps them; far
    below 0, exp(x) is tiny and log1p(-exp(x)) is exact. The switch is at x = -log 2.
    """
    near_zero = x > -math.log(2.0)
    # Each branch is evaluated on inputs that keep it finite, so neither the value nor the
    # gradient of the unused branch can be inf/NaN (torch.where differentiates both branches).
    x_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    lambda_: float,
) -> PreferenceLoss:
    """ORPO: Monolithic Preference Optimization without Reference Model.

    Hong, Lee and Thorne, EMNLP 2024, https://arxiv.org/abs/2403.07691: L_ORPO = L_SFT +
    lambda * L_OR (TRL cites the odds-ratio term as the paper's equations (4) and (7)):

        p(y)      = exp(avg_logp(y))                     (length-normalised likelihood)
        log odds  = log p - log(1 - p) = avg_logp - log(1 - exp(avg_logp))
        loss      = nll_w - lambda_ * log sigmoid( log odds(y_w) - log odds(y_l) )

    log(1 - exp(x)) is computed with a stable log1mexp, and average log-probs are clamped to at
    most -1e-7 so that a response the model is certain of (avg_logp rounding to exactly 0 in
    float32) gives a large finite log-odds instead of inf/NaN. Computed in float32.

    chosen_nll is the per-token mean NLL of the chosen response (-avg_logp_w), the paper's
    L_SFT. TRL's ORPOTrainer differs here: it averages its NLL over the prompt AND the response
    tokens of the chosen sequence (and over the whole batch).

    Args:
        chosen_avg_logps, rejected_avg_logps: [B] average per-token log-probs (< 0).
        chosen_nll: [B] per-token mean negative log-likelihood of the chosen response.
        lambda_: weight of the odds-ratio term (TRL's `beta`).

    Returns:
        PreferenceLoss: losses [B] and the rewards lambda_ * avg_logp [B]. These "rewards" are
        only what TRL's ORPOTrainer logs (its beta times the average log-prob); ORPO itself
        defines no reward.
    """
    chosen = chosen_avg_logps.float().clamp(max=_ORPO_MAX_AVG_LOGP)
    rejected = rejected_avg_logps.float().clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds_ratio = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    losses = chosen_nll - lambda_ * F.logsigmoid(log_odds_ratio)
    return PreferenceLoss(losses, lambda_ * chosen_avg_logps, lambda_ * rejected_avg_logps)


def rrhf_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    lambda_: float,
) -> PreferenceLoss:
    """RRHF: Rank Responses to align Human Feedback, for one ranked pair.

    Yuan et al., NeurIPS 2023, https://arxiv.org/abs/2304.05302, equations (1)-(4): the score of
    a response is its length-normalised log-prob p_i = avg_logp(y_i), the ranking loss is
    sum over pairs ranked r_i < r_j of max(0, p_i - p_j), plus a fine-tuning loss on the best
    response. With two responses (the SimPO paper's Table 3 form):

        loss = max(0, avg_logp_l - avg_logp_w) + lambda_ * nll_w

    Normalisation: the ranking scores are length-normalised (as in the paper). The paper's
    L_ft (equation (3)) is a token SUM with weight 1 and the SimPO table writes
    -lambda * log pi(y_w | x); here chosen_nll is the per-token mean NLL (-avg_logp_w), the
    convention shared by all losses of this module, so lambda_ absorbs the length factor.

    Args:
        chosen_avg_logps, rejected_avg_logps: [B] average per-token log-probs under the policy.
        chosen_nll: [B] per-token mean negative log-likelihood of the chosen response.
        lambda_: weight of the likelihood term.

    Returns:
        PreferenceLoss: losses [B] and the RRHF scores avg_logp [B] as rewards.
    """
    losses = torch.relu(rejected_avg_logps - chosen_avg_logps) + lambda_ * chosen_nll
    return PreferenceLoss(losses, chosen_avg_logps, rejected_avg_logps)


def slic_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    delta: float,
    lambda_: float,
) -> PreferenceLoss:
    """SLiC-HF: Sequence Likelihood Calibration with Human Feedback.

    Zhao et al., 2023, https://arxiv.org/abs/2305.10425: the rank-calibration hinge on summed
    sequence log-probs plus a cross-entropy regulariser. SLiC-HF regularises towards
    a target sequence y_ref (the SFT target); the SimPO paper's Table 3 uses the chosen
    response, as we do:

        loss = max(0, delta - logp_w + logp_l) + lambda_ * nll_w

    Normalisation: the hinge uses SUMMED log-probs (the paper). The paper's regulariser is
    -log P(y_ref | x), a sequence sum; here chosen_nll is the per-token mean NLL of the chosen
    response (-avg_logp_w), the convention shared by this module, so lambda_ absorbs the
    length factor. Not in TRL: its "hinge" loss is max(0, 1 - beta * margin) =
    beta * max(0, 1 / beta - margin), i.e. this hinge with delta = 1 / beta scaled by beta, and
    in DPOTrainer on reference log-ratios rather than raw log-probs.

    Args:
        chosen_logps, rejected_logps: [B] summed log-probs under the policy.
        chosen_nll: [B] per-token mean negative log-likelihood of the chosen response.
        delta: the margin, in summed log-prob units.
        lambda_: weight of the likelihood term.

    Returns:
        PreferenceLoss: losses [B] and the summed log-probs as rewards [B].
    """
    losses = torch.relu(delta - chosen_logps + rejected_logps) + lambda_ * chosen_nll
    return PreferenceLoss(losses, chosen_logps, rejected_logps)


class KTOLoss(NamedTuple):
    """Per-example outputs of KTO on unpaired examples, each [N]."""

    losses: torch.Tensor
    rewards: torch.Tensor


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: an estimate of KL(pi || pi_ref), clamped at 0 and detached.

    Ethayarajh et al., ICML 2024, https://arxiv.org/abs/2402.01306: z0 is the KL
    between policy and reference on the prompt distribution. It is estimated from the same
    microbatch but on MISMATCHED (prompt, completion) pairs: the completion of example j is
    paired with the prompt of example i != j (TRL shifts completions by one within the batch),
    so that the estimate does not reuse the very pairs being scored. Then

        z0 = max(0, mean_i (logp(y_j | x_i) - ref_logp(y_j | x_i)))

    The paper does not backpropagate through z0 (it only sets the reference point), and TRL
    also averages it across devices before clamping; this function is the per-process part.

    Args:
        policy_kl_logps: [M] summed log-probs of the mismatched completions under the policy.
        ref_kl_logps: [M] the same under the reference model.

    Returns:
        A scalar tensor, >= 0, with no gradient.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_reference: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO: Kahneman-Tversky Optimization, on unpaired examples.

    Ethayarajh et al., ICML 2024, https://arxiv.org/abs/2402.01306, the KTO loss
    (L = E[lambda_y - v(x, y)]; TRL cites it as equation (7)):

        r    = logp - ref_logp
        z0   = max(0, kl_reference), detached
        loss = w_d * (1 - sigmoid(beta * (r - z0)))   for a desirable y
             = w_u * (1 - sigmoid(beta * (z0 - r)))   for an undesirable y

    A paired data set is used by splitting each pair into a desirable (chosen) and an
    undesirable (rejected) example; the caller does that and computes z0 with kto_kl_estimate.

    Args:
        policy_logps: [N] summed log-probs of the completions under the policy.
        ref_logps: [N] the same under the reference model.
        desirable: [N] bool, True for desirable examples.
        kl_reference: scalar tensor z0 (clamped at 0 and detached here).
        beta: risk-aversion / KL strength.
        desirable_weight, undesirable_weight: lambda_D and lambda_U of the paper.

    Returns:
        KTOLoss: losses [N] in input order, rewards beta * r [N].
    """
    z0 = kl_reference.clamp(min=0).detach()
    r = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)
    return KTOLoss(losses, beta * r)
