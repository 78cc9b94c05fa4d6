"""Errors a user can fix: the CLI prints their messages, one line each, and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave (recipe, data, flags); `messages` holds one line each."""

    def __init__(self, messages: list[str] | str):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


class RecipeError(UserError):
    """The recipe file or its overrides are invalid."""


class DataError(UserError):
    """A data source cannot be read or a row does not fit the expected format."""
