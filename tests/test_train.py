"""Training stages on the tiny model: accumulation invariance, the real CLI end to end, resume, and
`simpo eval` against an independent computation with plain transformers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from simpo_cli.model.load import load_model
from simpo_cli.recipe import RECIPES_DIR, load_recipe
from simpo_cli.run.pipeline import run_stage
from simpo_cli.train import schedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_DATA = RECIPES_DIR / "tiny" / "data"
STAGE_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "resolved_recipe.yaml",
    "metrics.jsonl",
    "reproducibility.json",
    "data_report.txt",
    "README.md",
    "stage_complete.json",
)


def simpo(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simpo_cli", *args], capture_output=True, text=True, **kwargs
    )


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- accumulation


def _one_sgd_step(stage: str, out: Path, micro: int, accumulation: int, *sets: str) -> dict:
    """One optimizer step of plain SGD (lr 1, no clipping, no warmup) from the seeded tiny
    model: the weight change is exactly minus the gradient of the step's loss. 8 examples in a
    step of micro x accumulation may be a short step (3 x 3): a stage refuses one
    (schedule.check_trainer), which these comparisons of micro-batch layouts leave out."""
    t = f"{stage}.training"
    recipe = load_recipe(
        "tiny",
        [
            f"pipeline=[{stage}]",
            f"{stage}.data.train.max_rows=8",
            f"{stage}.data.eval=null",
            f"{t}.max_steps=1",
            f"{t}.optim=sgd",
            f"{t}.learning_rate=1.0",
            f"{t}.lr_scheduler_type=constant",
            f"{t}.warmup_ratio=0",
            f"{t}.max_grad_norm=0",
            f"{t}.per_device_train_batch_size={micro}",
            f"{t}.gradient_accumulation_steps={accumulation}",
            f"{t}.total_batch_size=null",
            f"{t}.logging_steps=1",
            *sets,
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(schedule, "check_trainer", lambda *args: None)
        stage_dir = run_stage(recipe, stage, out)
    # Weights that moved: no warning that nothing was learned.
    assert "warnings" not in json.loads((stage_dir / "stage_complete.json").read_text())
    start = load_model(recipe, None, recipe.stage(stage).training.seed).state_dict()
    end = load_file(stage_dir / "model.safetensors")
    step = next(m for m in metrics(stage_dir) if "loss" in m)
    return {"delta": {k: end[k] - start[k] for k in end}, "loss": step["loss"]}


@pytest.mark.parametrize("stage", ["preference", "sft"])
@pytest.mark.parametrize(("micro", "accumulation"), [(2, 4), (3, 3)])
def test_gradient_accumulation_invariance(tmp_path, stage, micro, accumulation):
    """One micro-batch of 8 examples, and the same 8 (same seed, same sampler order) split into
    micro-batches of 2 x 4 accumulation steps, or unevenly into 3 + 3 + 2, give the same loss
    and the same gradients: the step's loss is the mean over its pairs (preference) or trained
    tokens (SFT), whatever the micro-batches."""
    whole = _one_sgd_step(stage, tmp_path / "a", micro=8, accumulation=1)
    split = _one_sgd_step(stage, tmp_path / "b", micro=micro, accumulation=accumulation)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    moved = 0
    for name, delta in whole["delta"].items():
        torch.testing.assert_close(split["delta"][name], delta, rtol=1e-4, atol=1e-6)
        moved += int(delta.abs().max() > 0)
    assert moved > 0, "the step changed no weight"


@pytest.mark.parametrize("stage", ["preference", "sft"])
def test_packed_chunked_step_equals_padded_full_logits(tmp_path, stage):
    """The step's loss and gradients with the default packed batches and chunked log-probs
    (chunks of 16 tokens, so every micro-batch is split) equal those of padded batches with full
    logits, through the whole stage (collator, trainer, loss scaling)."""
    t = f"{stage}.training"
    fast = _one_sgd_step(stage, tmp_path / "a", 4, 2, f"{t}.logps_chunk_size=16")
    plain = _one_sgd_step(stage, tmp_path / "b", 4, 2,
                          f"{t}.padding_free=false", f"{t}.logps_chunk_size=0")  # fmt: skip
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    for name, delta in plain["delta"].items():
        torch.testing.assert_close(fast["delta"][name], delta, rtol=0, atol=1e-5)


def test_balanced_batches_group_pairs_by_length(tmp_path, monkeypatch):
    """balanced_batches: the step's 8 pairs are dealt into 4 micro-batches of different sizes by
    length (short pairs together, long ones with fewer others), and the step's loss and
    gradients are those of one micro-batch of all 8."""
    from simpo_cli.train.preference import PreferenceTrainer

    seen = []
    compute_loss = PreferenceTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append((inputs["num_pairs"], inputs["token_index"].numel()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    # Six pairs on 2 digits, two on 12: lengths the sampler must not mix evenly.
    rows = []
    for digits in [[3, 1], [2, 0], [5, 4], [9, 7], [8, 6], [1, 0], [*range(12)][::-1], [4, 9] * 6]:
        prompt = "Sort: " + " ".join(map(str, digits))
        answer = " ".join(map(str, sorted(digits)))
        rows.append({"chosen": [{"role": "user", "content": prompt},
                                {"role": "assistant", "content": answer}],
                     "rejected": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": answer[::-1]}]})  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = f"preference.data.train.path={pairs}"
    monkeypatch.setattr(PreferenceTrainer, "compute_loss", spy)
    balanced = _one_sgd_step("preference", tmp_path / "a", 2, 4, data,
                             "preference.training.balanced_batches=true")  # fmt: skip
    monkeypatch.undo()
    assert len(seen) == 4 and sum(pairs for pairs, _ in seen) == 8
    # The two long pairs alone, the six short ones three by three (trained tokens: 30, 26, 18).
    assert sorted(pairs for pairs, _ in seen) == [1, 1, 3, 3], seen
    whole = _one_sgd_step("preference", tmp_path / "b", 8, 1, data)
    assert balanced["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    for name, delta in whole["delta"].items():
        torch.testing.assert_close(balanced["delta"][name], delta, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- the CLI end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "out"
    result = simpo("train", "tiny", "--output-dir", str(out))
    return out, result


@pytest.mark.slow
def test_cli_train_tiny_end_to_end(tiny_run):
    out, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("sft", "preference"):
        for name in STAGE_FILES:
            assert (out / stage / name).is_file(), f"{stage}/{name} missing"
    assert f"final model: {out / 'preference'}" in result.stdout

    # Losses finite, and the authors' metric names logged.
    pref = [m for m in metrics(out / "preference") if "loss" in m and "rewards/chosen" in m]
    assert pref, "no training logs"
    for m in pref:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                    "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
                    "logits/rejected", "grad_norm", "learning_rate", "epoch"):  # fmt: skip
            assert math.isfinite(m[key]), (key, m)
    assert all(math.isfinite(m["loss"]) for m in metrics(out / "sft") if "loss" in m)

    # The SimPO stage changed the SFT model's weights.
    sft = load_file(out / "sft" / "model.safetensors")
    final = load_file(out / "preference" / "model.safetensors")
    assert any(not torch.equal(sft[k], final[k]) for k in sft)

    # The held-out loss clearly falls over the stage and reward accuracy does not (the SFT model
    # already ranks most held-out pairs right; what SimPO adds shows in its answers, below).
    before = json.loads((out / "preference" / "eval_before.json").read_text())
    after = json.loads((out / "preference" / "stage_complete.json").read_text())["eval"]
    assert after["eval_rewards/accuracies"] >= before["eval_rewards/accuracies"]
    assert after["eval_loss"] <= 0.8 * before["eval_loss"]
    assert "reward accuracy" in result.stdout and "SimPO loss" in result.stdout

    record = json.loads((out / "preference" / "reproducibility.json").read_text())
    assert record["seed"] == 42 and record["world_size"] == 1
    assert record["start_model"] == str(out / "sft")
    assert record["datasets"]["preference.data.train"].startswith("sha256:")
    assert "torch" in record["packages"] and "transformers" in record["packages"]


@pytest.mark.slow
def test_tiny_pipeline_ends_with_the_evaluate_stage(tiny_run):
    """The evaluate stage compares tiny-sft and tiny-preference: its held-out numbers for the
    preference model are those the preference stage's own evaluation computed at the end (same
    pairs, beta and gamma, another code path); the answer files are the official layout; the
    table and the plot are written. The demo shows learning: after SFT the greedy answers to the
    held-out prompts are digit lists that end (not cut at max_new_tokens), and after SimPO
    clearly more of them are the right answer (measured: 43 -> 63 of 100)."""
    from simpo_cli.evaluate.benchmarks import load_questions, read_back

    out, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    evaluate = out / "evaluate"
    assert f"evaluation: {evaluate}" in result.stdout
    table = json.loads((evaluate / "comparison.json").read_text())
    rows = {row["checkpoint"]: row for row in table["rows"]}
    assert list(rows) == ["tiny-sft", "tiny-preference"]
    trainer = json.loads((out / "preference" / "stage_complete.json").read_text())["eval"]
    ours = rows["tiny-preference"]
    assert ours["reward_accuracy"] == pytest.approx(trainer["eval_rewards/accuracies"], abs=1e-6)
    assert ours["reward_margin"] == pytest.approx(trainer["eval_rewards/margins"], rel=1e-4)
    assert ours["implicit_reward_accuracy"] is not None  # against the sft model (reference: sft)
    assert rows["tiny-sft"]["reward_accuracy"] <= ours["reward_accuracy"]
    questions = load_questions("alpaca_eval", str(RECIPES_DIR / "tiny/benchmarks/sort_eval.json"))
    for label in rows:
        read_back("alpaca_eval", evaluate / "alpaca_eval" / label, label, questions)

    sft = json.loads((evaluate / "alpaca_eval/tiny-sft/model_outputs.json").read_text())
    # a digit list of the right length: "1 2 4 4" for "Sort: 1 4 2 4"
    right_length = [
        len(a["output"].split()) == len(q.reference.split())
        and all(len(d) == 1 and d.isdigit() for d in a["output"].split())
        for a, q in zip(sft, questions, strict=True)
    ]
    assert sum(right_length) >= 0.8 * len(questions), [a["output"] for a in sft[:8]]
    assert rows["tiny-sft"]["alpaca_eval/cut_at_max_new_tokens"] <= 0.1
    gain = (
        rows["tiny-preference"]["alpaca_eval/exact_match"]
        - rows["tiny-sft"]["alpaca_eval/exact_match"]
    )
    assert gain >= 0.1, rows
    for label in rows:
        shown = f"exact match: {label:<15}  {rows[label]['alpaca_eval/exact_match']:.2f}"
        assert shown in result.stdout
    assert (evaluate / "comparison.png").stat().st_size > 10_000
    assert "| tiny-preference |" in (evaluate / "comparison.md").read_text()
    # The table in each model's card (README.md): the SFT model, full weights built from config.
    table = (evaluate / "comparison.md").read_text().split("\n\n")[0].strip()
    for stage in ("sft", "preference"):
        card = ModelCard.load(out / stage / "README.md")
        assert card.data.library_name == "transformers" and table in card.text
    card = ModelCard.load(out / "sft" / "README.md")
    assert card.data.base_model is None and card.data.tags[:3] == ["sft", "simpo-cli", "alignment"]
    assert "Base model: a new `llama` model built from config" in card.text
    assert (
        "Recipe `tiny`: **sft** -> preference -> evaluate. This model is stage 1 of 3" in card.text
    )


@pytest.mark.slow
def test_saved_model_loads_with_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = tiny_run
    assert result.returncode == 0
    model = AutoModelForCausalLM.from_pretrained(out / "preference")
    tokenizer = AutoTokenizer.from_pretrained(out / "preference")
    saved = load_file(out / "preference" / "model.safetensors")
    state = model.state_dict()
    # Every weight is in the file but the output head, which is the input embedding (tied).
    assert model.config.tie_word_embeddings
    assert saved.keys() == state.keys() - {"lm_head.weight"}
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["lm_head.weight"], saved["model.embed_tokens.weight"])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Sort: 3 1 2"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.slow
def test_rerun_skips_finished_stages(tiny_run, cli):
    out, first = tiny_run
    assert first.returncode == 0
    before = (out / "preference" / "model.safetensors").stat().st_mtime_ns
    result = cli("train", "tiny", "--output-dir", out)
    assert result.code == 0, result.stderr[-2000:]
    assert "[sft] already finished" in result.stdout
    assert "[preference] already finished" in result.stdout
    assert (out / "preference" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_changed_recipe_does_not_reuse_a_stage(tiny_run, cli):
    out, first = tiny_run
    assert first.returncode == 0
    result = cli("train", "tiny", "--output-dir", out, "--set", "preference.beta=3")
    assert result.code == 2
    assert "Traceback" not in result.stderr
    assert (
        "holds a run of the 'preference' stage made with a different recipe (preference.beta: "
        "2.0 -> 3.0)" in result.stderr
    )
    assert (out / "preference" / "stage_complete.json").is_file(), "nothing was deleted"


# --------------------------------------------------------------------------- simpo eval


@pytest.mark.slow
def test_eval_matches_plain_transformers(tiny_run, tmp_path):
    """Per-pair average log-probs from `simpo eval` equal a computation written here with plain
    transformers: render with the chat template, response = what follows the generation prompt,
    average the log-probs of the response tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, first = tiny_run
    assert first.returncode == 0
    rows = [json.loads(x) for x in (TINY_DATA / "pref_eval.jsonl").read_text().splitlines()[:12]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result_file = tmp_path / "scores.json"
    result = simpo("eval", str(out / "preference"), "--pairs", str(pairs), "--pairs-output",
                   str(result_file))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result_file.read_text())
    assert len(scores["pairs"]) == len(rows)

    model = AutoModelForCausalLM.from_pretrained(out / "preference").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "preference")
    for row, got in zip(rows, scores["pairs"], strict=True):
        for side in ("chosen", "rejected"):
            conversation = row[side]
            prompt = tokenizer.apply_chat_template(
                conversation[:-1], tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(conversation, tokenize=False)
            ids = tokenizer(full, add_special_tokens=False, return_tensors="pt").input_ids
            n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            token_logps = logp[torch.arange(len(targets)), targets][n_prompt - 1 :]
            assert got[f"{side}_tokens"] == len(token_logps)
            assert got[f"{side}_logps"] == pytest.approx(token_logps.mean().item(), abs=1e-5)

    chosen = torch.tensor([p["chosen_logps"] for p in scores["pairs"]])
    rejected = torch.tensor([p["rejected_logps"] for p in scores["pairs"]])
    summary = scores["summary"]
    margins = 2.0 * (chosen - rejected)
    assert summary["reward_accuracy"] == pytest.approx((margins > 0).float().mean().item())
    expected_loss = torch.nn.functional.softplus(-(margins - 1.0)).mean().item()
    assert summary["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert summary["beta"] == 2.0 and summary["gamma"] == 1.0


# --------------------------------------------------------------------------- user errors


def _pairs_recipe(tmp_path: Path, pairs_text: str) -> Path:
    (tmp_path / "pairs.jsonl").write_text(pairs_text)
    recipe = (RECIPES_DIR / "tiny" / "recipe.yaml").read_text()
    recipe = recipe.replace("tokenizer: tokenizer", f"tokenizer: {RECIPES_DIR / 'tiny/tokenizer'}")
    recipe = recipe.replace("data/pref_train.jsonl", "pairs.jsonl")
    recipe = recipe.replace("eval: data/pref_eval.jsonl", "eval: null")
    # A step of one pair without warmup: the file's one or two rows make a stage that trains.
    recipe = recipe.replace("total_batch_size: 16", "total_batch_size: 1")
    recipe = recipe.replace("per_device_train_batch_size: 8", "per_device_train_batch_size: 1")
    recipe = recipe.replace("warmup_ratio: 0.1", "warmup_ratio: 0")
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    return path


GOOD_PAIR = {"prompt": "Sort: 2 1", "chosen": "1 2", "rejected": "2 1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (json.dumps(GOOD_PAIR) + "\n{broken\n", "pairs.jsonl: line 2: invalid JSON"),
        (json.dumps({"prompt": "x", "chosen": "y"}) + "\n", "missing column(s) for preference"),
        (json.dumps({**GOOD_PAIR, "chosen": 3}) + "\n", "line 1: chosen: expected a string"),
    ],
)
def test_data_errors_end_the_cli_with_one_line(tmp_path, cli, text, expected):
    recipe = _pairs_recipe(tmp_path, text)
    out = tmp_path / "out"
    result = cli("preference", recipe, "-o", out, "--set", "pipeline=[preference]")
    assert result.code == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # stderr also holds the tokenizing progress bar; the error is one line, the last.
    errors = result.errors()
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    assert expected in errors[0] and str(tmp_path / "pairs.jsonl") in errors[0]
    assert not (out / "preference" / "model.safetensors").exists()


def test_missing_tracker_fails_before_any_work(tmp_path, cli, monkeypatch):
    """Whether or not tensorboard is installed here: the CLI runs with it hidden (None in
    sys.modules: importing it fails and find_spec gives None)."""
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as on a machine without tensorboard
    result = cli("train", "tiny", "-o", out, "--set", "logging.report_to=[tensorboard]")
    assert result.code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: logging.report_to: tensorboard is not installed; pip install "
        "'simpo-cli[tensorboard]' or remove tensorboard from logging.report_to"
    )
    assert not (out / "sft" / "data_report.txt").exists(), "failed only after reading data"


# --------------------------------------------------------------------------- the paired forward


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_simpo_compute_loss_matches_separate_passes(tmp_path, monkeypatch, sft_weight):
    """PreferenceTrainer.compute_loss (chosen and rejected stacked in one padded forward) equals
    the loss written out from two separate, unpadded passes per sequence, plus the SFT term
    sft_weight * mean(-avg_logp_chosen); the logged metrics carry the authors' names, and stay
    on the device (no .item()) until the log brings them over together."""
    from transformers import TrainingArguments

    from simpo_cli.data import PreferenceCollator, load_source, load_tokenizer, prepare
    from simpo_cli.losses import sequence_logps
    from simpo_cli.train.preference import PreferenceTrainer

    recipe = load_recipe("tiny", ["pipeline=[preference]", f"preference.sft_weight={sft_weight}"])
    stage = recipe.preference
    tokenizer = load_tokenizer(recipe.model)
    rows = load_source(stage.data.train.model_copy(update={"max_rows": 6}), "t")
    pairs, _ = prepare(rows, tokenizer, "preference", "t", 64, 40)
    model = load_model(recipe, None, 42)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=pairs, stage=stage)
    batch = PreferenceCollator(tokenizer.pad_token_id)([pairs[i] for i in range(len(pairs))])
    synced = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: synced.append(t) or real_item(t))
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    assert synced == [], "compute_loss moved a metric to the host"
    monkeypatch.undo()
    with torch.no_grad():

        def avg_logp(ids, labels):
            logits = model(torch.tensor([ids])).logits
            return sequence_logps(logits, torch.tensor([labels]))[0].item()

        chosen = torch.tensor([avg_logp(p["chosen_ids"], p["chosen_labels"]) for p in pairs])
        rejected = torch.tensor([avg_logp(p["rejected_ids"], p["rejected_labels"]) for p in pairs])
    z = 2.0 * (chosen - rejected) - 1.0  # beta 2, gamma = 2 * 0.5
    expected = torch.nn.functional.softplus(-z).mean() + sft_weight * (-chosen.mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    logged = {"loss": loss.item()}
    trainer.log(logged)
    assert logged["rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())
    assert logged["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert logged["rewards/margins"] == pytest.approx(
        2.0 * (chosen - rejected).mean().item(), rel=1e-4
    )
    assert ("sft_loss" in logged) == (sft_weight > 0)

    # Held-out: the loss, and with sft_weight the SimPO term and the SFT term apart (the SimPO
    # term is what `simpo eval` calls SimPO loss).
    from types import SimpleNamespace

    from simpo_cli.train.preference import preference_metrics

    with torch.no_grad():
        _, per_pair, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    held_out = preference_metrics(SimpleNamespace(predictions=per_pair.numpy()), sft_weight)
    assert held_out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert ("simpo_loss" in held_out) == ("sft_loss" in held_out) == (sft_weight > 0)
    if sft_weight:
        simpo_term = torch.nn.functional.softplus(-z).mean().item()
        assert held_out["simpo_loss"] == pytest.approx(simpo_term, rel=1e-5)
        assert held_out["sft_loss"] == pytest.approx(-chosen.mean().item(), rel=1e-5)


def test_held_out_summary_names_each_term_and_sets_ties_apart(capsys):
    """The preference stage's before/after lines: with sft_weight the SimPO term, the SFT term
    and their sum on lines of their own; reward accuracy over the pairs that are not tied (a
    DPO policy that still is its reference ties on every pair: "identical", not 0)."""
    from simpo_cli.train.preference import _print_before_after

    before = {"eval_rewards/accuracies": 0.0, "eval_rewards/ties": 1.0, "eval_loss": 2.2,
              "eval_simpo_loss": 1.2, "eval_sft_loss": 2.0}  # fmt: skip
    after = {"eval_rewards/accuracies": 0.6, "eval_rewards/ties": 0.25, "eval_loss": 1.5,
             "eval_simpo_loss": 0.7, "eval_sft_loss": 1.6}  # fmt: skip
    _print_before_after("preference", "SimPO", 0.5, before, after)
    assert capsys.readouterr().out.splitlines() == [
        "[preference] held-out pairs                before      after",
        "[preference]   reward accuracy (untied) identical     0.8000",
        "[preference]   reward ties                 1.0000     0.2500",
        "[preference]   SimPO loss                  1.2000     0.7000",
        "[preference]   SFT loss (chosen NLL)       2.0000     1.6000",
        "[preference]   total (+ 0.5 x SFT)         2.2000     1.5000",
    ]
    untied = {"eval_rewards/accuracies": 0.75, "eval_rewards/ties": 0.0, "eval_loss": 0.5}
    _print_before_after("preference", "SimPO", 0.0, untied, untied)
    assert capsys.readouterr().out.splitlines()[1:] == [
        "[preference]   reward accuracy (untied)    0.7500     0.7500",
        "[preference]   SimPO loss                  0.5000     0.5000",
    ]


# --------------------------------------------------------------------------- the picture


def test_curves_have_no_empty_panels_and_labelled_axes(tmp_path):
    """The figure had a row of three panels per stage, so an SFT stage left two empty, and no
    y-axis labels: each stage now has the panels of what it logged, every axis labelled."""
    pytest.importorskip("matplotlib")
    from simpo_cli.run.curves import curves_figure

    sft = [{"step": s, "loss": 5 - s / 10} for s in (1, 2)] + [{"step": 2, "eval_loss": 4.0}]
    keys = ("loss", "rewards/accuracies", "rewards/margins")
    preference = [{"step": s, **dict.fromkeys(keys, 0.5)} for s in (1, 2)]
    preference.append({"step": 2, **{f"eval_{key}": 0.6 for key in keys}})
    for name, rows in (("sft", sft), ("preference", preference)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = curves_figure([tmp_path / "sft", tmp_path / "preference"])
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [
        "sft: loss", "preference: loss", "preference: reward accuracy",
        "preference: reward margin",
    ]  # fmt: skip
    for ax in axes:
        assert ax.lines and ax.axison, ax.get_title()
        assert ax.get_xlabel() == "optimizer step"
        assert ax.get_ylabel() == ax.get_title().split(": ")[1]


@pytest.mark.slow
def test_run_leaves_a_plot_of_its_curves(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, result = tiny_run
    assert result.returncode == 0
    png = out / "training_curves.png"
    assert f"training curves: {png}" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    again = simpo("plot", str(out / "preference"), "-o", str(tmp_path / "plots"))
    assert again.returncode == 0 and (tmp_path / "plots" / "training_curves.png").is_file()
    missing = simpo("plot", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"error: {tmp_path}: no metrics.jsonl here or in its sft/, preference/ and "
        "round-*/preference/ folders"
    )
