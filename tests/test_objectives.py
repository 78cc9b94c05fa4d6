"""The recipe's loss name and hyperparameters applied to per-sequence log-probs (objectives.py),
and every loss trained on the tiny model: cached and live reference give the same run."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from simpo_cli.errors import RecipeError
from simpo_cli.recipe import LOSS_DEFAULTS, PreferenceStage, load_recipe
from simpo_cli.train.objectives import PairScores, preference_objective

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DATA = {"train": "pairs.jsonl"}
# Two pairs. Policy: chosen sums -4, -9 over 2 and 3 tokens (avg -2, -3); rejected sums -6, -4
# over 3 and 1 tokens (avg -2, -4). Reference sums: chosen -5, -9; rejected -5, -5.
POLICY = PairScores(
    torch.tensor([-4.0, -9.0]),
    torch.tensor([-6.0, -4.0]),
    torch.tensor([2, 3]),
    torch.tensor([3, 1]),
)
REFERENCE = POLICY._replace(
    chosen_sum=torch.tensor([-5.0, -9.0]), rejected_sum=torch.tensor([-5.0, -5.0])
)


def stage(**settings) -> PreferenceStage:
    return PreferenceStage(data=DATA, **settings)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_simpo_uses_averages_and_the_ablation_sums():
    # beta 2, gamma 1: z = 2 * (avg_w - avg_l) - 1 = 2*0 - 1 = -1 and 2*1 - 1 = 1.
    out = preference_objective(stage(), POLICY, None)
    assert out.losses.tolist() == pytest.approx([softplus(1.0), softplus(-1.0)])
    # length_normalize false, gamma 0: z = 2 * (sum_w - sum_l) = 2*2 = 4 and 2*(-5) = -10.
    ablation = stage(length_normalize=False, gamma=0.0)
    out = preference_objective(ablation, POLICY, None)
    assert out.losses.tolist() == pytest.approx([softplus(-4.0), softplus(10.0)])


def test_simpo_sft_weight_adds_the_chosen_cross_entropy():
    # sft term: 0.5 * -avg_w = 0.5 * 2 and 0.5 * 3.
    out = preference_objective(stage(sft_weight=0.5), POLICY, None)
    assert out.losses.tolist() == pytest.approx([softplus(1.0) + 1.0, softplus(-1.0) + 1.5])


def test_dpo_on_summed_log_ratios():
    # beta 0.1: h = (-4 + 5) - (-6 + 5) = 2 and (-9 + 9) - (-4 + 5) = -1.
    out = preference_objective(stage(loss="dpo"), POLICY, REFERENCE)
    assert out.losses.tolist() == pytest.approx([softplus(-0.2), softplus(0.1)])
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])


def test_ipo_and_rdpo():
    # IPO tau 0.1: (h - 1/(2*0.1))^2 = (2 - 5)^2 = 9 and (-1 - 5)^2 = 36.
    out = preference_objective(stage(loss="ipo"), POLICY, REFERENCE)
    assert out.losses.tolist() == pytest.approx([9.0, 36.0])
    # R-DPO beta 0.1, alpha 0.5: -log sigmoid(0.1*h + 0.5*(|y_w| - |y_l|)):
    # 0.2 + 0.5*(2-3) = -0.3 and -0.1 + 0.5*(3-1) = 0.9.
    out = preference_objective(stage(loss="rdpo", alpha=0.5), POLICY, REFERENCE)
    assert out.losses.tolist() == pytest.approx([softplus(0.3), softplus(-0.9)])


def test_reference_free_baselines():
    # CPO beta 0.1, lambda 1: softplus(-0.1*(sum_w - sum_l)) + nll, nll = -avg_w = 2, 3.
    out = preference_objective(stage(loss="cpo"), POLICY, None)
    assert out.losses.tolist() == pytest.approx([softplus(-0.2) + 2, softplus(0.5) + 3])
    # RRHF lambda 1: max(0, avg_l - avg_w) + nll = max(0, 0) + 2 and max(0, -1) + 3.
    out = preference_objective(stage(loss="rrhf"), POLICY, None)
    assert out.losses.tolist() == pytest.approx([2.0, 3.0])
    # SLiC delta 1, lambda 0.5: max(0, 1 - sum_w + sum_l) + 0.5 nll = max(0,-1) + 1; 6 + 1.5.
    out = preference_objective(stage(loss="slic", **{"lambda": 0.5}), POLICY, None)
    assert out.losses.tolist() == pytest.approx([1.0, 7.5])
    # ORPO lambda 0.1: nll - 0.1 log sigmoid(log odds_w - log odds_l), odds(p) = p / (1 - p).
    out = preference_objective(stage(loss="orpo"), POLICY, None)

    def log_odds(avg: float) -> float:
        return avg - math.log1p(-math.exp(avg))

    expected = [
        nll + 0.1 * softplus(-(log_odds(w) - log_odds(lo)))
        for nll, w, lo in ((2.0, -2.0, -2.0), (3.0, -3.0, -4.0))
    ]
    assert out.losses.tolist() == pytest.approx(expected)


def test_kto_splits_each_pair_into_a_desirable_and_an_undesirable_example():
    # Mismatched completions: policy sums -3, -1, reference -4, -4: z0 = mean(1, 3) = 2.
    # beta 0.1; r_w = (1, 0), r_l = (-1, 1) from POLICY - REFERENCE.
    # desirable: 1 - sigmoid(0.1 * (r_w - 2)); undesirable: 1 - sigmoid(0.1 * (2 - r_l)).
    policy = POLICY._replace(kl_sum=torch.tensor([-3.0, -1.0]))
    reference = REFERENCE._replace(kl_sum=torch.tensor([-4.0, -4.0]))
    out = preference_objective(stage(loss="kto"), policy, reference)

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    expected = [
        ((1 - sigmoid(0.1 * (1 - 2))) + (1 - sigmoid(0.1 * (2 + 1)))) / 2,
        ((1 - sigmoid(0.1 * (0 - 2))) + (1 - sigmoid(0.1 * (2 - 1)))) / 2,
    ]
    assert out.losses.tolist() == pytest.approx(expected)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])


def test_losses_with_a_reference_refuse_to_run_without_one():
    with pytest.raises(ValueError, match="loss dpo needs reference log-probs"):
        preference_objective(stage(loss="dpo"), POLICY, None)


def test_each_loss_takes_only_its_hyperparameters():
    assert stage(loss="dpo").beta == 0.1 and stage(loss="dpo").reference.mode == "cached"
    assert stage(loss="simpo").reference is None
    assert stage(loss="ipo").tau == 0.1 and stage(loss="ipo").beta is None
    with pytest.raises(ValueError, match="tau applies to ipo, not dpo"):
        stage(loss="dpo", tau=0.5)
    with pytest.raises(ValueError, match="gamma_beta_ratio applies to simpo, not cpo"):
        stage(loss="cpo", gamma_beta_ratio=0.5)
    assert set(LOSS_DEFAULTS) == {
        "simpo", "dpo", "ipo", "rdpo", "kto", "cpo", "orpo", "rrhf", "slic"
    }  # fmt: skip


def test_a_wrong_hyperparameter_in_a_recipe_is_one_clear_line():
    with pytest.raises(RecipeError) as info:
        load_recipe(
            "tiny",
            [
                "preference.loss=ipo",
                "preference.gamma_beta_ratio=null",
                "preference.sft_weight=null",
            ],
        )
    (line,) = info.value.messages
    assert line.endswith(
        "preference: beta applies to simpo, dpo, rdpo, kto, cpo, not ipo; remove it "
        "(loss ipo takes reference, tau)"
    )


# --------------------------------------------------------------------------- trained for real

LOSS_SETS = {
    "simpo": [],
    "dpo": ["preference.beta=0.5"],
    "ipo": ["preference.beta=null", "preference.tau=0.5"],
    "rdpo": ["preference.beta=0.5", "preference.alpha=0.05"],
    "kto": ["preference.beta=0.5"],
    "cpo": ["preference.beta=0.5"],
    "orpo": ["preference.beta=null"],
    "rrhf": ["preference.beta=null"],
    "slic": ["preference.beta=null"],
}


def _run(loss: str, out: Path, *extra: str, overwrite: bool = False):
    from simpo_cli.run.pipeline import run_stage

    sets = [
        "pipeline=[preference]",
        f"preference.loss={loss}",
        *(
            []
            if loss == "simpo"
            else ["preference.gamma_beta_ratio=null", "preference.sft_weight=null"]
        ),
        *LOSS_SETS[loss],
        "preference.data.train.max_rows=96",
        "preference.data.eval.max_rows=48",
        "preference.training.logging_steps=1",
        *extra,
    ]
    return run_stage(load_recipe("tiny", sets), "preference", out, overwrite=overwrite)


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(LOSS_SETS))
def test_every_loss_trains_the_tiny_model(tmp_path, loss):
    stage_dir = _run(loss, tmp_path)
    logs = _metrics(stage_dir)
    steps = [m for m in logs if "loss" in m]
    assert len(steps) == 6  # 96 pairs / 16 per step
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["rewards/margins"]) for m in steps)
    before = json.loads((stage_dir / "eval_before.json").read_text())
    after = json.loads((stage_dir / "stage_complete.json").read_text())["eval"]
    assert math.isfinite(after["eval_loss"])
    assert after["eval_loss"] < before["eval_loss"], "the held-out loss did not go down"


@pytest.mark.slow
def test_kto_cached_and_live_reference_agree(tmp_path):
    """KTO's cache holds three log-probs per pair (chosen, rejected, mismatched)."""
    cached = _run("kto", tmp_path / "cached")
    live = _run("kto", tmp_path / "live", "preference.reference.mode=live")
    cached_losses = [m["loss"] for m in _metrics(cached) if "loss" in m]
    assert cached_losses == pytest.approx(
        [m["loss"] for m in _metrics(live) if "loss" in m], rel=1e-6
    )
    assert cached_losses[0] == pytest.approx(0.5, rel=1e-6)  # r = z0 = 0: 1 - sigmoid(0)
    (stored, *_) = (tmp_path / "cached" / "reference_logps").glob("*.json")
    assert len(json.loads(stored.read_text())["sides"]) == 3


