"""Secrets kept out of everything simpo writes or prints: resolved_recipe.yaml, the JSON records
of a stage folder, metrics.jsonl, the settings table and the launch command line, and the run
name handed to TrainingArguments (saved in training_args.bin and sent to the trackers).
Files that transformers writes from model.config (config.json) cannot be redacted after the
fact: `secret_keys` finds what the recipe validation refuses there.

Two rules, both replacing the secret with "***":
- by key: a string under a key named like a secret (`hf_token`, `password`, `api_key`,
  `wandbApiKey`, ...). Only strings: `pad_token_id: 0` is a number and stays.
- by value: any occurrence of the value of an environment variable named like a secret
  (WANDB_API_KEY, HF_TOKEN, HUGGING_FACE_HUB_TOKEN, *_TOKEN, *_PASSWORD, *_SECRET, *_KEY).
  Values shorter than 8 characters, and paths (a *_KEY naming a key file), are left alone:
  replacing "1" or "/root" everywhere would mangle the records, not protect anything.

This module must not import torch: `simpo config show` prints a redacted recipe.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

REDACTED = "***"
MIN_SECRET_LENGTH = 8
_SECRET_WORDS = {"token", "password", "passwd", "passphrase", "secret", "apikey", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}
_SECRET_ENDINGS = ("PASSWORD", "PASSWD", "SECRET", "TOKEN")  # PGPASSWORD, GITHUBTOKEN


def _words(name: str) -> list[str]:
    """`wandbApiKey` and `WANDB_API_KEY` -> ['wandb', 'api', 'key']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    """A key or variable named like a secret. `tokenizer`, `tokenization`, `pad_token_id` and
    TOKENIZERS_PARALLELISM are not; `hf_token`, `api_key` and WANDB_API_KEY are."""
    words = _words(name)
    if not words or words[-1] in ("id", "ids"):  # pad_token_id: a token of the vocabulary
        return False
    if any(word in _SECRET_WORDS for word in words) or words[-1] == "key":
        return True
    if any(pair in _SECRET_PAIRS for pair in pairwise(words)):
        return True
    return name.upper().endswith(_SECRET_ENDINGS)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables, longest first (so that a secret
    that contains another is replaced whole)."""
    env = os.environ if environ is None else environ
    values = {
        value
        for name, value in env.items()
        if is_secret_name(name)
        and len(value) >= MIN_SECRET_LENGTH
        and not value.startswith(("/", "~", "./"))
    }
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, values: list[str] | None = None) -> str:
    """`text` with every secret value of the environment replaced."""
    for value in secret_values() if values is None else values:
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a JSON/YAML-like structure (dicts, lists, scalars) with secrets replaced: every
    string under a secret-named key, and every secret value of the environment."""
    values = secret_values(environ)

    def walk(value: Any, secret: bool) -> Any:
        if isinstance(value, Mapping):
            return {k: walk(v, secret or is_secret_name(str(k))) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, secret) for v in value]
        if isinstance(value, str):
            return REDACTED if secret and value else redact_text(value, values)
        return value

    return walk(obj, False)


def secret_keys(obj: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The strings of `obj` that `redact` replaces, by key path (`auth.password`, `urls[0]`),
    each with why: "is named like a secret" or "holds the value of a secret environment
    variable"."""
    values = secret_values(environ)
    found: dict[str, str] = {}

    def walk(value: Any, path: str, secret: bool) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                walk(item, where, secret or is_secret_name(str(key)))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]", secret)
        elif isinstance(value, str) and value:
            if secret:
                found[path] = "is named like a secret"
            elif any(v in value for v in values):
                found[path] = "holds the value of a secret environment variable"

    walk(obj, "", False)
    return found


def redact_setting(key: str, value: str) -> str:
    """One `key = value` setting (the last part of a dotted key decides), for tables and
    `--set KEY=VALUE` arguments."""
    if value and is_secret_name(key.rsplit(".", 1)[-1]):
        return REDACTED
    return redact_text(value)


def redact_args(args: list[str]) -> list[str]:
    """A command line to print: `--set a.hf_token=...` and `a.password=...` arguments get their
    value replaced, and any secret value of the environment anywhere."""
    shown = []
    for arg in args:
        key, sep, value = arg.partition("=")
        shown.append(
            redact_text(key) + sep + redact_setting(key, value) if sep else redact_text(arg)
        )
    return shown
