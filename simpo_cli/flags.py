"""Command-line options generated from the recipe schema: a field's name (`_` as `-`), type,
default, bounds and description make its option, so a field added to a section becomes a flag
without being restated. The values given come back nested as the schema nests them; the
command line given comes back for the launched processes.

Knows typer and pydantic, not the recipe's sections: the commands say which section each option
group comes from. Loads neither torch nor the package's heavy modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from simpo_cli.errors import UserError

S = TypeVar("S", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])
SECTION_PANEL = ""
# A Literal field's values as its type in --help (`<v0.1|current>`) when they fit this width; a
# longer list, one word that rich would cut mid-word at 80 columns, is listed in its help text.
CHOICES_WIDTH = 16


@dataclass(frozen=True)
class As:
    """What the schema cannot say about a field's option."""

    name: str | None = None  # the flag without `--`; default: PREFIX + the field's name
    help: str | None = None  # default: the field's description
    panel: str | None = SECTION_PANEL  # the help panel; None: the plain "Options"
    # A Literal field's values: "check": read as text, refused after parsing ("use one of");
    # "parse": refused by the parser; "schema": left to the schema's validation.
    choices: Literal["check", "parse", "schema"] = "check"


@dataclass(frozen=True)
class SchemaOption:
    """One generated option: the command's parameter and the schema field it fills."""

    parameter: inspect.Parameter
    section: str | None  # the field holding the section it fills; None: the schema's own field
    field: str
    anchor: bool  # given, it writes its section (the section's required fields, else any)
    item: bool  # its section is a list: the options fill its one item
    comma_list: bool  # a list of text, given comma-separated
    choices: tuple[str, ...]  # checked after parsing

    @property
    def name(self) -> str:
        return self.parameter.name

    def value(self, given: dict[str, Any]) -> Any:
        value = given[self.name]
        if self.comma_list and value is not None:
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def schema_options(
    schema: type[BaseModel],
    section: str | None = None,
    *,
    prefix: str = "",
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    panel: str | None = None,
    optional: bool = False,
    fields: dict[str, As] | None = None,
) -> list[SchemaOption]:
    """One option per field of `schema` (of the section in its field `section`), in the schema's
    order: every field, or `only` these, less `skip` and the fields that are sections (they get
    their own call). `optional`: each defaults to None (given, it overrides a setting)."""
    item = False
    if section is not None:
        inner, _ = _unwrap(schema.model_fields[section].annotation)
        item = get_origin(inner) is list
        schema = get_args(inner)[0] if item else inner
    names = [
        name
        for name in (schema.model_fields if only is None else only)
        if name not in skip and not _is_section(schema.model_fields[name].annotation)
    ]
    required = [name for name in names if schema.model_fields[name].is_required()]
    options = []
    for name in names:
        info, override = schema.model_fields[name], (fields or {}).get(name, As())
        kind, metadata = _unwrap(info.annotation)
        bounds = _bounds(kind, [*info.metadata, *metadata])
        choices: tuple[str, ...] = ()
        help_ = override.help or info.description
        if get_origin(kind) is Literal and override.choices != "parse":
            choices = get_args(kind) if override.choices == "check" else ()
            bounds["metavar"] = f"<{'|'.join(get_args(kind))}>"  # as the parser's choices show
            if len(bounds["metavar"]) > CHOICES_WIDTH:
                bounds["metavar"] = "<choice>"
                help_ = f"{help_ or ''} One of: {', '.join(get_args(kind))}.".lstrip()
            kind = str
        comma_list = get_origin(kind) is list and get_args(kind) == (str,)
        if comma_list:
            kind, help_ = str, f"{help_ or ''} Comma-separated.".lstrip()
        elif not (kind in (str, int, float, bool) or get_origin(kind) is Literal):
            raise TypeError(f"{schema.__name__}.{name}: no option for {kind}; skip the field")
        default = None if optional or info.is_required() else info.default
        flag = "--" + (override.name or prefix + name).replace("_", "-")
        option = typer.Option(
            # A switch that is off by default: --flag alone (no --no-flag beside it in --help).
            *([flag] if kind is bool and default is False else []),
            help=help_,
            rich_help_panel=panel if override.panel == SECTION_PANEL else override.panel,
            **bounds,
        )
        parameter = inspect.Parameter(
            (override.name or prefix + name).replace("-", "_"),
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[kind | None if default is None else kind, option],
        )
        anchor = name in (required or names)
        options.append(SchemaOption(parameter, section, name, anchor, item, comma_list, choices))
    return options


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """The type inside `X | None` and `Annotated[X, ...]`, with the constraints it carries."""
    if get_origin(annotation) in (Union, type(int | None)):
        [annotation] = [arg for arg in get_args(annotation) if arg is not type(None)]
    metadata: list[Any] = []
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for entry in extra:
            metadata += entry.metadata if isinstance(entry, FieldInfo) else [entry]
    return annotation, metadata


