"""Losses against numbers worked out by hand."""

import math

import pytest
import torch

from simpo_cli.losses import IGNORE_INDEX, sequence_logps, simpo_loss


def _neg_log_sigmoid(z: float) -> float:
    return math.log1p(math.exp(-z))


@pytest.mark.parametrize(
    ("logp_w", "logp_l", "expected"),
    [
        # beta=2, gamma=0.5 (reference table):
        # z = 2 * (-1.0 + 1.0) - 0.5 = -0.5 -> -log sigmoid(-0.5) = log(1 + e^0.5) = 0.974077
        (-1.0, -1.0, 0.974077),
        # z = 2 * (-0.5 + 1.5) - 0.5 = 1.5  -> log(1 + e^-1.5) = 0.201413
        (-0.5, -1.5, 0.201413),
        # z = 2 * (-2.0 + 1.0) - 0.5 = -2.5 -> log(1 + e^2.5) = 2.578890
        (-2.0, -1.0, 2.578890),
    ],
)
def test_simpo_loss_reference_table(logp_w, logp_l, expected):
    out = simpo_loss(torch.tensor([logp_w]), torch.tensor([logp_l]), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(2.0 * logp_w)
    assert out.rejected_rewards.item() == pytest.approx(2.0 * logp_l)


def test_simpo_loss_is_per_pair():
    out = simpo_loss(torch.tensor([-1.0, -0.5]), torch.tensor([-1.0, -1.5]), beta=2.0, gamma=0.5)
    assert out.losses.shape == (2,)
    assert out.losses.tolist() == pytest.approx([0.974077, 0.201413], abs=1e-6)


def test_simpo_label_smoothing():
    # z = 1.5, eps = 0.1: 0.9 * log(1 + e^-1.5) + 0.1 * log(1 + e^1.5)
    #   = 0.9 * 0.201413 + 0.1 * 1.701413 = 0.181272 + 0.170141 = 0.351413
    out = simpo_loss(
        torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=0.5, label_smoothing=0.1
    )
    assert out.losses.item() == pytest.approx(0.351413, abs=1e-6)


def test_simpo_hinge():
    # z = 1.5 -> relu(1 - 1.5) = 0 ; z = -0.5 -> relu(1.5) = 1.5 ; z = 0.7 -> 0.3
    out = simpo_loss(
        torch.tensor([-0.5, -1.0, -1.0]),
        torch.tensor([-1.5, -1.0, -1.6]),
        beta=2.0,
        gamma=0.5,
        loss_type="hinge",
    )
    assert out.losses.tolist() == pytest.approx([0.0, 1.5, 0.3], abs=1e-6)


def test_simpo_gamma_from_ratio_llama3_instruct():
    # Llama3-Instruct: beta 2.5, gamma/beta 0.55 -> gamma 1.375. Equal log-probs: z = -1.375.
    out = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), beta=2.5, gamma=2.5 * 0.55)
    assert out.losses.item() == pytest.approx(_neg_log_sigmoid(-1.375), abs=1e-6)


def test_sequence_logps_by_hand():
    # Vocabulary of 2, logits [0, log 3] at every position: p(0) = 1/4, p(1) = 3/4.
    # Sequence [5?, 1, 0, 1] with the first label masked (prompt) and the last padded:
    # predicted tokens are labels[1:] = [1, 0, -100] -> logps log(3/4) + log(1/4), 2 tokens.
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(1, 4, 1)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
    total, n = sequence_logps(logits, labels, average=False)
    assert n.tolist() == [2]
    assert total.item() == pytest.approx(math.log(0.75) + math.log(0.25), abs=1e-6)
    avg, _ = sequence_logps(logits, labels, average=True)
    assert avg.item() == pytest.approx((math.log(0.75) + math.log(0.25)) / 2, abs=1e-6)


def test_sequence_logps_uses_the_shift():
    # Position t predicts token t + 1: only logits at position 0 matter for labels[1].
    logits = torch.zeros(1, 2, 3)
    logits[0, 0, 2] = 10.0  # position 0 is confident in token 2
    logits[0, 1, 0] = 10.0  # position 1 (predicts nothing) is confident in token 0
    labels = torch.tensor([[IGNORE_INDEX, 2]])
    avg, _ = sequence_logps(logits, labels)
    expected = 10.0 - math.log(math.exp(10.0) + 2.0)
    assert avg.item() == pytest.approx(expected, abs=1e-5)


def test_sequence_logps_bf16_is_upcast():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 50)
    labels = torch.randint(0, 50, (2, 6))
    labels[:, :2] = IGNORE_INDEX
    ref, _ = sequence_logps(logits, labels)
    low, _ = sequence_logps(logits.bfloat16(), labels)
    assert low.dtype == torch.float32
    assert torch.allclose(low, ref, atol=0.05)


def test_sequence_logps_empty_row_is_zero_not_nan():
    logits = torch.zeros(1, 3, 4)
    labels = torch.full((1, 3), IGNORE_INDEX)
    avg, n = sequence_logps(logits, labels)
    assert n.item() == 0 and avg.item() == 0.0
