"""Which progress bars show (simpo_cli/progress.py): those of work that takes a second or more.
A dataset's tokenizing shows its bar from 1,000 rows (at about 1,000 rows a second); transformers'
own bars (loading and writing weights) show once their work has run for a second."""

import time

import datasets
import pytest

from simpo_cli import progress
from simpo_cli.data import load_source, prepare
from simpo_cli.recipe import RECIPES_DIR, DataSource

SFT_TRAIN = RECIPES_DIR / "tiny" / "data" / "sft_train.jsonl"


@pytest.mark.parametrize("rows, bar", [(999, False), (1000, True)])
def test_tokenizing_shows_its_bar_from_a_thousand_rows(tok, capsys, rows, bar):
    raw = load_source(DataSource(path=str(SFT_TRAIN), max_rows=rows), "sft.data.train")
    capsys.readouterr()
    prepared, _ = prepare(raw, tok, "sft", "sft.data.train", max_length=64)
    err = capsys.readouterr().err
    assert len(prepared) == rows  # every row kept (select, no second pass)
    assert ("Tokenizing sft.data.train" in err) is bar, err[-500:]
    if bar:
        assert f"{rows}/{rows}" in err
    assert "Dropping" not in err


def test_dataset_bars_turn_on_at_a_second_of_work():
    for rows, shown in [(19_999, False), (20_000, True)]:
        with progress.dataset_bars(rows, progress.WRITING):
            assert datasets.is_progress_bar_enabled() is shown, rows
        assert datasets.is_progress_bar_enabled()  # as it was after the block


@pytest.fixture
def transformers_hook():
    """transformers' tqdm hook as progress.install sets it, taken off after the test."""
    from transformers.utils import logging

    previous = logging.set_tqdm_hook(None)
    progress.install()
    yield logging.tqdm
    logging.set_tqdm_hook(previous)


def test_transformers_bars_show_once_their_work_has_taken_a_second(
    transformers_hook, capsys, monkeypatch
):
    for _ in transformers_hook(range(20), desc="Loading weights"):
        pass  # a 2-layer model's 20 tensors
    assert "Loading weights" not in capsys.readouterr().err
    monkeypatch.setattr(progress, "SECONDS", 0.05)  # slow work: each tensor takes longer
    for _ in transformers_hook(range(3), desc="Loading weights"):
        time.sleep(0.05)
    assert "Loading weights: 100%" in capsys.readouterr().err