def _is_section(annotation: Any) -> bool:
    kind, _ = _unwrap(annotation)
    if get_origin(kind) is list:
        kind = get_args(kind)[0]
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _bounds(kind: Any, metadata: list[Any]) -> dict[str, Any]:
    """The parser's min and max: an int's bounds, a float's inclusive ones (an exclusive float
    bound is the schema's to check)."""
    bounds = {}
    for entry in metadata:
        if isinstance(entry, annotated_types.Ge):
            bounds["min"] = entry.ge
        elif isinstance(entry, annotated_types.Gt) and kind is int:
            bounds["min"] = entry.gt + 1
        elif isinstance(entry, annotated_types.Le):
            bounds["max"] = entry.le
        elif isinstance(entry, annotated_types.Lt) and kind is int:
            bounds["max"] = entry.lt - 1
    return bounds


def with_options(*order: str | list[SchemaOption], omit: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Give a command its parameters in this order: its own, by name, and generated ones, which
    it takes as **keyword arguments. `omit`: its own parameters the command does not offer (they
    keep their defaults)."""

    def give(command: F) -> F:
        own = inspect.signature(command, eval_str=True).parameters
        params = [
            param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for entry in order
            for param in ([own[entry]] if isinstance(entry, str) else [o.parameter for o in entry])
        ]
        named = {entry for entry in order if isinstance(entry, str)} | set(omit)
        unplaced = {n for n, p in own.items() if p.kind != p.VAR_KEYWORD} - named
        if unplaced:
            raise TypeError(f"{command.__name__}: with_options does not place {unplaced}")
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return command

    return give


def option_values(options: list[SchemaOption], given: dict[str, Any]) -> dict[str, Any]:
    """The settings the options stand for, nested as in the schema. A section is written only
    when one of its anchors was given: --split without --pairs writes no pairs."""
    written = {o.section for o in options if o.anchor and given[o.name] is not None}
    values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for option in options:
        if option.section is None:
            values[option.field] = option.value(given)
        elif option.section in written:
            sections.setdefault(option.section, {})[option.field] = option.value(given)
    for name, section in sections.items():
        item = next(o.item for o in options if o.section == name)
        values[name] = [section] if item else section
    return values


def check_choices(options: list[SchemaOption], given: dict[str, Any]) -> None:
    """Refuse a value outside a Literal field's values: `--flag VALUE: use one of ...`."""
    for option in options:
        value = given[option.name]
        if option.choices and value is not None and value not in option.choices:
            flag = "--" + option.name.replace("_", "-")
            raise UserError(f"{flag} {value}: use one of {', '.join(option.choices)}")


def validated(schema: type[S], values: dict[str, Any], command: str) -> S:
    """A schema section from option values; a value out of range is one line naming the flag."""
    try:
        return schema(**values)
    except ValidationError as err:
        first = err.errors()[0]
        flag = "--" + "-".join(str(p) for p in first["loc"]).replace("_", "-")
        raise UserError(f"{command}: {flag}: {first['msg']}") from None


def command_line_again(ctx: typer.Context) -> list[str]:
    """The command's arguments as given, rebuilt from the parsed values for the launched
    processes, less --machine-rank (the launcher's alone)."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            args += [str(v) for v in value]
            continue
        if value is None or value == param.default or param.name == "machine_rank":
            continue
        if getattr(param, "is_flag", False):  # a flag given (its value differs from the default)
            args.append(param.opts[0] if value else param.secondary_opts[0])
            continue
        args += [param.opts[0], str(value)]
    return args


def with_plain_help_types(app: typer.Typer) -> Any:
    """The app's click command, its --help as plain_help_types makes it."""
    command = typer.main.get_command(app)
    plain_help_types(command)
    return command


def plain_help_types(command: Any) -> None:
    """typer writes a type beside every parameter in --help, `<bool>` beside a flag,
    `<list[str]>` beside a repeatable option or argument and `<int range> [x>=1]` beside a
    bounded number: a flag gets none (it takes no value), a repeatable one its item's type
    (`<str>`) and a bounded one its type and bounds (`<int> [x>=1]`, narrow enough for a
    26-letter flag beside it at 80 columns), in `command` and its subcommands. Each paragraph of
    a command's help is made one line (one_line_paragraphs)."""
    command.help = one_line_paragraphs(command.help)
    context = typer.Context(command)
    for param in [*command.params, command.get_help_option(context)]:
        if param is None or not hasattr(param, "display_type"):
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
            continue
        shown = param.display_type(context)
        if shown.startswith("<list["):
            plain = "<" + shown[len("<list[") : -len("]>")] + ">"
        elif shown.endswith(" range>"):
            plain = shown.removesuffix(" range>") + ">"
        else:
            continue
        if param.param_type_name == "option":
            param.metavar = plain
        else:  # an argument's name column reads its metavar: only the type column changes
            param.display_type_rich = lambda ctx, plain=plain: plain
    for sub in getattr(command, "commands", {}).values():
        plain_help_types(sub)


def one_line_paragraphs(text: str | None) -> str | None:
    """Each paragraph of a help text on one line, for rich to wrap at the terminal's width.
    typer's rich help keeps a docstring's line breaks after its first paragraph (a 95-column
    source line wraps into a ragged pair at 80 columns), and in a group's list of commands it
    keeps those of the first paragraph too."""
    if not text:
        return text
    return "\n\n".join(" ".join(part.split()) for part in inspect.cleandoc(text).split("\n\n"))
