"""`simpo eval` over several checkpoints: the pair numbers of the paper's analyses (Spearman of
length and average log-prob, DPO's implicit reward against a reference), the comparison table
and plots, benchmark win rates against another checkpoint, the same numbers on 2 processes as
on 1, and one-line errors."""

import csv
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simpo_cli.evaluate.pairs import (
    accuracy_and_ties,
    implicit_reward_summary,
    spearman,
    token_budget_batches,
)
from simpo_cli.launch import free_port
from simpo_cli.recipe import RECIPES_DIR

TINY = RECIPES_DIR / "tiny"
REWARD = RECIPES_DIR / "tiny-onpolicy" / "reward.py"


def simpo(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `simpo train` leaves it: sft/ (the tiny seeded model) and preference/
    (the same with its weights moved a little), each a finished stage."""
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("runs") / "tiny"
    save_tiny_model(run / "sft")
    save_tiny_model(run / "preference")
    model = AutoModelForCausalLM.from_pretrained(run / "preference")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(run / "preference")
    for stage in ("sft", "preference"):
        (run / stage / "stage_complete.json").write_text("{}")
    return run


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = (TINY / "data" / "pref_eval.jsonl").read_text().splitlines()[:24]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def compared(run_dir, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "compare"
    result = simpo(
        "eval", run_dir, "--pairs", pairs, "--reference", run_dir / "sft", "-o", out,
        "--batch-tokens", "96",
        "--benchmark", "alpaca_eval", "--questions", TINY / "benchmarks" / "alpaca_eval.json",
        "--max-new-tokens", "6", "--family", "gemma2", "--backend", "transformers",
        "--against", "tiny-sft", "--reward-function", f"{REWARD}:sorted_digits",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


# --------------------------------------------------------------------------- the numbers


def test_spearman_by_hand_and_against_scipy():
    """x ranks 1 2 3 4 and y ranks 1 3 2 4: 1 - 6 x (0 + 1 + 1 + 0) / (4 x 15) = 0.8. With ties
    (mean ranks) it matches scipy's spearmanr on random data."""
    scipy_stats = pytest.importorskip("scipy.stats")
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rng = random.Random(0)
    for _ in range(5):
        x = [rng.randint(1, 6) for _ in range(40)]  # many ties, like token counts
        y = [rng.gauss(0, 1) + 0.1 * v for v in x]
        expected = scipy_stats.spearmanr(x, y).statistic
        assert spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_token_budget_batches_longest_first_within_the_budget():
    """Lengths 5, 9, 2, 9, 3 with 40 tokens: 2 rows per pair x longest row. 9 and 9 fill
    2 x 2 x 9 = 36 (a third pair would be 54); then 5 and 3 (2 x 2 x 5 = 20), plus 2 (30)."""
    assert token_budget_batches([5, 9, 2, 9, 3], 40) == [[1, 3], [0, 4, 2]]
    assert token_budget_batches([50, 1], 40) == [[0], [1]]  # too long: alone, not dropped


def test_implicit_reward_by_hand():
    """implicit = (chosen sum - its reference) - (rejected sum - its reference).
    Pair 1: (-4 + 5) - (-9 + 6) = 4 > 0, right; average log-probs -2 > -3 agree.
    Pair 2: (-6 + 2) - (-3 + 4) = -5, wrong; averages -2 < -1 agree (rejected first).
    Pair 3: (-2 + 1) - (-8 + 9) = -2, wrong; averages tie (-2, -2): the likelihood ranks it
    not, so it is left out of the disagreement. Accuracy 1/3, no ties, disagreement 0 of 2,
    mean margin (4 - 5 - 2) / 3 = -1. With pair 2's rejected average at -3 the likelihood
    prefers chosen there: disagreement 1 of 2."""
    scores = {
        "chosen_logps_sum": [-4.0, -6.0, -2.0],
        "rejected_logps_sum": [-9.0, -3.0, -8.0],
        "chosen_logps": [-2.0, -2.0, -2.0],
        "rejected_logps": [-3.0, -1.0, -2.0],
        "chosen_tokens": [2, 3, 1],
    }
    reference = {
        "chosen_logps_sum": [-5.0, -2.0, -1.0],
        "rejected_logps_sum": [-6.0, -4.0, -9.0],
        "chosen_tokens": [2, 3, 1],
    }
    got = implicit_reward_summary(scores, reference)
    assert got["implicit_reward_accuracy"] == pytest.approx(1 / 3)
    assert got["implicit_reward_ties"] == 0
    assert got["implicit_likelihood_disagreement"] == 0
    assert got["implicit_logratio_margin"] == pytest.approx(-1.0)
    scores["rejected_logps"][1] = -3.0  # pair 2: the likelihood now prefers chosen
    assert implicit_reward_summary(scores, reference)["implicit_likelihood_disagreement"] == (
        pytest.approx(1 / 2)
    )


def test_ties_count_as_ties_not_as_failures():
    """A model scored against itself as reference: every implicit reward is 0, a tie, and the
    accuracy reads "identical", not 0. Ties among others: pairs 1 and 3 tie (implicit 0), pair 2
    is right (1 > 0), pair 4 wrong: accuracy 1/2 over the untied, ties 2/4."""
    scores = {
        "chosen_logps_sum": [-4.0, -6.0, -2.0, -3.0],
        "rejected_logps_sum": [-9.0, -3.0, -8.0, -1.0],
        "chosen_logps": [-2.0, -2.0, -2.0, -3.0],
        "rejected_logps": [-3.0, -1.0, -2.5, -1.0],
        "chosen_tokens": [2, 3, 1, 1],
    }
    itself = implicit_reward_summary(scores, scores)
    assert itself["implicit_reward_accuracy"] == "identical"
    assert itself["implicit_reward_ties"] == 1
    assert itself["implicit_likelihood_disagreement"] == "identical"
    reference = {
        "chosen_logps_sum": [-4.0, -7.0, -2.0, -2.0],
        "rejected_logps_sum": [-9.0, -3.0, -8.0, -1.0],
        "chosen_tokens": [2, 3, 1, 1],
    }
    got = implicit_reward_summary(scores, reference)
    assert got["implicit_reward_accuracy"] == pytest.approx(1 / 2)
    assert got["implicit_reward_ties"] == pytest.approx(2 / 4)
    # Ranked by both: pair 2 (implicit right, likelihood wrong), pair 4 (both wrong).
    assert got["implicit_likelihood_disagreement"] == pytest.approx(1 / 2)
    assert accuracy_and_ties([0.0, 0.0]) == ("identical", 1.0)
    assert accuracy_and_ties([0.5, -1.0, 0.0, 2.0]) == (pytest.approx(2 / 3), 0.25)


def test_pair_numbers_do_not_depend_on_the_batches(run_dir, pairs, tok):
    """One pair per forward pass or all of them at once: the same log-probs (fp32)."""
    from simpo_cli.data import load_source, prepare
    from simpo_cli.evaluate.pairs import score_pairs
    from simpo_cli.model.load import load_checkpoint
    from simpo_cli.recipe import DataSource

    model = load_checkpoint(str(run_dir / "sft"))
    dataset, _ = prepare(load_source(DataSource(path=str(pairs)), "p"), tok, "preference", "p",
                         256, 128, "default")  # fmt: skip
    one = score_pairs(model, dataset, tok.pad_token_id, batch_tokens=1)
    every = score_pairs(model, dataset, tok.pad_token_id, batch_tokens=100_000)
    assert one["chosen_tokens"] == every["chosen_tokens"]
    for key in ("chosen_logps", "rejected_logps", "chosen_logps_sum"):
        assert one[key] == pytest.approx(every[key], abs=1e-5)


# --------------------------------------------------------------------------- the comparison


def test_comparison_table_over_the_run_folders_checkpoints(compared):
    """One row per stage of the run folder, in pipeline order; markdown, CSV and JSON agree with
    each checkpoint's own pairs.json; the Spearman value is that of the per-pair records."""
    scipy_stats = pytest.importorskip("scipy.stats")
    out, stdout = compared
    table = json.loads((out / "comparison.json").read_text())
    assert [row["checkpoint"] for row in table["rows"]] == ["tiny-sft", "tiny-preference"]
    with (out / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    markdown = (out / "comparison.md").read_text()
    for row, csv_row in zip(table["rows"], rows, strict=True):
        scored = json.loads((out / "checkpoints" / row["checkpoint"] / "pairs.json").read_text())
        summary, records = scored["summary"], scored["pairs"]
        assert summary["pairs"] == 24
        # SimPO's reward is beta x the average log-prob; the loss -log sigmoid(margin - gamma).
        beta, gamma = summary["beta"], summary["gamma"]
        margins = [beta * (r["chosen_logps"] - r["rejected_logps"]) for r in records]
        expected = {
            "reward_accuracy": sum(m > 0 for m in margins) / 24,
            "reward_margin": sum(margins) / 24,
            "loss": sum(math.log1p(math.exp(-(m - gamma))) for m in margins) / 24,
            # The SFT term apart from the SimPO loss: the chosen replies' cross-entropy.
            "sft_loss": -sum(r["chosen_logps"] for r in records) / 24,
            "reward_ties": 0.0,
        }
        assert 0 < expected["reward_accuracy"] < 1, "the tiny model ranks some pairs each way"
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=1e-9)
            assert summary[key] == pytest.approx(value, abs=1e-9)
            assert float(csv_row[key]) == pytest.approx(value, abs=1e-6)
        assert f"| {row['checkpoint']} | 24 | {summary['reward_accuracy']:.4f} |" in markdown
        lengths = [r[f"{s}_tokens"] for s in ("chosen", "rejected") for r in records]
        logps = [r[f"{s}_logps"] for s in ("chosen", "rejected") for r in records]
        expected = scipy_stats.spearmanr(lengths, logps).statistic
        assert summary["spearman_length_logp"] == pytest.approx(expected, abs=1e-9)
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "tiny-preference" in stdout and "wrote" in stdout


def test_implicit_reward_against_the_reference_from_the_per_pair_sums(compared):
    """The preference checkpoint against the sft reference: accuracy and disagreement recomputed
    from the summed log-probs written per pair; the sft row, its own reference, has none."""
    out, _ = compared
    rows = {r["checkpoint"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    assert rows["tiny-sft"]["implicit_reward_accuracy"] is None
    records = json.loads((out / "checkpoints/tiny-preference/pairs.json").read_text())["pairs"]
    implicit = [
        (r["chosen_logps_sum"] - r["reference_chosen_logps_sum"])
        - (r["rejected_logps_sum"] - r["reference_rejected_logps_sum"])
        for r in records
    ]
    likelihood = [r["chosen_logps"] - r["rejected_logps"] for r in records]
    accuracy = sum(m > 0 for m in implicit) / len(records)
    disagree = sum((m > 0) != (d > 0) for m, d in zip(implicit, likelihood, strict=True)) / len(
        records
    )
    assert 0 < accuracy < 1, "the moved weights should rank some pairs each way"
    assert rows["tiny-preference"]["implicit_reward_accuracy"] == pytest.approx(accuracy)
    assert rows["tiny-preference"]["implicit_likelihood_disagreement"] == pytest.approx(disagree)


def test_win_rate_against_another_checkpoint(compared):
    """--against tiny-sft: the preference checkpoint's AlpacaEval answers scored against the sft
    checkpoint's, both read from the answer files, rewards recomputed here with the function."""
    sys.path.insert(0, str(REWARD.parent))
    from reward import sorted_digits

    out, stdout = compared
    read = [
        {r["instruction"]: r["output"] for r in json.loads(
            (out / "alpaca_eval" / label / "model_outputs.json").read_text())}
        for label in ("tiny-preference", "tiny-sft")
    ]  # fmt: skip
    hard = soft = 0.0
    for instruction, reply in read[0].items():
        prompt = [{"role": "user", "content": instruction}]
        delta = sorted_digits(prompt, reply) - sorted_digits(prompt, read[1][instruction])
        hard += 1.0 if delta > 0 else 0.5 if delta == 0 else 0.0
        soft += 1 / (1 + math.exp(-delta))
    got = json.loads((out / "checkpoints/tiny-preference/alpaca_eval/win_rate.json").read_text())
    assert got["opponent"] == "tiny-sft" and got["n"] == len(read[0])
    assert got["win_rate"] == pytest.approx(hard / len(read[0]))
    assert got["soft_win_rate"] == pytest.approx(soft / len(read[0]))
    assert not (out / "checkpoints/tiny-sft/alpaca_eval/win_rate.json").exists()
    assert "proxy" in stdout


def test_family_and_backend_flags_decide_how_answers_are_generated(compared):
    """--family gemma2: AlpacaEval sampled at the SimPO authors' gemma2 temperature, 0.5 (the
    default llama3's is 0.9), in one generation pass per checkpoint; --backend transformers:
    generated with transformers, as the settings beside the answers record."""
    out, _ = compared
    for label in ("tiny-sft", "tiny-preference"):
        work = out / "checkpoints" / label / "alpaca_eval" / "generation"
        assert [p.name for p in work.iterdir()] == ["turn1-temperature0.5"]
        lines = (work / "turn1-temperature0.5" / "samples-rank0.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["generation"]["temperature"] == 0.5
        written = json.loads((out / "alpaca_eval" / label / "generation_settings.json").read_text())
        assert written["decoding"]["temperature"] == 0.5
        assert "for gemma2" in written["decoding"]["source"]
        assert written["backend"] == "transformers"


def test_two_processes_give_the_numbers_of_one(run_dir, pairs, compared, tmp_path):
    """The command of `compared` on 2 processes (each scores every other batch of pairs and
    answers every other question): identical per-pair numbers, answers and table rows."""
    out, _ = compared
    two = tmp_path / "two"
    result = simpo(
        "eval", run_dir, "--pairs", pairs, "--reference", run_dir / "sft", "-o", two,
        "--batch-tokens", "96", "--num-processes", "2", "--main-process-port", str(free_port()),
        "--benchmark", "alpaca_eval", "--questions", TINY / "benchmarks" / "alpaca_eval.json",
        "--max-new-tokens", "6", "--family", "gemma2", "--backend", "transformers",
        "--against", "tiny-sft", "--reward-function", f"{REWARD}:sorted_digits",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for label in ("tiny-sft", "tiny-preference"):
        answers = Path("alpaca_eval") / label / "model_outputs.json"
        assert (two / answers).read_text() == (out / answers).read_text()
    for label in ("tiny-sft", "tiny-preference"):
        one_run = json.loads((out / "checkpoints" / label / "pairs.json").read_text())
        two_run = json.loads((two / "checkpoints" / label / "pairs.json").read_text())
        assert two_run["summary"]["processes"] == 2 and one_run["summary"]["processes"] == 1
        assert two_run["pairs"] == one_run["pairs"]
    two_rows = json.loads((two / "comparison.json").read_text())["rows"]
    assert two_rows == json.loads((out / "comparison.json").read_text())["rows"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args, expected",
    [
        (["RUN", "--benchmark", "alpaca_eval", "--questions", "ALPACA"], "give -o DIR"),
        (["SFT", "SFT", "--pairs", "PAIRS", "-o", "x"], "sft names more than one folder"),
        (
            ["RUN", "--pairs", "PAIRS", "--pairs-output", "x.json"],
            "--pairs-output: writes one checkpoint's pairs, but 2 are given (tiny-sft, "
            "tiny-preference); use -o DIR for several",
        ),
        (["SFT", "--pairs", "PAIRS", "--output", "x.json"], "No such option: --output"),
        (
            ["RUN", "--benchmark", "alpaca_eval", "--questions", "ALPACA", "-o", "x",
             "--against", "tiny-sftt", "--reward-function", "REWARD"],
            "--against tiny-sftt: no such checkpoint, file or folder; did you mean tiny-sft? give "
            "one of the checkpoints evaluated here (tiny-sft, tiny-preference), ",
        ),
        (["SFT", "--benchmark", "alpaca_eval", "-o", "x", "--against", "reference"], "a scorer"),
        (["SFT", "--pairs", "PAIRS", "--reference", "nope"], "nope: --reference: no such"),
        (["SFT", "--pairs", "PAIRS", "--dtype", "float8"], "--dtype float8: use one of"),
        (["EMPTY", "--pairs", "PAIRS", "-o", "x"], "nor a run folder"),
        (["SFT", "--lm-eval", "t", "-o", "x", "--lm-eval-include-path", "nope"], "no such folder"),
        (
            ["SFT", "--pairs", "PAIRS", "--benchmark", "alpaca_eval", "--questions", "ALPACA",
             "-o", "x", "--backend", "vllm"],
            "backend: vllm: not installed",
        ),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(cli, monkeypatch, run_dir, pairs, tmp_path, args, expected):
    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM not installed, whatever this machine has
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    names = {
        "RUN": run_dir, "SFT": run_dir / "sft", "PREF": run_dir / "preference", "PAIRS": pairs,
        "EMPTY": tmp_path / "empty", "ALPACA": TINY / "benchmarks" / "alpaca_eval.json",
        "REWARD": f"{REWARD}:sorted_digits",
    }  # fmt: skip
    result = cli("eval", *[names.get(a, a) for a in args])
    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    if args[-2] == "--output":  # an unknown flag: the parser's usage error
        assert expected in result.stderr and "--output-dir" in result.stderr
    else:
        assert len(result.errors()) == 1 and expected in result.errors()[0], result.stderr
    assert not Path(tmp_path / "x").exists() and not Path(tmp_path / "x.json").exists()


def test_a_run_folder_scores_its_finished_stages_whatever_its_progress(
    cli, run_dir, pairs, tmp_path
):
    """`simpo eval RUN --pairs P` without -o, while the run trains and once it has finished:
    each says which stages it scores and which it skips (an unfinished one with its newest
    complete checkpoint), prints one line per checkpoint naming it, and, for several, the table
    (counts as whole numbers, beta as set, mean lengths to one decimal). The unfinished stage's
    folder itself is one line naming that checkpoint."""
    import shutil

    mid = tmp_path / "tiny"
    shutil.copytree(run_dir / "sft", mid / "sft")
    stage = mid / "preference"
    for step in (2, 3):
        shutil.copytree(run_dir / "preference", stage / f"checkpoint-{step}")
        (stage / f"checkpoint-{step}" / "stage_complete.json").unlink()
    files = sorted(p.name for p in (stage / "checkpoint-2").iterdir())
    done = {"step": 2, "files": files}
    (stage / "checkpoint-2" / "checkpoint_complete.json").write_text(json.dumps(done))
    (stage / "resolved_recipe.yaml").write_text("name: tiny\n")  # checkpoint-3: still saving

    training = cli("eval", mid, "--pairs", pairs)
    assert training.code == 0, training.stdout[-2000:] + training.stderr[-2000:]
    lines = training.stdout.splitlines()
    assert f"{mid}: scoring sft ({mid / 'sft'}) as tiny-sft" in lines
    assert (
        f"{mid}: skipping preference: the preference stage has not finished; to score it now, "
        f"pass its newest complete checkpoint, {stage / 'checkpoint-2'}"
    ) in lines
    [scored] = [line for line in lines if "reward accuracy" in line]
    assert scored.startswith(f"tiny-sft ({mid / 'sft'}): pairs 24: reward accuracy ")
    assert "| checkpoint |" not in training.stdout  # one checkpoint: its line is the result

    refused = cli("eval", stage, "--pairs", pairs)
    assert refused.code == 2
    assert refused.errors() == [
        f"error: {stage}: the preference stage has not finished; to score it now, pass its "
        f"newest complete checkpoint, {stage / 'checkpoint-2'}"
    ]

    finished = cli("eval", run_dir, "--pairs", pairs)
    assert finished.code == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    assert f"{run_dir}: scoring preference ({run_dir / 'preference'}) as tiny-preference" in (
        finished.stdout.splitlines()
    )
    lines = finished.stdout.splitlines()
    table = [line for line in lines if line.startswith("| tiny-")]
    assert [row.split(" | ")[0] for row in table] == ["| tiny-sft", "| tiny-preference"]
    header = lines[lines.index(table[0]) - 2].strip("| ").split(" | ")
    for row in table:
        cell = dict(zip(header, row.strip("| ").split(" | "), strict=True))
        assert cell["pairs"] == "24" and cell["beta"] == "2"
        for rate in ("reward accuracy (untied pairs)", "reward ties", "reward margin",
                     "SimPO loss", "SFT loss (chosen NLL)"):  # fmt: skip
            assert len(cell[rate].split(".")[1]) == 4, (rate, cell[rate])
        for mean in ("chosen tokens", "rejected tokens"):
            assert len(cell[mean].split(".")[1]) == 1, (mean, cell[mean])
    assert not any(tmp_path.glob("**/comparison.*")) and not (run_dir / "checkpoints").exists()


def test_table_cells_read_as_what_they_count(tmp_path):
    """Counts as whole numbers (also when a JSON round trip made them floats), settings as set,
    mean lengths to one decimal, rates and losses to four, in the markdown and the CSV."""
    from simpo_cli.evaluate.compare import comparison_rows, markdown_table, write_comparison

    results = {
        "a": {
            "pairs": {"pairs": 2.0, "reward_accuracy": 0.5, "reward_margin": 0.1, "loss": 1.23456,
                      "beta": 2.0, "spearman_length_logp": 0.2, "mean_chosen_tokens": 31.5,
                      "mean_rejected_tokens": 30.0, "points": {"tokens": [3], "logps": [-1.0]}},
            "benchmarks": {"mt_bench": {"mean_characters": 40.25, "mean_tokens": 12.0,
                                        "cut_at_max_new_tokens": 0.5}},
        }
    }  # fmt: skip
    table = markdown_table(*comparison_rows(results))
    row = "| a | 2 | 0.5000 | 0.1000 | 1.2346 | 2 | 0.2000 | 31.5 | 30.0 | 40.2 | 12.0 | 0.5000 |"
    assert table.splitlines()[2] == row
    write_comparison(results, tmp_path)
    with (tmp_path / "comparison.csv").open() as f:
        written = next(csv.DictReader(f))
    assert written["pairs"] == "2" and written["mean_chosen_tokens"] == "31.5"
    assert written["loss"] == "1.23456"  # the CSV keeps full precision


# --------------------------------------------------------------------------- the evaluate stage


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["pipeline=[evaluate]"], "evaluate: no checkpoints to evaluate"),
        (
            ["preference.data.eval=null", "evaluate.benchmarks=[]"],
            "evaluate: nothing to evaluate",
        ),
        (
            ["evaluate.checkpoints=[preference]", "evaluate.benchmarks.0.against=sft",
             "evaluate.reward.function=x.py:f"],
            "'sft' is not among the checkpoints evaluated (preference)",
        ),
        (["evaluate.benchmarks.0.against=sft"], "benchmarks.against needs reward"),
        (
            ["evaluate.benchmarks.0.name=mt_bench", "evaluate.benchmarks.0.exact_match=true"],
            "exact_match on mt_bench: only alpaca_eval questions carry a reference answer",
        ),
    ],
)  # fmt: skip
def test_evaluate_stage_recipe_errors(sets, expected):
    from simpo_cli.errors import UserError
    from simpo_cli.recipe import load_recipe

    with pytest.raises(UserError) as caught:
        load_recipe("tiny", sets)
    assert any(expected in line for line in caught.value.messages), caught.value.messages


def test_set_reaches_into_the_benchmarks_list():
    """--set evaluate.benchmarks.0.max_new_tokens=3 sets the first benchmark's key; an index
    past the list is one line naming its length."""
    from simpo_cli.errors import UserError
    from simpo_cli.recipe import load_recipe, settings_table

    recipe = load_recipe("tiny", ["evaluate.benchmarks.0.max_new_tokens=3"])
    assert recipe.evaluate.benchmarks[0].max_new_tokens == 3
    row = next(r for r in settings_table(recipe, "evaluate") if "0.max_new_tokens" in r)
    assert row.split()[1] == "3" and "--set" in row
    with pytest.raises(UserError, match="evaluate.benchmarks is a list of 1; index 0 to 0"):
        load_recipe("tiny", ["evaluate.benchmarks.1.name=mt_bench"])


def test_evaluate_stage_names_what_must_run_first(cli, tmp_path):
    """`simpo evaluate tiny` before training: one line naming the stage to run first."""
    result = cli("evaluate", "tiny", "-o", tmp_path / "run")
    assert result.code == 2, result.stdout[-2000:] + result.stderr[-2000:]
    [line] = result.errors()
    assert "'sft' stage's model" in line and "simpo sft" in line


def test_evaluate_stage_of_a_run_folder_and_its_plan(cli, run_dir, pairs, tmp_path):
    """The stage on finished checkpoints listed by path (a user's recipe), with its own pairs and
    a win rate against AlpacaEval's reference: the dry run lists what it will do, the run
    writes the table with a row per checkpoint and the win rate columns; a rerun skips it."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {name_or_path: " + str(run_dir / "sft") + "}\n"
        "pipeline: [evaluate]\n"
        "evaluate:\n"
        f"  checkpoints: [{run_dir / 'sft'}, {run_dir / 'preference'}]\n"
        f"  pairs: {{path: {pairs}, max_rows: 6}}\n"
        "  benchmarks:\n"
        "    - name: alpaca_eval\n"
        f"      questions: {TINY / 'benchmarks' / 'alpaca_eval.json'}\n"
        "      max_new_tokens: 4\n"
        "      temperature: 0\n"
        "      exact_match: true\n"
        "      against: reference\n"
        f"  reward: {{function: '{REWARD}:sorted_digits'}}\n"
    )
    plan = cli("train", recipe, "-o", tmp_path / "out", "--dry-run")
    assert plan.code == 0, plan.stderr[-2000:]
    assert "checkpoints: sft, preference" in plan.stdout
    assert "reward-model win rate against reference" in plan.stdout
    result = simpo("train", recipe, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "out/evaluate/comparison.json").read_text())["rows"]
    assert [row["checkpoint"] for row in rows] == ["sft", "preference"]
    assert all(row["pairs"] == 6 for row in rows)
    sys.path.insert(0, str(REWARD.parent))
    from reward import sorted_digits

    reference = json.loads((TINY / "benchmarks" / "alpaca_eval.json").read_text())
    for row in rows:
        answers = tmp_path / "out/evaluate/alpaca_eval" / row["checkpoint"] / "model_outputs.json"
        outputs = {r["instruction"]: r["output"] for r in json.loads(answers.read_text())}
        deltas = [
            sorted_digits(
                [{"role": "user", "content": r["instruction"]}], outputs[r["instruction"]]
            )
            - sorted_digits([{"role": "user", "content": r["instruction"]}], r["output"])
            for r in reference
        ]
        hard = sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in deltas) / len(deltas)
        soft = sum(1 / (1 + math.exp(-d)) for d in deltas) / len(deltas)
        assert row["alpaca_eval/win_rate vs reference"] == pytest.approx(hard)
        assert row["alpaca_eval/soft_win_rate vs reference"] == pytest.approx(soft)
        # exact_match: the share of answers equal to the reference, printed with the answers.
        same = [outputs[r["instruction"]].strip() == r["output"] for r in reference]
        assert row["alpaca_eval/exact_match"] == pytest.approx(sum(same) / len(same))
        label = row["checkpoint"]
        assert f"exact match: {label:<10}  {sum(same) / len(same):.2f}" in result.stdout
        shown = json.dumps(outputs[reference[0]["instruction"]], ensure_ascii=False)
        assert f"    {label:<10}  {'=' if same[0] else ' '} {shown}" in result.stdout
    assert "alpaca_eval exact match" in (tmp_path / "out/evaluate/comparison.md").read_text()
    again = cli("train", recipe, "-o", tmp_path / "out")
    assert again.code == 0 and "[evaluate] already finished" in again.stdout


def test_lm_eval_tasks_land_in_the_table(run_dir, tmp_path):
    """`--lm-eval` through the CLI on a task defined on a local data file: the table holds the
    task's metrics as lm-eval computed them (lm_eval.json)."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "lm"
    result = simpo("eval", run_dir / "preference", "-o", out, "--lm-eval", "tiny_sort",
                   "--lm-eval-include-path", Path(__file__).parent / "assets" / "lm_eval_task",
                   "--lm-eval-limit", "6")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "comparison.png").is_file()  # lm-eval numbers alone get their plot too
    row = json.loads((out / "comparison.json").read_text())["rows"][0]
    record = json.loads((out / "checkpoints/preference/lm_eval/lm_eval.json").read_text())
    task = Path(__file__).parent / "assets" / "lm_eval_task" / "digits.jsonl"
    questions = len(task.read_text().splitlines())
    assert row["tiny_sort/acc"] == record["results"]["tiny_sort"]["acc"]
    # --lm-eval-limit 6: 6 of the task's questions are answered (not all of them), so the
    # accuracy counts right answers out of 6.
    assert questions > 6
    assert record["samples"]["tiny_sort"] == {"original": questions, "effective": 6}
    assert 6 * row["tiny_sort/acc"] == pytest.approx(round(6 * row["tiny_sort/acc"]))
    assert record["settings"]["limit"] == 6
    assert "tiny_sort/acc" in (out / "comparison.md").read_text()


def test_the_launched_processes_get_the_command_line_back():
    """`simpo eval ... --num-processes 2` re-runs itself under the launcher with the flags as
    given (a flag alone, a value after its option), less --machine-rank (the launcher's)."""
    import typer

    from simpo_cli.cli import app
    from simpo_cli.flags import command_line_again as _command_line_again

    command = typer.main.get_command(app).get_command(None, "eval")
    given = ["m1", "m2", "--pairs", "p.jsonl", "--lm-eval", "t", "--lm-eval-no-chat-template",
             "--machine-rank", "1", "--num-processes", "2", "-o", "out", "--tokenization",
             "authors", "--exact-match"]  # fmt: skip
    ctx = command.make_context("eval", given)
    assert _command_line_again(ctx) == [
        "m1", "m2", "--pairs", "p.jsonl", "--tokenization", "authors", "--output-dir", "out",
        "--exact-match", "--lm-eval", "t", "--lm-eval-no-chat-template", "--num-processes", "2",
    ]  # fmt: skip
