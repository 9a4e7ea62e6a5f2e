"""The msgpack codec every cross-process message shares (`WireMessage`; the messages are in disagg/protocol.py).

A message is a dataclass sent as a msgpack map of exactly its fields plus a `type` tag.  Decoding checks every
value against the field's annotation: enums come back as enums (map keys included), nested dataclasses from their
maps, numbers and strings as their types; unknown or missing fields, wrong types and unknown enum values raise
`WireFormatError`.  Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, ClassVar, TypeVar

import msgpack

from disagg.errors import WireFormatError

_M = TypeVar("_M", bound="WireMessage")


class WireMessage:
    """Mixin: a dataclass that travels as a msgpack map with a `type` tag and exactly its own fields."""

    TYPE: ClassVar[str]

    def to_wire(self) -> bytes:
        body = _encode(self)
        body["type"] = self.TYPE
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_wire(cls: type[_M], payload: bytes) -> _M:
        try:
            data = msgpack.unpackb(payload, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise WireFormatError(f"not a {cls.__name__} message: {exc}") from exc
        if not isinstance(data, dict) or data.pop("type", None) != cls.TYPE:
            raise WireFormatError(f"not a {cls.__name__} message")
        return _decode_dataclass(cls, data)


def _encode(value: Any) -> Any:
    """Plain msgpack data: dataclasses as maps of their fields, enums as their values (map keys too)."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {_encode(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return value if all(type(x) in _SCALARS for x in value) else [_encode(x) for x in value]
    return value


_SCALARS = (int, float, str, bool, bytes, type(None))


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode_dataclass(cls: Any, data: Any, where: str = "") -> Any:
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise WireFormatError(f"{where}: expected a map, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if set(data) != names:
        raise WireFormatError(f"{where}: fields {sorted(set(data) ^ names, key=str)} missing or unexpected")
    hints = _hints(cls)
    values = {name: _decode(hints[name], data[name], f"{where}.{name}") for name in names}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # the class's own validation (SamplingParams)
        raise WireFormatError(f"{where}: {exc}") from exc


def _decode(tp: Any, value: Any, where: str) -> Any:
    """`value` as annotation `tp` says: enums rebuilt from their values, nested dataclasses from their maps,
    containers element by element; anything that does not fit raises WireFormatError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _decode(arg, value, where)
            except WireFormatError:
                continue
        raise WireFormatError(f"{where}: {value!r:.80} fits none of {tp}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            raise WireFormatError(f"{where}: {value!r:.80} is not a {tp.__name__}") from None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, where)
    if origin is list or tp is list:
        _check(isinstance(value, list), value, "list", where)
        if not args or args[0] is Any:
            return value
        if args[0] in (int, str):  # token ids, hashes: checked in one pass, not decoded one by one
            _check(all(type(x) is args[0] for x in value), value, f"list of {args[0].__name__}", where)
            return value
        return [_decode(args[0], x, where) for x in value]
    if origin is dict or tp is dict:
        _check(isinstance(value, dict), value, "map", where)
        if not args:
            return value
        return {_decode(args[0], k, where): _decode(args[1], v, where) for k, v in value.items()}
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), value, "number", where)
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), value, "integer", where)
        return value
    if tp in (str, bool, bytes):
        _check(isinstance(value, tp), value, tp.__name__, where)
        return value
    raise WireFormatError(f"{where}: no wire rule for {tp}")  # a schema bug, found by the round-trip tests


def _check(ok: bool, value: Any, expected: str, where: str) -> None:
    if not ok:
        raise WireFormatError(f"{where}: expected {expected}, got {value!r:.80}")
