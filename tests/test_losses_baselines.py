"""Baseline losses (DPO, IPO, R-DPO, CPO, ORPO, RRHF, SLiC-HF, KTO): numbers worked out by hand,
numerical stability, and parity with TRL 1.16 where TRL implements the same loss.

Hand-worked numbers use n(z) = -log sigmoid(z) = log(1 + e^-z), and n(-z) = z + n(z).

TRL's losses are methods of big trainers. We call them unbound on a `types.SimpleNamespace`
holding only the attributes each method reads (checked against the TRL 1.16 source). DPO and KTO
have no separate loss method in 1.16 (the loss is inline in `_compute_loss`), so for those we run
`_compute_loss` itself with a stand-in model whose per-token log-probs sum to the numbers we pick.
"""

import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from simpo_cli.losses import (
    IGNORE_INDEX,
    KTOLoss,
    PreferenceLoss,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    rdpo_loss,
    rrhf_loss,
    sequence_logps,
    simpo_loss,
    slic_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- DPO --------------------------------------------------------------------------------------


def test_dpo_by_hand():
    # beta = 0.1.
    # Pair 0: logratio_w = -10 + 11 = 1, logratio_l = -12 + 11 = -1, h = 2, beta h = 0.2
    #         loss = n(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139; rewards 0.1, -0.1
    # Pair 1: logratio_w = -15 + 12 = -3, logratio_l = -9 + 10 = 1, h = -4, beta h = -0.4
    #         loss = n(-0.4) = log(1 + e^0.4) = log(2.491825) = 0.913015; rewards -0.3, 0.1
    out = dpo_loss(t(-10, -15), t(-12, -9), t(-11, -12), t(-11, -10), beta=0.1)
    assert isinstance(out, PreferenceLoss)
    assert out.losses.shape == (2,)
    assert out.losses.tolist() == pytest.approx([0.598139, 0.913015], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.3], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1], abs=1e-6)


def test_dpo_label_smoothing_by_hand():
    # beta h = 0.2, eps = 0.2: 0.8 * n(0.2) + 0.2 * n(-0.2) = 0.8 * 0.598139 + 0.2 * 0.798139
    #                                                       = 0.478511 + 0.159628 = 0.638139
    out = dpo_loss(t(-10), t(-12), t(-11), t(-11), beta=0.1, label_smoothing=0.2)
    assert out.losses.item() == pytest.approx(0.638139, abs=1e-6)


# --- IPO --------------------------------------------------------------------------------------


def test_ipo_by_hand():
    # tau = 0.5 -> target 1 / (2 tau) = 1. Same log-probs as the DPO test plus one on target:
    # h = 2 -> (2 - 1)^2 = 1 ; h = -4 -> (-4 - 1)^2 = 25 ; h = (-5 + 6) - (-7 + 7) = 1 -> 0
    out = ipo_loss(t(-10, -15, -5), t(-12, -9, -7), t(-11, -12, -6), t(-11, -10, -7), tau=0.5)
    assert out.losses.tolist() == pytest.approx([1.0, 25.0, 0.0], abs=1e-6)
    # rewards tau * logratio: 0.5 * [1, -3, 1] and 0.5 * [-1, 1, 0]
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -1.5, 0.5], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5, 0.0], abs=1e-6)


# --- R-DPO ------------------------------------------------------------------------------------


def test_rdpo_by_hand():
    # beta = 0.1, alpha = 0.01, the DPO pair 0 (beta h = 0.2) with three length pairs:
    # |y_w| = 30, |y_l| = 10: z = 0.2 + 0.01 * 20 = 0.4 -> n(0.4) = log(1.670320) = 0.513015
    # |y_w| = 10, |y_l| = 30: z = 0.2 - 0.2 = 0       -> n(0) = log 2 = 0.693147
    # |y_w| = |y_l| = 25:     z = 0.2                 -> plain DPO, 0.598139
    ones = torch.ones(3)
    out = rdpo_loss(
        -10 * ones,
        -12 * ones,
        -11 * ones,
        -11 * ones,
        chosen_lengths=torch.tensor([30, 10, 25]),  # int tensors are accepted
        rejected_lengths=torch.tensor([10, 30, 25]),
        beta=0.1,
        alpha=0.01,
    )
    assert out.losses.tolist() == pytest.approx([0.513015, 0.693147, 0.598139], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1] * 3, abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1] * 3, abs=1e-6)


