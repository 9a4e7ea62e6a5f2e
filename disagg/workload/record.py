"""One replayable request, and how a trace's lengths and times are scaled to what the serving machine holds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from disagg.workload.tokens import prompt_tokens


@dataclass
class TraceRequest:
    """A request as the trace states it, in the trace's own units (tokens of `native_block` per hash_id).

    timestamp_ms: arrival time; for agent turns after the first it is only the nominal time (session start plus
    think times); a session-aware replayer sends turn k `think_time_ms` after turn k-1 finished.
    hash_ids: one id per native block of the prompt (Mooncake convention); same id = same tokens.
    """

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int] = field(default_factory=list)
    session_id: str | None = None
    turn: int | None = None
    think_time_ms: float = 0.0
    tenant: str | None = None  # who sends it (admission control's fair share); None: the default tenant
    priority: int = 0  # higher = more important
    model: str | None = None  # the served model it asks for; None: the replay's model

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "timestamp": self.timestamp_ms,
            "input_length": self.input_length,
            "output_length": self.output_length,
            "hash_ids": self.hash_ids,
        }
        if self.session_id is not None:
            row.update(session_id=self.session_id, turn=self.turn, think_time_ms=self.think_time_ms)
        if self.model is not None:
            row["model"] = self.model
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> TraceRequest:
        missing = {"timestamp", "input_length", "output_length"} - row.keys()
        if missing:
            raise ValueError(f"trace record lacks {sorted(missing)}: {row}")
        return cls(
            timestamp_ms=float(row["timestamp"]),
            input_length=int(row["input_length"]),
            output_length=int(row["output_length"]),
            hash_ids=[int(h) for h in row.get("hash_ids", [])],
            session_id=row.get("session_id"),
            turn=row.get("turn"),
            think_time_ms=float(row.get("think_time_ms", 0.0)),
            model=str(row["model"]) if row.get("model") is not None else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TraceScale:
    """Maps trace units onto the serving machine.

    block_tokens: tokens each hash_id becomes (the trace's native_block tokens shrink by block_tokens/native_block;
    input lengths shrink by the same factor).  output_scale: factor on output lengths (None: the same factor).
    time_scale: replay speed; 2.0 sends the trace twice as fast (timestamps and think times divided by 2).
    """

    block_tokens: int = 16
    native_block: int = 512
    output_scale: float | None = None
    time_scale: float = 1.0
    max_input_tokens: int | None = None  # longer prompts keep their leading tokens (the shared prefix)
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.block_tokens <= 0 or self.native_block <= 0 or self.time_scale <= 0:
            raise ValueError("block_tokens, native_block and time_scale must be positive")

    @property
    def length_factor(self) -> float:
        return self.block_tokens / self.native_block

    def input_len(self, req: TraceRequest) -> int:
        n = max(1, math.ceil(req.input_length * self.length_factor))
        if req.hash_ids:
            n = min(n, len(req.hash_ids) * self.block_tokens)
        return min(n, self.max_input_tokens) if self.max_input_tokens else n

    def output_len(self, req: TraceRequest) -> int:
        factor = self.length_factor if self.output_scale is None else self.output_scale
        n = max(1, round(req.output_length * factor))
        return min(n, self.max_output_tokens) if self.max_output_tokens else n

    def prompt(self, req: TraceRequest, vocab_size: int, salt: int = 0) -> list[int]:
        return prompt_tokens(req.hash_ids, self.input_len(req), self.block_tokens, vocab_size, salt)

    def seconds(self, ms: float) -> float:
        return ms / 1000 / self.time_scale

    def describe(self) -> dict[str, Any]:
        return {
            "block_tokens": self.block_tokens,
            "native_block": self.native_block,
            "length_factor": self.length_factor,
            "output_scale": self.length_factor if self.output_scale is None else self.output_scale,
            "time_scale": self.time_scale,
            "max_input_tokens": self.max_input_tokens,
            "max_output_tokens": self.max_output_tokens,
        }


def send_units(trace: list[TraceRequest]) -> list[list[int]]:
    """Indices grouped into send units: one per session (in turn order) or one per lone request.  A replayer sends
    a unit's first request at its arrival time and each later turn after the previous one finished."""
    sessions: dict[str, list[int]] = {}
    units: list[list[int]] = []
    for i, r in enumerate(trace):
        if r.session_id is None:
            units.append([i])
        elif r.session_id in sessions:
            sessions[r.session_id].append(i)
        else:
            sessions[r.session_id] = [i]
            units.append(sessions[r.session_id])
    for idx in sessions.values():
        idx.sort(key=lambda i: trace[i].turn or 0)
    return units


def for_models(traces: dict[str, list[TraceRequest]]) -> list[TraceRequest]:
    """One trace of several models' traces: each request asks for its trace's model; the sessions of different
    models stay apart (their ids are prefixed by the model); in arrival order."""
    merged = [
        replace(r, model=model, session_id=f"{model}/{r.session_id}" if r.session_id is not None else None)
        for model, trace in traces.items()
        for r in trace
    ]
    return sorted(merged, key=lambda r: r.timestamp_ms)
