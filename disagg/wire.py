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
    return _decoder(cls)(data, where or cls.__name__)


_Decode = typing.Callable[[Any, str], Any]  # (value, where it sits: for the error) -> the decoded value


def _decoder(tp: Any) -> _Decode:
    """The decoder of annotation `tp`, built once per annotation: enums rebuilt from their values, nested
    dataclasses from their maps, containers element by element; anything that does not fit raises
    WireFormatError.  (Built once because a router decodes every KV event page of every worker: reading the
    annotations per value cost more than the values.)  Cached by the annotation and its arguments in order:
    `int | float == float | int`, but the order decides which a value decodes as."""
    return _built(tp, typing.get_args(tp))


@functools.cache
def _built(tp: Any, args: tuple[Any, ...]) -> _Decode:
    origin = typing.get_origin(tp)
    if tp is Any:
        return lambda value, where: value
    if origin is typing.Union or origin is types.UnionType:
        return _union([_decoder(a) for a in args if a is not type(None)], type(None) in args, tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp)
    if origin is list or tp is list:
        return _list(args[0] if args else Any)
    if origin is dict or tp is dict:
        return _dict(*(args or (Any, Any)))
    if tp is float:
        return _float
    if tp is int:
        return _int
    if tp in (str, bool, bytes):
        return _plain(tp)
    raise WireFormatError(f"no wire rule for {tp}")  # a schema bug, found by the round-trip tests


def _union(options: list[_Decode], optional: bool, tp: Any) -> _Decode:
    def decode(value: Any, where: str) -> Any:
        if value is None and optional:
            return None
        for option in options:
            try:
                return option(value, where)
            except WireFormatError:
                continue
        raise WireFormatError(f"{where}: {value!r:.80} fits none of {tp}")

    return decode


def _enum(tp: type[enum.Enum]) -> _Decode:
    def decode(value: Any, where: str) -> Any:
        try:
            return tp(value)
        except (ValueError, TypeError):
            raise WireFormatError(f"{where}: {value!r:.80} is not a {tp.__name__}") from None

    return decode


def _dataclass(cls: Any) -> _Decode:
    names = {f.name for f in dataclasses.fields(cls)}
    built: list[list[tuple[str, _Decode]]] = []  # the field decoders, made on first use (a dataclass may refer to
    # itself); appended whole, so a thread decoding meanwhile never sees half of them

    def decode(data: Any, where: str) -> Any:
        if not isinstance(data, dict):
            raise WireFormatError(f"{where}: expected a map, got {type(data).__name__}")
        if data.keys() != names:
            raise WireFormatError(f"{where}: fields {sorted(set(data) ^ names, key=str)} missing or unexpected")
        if not built:
            hints = _hints(cls)
            built.append([(name, _decoder(hints[name])) for name in names])
        values = {name: field(data[name], f"{where}.{name}") for name, field in built[0]}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:  # the class's own validation (SamplingParams)
            raise WireFormatError(f"{where}: {exc}") from exc

    return decode


def _list(item: Any) -> _Decode:
    if item in (int, str):  # token ids, hashes: checked in one pass, not decoded one by one
        name, only = f"list of {item.__name__}", {item}

        def scalars(value: Any, where: str) -> Any:
            # the set of the elements' types, made in C: a bool is not an int here, as type() tells them apart
            _check(isinstance(value, list) and (not value or set(map(type, value)) == only), value, name, where)
            return value

        return scalars
    element = None if item is Any else _decoder(item)

    def decode(value: Any, where: str) -> Any:
        _check(isinstance(value, list), value, "list", where)
        return value if element is None else [element(x, where) for x in value]

    return decode


def _dict(key: Any, val: Any) -> _Decode:
    k, v = (None, None) if (key, val) == (Any, Any) else (_decoder(key), _decoder(val))

    def decode(value: Any, where: str) -> Any:
        _check(isinstance(value, dict), value, "map", where)
        if k is None or v is None:
            return value
        return {k(x, where): v(y, where) for x, y in value.items()}

    return decode


def _float(value: Any, where: str) -> float:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), value, "number", where)
    return float(value)


def _int(value: Any, where: str) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool), value, "integer", where)
    return value


def _plain(tp: type) -> _Decode:
    def decode(value: Any, where: str) -> Any:
        _check(isinstance(value, tp), value, tp.__name__, where)
        return value

    return decode


def _check(ok: bool, value: Any, expected: str, where: str) -> None:
    if not ok:
        raise WireFormatError(f"{where}: expected {expected}, got {value!r:.80}")