def test_rdpo_sign_pushes_less_towards_a_longer_chosen_response():
    # The sign check of R-DPO's equation (9): d loss / d logp_w = -beta * sigmoid(-z).
    # Chosen longer (z = 0.4): -0.1 * sigmoid(-0.4) = -0.1 * 0.401312 = -0.0401312
    # Plain DPO   (z = 0.2):   -0.1 * sigmoid(-0.2) = -0.1 * 0.450166 = -0.0450166
    # A longer chosen response gets a SMALLER push up than under DPO: length cannot buy reward.
    logp_w = t(-10, -10).requires_grad_()
    out = rdpo_loss(
        logp_w, t(-12, -12), t(-11, -11), t(-11, -11), t(30, 25), t(10, 25), beta=0.1, alpha=0.01
    )
    out.losses.sum().backward()
    assert logp_w.grad.tolist() == pytest.approx([-0.0401312, -0.0450166], abs=1e-7)


# --- CPO --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logp_w", "logp_l", "nll", "lambda_", "expected"),
    [
        # beta = 0.1: z = 0.1 * (-20 + 25) = 0.5 -> n(0.5) = 0.474077; + 1.0 * 0.5 -> 0.974077
        (-20.0, -25.0, 0.5, 1.0, 0.974077),
        # z = 0.1 * (-30 + 20) = -1 -> n(-1) = log(1 + e) = 1.313262; + 0.5 * 1.5 -> 2.063262
        (-30.0, -20.0, 1.5, 0.5, 2.063262),
        # lambda_ = 0: only the preference term, n(0.5) = 0.474077
        (-20.0, -25.0, 0.5, 0.0, 0.474077),
    ],
)
def test_cpo_by_hand(logp_w, logp_l, nll, lambda_, expected):
    out = cpo_loss(t(logp_w), t(logp_l), t(nll), beta=0.1, lambda_=lambda_)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * logp_w)
    assert out.rejected_rewards.item() == pytest.approx(0.1 * logp_l)


# --- ORPO -------------------------------------------------------------------------------------


def test_orpo_by_hand():
    # Pair 0: p_w = 0.5 -> odds 1, log odds 0; p_l = 0.2 -> odds 0.25, log odds -log 4.
    #   log odds ratio = log 4, sigmoid(log 4) = 4 / 5, -log sigmoid = -log 0.8 = 0.223144
    #   nll_w = -log 0.5 = 0.693147; lambda_ = 0.5: 0.693147 + 0.5 * 0.223144 = 0.804719
    # Pair 1: swapped, log odds ratio = -log 4, sigmoid = 1 / 5, -log sigmoid = log 5 = 1.609438
    #   nll_w = -log 0.2 = 1.609438: 1.609438 + 0.5 * 1.609438 = 2.414157
    w = t(math.log(0.5), math.log(0.2))
    l_ = t(math.log(0.2), math.log(0.5))
    out = orpo_loss(w, l_, -w, lambda_=0.5)
    assert out.losses.shape == (2,)
    assert out.losses.tolist() == pytest.approx([0.804719, 2.414157], abs=1e-6)
    # rewards lambda_ * avg_logp, as TRL logs them: 0.5 * log 0.5 = -0.346574, 0.5 * log 0.2
    assert out.chosen_rewards.tolist() == pytest.approx([-0.346574, -0.804719], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.804719, -0.346574], abs=1e-6)


def _log_odds(x: float) -> float:
    # log(p / (1 - p)) for p = e^x, in double precision.
    return x - math.log(-math.expm1(x))


