"""Validation errors as recipe problems: one line each, with where, key path, value and the fix."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from simpo_cli.recipe.schema import Recipe

_FIXES = {
    "missing": "add it",
    "float_parsing": "give a number, e.g. 2.0",
    "float_type": "give a number, e.g. 2.0",
    "int_parsing": "give a whole number",
    "int_type": "give a whole number",
    "int_from_float": "give a whole number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "give a string (quote it)",
    "list_type": "give a list, e.g. [a, b]",
    "dict_type": "give a mapping of keys",
    "model_type": "give a mapping of keys",
    "model_attributes_type": "give a mapping of keys",
    "greater_than": "raise it",
    "greater_than_equal": "raise it",
    "less_than": "lower it",
    "less_than_equal": "lower it",
}


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Names of the keys allowed in the section at `loc` (for "did you mean")."""
    model: Any = Recipe
    for part in loc:
        fields = getattr(model, "model_fields", {})
        field = next((f for n, f in fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    return [f.alias or name for name, f in getattr(model, "model_fields", {}).items()]


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _origin(
    loc: tuple[Any, ...], origins: dict[tuple[str, ...], str], source: str
) -> tuple[str, str | None]:
    """Who wrote the value at `loc`: the --set that wrote it or a section holding it (an item
    of a list written whole), else the recipe file; and the --set text, if any."""
    path = tuple(str(p) for p in loc)
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return origins[path[:end]], origins[path[:end]].removeprefix("--set ")
    return source, None


def _set_syntax(kind: str, value: Any, given: str) -> str | None:
    """How to write a list with --set: `--set 'KEY=[a, b]'`, quoted for the shell. Items
    written with spaces and no commas are put in the list they meant."""
    key, _, raw = given.partition("=")
    items = ", ".join(re.findall(r"[^\s,\[\]]+", raw))
    listed = f"--set '{key}=[{items}]'"
    if kind == "list_type":
        return f"give a list (items comma-separated, quoted for the shell): {listed}"
    if isinstance(value, str) and " " in value.strip() and raw.lstrip().startswith("["):
        return f"separate the items with commas: {listed}"
    return None


def format_errors(
    err: ValidationError,
    source: str,
    origins: dict[tuple[str, ...], str] | None = None,
    prefix: str = "",
) -> list[str]:
    """One line per problem: where, key path, value, constraint and the fix. `prefix`: where the
    keys were written when not at the top level (rounds.overrides[1] for a round's override)."""
    origins = origins or {}
    lines = []
    for item in err.errors(include_url=False):
        loc = tuple(p for p in item["loc"] if p != "function-after[...]")
        kind = item["type"]
        key = ".".join(filter(None, [prefix, _dotted(loc) if loc else ""])) or _dotted(loc)
        where, given = _origin(loc, origins, source)
        message = item["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            allowed = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            lines.append(f"{where}: {key}: unknown key; {hint}")
        elif kind == "missing":
            lines.append(f"{where}: {key}: required key is missing; add it")
        elif kind == "value_error":
            # A section's validator may report several problems, one per line; top-level
            # messages name their keys themselves.
            for part in message.split("\n"):
                lines.append(f"{where}: {key}: {part}" if loc or prefix else f"{where}: {part}")
        else:
            value = item.get("input")
            fix = _FIXES.get(kind, "")
            if kind == "literal_error":
                options = str(item.get("ctx", {}).get("expected", "")).replace("'", "")
                close = difflib.get_close_matches(
                    str(value), [o.strip() for o in options.replace(" or ", ",").split(",")], n=1
                )
                fix = f"did you mean '{close[0]}'?" if close else f"use one of {options}"
            if given is not None:  # a --set value: the syntax that would have worked
                fix = _set_syntax(kind, value, given) or fix
            constraint = message[0].lower() + message[1:] if message else kind
            lines.append(f"{where}: {key} = {value!r}: {constraint}" + (f"; {fix}" if fix else ""))
    return lines
