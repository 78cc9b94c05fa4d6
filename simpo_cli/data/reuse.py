"""Tokenized data kept on disk and read back by the next stage that would tokenize the same rows
the same way: the points of a sweep (run/sweep.py) train on one data file with one tokenizer,
so the first point tokenizes it and the others read it (DIR/tokenized/<key>/).

The key is a sha256 of everything that decides the tokenized rows: the rows (the file's bytes,
or a hub dataset's fingerprint), which of them are read (split, subset, max_rows), the stage
kind, max_length, max_prompt_length and the tokenization convention, the tokenizer (its
vocabulary and merges, special tokens and chat template), and this package's tokenizing code
(a change to it makes new entries, never a stale read). An entry is written whole or not at all
(a folder renamed into place), so points running at once on SLURM may race to write it and a
reader never sees half of one. A source that fails to tokenize is not kept: its error comes
again, each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from simpo_cli import progress
from simpo_cli.data import rows, sources, tokenize
from simpo_cli.data import tokenizer as tokenizer_module
from simpo_cli.data.sources import fingerprint
from simpo_cli.data.tokenize import DataReport, prepare
from simpo_cli.data.tokenizer import adds_bos
from simpo_cli.recipe import DataSource

TOKENIZED_DIR = "tokenized"  # DIR/tokenized/<key>/
REPORT_FILE = "data_report.json"  # the DataReport's counts, beside the saved dataset


def prepare_reused(
    source: DataSource,
    raw,
    tokenizer,
    kind: str,
    name: str,
    max_length: int,
    max_prompt_length: int,
    tokenization: str,
    folder: Path,
    write: bool,
):
    """prepare(...)'s (dataset, DataReport) for `raw` (loaded from `source`), read from
    folder/<key> when an earlier stage kept it there, else tokenized here and (when `write`:
    the main process) kept there. The third value is the entry's path when it was read, else
    None."""
    import datasets

    key = tokenized_key(source, raw, tokenizer, kind, max_length, max_prompt_length, tokenization)
    entry = folder / key
    if (entry / REPORT_FILE).is_file():
        counts = json.loads((entry / REPORT_FILE).read_text())
        report = DataReport(
            name=name,
            rows_read=counts["rows_read"],
            dropped=Counter(counts["dropped"]),
            truncated=counts["truncated"],
            mean_tokens=counts["mean_tokens"],
        )
        return datasets.load_from_disk(str(entry)), report, entry
    dataset, report = prepare(
        raw, tokenizer, kind, name, max_length, max_prompt_length, tokenization
    )
    if write:
        _keep(dataset, report, entry)
    return dataset, report, None


def _keep(dataset, report: DataReport, entry: Path) -> None:
    counts = {
        "rows_read": report.rows_read,
        "dropped": dict(report.dropped),
        "truncated": report.truncated,
        "mean_tokens": report.mean_tokens,
    }

    def write(folder: Path) -> None:
        with progress.dataset_bars(len(dataset), progress.WRITING):
            dataset.save_to_disk(str(folder))
        (folder / REPORT_FILE).write_text(json.dumps(counts, indent=1) + "\n")

    keep_whole(entry, write)


PARTIAL = ".partial-"  # <entry>.partial-<pid>@<host>-<random>: an entry being written


def keep_whole(entry: Path, write: Callable[[Path], None]) -> bool:
    """Write the folder `entry` whole or not at all: `write` fills a folder of this process's
    own beside it, which is then renamed into place, so a reader sees all of an entry or none
    of it. False when another process's entry got there first (that one stays: the same
    content). Folders that writers on this machine left when they were killed mid-write go
    first (their process is gone); those of other machines and of running processes stay."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(entry.parent)
    owner = f"{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    written = entry.with_name(f"{entry.name}{PARTIAL}{owner}")
    try:
        write(written)
    except BaseException:
        shutil.rmtree(written, ignore_errors=True)
        raise
    try:
        os.replace(written, entry)
    except OSError:  # the entry exists (a folder is not replaced by a rename): keep that one
        shutil.rmtree(written, ignore_errors=True)
        return False
    return True


def _remove_abandoned(folder: Path) -> None:
    host = socket.gethostname()
    for path in folder.glob(f"*{PARTIAL}*"):
        pid, _, rest = path.name.rsplit(PARTIAL, 1)[1].partition("@")
        if rest.rsplit("-", 1)[0] == host and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def tokenized_key(
    source: DataSource,
    raw,
    tokenizer,
    kind: str,
    max_length: int,
    max_prompt_length: int,
    tokenization: str,
) -> str:
    """The entry's name: a sha256 of what decides the tokenized rows (see the module's text)."""
    what = {
        "rows": fingerprint(source, raw),
        "read": {"split": source.split, "subset": source.subset, "max_rows": source.max_rows},
        "kind": kind,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "tokenization": tokenization,
        "tokenizer": tokenizer_identity(tokenizer),
        "code": _code_identity(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def tokenizer_identity(tokenizer) -> str:
    """A sha256 of what a tokenizer turns text into: its vocabulary and merges (a fast
    tokenizer's whole definition; a slow one's vocabulary), special tokens, whether it writes a
    BOS, and the chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {
        "special": tokenizer.special_tokens_map,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "adds_bos": adds_bos(tokenizer),
        "chat_template": tokenizer.chat_template,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _code_identity() -> str:
    """A sha256 of the modules that read and tokenize rows."""
    digest = hashlib.sha256()
    for module in (rows, sources, tokenize, tokenizer_module):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()