def test_orpo_stable_near_zero_and_very_negative():
    # avg_logp = -1e-6: log odds = -1e-6 - log(1 - e^-1e-6) = 13.815510 (1 - p = 1e-6, which
    # float32's 1 - exp(x) gets 1% wrong). avg_logp = -50: log odds = -50 - log1p(-e^-50) = -50.
    chosen = t(-1e-6, -50.0).requires_grad_()
    rejected = t(-50.0, -1e-6).requires_grad_()
    nll = t(0.25, 0.25)
    out = orpo_loss(chosen, rejected, nll, lambda_=1.0)
    assert torch.isfinite(out.losses).all()
    ratio = _log_odds(-1e-6) - _log_odds(-50.0)  # 63.815510
    assert ratio == pytest.approx(63.815510, abs=1e-6)
    # Pair 0: -log sigmoid(63.8) = e^-63.8 ~ 0, loss = nll. Pair 1: -log sigmoid(-63.8) = 63.8.
    assert out.losses[0].item() == pytest.approx(0.25, abs=1e-6)
    assert out.losses[1].item() == pytest.approx(0.25 + ratio, rel=1e-5)
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_orpo_certain_response_gives_finite_loss_and_gradient():
    # A confident model in float32 gives avg_logp == 0.0 exactly, where log(1 - e^0) = -inf and
    # unguarded ORPO returns inf (or NaN with both at 0). The clamp at -1e-7 keeps it finite.
    chosen = t(0.0, 0.0, -1e-3).requires_grad_()
    rejected = t(-2.0, 0.0, 0.0).requires_grad_()
    out = orpo_loss(chosen, rejected, t(0.0, 0.0, 1e-3), lambda_=1.0)
    assert torch.isfinite(out.losses).all()
    # Both at the clamp: log odds ratio 0, loss = nll + log 2.
    assert out.losses[1].item() == pytest.approx(math.log(2.0), abs=1e-6)
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


# --- RRHF -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("avg_w", "avg_l", "nll", "lambda_", "expected"),
    [
        # Ranked right, hinge inactive: max(0, -1.0 + 0.5) = 0; + 1.0 * 0.5 -> 0.5
        (-0.5, -1.0, 0.5, 1.0, 0.5),
        # Ranked wrong, hinge active: max(0, -0.7 + 1.2) = 0.5; + 0.5 * 1.2 -> 1.1
        (-1.2, -0.7, 1.2, 0.5, 1.1),
        # Tie: max(0, 0) = 0; + 2.0 * 0.8 -> 1.6
        (-0.8, -0.8, 0.8, 2.0, 1.6),
    ],
)
def test_rrhf_by_hand(avg_w, avg_l, nll, lambda_, expected):
    out = rrhf_loss(t(avg_w), t(avg_l), t(nll), lambda_=lambda_)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(avg_w)
    assert out.rejected_rewards.item() == pytest.approx(avg_l)


# --- SLiC-HF ----------------------------------------------------------------------------------


