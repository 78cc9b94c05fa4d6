"""From scored samples to preference pairs: which sample is chosen and rejected, what is dropped
and counted, the written dataset, and its round trip into preference training data. Expected
values are worked out by hand in each test."""

import json
import math

import datasets
import pytest

from simpo_cli.data import load_source, prepare
from simpo_cli.errors import DataError, UserError
from simpo_cli.onpolicy.binarize import binarize, check_records, split_rows, write_dataset
from simpo_cli.recipe import DataSource


def _record(prompt_id, texts, finish=None, tokens=None, prompt=None):
    finish = finish or ["stop"] * len(texts)
    tokens = tokens or [len(t.split()) for t in texts]
    return {
        "prompt_id": prompt_id,
        "prompt": prompt or [{"role": "user", "content": f"Sort: {prompt_id}"}],
        "samples": [
            {"text": t, "finish_reason": f, "tokens": n, "seed": seed}
            for t, f, n, seed in zip(texts, finish, tokens, (13, 21, 42, 79, 100), strict=False)
        ],
    }


def test_chosen_is_the_best_and_rejected_the_worst_sample():
    """Scores 0.5, 2.0, -1.0, 2.0: the highest is 2.0 (samples 1 and 3: the first, 1, wins);
    the lowest is -1.0 (sample 2)."""
    record = _record("3 1 2", ["1 3 2", "1 2 3", "3 1 2", "1 2 3 3"])
    rows, report = binarize([record], [[0.5, 2.0, -1.0, 2.0]])
    (row,) = rows
    user = {"role": "user", "content": "Sort: 3 1 2"}
    assert row == {
        "prompt_id": "3 1 2",
        "prompt": "Sort: 3 1 2",
        "chosen": [user, {"role": "assistant", "content": "1 2 3"}],
        "rejected": [user, {"role": "assistant", "content": "3 1 2"}],
        "all_generated_responses": ["1 3 2", "1 2 3", "3 1 2", "1 2 3 3"],
        "all_rm_scores": [0.5, 2.0, -1.0, 2.0],
        "score_chosen": 2.0,
        "score_rejected": -1.0,
        "chosen_index": 1,
        "rejected_index": 2,
        "finish_reasons": ["stop"] * 4,
        "response_tokens": [3, 3, 3, 4],
        "seeds": [13, 21, 42, 79],
    }
    assert report.pairs == 1 and sum(report.dropped.values()) == 0


def test_a_multi_turn_prompt_is_kept_whole_and_prompt_is_the_last_user_turn():
    prompt = [
        {"role": "system", "content": "Answer with digits."},
        {"role": "user", "content": "Sort: 2 1"},
        {"role": "assistant", "content": "1 2"},
        {"role": "user", "content": "Now reversed."},
    ]
    rows, _ = binarize([_record("r", ["2 1", "1 2"], prompt=prompt)], [[1.0, 0.0]])
    assert rows[0]["prompt"] == "Now reversed."
    assert rows[0]["chosen"] == prompt + [{"role": "assistant", "content": "2 1"}]
    assert rows[0]["rejected"] == prompt + [{"role": "assistant", "content": "1 2"}]


def test_drops_are_counted_by_reason():
    """Seven prompts, min_margin 0.5, truncated samples excluded:
    a: all three texts identical (scores differ)                      -> identical
    b: two of three cut at max_new_tokens, one left                   -> truncated
    c: scores 1, 1, 1 on different texts                              -> tie
    d: best "x" (3.0) and worst "x" (1.0) have the same text          -> same_text
    e: margin 2.4 - 2.0 = 0.4 < 0.5                                   -> under_margin
    f: margin 0.5 exactly (>= min_margin)                             -> kept
    g: the best (9.0) is cut, so chosen is 5.0; worst 1.0             -> kept (samples 1 and 2)
    """
    records = [
        _record("a", ["same", "same", "same"]),
        _record("b", ["one", "two two", "three"], finish=["stop", "length", "length"]),
        _record("c", ["p", "q", "r"]),
        _record("d", ["x", "y", "x"]),
        _record("e", ["m", "n"]),
        _record("f", ["u u", "v"]),
        _record("g", ["cut off", "kept", "worse one"], finish=["length", "stop", "stop"]),
    ]
    scores = [[1, 2, 3], [1, 2, 3], [1, 1, 1], [3.0, 2.0, 1.0], [2.4, 2.0], [1.5, 1.0], [9, 5, 1]]
    rows, report = binarize(records, scores, min_margin=0.5)
    assert [r["prompt_id"] for r in rows] == ["f", "g"]
    assert (rows[1]["chosen_index"], rows[1]["rejected_index"]) == (1, 2)
    assert dict(report.dropped) == {
        "identical": 1,
        "truncated": 1,
        "tie": 1,
        "same_text": 1,
        "under_margin": 1,
    }
    assert (report.prompts, report.samples, report.truncated_samples, report.pairs) == (7, 19, 3, 2)


