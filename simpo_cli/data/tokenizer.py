"""The tokenizer of a stage (load_tokenizer: the chat template override, a pad token, right
padding) and whether it writes a BOS by itself (adds_bos). Reads no data.
"""

from __future__ import annotations

from pathlib import Path

from simpo_cli.errors import DataError
from simpo_cli.recipe import ModelSettings


def load_tokenizer(model: ModelSettings, name_or_path: str | None = None):
    """The tokenizer for a stage: from `name_or_path` (a previous stage's output) when given, else
    model.tokenizer or model.name_or_path; model.chat_template overrides the template."""
    from transformers import AutoTokenizer

    source = name_or_path or model.tokenizer or model.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"model.tokenizer: cannot load a tokenizer from '{source}': {first}; "
            "give a local tokenizer folder or a reachable hub name"
        ) from None
    if model.chat_template:
        template = model.chat_template
        if template.endswith(".jinja"):
            try:
                template = Path(template).read_text()
            except OSError as err:
                raise DataError(f"model.chat_template: cannot read {template}: {err}") from None
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise DataError(
            f"model.chat_template: the tokenizer at '{source}' has no chat template; "
            "set model.chat_template to a .jinja file or the template text"
        )
    if tokenizer.pad_token_id is None:
        # Padding is always masked out of the loss and attention; any id serves.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