def test_slic_by_hand():
    # delta = 1, lambda_ = 0.1:
    # margin 4 >= delta, inactive: max(0, 1 - (-10) + (-14)) = max(0, -3) = 0; + 0.1 * 2 = 0.2
    # wrong order, active:         max(0, 1 - (-12) + (-11.5)) = 1.5;          + 0.1 * 3 = 1.8
    # right order, margin 0.4 < 1: max(0, 1 - (-10) + (-10.4)) = 0.6;          + 0.1 * 1 = 0.7
    out = slic_loss(t(-10, -12, -10), t(-14, -11.5, -10.4), t(2, 3, 1), delta=1.0, lambda_=0.1)
    assert out.losses.tolist() == pytest.approx([0.2, 1.8, 0.7], abs=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx([-10, -12, -10])
    assert out.rejected_rewards.tolist() == pytest.approx([-14, -11.5, -10.4])


# --- KTO --------------------------------------------------------------------------------------


def test_kto_by_hand():
    # beta = 0.1, z0 = 0.5, w_d = 1, w_u = 2, r = logp - ref_logp:
    # desirable,   r = -6.5 + 10 = 3.5:   1 - sigmoid(0.1 * (3.5 - 0.5)) = sigmoid(-0.3) = 0.425557
    # undesirable, r = -14.5 + 10 = -4.5: 2 * (1 - sigmoid(0.1 * (0.5 + 4.5))) = 2 * sigmoid(-0.5)
    #                                     = 2 * 0.377541 = 0.755081
    # undesirable, r = 0.5 = z0:          2 * (1 - sigmoid(0)) = 1.0
    out = kto_loss(
        t(-6.5, -14.5, -9.5),
        t(-10, -10, -10),
        torch.tensor([True, False, False]),
        torch.tensor(0.5),
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    assert isinstance(out, KTOLoss)
    assert out.losses.shape == (3,)
    assert out.losses.tolist() == pytest.approx([0.425557, 0.755081, 1.0], abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.35, -0.45, 0.05], abs=1e-6)


def test_kto_reference_point_is_clamped_and_detached():
    # kl_reference = -2 is clamped to z0 = 0: 1 - sigmoid(0.1 * 3.5) = sigmoid(-0.35) = 0.413382
    kl = torch.tensor(-2.0, requires_grad=True)
    logp = t(-6.5).requires_grad_()
    out = kto_loss(logp, t(-10), torch.tensor([True]), kl, beta=0.1)
    assert out.losses.item() == pytest.approx(0.413382, abs=1e-6)
    out.losses.sum().backward()
    assert kl.grad is None  # no gradient reaches z0
    assert logp.grad is not None


def test_kto_kl_estimate():
    # diffs [1, -1, 3], mean 1.0 ; diffs [-1, -2], mean -1.5 -> clamped to 0
    policy = t(-10, -12, -8).requires_grad_()
    z0 = kto_kl_estimate(policy, t(-11, -11, -11))
    assert z0.shape == () and z0.item() == pytest.approx(1.0)
    assert not z0.requires_grad
    assert kto_kl_estimate(t(-12, -13), t(-11, -11)).item() == 0.0


# --- shapes -----------------------------------------------------------------------------------


def test_every_paired_loss_is_per_pair():
    torch.manual_seed(0)
    b = 5
    w, l_, rw, rl = (-torch.rand(b) * 50 for _ in range(4))
    aw, al = -torch.rand(b) * 3, -torch.rand(b) * 3
    nll = torch.rand(b)
    lengths = torch.randint(1, 100, (2, b))
    outs = [
        dpo_loss(w, l_, rw, rl, beta=0.1),
        ipo_loss(w, l_, rw, rl, tau=0.1),
        rdpo_loss(w, l_, rw, rl, lengths[0], lengths[1], beta=0.1, alpha=0.1),
        cpo_loss(w, l_, nll, beta=0.1, lambda_=1.0),
        orpo_loss(aw, al, nll, lambda_=0.1),
        rrhf_loss(aw, al, nll, lambda_=1.0),
        slic_loss(w, l_, nll, delta=1.0, lambda_=0.1),
    ]
    for out in outs:
        assert isinstance(out, PreferenceLoss)
        assert all(x.shape == (b,) for x in out)
        assert torch.isfinite(out.losses).all()
    kto = kto_loss(w, rw, torch.rand(b) > 0.5, torch.tensor(0.3), beta=0.1)
    assert kto.losses.shape == (b,) and kto.rewards.shape == (b,)


# --- TRL parity -------------------------------------------------------------------------------
# TRL 1.16 has no R-DPO, RRHF or SLiC-HF, and its DPOTrainer no longer applies label smoothing
# to the sigmoid loss (label_smoothing there only feeds the "robust" and "exo_pair" losses,
# which are different formulas), so cDPO is checked through CPOTrainer's sigmoid loss, which
# still has it and is DPO without the reference: fed log-ratios, it is cDPO exactly.

CPU = torch.device("cpu")
ACCELERATOR = SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x, gather=lambda x: x)


def _pairs(seed: int, b: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w = -(5 + 45 * torch.rand(b, generator=g))
    l_ = -(5 + 45 * torch.rand(b, generator=g))
    rw = w + torch.randn(b, generator=g) * 3
    rl = l_ + torch.randn(b, generator=g) * 3
    return w, l_, rw, rl


def _cpo_trainer():
    return pytest.importorskip("trl.experimental.cpo").CPOTrainer


def _trl_cpo_loss(loss_type: str, beta: float, chosen, rejected, label_smoothing=0.0, gamma=0.0):
    # CPOTrainer.cpo_loss reads alpha (AlphaPO; 0 = log-prob rewards), loss_type, beta,
    # label_smoothing, simpo_gamma and accelerator.device.
    fake = SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        accelerator=ACCELERATOR,
    )
    return _cpo_trainer().cpo_loss(fake, chosen, rejected)