@pytest.mark.slow
def test_cached_and_live_reference_give_the_same_run(tmp_path):
    cached = _run("dpo", tmp_path / "cached")
    live = _run("dpo", tmp_path / "live", "preference.reference.mode=live")
    cached_losses = [m["loss"] for m in _metrics(cached) if "loss" in m]
    live_losses = [m["loss"] for m in _metrics(live) if "loss" in m]
    assert cached_losses == pytest.approx(live_losses, rel=1e-6)
    assert cached_losses[0] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    stored = list((tmp_path / "cached" / "reference_logps").glob("*.json"))
    assert len(stored) == 2  # train and eval
    # Started over, the stage finds them on disk (nothing recomputed) and trains the same way.
    before = {p: p.stat().st_mtime_ns for p in stored}
    again = _run("dpo", tmp_path / "cached", overwrite=True)
    assert [m["loss"] for m in _metrics(again) if "loss" in m] == cached_losses
    assert {p: p.stat().st_mtime_ns for p in stored} == before


COMPARE_COMPUTE = Path(__file__).resolve().parent.parent / "scripts" / "compare_compute.py"


def _table(stdout: str) -> dict[str, list[str]]:
    """compare_compute.py's table: method -> the other cells, in order."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}


def test_compute_comparison_ratios_by_hand(monkeypatch, capsys):
    """The table of scripts/compare_compute.py from measurements given by hand (4 steps each):
    simpo 2.0 s and 100 MiB; dpo-live 3.0 s (0.750 s/step, 3.0 / 2.0 = 1.50x) and 130 MiB
    (1.30x); dpo-cached 1.8 s (0.450 s/step, 0.90x), 95 MiB (0.95x), pre-pass 0.4 s."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("compare_compute", COMPARE_COMPUTE)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mib = 2**20
    measured = {
        "simpo": {"train_s": 2.0, "steps": 4, "peak_bytes": 100 * mib, "prepass_s": None},
        "dpo-live": {"train_s": 3.0, "steps": 4, "peak_bytes": 130 * mib, "prepass_s": None},
        "dpo-cached": {"train_s": 1.8, "steps": 4, "peak_bytes": 95 * mib, "prepass_s": 0.4},
    }
    monkeypatch.setattr(script, "measure", lambda name, *args: measured[name])
    monkeypatch.setattr(sys, "argv", ["compare_compute.py", "--steps", "4"])
    script.main()
    assert _table(capsys.readouterr().out) == {
        "simpo": ["0.500", "1.00x", "100", "1.00x", "-"],
        "dpo-live": ["0.750", "1.50x", "130", "1.30x", "-"],
        "dpo-cached": ["0.450", "0.90x", "95", "0.95x", "0.4"],
    }


@pytest.mark.slow
def test_compute_comparison_script_prints_the_table():
    """scripts/compare_compute.py, on the tiny model for 2 steps: one row per method, with
    numbers, the cached reference's pre-pass reported apart (the arithmetic of the ratios:
    test_compute_comparison_ratios_by_hand)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(COMPARE_COMPUTE), "--steps", "2", "--tiny"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = _table(result.stdout)
    assert set(table) == {"simpo", "dpo-live", "dpo-cached"}
    for cells in table.values():
        assert float(cells[0]) > 0 and float(cells[2]) >= 0
        assert cells[1].endswith("x") and cells[3].endswith("x")
    assert table["simpo"][4] == "-" and float(table["dpo-cached"][4]) >= 0
