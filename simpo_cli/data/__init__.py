"""Data: reading sources, the tokenizer, rendering and tokenizing rows, collating batches, and
showing one example (`simpo data inspect`), one module per concern:

- sources.py   a DataSource into a Dataset, row locations, JSON rows, fingerprints;
- tokenizer.py the stage's tokenizer;
- tokenize.py  rendering, the row formats, tokenizing, masking and truncating rows;
- collate.py   padding and packing tokenized examples into batches (loads torch);
- inspect.py   one row shown as training sees it.

Code outside the package imports these names from simpo_cli.data; the modules inside import each
other directly (inspect -> tokenize -> sources, tokenizer), never through this file.
"""

from simpo_cli.data.collate import (
    LENGTH_COLUMN,
    PreferenceCollator,
    SFTCollator,
    collate_sequences,
    with_lengths,
)
from simpo_cli.data.inspect import inspect_row, show_tokens
from simpo_cli.data.sources import (
    LOCAL_SUFFIXES,
    LOCATION_COLUMN,
    SOURCE_ROW,
    fingerprint,
    load_source,
    read_json_rows,
    row_location,
)
from simpo_cli.data.tokenize import (
    PREFERENCE_COLUMNS,
    SFT_COLUMNS,
    DataReport,
    Message,
    add_mismatched_pairs,
    as_messages,
    check_columns,
    preference_messages,
    prepare,
    render_segments,
    sft_messages,
    tokenize_conversation,
    tokenize_pair,
    tokenize_segments,
)
from simpo_cli.data.tokenizer import adds_bos, load_tokenizer

__all__ = [
    "LENGTH_COLUMN",
    "LOCAL_SUFFIXES",
    "LOCATION_COLUMN",
    "PREFERENCE_COLUMNS",
    "SFT_COLUMNS",
    "SOURCE_ROW",
    "DataReport",
    "Message",
    "PreferenceCollator",
    "SFTCollator",
    "add_mismatched_pairs",
    "adds_bos",
    "as_messages",
    "check_columns",
    "collate_sequences",
    "fingerprint",
    "inspect_row",
    "load_source",
    "load_tokenizer",
    "preference_messages",
    "prepare",
    "read_json_rows",
    "render_segments",
    "row_location",
    "sft_messages",
    "show_tokens",
    "tokenize_conversation",
    "tokenize_pair",
    "tokenize_segments",
    "with_lengths",
]
