"""Progress bars only for work that takes seconds.

A bar that opens and closes in a blink tells nothing and pushes what matters (the settings, the
data report, the step lines) up the screen: transformers' "Loading weights 20/20" on every model
load and "Writing model shards 1/1" on every save, datasets' map and filter bars over a 300-row
file. The rule: a bar for work of SECONDS or more, decided in one of two ways.

- Work whose size is known before it starts, datasets' passes over rows (`dataset_bars`): the
  rows and the rate that kind of work goes at. Tokenizing (1,000 rows a second) shows a bar from
  1,000 rows: the tiny recipe's 3,000 SFT rows and 1,500 pairs, and every real dataset, show
  theirs; its 300 held-out pairs do not.
- Work of unknown length, transformers loading and writing weights (`install`) and the Trainer's
  evaluation passes (train/console.py): its bar waits SECONDS before it shows (tqdm's `delay`),
  so a 2-layer model's load shows none and an 8B model's does.

Kept as they were: the Trainer's training bar (a run's progress from its first step), the
generate and annotate stages' own bars (onpolicy/; a terminal only), and the hub's download
bars. HF_DATASETS_DISABLE_PROGRESS_BARS, when set, still decides for datasets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SECONDS = 1.0
# Rows a second on one CPU core of a busy machine: the tiny recipe's chat rows through its
# tokenizer and chat template (3,000 SFT rows in 2.7 s; a real tokenizer and longer chats are no
# faster); on-policy pairs written by save_to_disk (about 6 kB a row: 23,000 a second); a
# parquet file read into a dataset (60,000 a second of short rows).
TOKENIZING = 1_000
WRITING = 20_000
READING = 50_000


@contextmanager
def dataset_bars(rows: int, rows_per_second: float) -> Iterator[None]:
    """datasets' progress bars inside the block only when `rows` rows at `rows_per_second` take
    SECONDS or more."""
    import datasets

    quiet = (
        rows < SECONDS * rows_per_second
        and datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None  # the user's say
        and datasets.is_progress_bar_enabled()
    )
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            datasets.enable_progress_bars()


def install() -> None:
    """From now on in this process, transformers' own bars (loading and writing weights) show
    only once their work has taken SECONDS."""
    from transformers.utils import logging

    logging.set_tqdm_hook(_after_seconds)


def _after_seconds(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """transformers' tqdm hook: its bar, created with tqdm's `delay` (the bar of work that ends
    sooner is never drawn)."""
    return factory(*args, **{"delay": SECONDS, **kwargs})
