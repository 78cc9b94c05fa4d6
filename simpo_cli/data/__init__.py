"""Data: reading sources, the row formats, the tokenizer, rendering and tokenizing rows,
collating batches, and showing one example (`simpo data inspect`), one module per concern:

- sources.py   a DataSource into a Dataset, row locations, JSON rows, fingerprints;
- rows.py      a row's messages, the columns a stage needs, a file's rows checked (no torch);
- tokenizer.py the stage's tokenizer;
- tokenize.py  rendering, tokenizing, masking and truncating rows;
- collate.py   padding and packing tokenized examples into batches (loads torch);
- inspect.py   one row shown as training sees it;
- reuse.py     tokenized data kept on disk and read back (the points of a sweep).

Code outside the package imports these names from simpo_cli.data; the modules inside import each
other directly (inspect -> tokenize -> rows -> sources, tokenizer), never through this file.
Each name is loaded from its module when first used, so that importing rows or sources (as
`simpo validate` does) does not load torch with collate and tokenize.
"""

import importlib
from typing import Any

_NAMES = {
    "collate": (
        "LENGTH_COLUMN",
        "PreferenceCollator",
        "SFTCollator",
        "collate_sequences",
        "with_lengths",
    ),
    "inspect": ("inspect_row", "show_tokens"),
    "reuse": ("TOKENIZED_DIR", "prepare_reused"),
    "rows": (
        "PREFERENCE_COLUMNS",
        "SFT_COLUMNS",
        "Message",
        "as_messages",
        "check_columns",
        "check_rows",
        "preference_messages",
        "sft_messages",
    ),
    "sources": (
        "LOCAL_SUFFIXES",
        "LOCATION_COLUMN",
        "SOURCE_ROW",
        "fingerprint",
        "load_source",
        "read_json_rows",
        "row_location",
    ),
    "tokenize": (
        "DataReport",
        "add_mismatched_pairs",
        "prepare",
        "render_segments",
        "tokenize_conversation",
        "tokenize_pair",
        "tokenize_segments",
    ),
    "tokenizer": ("adds_bos", "load_tokenizer"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value
