"""Command-line options generated from config dataclasses: the dataclass is the one source of a setting's default
and help, and every CLI (`disagg serve`, `disagg plan`, `disagg bench ...`) builds its options from it.

    add_options(parser, EngineConfig, prefix="engine-")  ->  --engine-max-model-len ...
    config = from_options(EngineConfig, args, prefix="engine-")

A field's help is `field(metadata={"help": ...})`; `metadata={"cli": False}` keeps it off the command line;
`metadata={"flag": "--kv-cache-mb"}` names the option when the field's name would read badly (`"aliases": (...)`:
older names that still work).  Scalars (int,
float, str, bool as --x/--no-x, enums by value, and their optionals) become options; other fields are skipped.
A field without a default becomes a required option; `only=` picks the fields one CLI exposes.  Three more
metadata keys cover what a scalar cannot say: `"choices": (...)` limits a str field to those values,
`"nargs": "+"` makes a `list[int]`-like field (`list[X]` or `tuple[X, ...]` of a scalar X) take several values
(`"nargs": "append"`: one value per repetition of the option), and `"positional": True` makes the field a
positional argument (no -- name), and `"parse": f` reads a field of any type from its text with `f` (a JSON map,
a TENANT=X list: argparse refuses what `f` raises ArgumentTypeError or ValueError for).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_SCALARS = (int, float, str)


def _items(annotation: Any) -> type | None:
    """The scalar element type of `list[X]` / `tuple[X, ...]`, else None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and len(args) == 1:
        kind = args[0]
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        kind = args[0]
    else:
        return None
    return kind if kind in _SCALARS else None


def _scalar(annotation: Any) -> tuple[type | None, bool]:
    """(the scalar type a field parses as, whether None is allowed); (None, _) when it is not a scalar."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            return None, optional
        annotation = args[0]
    if annotation is bool or annotation in _SCALARS:
        return annotation, optional
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation, optional
    return None, optional


def option_name(f: dataclasses.Field, prefix: str = "") -> str:
    return f.metadata.get("flag") or "--" + prefix + f.name.replace("_", "-")


def _names(f: dataclasses.Field, prefix: str) -> list[str]:
    return [option_name(f, prefix), *f.metadata.get("aliases", ())]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    skip: typing.Collection[str] = (),
    only: typing.Collection[str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """One option per scalar field of `cls` (`only`: just these fields; `defaults` overrides a field's default
    for this CLI only: say why where you call it).  A field without a default is a required option."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or not f.metadata.get("cli", True):
            continue
        if "parse" in f.metadata:
            default = (defaults or {}).get(f.name, _default(f))
            text = f"{f.metadata.get('help', '')} (default {_show(default)})".strip()
            dest = (prefix + f.name).replace("-", "_")
            parser.add_argument(*_names(f, prefix), dest=dest, type=f.metadata["parse"], default=default, help=text)
            continue
        if "nargs" in f.metadata or f.metadata.get("positional"):
            required = _required(f) and f.name not in (defaults or {})
            _add_special(parser, f, hints[f.name], prefix, (defaults or {}).get(f.name, _default(f)), required)
            continue
        kind, optional = _scalar(hints[f.name])
        if kind is None:
            continue
        required = _required(f) and f.name not in (defaults or {})
        default = (defaults or {}).get(f.name, _default(f))
        if required:
            if kind is bool:
                raise TypeError(f"{cls.__name__}.{f.name}: a flag needs a default")
            parser.add_argument(
                option_name(f, prefix),
                dest=(prefix + f.name).replace("-", "_"),
                type=_enum_parser(kind) if issubclass(kind, enum.Enum) else kind,
                required=True,
                choices=f.metadata.get("choices"),
                help=f.metadata.get("help", ""),
            )
            continue
        text = f.metadata.get("help", "")
        dest = (prefix + f.name).replace("-", "_")
        names = _names(f, prefix)
        if kind is bool:
            parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            choices = [m.value for m in kind]
            parser.add_argument(
                *names,
                dest=dest,
                type=_enum_parser(kind),
                default=default,
                help=f"{text} (one of {', '.join(map(str, choices))}; default {_show(default)})",
            )
        else:
            parser.add_argument(
                *names,
                dest=dest,
                type=_optional(kind) if optional else kind,
                default=default,
                choices=f.metadata.get("choices"),
                help=f"{text} (default {_show(default)})".strip(),
            )


def _add_special(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    f: dataclasses.Field,
    annotation: Any,
    prefix: str,
    default: Any,
    required: bool,
) -> None:
    """A field with `nargs` (several values of a list/tuple field) or `positional` metadata."""
    text = f.metadata.get("help", "")
    if f.metadata.get("positional"):
        kind, _ = _scalar(annotation)
        if kind is None or kind is bool or f.metadata.get("nargs"):
            raise TypeError(f"{f.name}: a positional argument is one scalar")
        if required:
            parser.add_argument((prefix + f.name).replace("-", "_"), type=kind, help=text)
        else:
            parser.add_argument((prefix + f.name).replace("-", "_"), type=kind, nargs="?", default=default, help=text)
        return
    kind = _items(annotation)
    if kind is None:
        raise TypeError(f"{f.name}: nargs needs a list[X] or tuple[X, ...] field of a scalar X")
    nargs = f.metadata["nargs"]
    parser.add_argument(
        option_name(f, prefix),
        dest=(prefix + f.name).replace("-", "_"),
        type=kind,
        **({"action": "append"} if nargs == "append" else {"nargs": nargs}),
        default=default,
        required=required,
        help=text if required else f"{text} (default {' '.join(map(str, default))})".strip(),
    )


def from_options(
    cls: type[T],
    args: argparse.Namespace,
    *,
    prefix: str = "",
    only: typing.Collection[str] | None = None,
    **overrides: Any,
) -> T:
    """Build `cls` from parsed options (fields without an option keep their defaults; `overrides` win).  `only`:
    read just these fields, as `add_options(only=...)` added them (a CLI built from several dataclasses whose
    field names overlap)."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if only is not None and f.name not in only:
            continue
        dest = (prefix + f.name).replace("-", "_")
        if hasattr(args, dest):
            value = getattr(args, dest)
            # a tuple field stays a tuple (argparse gives lists)
            if isinstance(value, list) and typing.get_origin(hints[f.name]) is tuple:
                value = tuple(value)
            values[f.name] = value
    values.update(overrides)
    return cls(**values)


def _show(value: Any) -> str:
    return value.value if isinstance(value, enum.Enum) else repr(value)


def _optional(kind: type) -> typing.Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("", "none") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _enum_parser(kind: type[enum.Enum]) -> typing.Callable[[str], enum.Enum]:
    def parse(text: str) -> enum.Enum:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(str(m.value) for m in kind)}"
            ) from None

    parse.__name__ = kind.__name__
    return parse