def _trl_dpo_compute_loss(loss_type, beta, w, l_, rw, rl, n_w=1, n_l=1):
    """TRL DPOTrainer._compute_loss on one pair; returns (loss, metrics).

    The stand-in model's fused head returns per-token log-probs: n tokens of logp / n each on
    the completion positions (zero elsewhere), so TRL's sums are exactly logp, and its token
    counts (for IPO) are n. References come in as precomputed log-probs.
    """
    dpo_trainer = pytest.importorskip("trl").DPOTrainer
    width = 1 + max(n_w, n_l)  # one prompt token, then the completion
    completion_mask = torch.zeros(2, width, dtype=torch.long)
    completion_mask[0, 1 : 1 + n_w] = 1
    completion_mask[1, 1 : 1 + n_l] = 1
    shifted = completion_mask[:, 1:].float()
    log_probs = shifted * torch.stack([w / n_w, l_ / n_l]).reshape(2, 1)

    def model(**kwargs):
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros_like(log_probs),
            mean_logits=torch.zeros_like(log_probs),
            is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
        )

    model.training = True
    fake = SimpleNamespace(
        model=model,
        accelerator=ACCELERATOR,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": torch.ones(2, width, dtype=torch.long),
        "attention_mask": torch.ones(2, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rw.reshape(1),
        "ref_rejected_logps": rl.reshape(1),
    }
    loss = dpo_trainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_trl_parity_dpo_sigmoid(beta):
    w, l_, rw, rl = _pairs(0)
    ours = dpo_loss(w, l_, rw, rl, beta=beta)
    for i in range(len(w)):
        loss, metrics = _trl_dpo_compute_loss("sigmoid", beta, w[i], l_[i], rw[i], rl[i])
        assert loss.item() == pytest.approx(ours.losses[i].item(), abs=1e-6)
        assert metrics["rewards/chosen"][-1] == pytest.approx(
            ours.chosen_rewards[i].item(), abs=1e-5
        )
        assert metrics["rewards/rejected"][-1] == pytest.approx(
            ours.rejected_rewards[i].item(), abs=1e-5
        )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_trl_parity_dpo_label_smoothing_via_cpo_sigmoid(label_smoothing):
    # cpo_loss(sigmoid) on logratio_w, logratio_l is cDPO: see the note above.
    w, l_, rw, rl = _pairs(1)
    ours = dpo_loss(w, l_, rw, rl, beta=0.1, label_smoothing=label_smoothing)
    trl_losses, trl_cr, trl_rr = _trl_cpo_loss(
        "sigmoid", 0.1, w - rw, l_ - rl, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(ours.losses, trl_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl_cr, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, trl_rr, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("n_w", "n_l"), [(1, 1), (4, 7)])
def test_trl_parity_ipo(n_w, n_l):
    # TRL's DPOTrainer IPO divides each log-ratio by its response's token count; ours takes what
    # it is given, so we give it per-token averages. With 1 token each it is equation (17) as is.
    w, l_, rw, rl = _pairs(2)
    tau = 0.5
    ours = ipo_loss(w / n_w, l_ / n_l, rw / n_w, rl / n_l, tau=tau)
    for i in range(len(w)):
        loss, _ = _trl_dpo_compute_loss("ipo", tau, w[i], l_[i], rw[i], rl[i], n_w, n_l)
        assert loss.item() == pytest.approx(ours.losses[i].item(), abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_trl_hinge_is_a_rescaled_slic_hinge(beta):
    # TRL's hinge is max(0, 1 - beta * m) = beta * max(0, 1 / beta - m): SLiC-HF's hinge with
    # delta = 1 / beta, scaled by beta (identical at beta = 1), without SLiC's likelihood term.
    # CPOTrainer applies it to raw log-probs (as SLiC-HF does); DPOTrainer to reference
    # log-ratios (SLiC-HF has no reference), which we check by feeding slic_loss log-ratios.
    w, l_, rw, rl = _pairs(3)
    zero = torch.zeros_like(w)
    # rejected = chosen minus margins 10, 0.5, -0.2, -10: inactive and active hinges
    rejected = w - torch.tensor([10.0, 0.5, -0.2, -10.0])
    trl_losses, _, _ = _trl_cpo_loss("hinge", beta, w, rejected)
    ours = slic_loss(w, rejected, zero, delta=1 / beta, lambda_=0.0)
    torch.testing.assert_close(beta * ours.losses, trl_losses, atol=1e-6, rtol=0)
    assert (trl_losses == 0).any() and (trl_losses > 0).any()
    for i in range(len(w)):
        loss, _ = _trl_dpo_compute_loss("hinge", beta, w[i], l_[i], rw[i], rl[i])
        ref_hinge = slic_loss(w[i] - rw[i], l_[i] - rl[i], zero[i], delta=1 / beta, lambda_=0.0)
        assert loss.item() == pytest.approx(beta * ref_hinge.losses.item(), abs=1e-6)


def test_trl_parity_cpo_preference_term():
    w, l_, _, _ = _pairs(4)
    ours = cpo_loss(w, l_, torch.zeros_like(w), beta=0.1, lambda_=1.0)
    trl_losses, trl_cr, trl_rr = _trl_cpo_loss("sigmoid", 0.1, w, l_)
    torch.testing.assert_close(ours.losses, trl_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl_cr, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, trl_rr, atol=1e-6, rtol=0)


def _paired_batch(b: int = 1, seed: int = 5):
    """Token ids, labels and fixed logits for B pairs: 2 prompt tokens, responses of 4 and 3
    tokens (the rejected one padded by one), vocabulary 11."""
    g = torch.Generator().manual_seed(seed)
    width, vocab = 6, 11
    ids = torch.randint(1, vocab, (2 * b, width), generator=g)
    attention = torch.ones(2 * b, width, dtype=torch.long)
    attention[b:, -1] = 0  # rejected responses are one token shorter
    ids = ids.masked_fill(attention == 0, 0)
    labels = ids.masked_fill(attention == 0, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX  # the prompt
    if b > 1:
        labels[1, 2] = IGNORE_INDEX  # chosen responses of different lengths (4 and 3 tokens)
    logits = torch.randn(2 * b, width, vocab, generator=g) * 2
    batch = {
        "chosen_input_ids": ids[:b],
        "chosen_attention_mask": attention[:b],
        "chosen_labels": labels[:b],
        "rejected_input_ids": ids[b:],
        "rejected_attention_mask": attention[b:],
        "rejected_labels": labels[b:],
    }
    return batch, logits, labels


def _trl_concatenated_forward(trainer_cls, logits, batch, **attrs):
    def model(*args, **kwargs):
        return SimpleNamespace(logits=logits)

    fake = SimpleNamespace(
        concatenated_inputs=trainer_cls.concatenated_inputs,  # staticmethods
        get_batch_logps=trainer_cls.get_batch_logps,
        is_encoder_decoder=False,
        accelerator=ACCELERATOR,
        aux_loss_enabled=False,
        **attrs,
    )
    return trainer_cls.concatenated_forward(fake, model, batch)


def test_trl_parity_cpo_full_loss_with_nll():
    # CPOTrainer.concatenated_forward on fixed logits gives TRL's summed log-probs and its NLL
    # (cross-entropy over the chosen response tokens); the trainer's loss is then
    # losses.mean() + cpo_alpha * nll. One pair, so TRL's batch token mean is our per-example one.
    trainer = _cpo_trainer()
    batch, logits, labels = _paired_batch(b=1)
    chosen_t, rejected_t, _, _, nll_t = _trl_concatenated_forward(
        trainer, logits, batch, pad_token_id=0, cpo_alpha=1.0, loss_type="sigmoid"
    )
    logps, _ = sequence_logps(logits, labels, average=False)
    avg, _ = sequence_logps(logits, labels, average=True)
    torch.testing.assert_close(logps, torch.cat([chosen_t, rejected_t]), atol=1e-5, rtol=0)
    assert nll_t.item() == pytest.approx(-avg[0].item(), abs=1e-6)
    for cpo_alpha in (1.0, 0.3):
        trl_losses, _, _ = _trl_cpo_loss("sigmoid", 0.1, chosen_t, rejected_t)
        trl_total = trl_losses.mean() + cpo_alpha * nll_t
        ours = cpo_loss(logps[:1], logps[1:], -avg[:1], beta=0.1, lambda_=cpo_alpha)
        assert ours.losses.item() == pytest.approx(trl_total.item(), abs=1e-6)


def test_trl_cpo_nll_is_a_token_weighted_batch_mean():
    # With several pairs TRL's NLL is one cross-entropy over all chosen tokens of the batch:
    # the token-weighted mean of our per-example NLLs, not their plain mean.
    trainer = _cpo_trainer()
    batch, logits, labels = _paired_batch(b=2)
    *_, nll_t = _trl_concatenated_forward(
        trainer, logits, batch, pad_token_id=0, cpo_alpha=1.0, loss_type="sigmoid"
    )
    avg, n = sequence_logps(logits[:2], labels[:2], average=True)
    assert n.tolist() == [4, 3]
    weighted = (-avg * n).sum() / n.sum()
    assert nll_t.item() == pytest.approx(weighted.item(), abs=1e-6)
    assert nll_t.item() != pytest.approx((-avg).mean().item(), abs=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_trl_parity_simpo_via_cpo(label_smoothing):
    # CPOTrainer loss_type="simpo" with cpo_alpha = 0 is SimPO. Its simpo_gamma is the ABSOLUTE
    # margin (it divides by beta internally), the same as our simpo_loss's gamma.
    g = torch.Generator().manual_seed(6)
    w, l_ = -3 * torch.rand(4, generator=g), -3 * torch.rand(4, generator=g)
    beta, gamma = 2.5, 2.5 * 0.55
    ours = simpo_loss(w, l_, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    trl_losses, trl_cr, trl_rr = _trl_cpo_loss(
        "simpo", beta, w, l_, label_smoothing=label_smoothing, gamma=gamma
    )
    torch.testing.assert_close(ours.losses, trl_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl_cr, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, trl_rr, atol=1e-6, rtol=0)


def _orpo_trainer():
    return pytest.importorskip("trl.experimental.orpo").ORPOTrainer


@pytest.mark.parametrize("lambda_", [0.1, 1.0])
def test_trl_parity_orpo(lambda_):
    # ORPOTrainer.odds_ratio_loss returns beta * log sigmoid(log odds ratio) (a log-likelihood,
    # <= 0) and the trainer's loss is nll - mean of it; TRL's beta is ORPO's lambda.
    g = torch.Generator().manual_seed(7)
    w = -torch.cat([torch.rand(4, generator=g) * 4, t(1e-4, 0.6, 0.8, 30.0)])
    l_ = -torch.cat([torch.rand(4, generator=g) * 4, t(0.6, 1e-4, 30.0, 0.8)])
    nll = -w
    fake = SimpleNamespace(beta=lambda_, accelerator=ACCELERATOR)
    trl_lik, trl_cr, trl_rr, _, _ = _orpo_trainer().odds_ratio_loss(fake, w, l_)
    ours = orpo_loss(w, l_, nll, lambda_=lambda_)
    # rtol too: the last pair's loss is about 60, where float32 values are 3.8e-6 apart.
    torch.testing.assert_close(ours.losses, nll - trl_lik, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.chosen_rewards, trl_cr, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, trl_rr, atol=1e-6, rtol=0)


def test_trl_orpo_nll_includes_the_prompt():
    # A discrepancy with the ORPO paper's L_SFT (the chosen RESPONSE's NLL): TRL's
    # ORPOTrainer.concatenated_forward averages its NLL over prompt and response tokens. Its
    # length-normalised log-probs are over the response only, like sequence_logps.
    batch, logits, labels = _paired_batch(b=1)
    chosen_t, rejected_t, _, _, nll_t = _trl_concatenated_forward(
        _orpo_trainer(), logits, batch, padding_value=0
    )
    avg, _ = sequence_logps(logits, labels, average=True)
    torch.testing.assert_close(avg, torch.cat([chosen_t, rejected_t]), atol=1e-6, rtol=0)
    with_prompt = batch["chosen_input_ids"].masked_fill(
        batch["chosen_attention_mask"] == 0, IGNORE_INDEX
    )
    avg_with_prompt, _ = sequence_logps(logits[:1], with_prompt, average=True)
    assert nll_t.item() == pytest.approx(-avg_with_prompt.item(), abs=1e-6)
    assert nll_t.item() != pytest.approx(-avg[0].item(), abs=1e-3)


def _trl_kto_compute_loss(beta, logps, ref_logps, desirable, kl_logps, ref_kl_logps, w_d, w_u):
    """TRL KTOTrainer._compute_loss on N examples; returns (loss, metrics).

    Same stand-in model as for DPO (one completion token carrying the whole log-prob). The
    mismatched KL completions go through TRL's own _compute_kl_logps, which calls the model on
    batch["KL_input_ids"]; references are precomputed.
    """
    kto_trainer = pytest.importorskip("trl").KTOTrainer
    n, m = len(logps), len(kl_logps)
    ids, kl_ids = torch.ones(n, 2, dtype=torch.long), torch.ones(m, 2, dtype=torch.long)
    mask, kl_mask = torch.tensor([[0, 1]] * n), torch.tensor([[0, 1]] * m)

    def model(**kwargs):
        per_token = (kl_logps if kwargs["input_ids"] is kl_ids else logps).reshape(-1, 1)
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    model.training = True
    fake = SimpleNamespace(
        model=model,
        accelerator=ACCELERATOR,
        calculate_KL=True,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        loss_type="kto",
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake._compute_kl_logps = functools.partial(kto_trainer._compute_kl_logps, fake)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": kl_mask,
        "label": desirable,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    loss = kto_trainer._compute_loss(fake, model, batch, return_outputs=False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize(
    ("kl_shift", "w_d", "w_u"),
    # KL estimate positive (used as is) or negative (clamped to 0); weights equal or not
    [(0.7, 1.0, 1.0), (-0.7, 1.0, 1.0), (0.7, 1.0, 1.5)],
)
def test_trl_parity_kto(kl_shift, w_d, w_u):
    g = torch.Generator().manual_seed(8)
    logps = -(5 + 45 * torch.rand(6, generator=g))
    ref_logps = logps + torch.randn(6, generator=g) * 3
    desirable = torch.tensor([True, False, True, False, False, True])
    kl_ref = -(5 + 45 * torch.rand(6, generator=g))
    kl_policy = kl_ref + kl_shift + torch.randn(6, generator=g) * 0.1
    beta = 0.1
    z0 = kto_kl_estimate(kl_policy, kl_ref)
    ours = kto_loss(logps, ref_logps, desirable, z0, beta, w_d, w_u)
    for i in range(len(logps)):
        loss, metrics = _trl_kto_compute_loss(
            beta,
            logps[i : i + 1],
            ref_logps[i : i + 1],
            desirable[i : i + 1],
            kl_policy,
            kl_ref,
            w_d,
            w_u,
        )
        assert loss.item() == pytest.approx(ours.losses[i].item(), abs=1e-6)
        assert metrics["kl"][-1] == pytest.approx(z0.item(), abs=1e-6)
        key = "rewards/chosen" if desirable[i] else "rewards/rejected"
        assert metrics[key][-1] == pytest.approx(ours.rewards[i].item(), abs=1e-5)
    # The whole batch at once: TRL orders [desirable..., undesirable...] and takes the mean.
    loss, _ = _trl_kto_compute_loss(beta, logps, ref_logps, desirable, kl_policy, kl_ref, w_d, w_u)
    assert loss.item() == pytest.approx(ours.losses.mean().item(), abs=1e-6)
