"""The hints agent frameworks send, accepted unchanged and mapped onto our own request options.

Two envelopes arrive in request bodies (any of the generation APIs):

- NVIDIA Dynamo's `nvext`: `agent_hints` {`priority`, `latency_sensitivity`, `osl`, `speculative_prefill`},
  `greed_sampling`, `cache_control` {`type`: "ephemeral", `ttl`: "600" | "5m" | "1h"};
- the `kv_hints` envelope (SGLang RFC style): {`protocol_version`, `actions`: [{`action_type`, ...}]} with the
  actions `kv.retain` {`ttl_s`} and `kv.demote` {`ttl_s`}.

What each one becomes (`Hints`):

- `agent_hints.priority`: the request's priority (higher = more important, SGLang's default polarity), clamped
  to the caller key's cap instead of refused - a hint never fails a request;
- `agent_hints.latency_sensitivity` (seconds): queue order inside the caller's own admission queue - the request
  counts as having arrived that much earlier (Dynamo's meaning); it never jumps a higher band or another
  tenant's fair share;
- `agent_hints.osl`: the expected output length, which the router's load book counts as decode work left
  (instead of `max_tokens`);
- `agent_hints.speculative_prefill`, `cache_control`, `kv.retain`, `kv.demote`: KV retention - this turn's KV
  (prompt and output) is kept in the serving worker's CPU tier for the TTL (a tool call's wait survives device
  eviction) and the session's next turn is routed to that worker;
- `greed_sampling`: temperature 0.

Anything else - an unknown field, a known one with a value of the wrong type, an unknown action - is ignored and
named in `Hints.ignored` (the front door counts them: `disagg:ignored_hints_total`), never a 400: agents send
hints for many servers at once.  Pure: no HTTP here.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from disagg.http.config import MAX_PRIORITY

RETENTION_MAX_S = 3600.0  # the same cap as the `kv_retention` body field (http/schemas.py)
RETENTION_DEFAULT_S = 300.0  # a retention hint without a usable TTL (Dynamo's default for cache_control)
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")
_TTL_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


class Hint(str, enum.Enum):
    """Hint names as metrics label them: the known ones, and OTHER for every name we do not know (so a client
    cannot grow the label set)."""

    PRIORITY = "priority"
    LATENCY_SENSITIVITY = "latency_sensitivity"
    OSL = "osl"
    SPECULATIVE_PREFILL = "speculative_prefill"
    GREED_SAMPLING = "greed_sampling"
    CACHE_CONTROL = "cache_control"
    KV_RETAIN = "kv.retain"
    KV_DEMOTE = "kv.demote"
    OTHER = "other"


@dataclass
class Hints:
    priority: int | None = None
    latency_sensitivity_s: float = 0.0
    expected_output_tokens: int | None = None
    retention_s: float | None = None
    greedy: bool = False
    ignored: list[Hint] = field(default_factory=list)

    def capped_priority(self, max_priority: int) -> int | None:
        return None if self.priority is None else max(-MAX_PRIORITY, min(self.priority, max_priority))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def ttl_seconds(value: Any) -> float | None:
    """A TTL as Dynamo's cache_control writes it ("600", "5m", "1h", or a number), in seconds; None if unreadable."""
    number = _number(value)
    if number is None and isinstance(value, str) and (m := _TTL.match(value)):
        number = float(m.group(1)) * _TTL_UNIT_S[m.group(2)]
    if number is None or number <= 0:
        return None
    return min(number, RETENTION_MAX_S)


def _retain(hints: Hints, ttl: float | None) -> None:
    ttl = ttl if ttl is not None else RETENTION_DEFAULT_S
    hints.retention_s = max(hints.retention_s or 0.0, ttl)


def _agent_hints(raw: Mapping[str, Any], hints: Hints) -> None:
    for name, value in raw.items():
        number = _number(value)
        if name == Hint.PRIORITY and number is not None and number == int(number):
            hints.priority = int(number)
        elif name == Hint.LATENCY_SENSITIVITY and number is not None and number >= 0:
            hints.latency_sensitivity_s = number
        elif name == Hint.OSL and number is not None and number >= 1:
            hints.expected_output_tokens = int(number)
        elif name == Hint.SPECULATIVE_PREFILL and isinstance(value, bool):
            if value:
                _retain(hints, None)
        else:
            hints.ignored.append(_known(name))


def _known(name: str) -> Hint:
    try:
        return Hint(name)
    except ValueError:
        return Hint.OTHER


def _nvext(raw: Mapping[str, Any], hints: Hints) -> None:
    for name, value in raw.items():
        if name == "agent_hints" and isinstance(value, Mapping):
            _agent_hints(value, hints)
        elif name == Hint.GREED_SAMPLING and isinstance(value, bool):
            hints.greedy = value
        elif name == Hint.CACHE_CONTROL and isinstance(value, Mapping) and value.get("type") in (None, "ephemeral"):
            _retain(hints, ttl_seconds(value.get("ttl")))
        else:
            hints.ignored.append(_known(name))


_ENVELOPE = ("protocol_version", "actions")  # the kv_hints envelope's own fields


def _kv_hints(raw: Mapping[str, Any], hints: Hints) -> None:
    hints.ignored += [Hint.OTHER for name in raw if name not in _ENVELOPE]
    actions = raw.get("actions")
    if not isinstance(actions, list):
        hints.ignored.append(Hint.OTHER)
        return
    for action in actions:
        kind = action.get("action_type") if isinstance(action, Mapping) else None
        if kind in (Hint.KV_RETAIN, Hint.KV_DEMOTE):
            # both keep the KV in the CPU tier (retain: a copy there while the device copy ages out by LRU;
            # demote: the same, asked for at the end of a turn): the tier is where it survives a tool call
            _retain(hints, ttl_seconds(action.get("ttl_s")))
        else:
            hints.ignored.append(_known(str(kind)))


def read_hints(nvext: Any, kv_hints: Any) -> Hints:
    """The hints of one request body (`nvext`, `kv_hints`: whatever JSON the client sent, or None)."""
    hints = Hints()
    for raw, read in ((nvext, _nvext), (kv_hints, _kv_hints)):
        if raw is None:
            continue
        if isinstance(raw, Mapping):
            read(raw, hints)
        else:
            hints.ignored.append(Hint.OTHER)
    return hints
