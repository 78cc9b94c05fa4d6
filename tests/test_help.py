"""Every command's --help reads cleanly at 80 columns (and at 120): no line wider than the
terminal, no word cut across two lines or cut short with `…` (rich does both when the columns of
an options table do not fit), and each paragraph of a command's help wrapped as one paragraph
(typer's rich help kept a docstring's own line breaks: a 95-column source line became a ragged
pair of lines, and in a group's list of commands every line break stayed)."""

import re

import pytest
import typer

from simpo_cli.cli import app
from simpo_cli.flags import one_line_paragraphs

BOX = "│╭╮╰╯─"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # where a CI sets FORCE_COLOR


def _commands(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(app)))


def _words(text: str) -> set[str]:
    return set(re.sub(f"[{BOX}]", " ", text).split())


@pytest.fixture
def help_at(cli, monkeypatch):
    def render(path, columns: int) -> str:
        monkeypatch.setenv("COLUMNS", str(columns))  # rich reads it for each help
        result = cli(*path, "--help")
        assert result.code == 0, result.stderr
        return ANSI.sub("", result.stdout)

    return render


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "simpo")
def test_help_fits_the_terminal_with_every_word_whole(help_at, path):
    whole = _words(help_at(path, 1000))  # wide enough that nothing is wrapped
    for columns in (80, 120):
        text = help_at(path, columns)
        wide = [line for line in text.splitlines() if len(line) > columns]
        assert not wide, (columns, wide)
        assert "…" not in text, (columns, [line for line in text.splitlines() if "…" in line])
        cut = _words(text) - whole
        assert not cut, (columns, sorted(cut), text)


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "simpo")
def test_each_paragraph_of_a_commands_help_is_one_paragraph(help_at, path):
    """At a width that wraps nothing, every paragraph of the help (a docstring's, however its
    source lines are broken) is one line, in the command's own help and in its group's list."""
    paragraphs = one_line_paragraphs(COMMANDS[path].help or "").split("\n\n")
    lines = [line.strip(f" {BOX}") for line in help_at(path, 1000).splitlines()]
    for paragraph in paragraphs:
        assert paragraph in lines, (paragraph, lines)
    if path:
        listed = help_at(path[:-1], 1000).splitlines()
        rows = [line.strip(f" {BOX}").split(maxsplit=1) for line in listed]
        rows = {row[0]: row[1] for row in rows if len(row) == 2}
        assert rows.get(path[-1]) == paragraphs[0], rows.get(path[-1])