def test_empty_replies_are_never_paired():
    """An empty or whitespace-only reply is left out before selection, whatever its score:
    h: the lowest score is the empty reply: rejected is the next lowest, "b" (2.0)
    i: the highest score is "  " (whitespace): chosen is "c" (1.0), rejected "d"
    j: one reply besides two empty ones                               -> empty
    All three empty in k are identical, the first reason that applies -> identical"""
    records = [
        _record("h", ["a", "b", ""]),
        _record("i", ["  ", "c", "d"]),
        _record("j", ["e", "", "\n"]),
        _record("k", ["", "", ""]),
    ]
    rows, report = binarize(records, [[3.0, 2.0, 1.0], [9.0, 1.0, 0.5], [1, 2, 3], [1, 2, 3]])
    assert [(r["prompt_id"], r["chosen_index"], r["rejected_index"]) for r in rows] == [
        ("h", 0, 1),
        ("i", 1, 2),
    ]
    assert all(r[side][-1]["content"].strip() for r in rows for side in ("chosen", "rejected"))
    assert dict(report.dropped) == {"empty": 1, "identical": 1}
    assert report.empty_samples == 4  # h's, i's and j's two (k stopped at identical)
    assert "samples with an empty reply (never paired): 4" in "\n".join(report.lines())
    assert report.to_dict()["dropped"]["empty"] == 1


def test_truncated_samples_can_be_kept():
    """With drop_truncated off, b keeps its cut samples (best: sample 2, 3.0) and g's cut 9.0
    is chosen."""
    records = [
        _record("b", ["one", "two two", "three"], finish=["stop", "length", "length"]),
        _record("g", ["cut off", "kept", "worse one"], finish=["length", "stop", "stop"]),
    ]
    rows, report = binarize(records, [[1, 2, 3], [9, 5, 1]], drop_truncated=False)
    assert [(r["chosen_index"], r["rejected_index"]) for r in rows] == [(2, 0), (0, 2)]
    assert rows[1]["finish_reasons"] == ["length", "stop", "stop"]
    assert report.truncated_samples == 3 and sum(report.dropped.values()) == 0


def test_best_vs_random_is_seeded_by_prompt_and_never_the_chosen_text():
    """Twenty prompts of five samples (sample 0 best, sample 1 a copy of its text): rejected is
    one of samples 2-4, the same draw whatever the record order, and the draws vary."""
    records = [_record(f"p{k}", ["best", "best", "b", "c", "d"]) for k in range(20)]
    scores = [[5.0, 4.0, 3.0, 2.0, 1.0]] * 20
    rows, _ = binarize(records, scores, selection="best_vs_random", seed=7)
    picks = {r["prompt_id"]: r["rejected_index"] for r in rows}
    assert len(rows) == 20 and all(r["chosen_index"] == 0 for r in rows)
    assert set(picks.values()) == {2, 3, 4}  # uniform over 3, 20 draws: each shows up
    reversed_rows, _ = binarize(records[::-1], scores, selection="best_vs_random", seed=7)
    assert {r["prompt_id"]: r["rejected_index"] for r in reversed_rows} == picks
    other_seed, _ = binarize(records, scores, selection="best_vs_random", seed=8)
    assert {r["prompt_id"]: r["rejected_index"] for r in other_seed} != picks


def test_best_vs_random_counts_a_tie_with_the_drawn_sample():
    """Samples 0 and 1 both score 2.0 on different texts; sample 1 is the only other choice."""
    rows, report = binarize(
        [_record("t", ["a", "b", "a"])], [[2.0, 2.0, 0.0]], selection="best_vs_random"
    )
    assert rows == [] and report.dropped["tie"] == 1


