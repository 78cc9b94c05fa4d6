"""Reading data sources: a DataSource (a .json/.jsonl/.parquet file, a save_to_disk folder, or a
hub dataset) into a datasets.Dataset; each raw row's place in its source (LOCATION_COLUMN,
row_location, SOURCE_ROW); the JSON reader and its one-type-per-column check
(check_column_kinds); the evaluation data shares (read_json_rows); and a
source's fingerprint for the reproducibility record. No tokenizer, no chat template, no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from simpo_cli import progress
from simpo_cli.errors import DataError
from simpo_cli.recipe import DataSource

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_source(source: DataSource, role: str):
    """Read a DataSource into a datasets.Dataset; `role` (sft.data.train...) names it in errors."""
    import datasets
    import pyarrow.parquet

    path = Path(source.path)
    if path.is_file():
        kind = LOCAL_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"{_at(role, path)}: unsupported file type '{path.suffix}'; "
                "use .json, .jsonl or .parquet, or a save_to_disk folder"
            )
        if kind == "json":
            dataset = _json_dataset(path, role)
        else:
            try:
                rows = pyarrow.parquet.read_metadata(path).num_rows
                with progress.dataset_bars(rows, progress.READING):
                    dataset = datasets.Dataset.from_parquet(str(path))
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise DataError(f"{_at(role, path)}: cannot read parquet: {err}") from None
    elif path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        try:
            # In memory: a dataset mapped or filtered while backed by the folder's files writes
            # its cache-*.arrow files into that folder, which is another stage's output (or the
            # user's); the folder keeps exactly what was saved there.
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as err:
            raise DataError(
                f"{_at(role, path)}: not a dataset saved with save_to_disk ({err}); "
                "point path at a .json/.jsonl/.parquet file or a saved dataset folder"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(
                    f"{_at(role, path)}: no split '{source.split}'; "
                    f"set split to one of {', '.join(loaded)}"
                )
            loaded = loaded[source.split]
        dataset = loaded
    else:
        # A hub name, or a local copy of a hub dataset repository (data files in a folder):
        # the same load_dataset call either way.
        try:
            dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"{role}: cannot load '{source.path}' (split {source.split}): {first}; "
                "check the hub name and split, or give a local file or folder path"
            ) from None
    if source.max_rows is not None and source.max_rows < len(dataset):
        dataset = dataset.select(range(source.max_rows))
    return dataset


# Raw datasets read from a JSON file carry each row's place in the file ("line 12", "item 3") in
# this column, so that every data error names the line a user can open; other sources have none
# and their rows are named "row N", counted from 1.
LOCATION_COLUMN = "__location__"
# The same, kept in a tokenized dataset (collators leave it out of the model's inputs).
SOURCE_ROW = "source_row"


def _at(role: str, path: Path) -> str:
    """`role: path`, or the role alone when it names the path already (the stages' roles do)."""
    return role if str(path) in role else f"{role}: {path}"


def _json_dataset(path: Path, role: str):
    """A JSON/JSONL file as a Dataset with the union of the rows' keys (a key a row lacks is null
    there), so a column that appears in later rows only is kept; plus LOCATION_COLUMN."""
    import datasets

    numbered, unit = read_json_rows(path)
    columns: dict[str, None] = {}  # ordered set: first appearance
    for _, row in numbered:
        columns.update(dict.fromkeys(row))
    check_column_kinds(numbered, unit, role, path)
    table = {key: [row.get(key) for _, row in numbered] for key in columns}
    table[LOCATION_COLUMN] = [f"{unit} {number}" for number, _ in numbered]
    try:
        return datasets.Dataset.from_dict(table)
    except (TypeError, ValueError) as err:  # pyarrow's ArrowTypeError / ArrowInvalid
        raise DataError(
            f"{_at(role, path)}: rows hold values of different shapes that cannot form one column "
            f"({err}); make each column one type"
        ) from None


def check_column_kinds(
    numbered: list[tuple[int, dict[str, Any]]], unit: str, role: str, path: Path
) -> None:
    """Each column one JSON type in every row that has it (a dataset column holds one type):
    else DataError naming the first row that differs and the row it differs from."""
    kinds: dict[str, tuple[str, int]] = {}
    for number, row in numbered:
        for key, value in row.items():
            if value is None:
                continue
            kind = _json_kind(value)
            first = kinds.setdefault(key, (kind, number))
            if first[0] != kind:
                raise DataError(
                    f"{_at(role, path)}: {unit} {number}: '{key}' is {kind} but {unit} {first[1]} "
                    f"has {first[0]}; make each column one type (e.g. chosen always a list of "
                    "messages)"
                )


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def row_location(row: dict[str, Any], index: int) -> str:
    """Where a raw row is in its source, counted from 1: "line 12" of a JSONL file, "item 3" of
    a JSON list, else "row N" by position."""
    return row.get(LOCATION_COLUMN) or f"row {index + 1}"


def read_json_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """(number, row) of each row of a JSON Lines file (number: the line) or of a .json file
    holding a list of objects (number: the item, from 1), and that unit ("line" or "item")."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
        numbered = list(enumerate(rows, start=1))
        unit = "item"
    else:
        numbered = []
        # split("\n"), not splitlines(): JSON strings may hold U+2028 or U+0085 unescaped.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {number}: invalid JSON ({err.msg} at column {err.colno}); "
                    "each line must be one JSON object"
                ) from None
        unit = "line"
    for number, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {unit} {number}: expected a JSON object, got {row!r:.60}")
    if not numbered:
        raise DataError(f"{path}: no rows; the file is empty")
    return numbered, unit


def fingerprint(source: DataSource, dataset) -> str:
    """A content fingerprint for the reproducibility record."""
    path = Path(source.path)
    if path.is_file():
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return f"datasets:{dataset._fingerprint}"