def test_the_report_has_score_statistics_and_the_length_bias():
    """Scores 1, 3 | 0, 4 | 2, 2 (a tie) | 3, 1: mean 16 / 8 = 2, population std
    sqrt((1 + 1 + 4 + 4 + 0 + 0 + 1 + 1) / 8) = sqrt(1.5), min 0, max 4.
    Kept pairs: p (chosen has 1 token, rejected 2: shorter), q (3 vs 1: longer), s (1 vs 1: not
    longer): chosen longer in 1 of 3; mean margin (2 + 4 + 2) / 3 = 8/3."""
    records = [
        _record("p", ["a b", "c"]),
        _record("q", ["d", "e f g"]),
        _record("r", ["h", "i"]),
        _record("s", ["j", "k"]),
    ]
    _, report = binarize(records, [[1, 3], [0, 4], [2, 2], [3, 1]])
    assert report.score_mean == 2.0
    assert report.score_std == pytest.approx(math.sqrt(1.5))
    assert (report.score_min, report.score_max) == (0, 4)
    assert report.margin_mean == pytest.approx(8 / 3)
    assert report.chosen_longer == pytest.approx(1 / 3)
    text = "\n".join(report.lines())
    assert "4 prompts, 8 samples -> 3 pairs" in text
    assert "dropped (tie): 1" in text and "chosen longer than rejected: 33.3% of pairs" in text
    assert report.to_dict()["dropped"] == {
        "identical": 0,
        "empty": 0,
        "truncated": 0,
        "tie": 1,
        "same_text": 0,
        "under_margin": 0,
    }


@pytest.mark.parametrize(
    "records, scores, message",
    [
        ([_record("a", ["x", "y"])], [], "1 sample records but 0 score lists"),
        ([_record("a", ["x", "y"])], [[1.0]], r"prompt a\): 2 samples but 1 scores"),
        ([_record("a", ["x", "y"])], [[1.0, math.nan]], "a score is not a finite number"),
        ([_record("a", ["x"]), _record("a", ["y"])], [[1], [2]], "record 2 .*repeats"),
        ([{**_record("a", ["x"]), "samples": []}], [[]], r"record 1 \(prompt a\): no samples"),
        ([{**_record("a", ["x"]), "samples": ["x"]}], [[1]], "each sample needs text"),
    ],
)
def test_records_that_do_not_fit_are_one_line_errors(records, scores, message):
    with pytest.raises(DataError, match=message) as err:
        check_records(records, scores)
    assert len(err.value.messages) == 1


# --------------------------------------------------------------------------- writing


def _rows(n: int) -> list[dict]:
    records = [_record(f"{k} {k + 1}", [f"{k} {k + 1}", f"{k + 1} {k}"]) for k in range(n)]
    rows, _ = binarize(records, [[1.0, 0.0]] * n)
    return rows


def test_the_dataset_folder_holds_the_splits_and_jsonl(tmp_path):
    rows = _rows(10)
    _, report = binarize([_record("a", ["x", "y"])], [[1.0, 0.0]])
    counts = write_dataset(rows, tmp_path / "pairs", eval_fraction=0.2, seed=0, report=report)
    folder = tmp_path / "pairs"
    assert counts == {"train": 8, "test": 2}
    assert sorted(p.name for p in folder.iterdir()) == [
        "dataset_dict.json",
        "report.json",
        "test",
        "test.jsonl",
        "train",
        "train.jsonl",
    ]
    saved = datasets.load_from_disk(str(folder))
    assert sorted(saved) == ["test", "train"]
    assert saved["train"].column_names == list(rows[0])
    lines = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert lines == saved["test"].to_list()
    ids = {r["prompt_id"] for r in saved["train"]} | {r["prompt_id"] for r in lines}
    assert ids == {r["prompt_id"] for r in rows}
    assert json.loads((folder / "report.json").read_text())["pairs"] == 1
    assert not (tmp_path / "pairs.partial").exists()


def test_the_held_out_split_depends_on_the_prompts_not_their_order():
    rows = _rows(10)
    train, test = split_rows(rows, 0.3, seed=1)
    assert len(test) == 3 and len(train) == 7
    train_rev, test_rev = split_rows(rows[::-1], 0.3, seed=1)
    assert {r["prompt_id"] for r in test_rev} == {r["prompt_id"] for r in test}
    assert split_rows(rows[:2], 0.01)[1] != []  # a fraction above 0 holds out at least one


def test_a_given_test_split_is_written_as_test(tmp_path):
    rows = _rows(4)
    assert write_dataset(rows[:3], tmp_path / "out", test_rows=rows[3:]) == {"train": 3, "test": 1}
    assert datasets.load_from_disk(str(tmp_path / "out"))["test"]["prompt_id"] == ["3 4"]


def test_an_existing_folder_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty; choose a new output folder"):
        write_dataset(_rows(2), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert write_dataset(_rows(2), tmp_path / "empty") == {"train": 2}


def test_a_run_without_seeds_or_finish_reasons_is_written(tmp_path):
    """Greedy decoding has no seeds; the seeds column keeps its integer type, with nulls."""
    record = _record("a", ["x", "y"])
    for sample in record["samples"]:
        sample["seed"] = None
        del sample["finish_reason"]
    rows, _ = binarize([record], [[1.0, 0.0]])
    write_dataset(rows, tmp_path / "out")
    saved = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert saved[0]["seeds"] == [None, None] and saved[0]["finish_reasons"] == ["", ""]
    assert saved.features["seeds"].feature.dtype == "int64"


def test_no_pairs_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no preference pairs to write"):
        write_dataset([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["folder", "jsonl"])
def test_written_pairs_load_as_preference_training_data(tmp_path, tok, source):
    """The written pairs read back through the preference stage's own path (load_source +
    prepare) with the tiny tokenizer: every pair kept, and the trained tokens of chosen are the
    chosen reply and its end-of-turn."""
    rows = _rows(3)
    write_dataset(rows, tmp_path / "pairs")
    path = tmp_path / "pairs" if source == "folder" else tmp_path / "pairs" / "train.jsonl"
    loaded = load_source(DataSource(path=str(path), split="train"), "preference.data.train")
    kept, report = prepare(loaded, tok, "preference", "preference.data.train", 64, 40)
    assert report.rows_kept == 3 and not report.dropped
    labels = [t for t in kept[0]["chosen_labels"] if t != -100]
    assert tok.decode(labels) == "0 1<|eot_id|>"
    assert tok.decode(kept[0]["chosen_ids"]).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nSort: 0 1<|eot_id|>"
    )


def test_generation_records_are_what_binarize_reads(tok):
    """The contract between the two halves of on-policy data: a record as generation.py writes
    it passes check_records unchanged."""
    from dataclasses import asdict

    from simpo_cli.onpolicy.binarize import check_records
    from simpo_cli.onpolicy.sampling import Sample

    samples = [asdict(Sample(seed=s, text=t, finish_reason="stop", tokens=3)) for s, t in
               ((13, "1 2"), (21, "2 1"))]  # fmt: skip
    record = {"prompt_id": "p1", "prompt": [{"role": "user", "content": "Sort: 2 1"}]}
    check_records([{**record, "samples": samples}], [[1.0, 0.0]])


def test_the_preference_stage_leaves_the_dataset_folder_as_annotate_wrote_it(tmp_path):
    """A preference stage trained and evaluated on a written dataset folder (both splits, as
    when it follows annotate): the folder holds the same files after (no cache-*.arrow of the
    stage's tokenizing in it)."""
    from simpo_cli.recipe import load_recipe
    from simpo_cli.run.pipeline import run_stage

    folder = tmp_path / "dataset"
    write_dataset(_rows(8), folder, eval_fraction=0.25)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    recipe = load_recipe(
        "tiny",
        [
            "pipeline=[preference]",
            f"preference.data.train.path={folder}",
            "preference.data.train.split=train",
            f"preference.data.eval.path={folder}",
            "preference.data.eval.split=test",
            "preference.training.max_steps=1",
            "preference.training.warmup_ratio=0",
            "preference.training.total_batch_size=2",
            "preference.training.per_device_train_batch_size=2",
        ],
    )
    stage_dir = run_stage(recipe, "preference", tmp_path / "run")
    assert (stage_dir / "stage_complete.json").is_file()
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == files
