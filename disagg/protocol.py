"""Wire-level types shared by workers, router and bench.

Everything that crosses a process boundary is a dataclass here with an explicit msgpack schema
(`to_wire` / `from_wire`): field names are checked, nothing is pickled.  The block-hash function lives
here too, because workers, router and bench must agree on it bit for bit.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack


# ---------------------------------------------------------------------------------------------- enums
# str-valued so they travel through msgpack as plain strings and compare equal to them.
class Role(str, enum.Enum):
    """What a worker does: prefill only, decode only (reads KV from prefill workers), or both (aggregated)."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def decodes(self) -> bool:
        return self is not Role.PREFILL

    @property
    def prefills(self) -> bool:
        return self is not Role.DECODE


class Tier(str, enum.Enum):
    """Where a KV block lives, fastest first."""

    DEVICE = "device"
    CPU = "cpu"
    DISK = "disk"


class EventKind(str, enum.Enum):
    STORED = "stored"
    REMOVED = "removed"
    CLEARED = "cleared"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


# ---------------------------------------------------------------------------------------------- block hashing
_ROOT_PARENT = b"disagg-root-v1\x00\x00"


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained content hash of one KV block: hash(parent block's hash, this block's token ids).

    Deterministic across processes and machines (blake2b, not Python's salted `hash`), 64-bit unsigned so it
    fits msgpack's uint64 and a numpy/torch int column.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(_ROOT_PARENT if parent_hash is None else parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None) -> list[int]:
    """Hashes of every *full* block of `token_ids`; a trailing partial block has no hash."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes


# ---------------------------------------------------------------------------------------------- sampling
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI names where they exist). Validated on construction."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the k most likely

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (
                isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens > 0,
                f"max_tokens must be a positive integer, got {self.max_tokens!r}",
            ),
            (
                _is_number(self.temperature) and self.temperature >= 0,
                f"temperature must be >= 0, got {self.temperature!r}",
            ),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (
                isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
                f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}",
            ),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids must be integers"),
            (
                self.logprobs is None
                or (
                    isinstance(self.logprobs, int)
                    and not isinstance(self.logprobs, bool)
                    and 0 <= self.logprobs <= MAX_LOGPROBS
                ),
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
        return cls(**data)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------- messages
class WireMessage:
    """Mixin: a dataclass that travels as a msgpack map with a `type` tag and exactly its own fields."""

    TYPE: ClassVar[str]

    def to_wire(self) -> bytes:
        body = {f.name: _encode_field(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        body["type"] = self.TYPE
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_wire(cls, payload: bytes):
        data = msgpack.unpackb(payload, raw=False)
        if not isinstance(data, dict) or data.pop("type", None) != cls.TYPE:
            raise ValueError(f"not a {cls.__name__} message")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if set(data) != names:
            raise ValueError(f"{cls.__name__}: fields {sorted(set(data) ^ names)} missing or unexpected")
        if "sampling" in data:
            data["sampling"] = SamplingParams.from_dict(data["sampling"])
        return cls(**data)


def _encode_field(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


@dataclass
class Request(WireMessage):
    """A tokenized generation request as the router hands it to a worker.

    `resume_token_ids`: output tokens the client already received from a worker that died (migration).  The new
    worker recomputes prompt + these tokens and continues with output index len(resume_token_ids), so greedy and
    seeded sampling produce exactly the tokens the first worker would have; `resume_num_chars` is how much of
    their text the client has seen, so the stream continues with no duplicate and no missing character.
    `session_id` / `kv_retention_s`: an agent session and how long its KV should stay pinned in the worker's CPU
    tier after this turn (None: no pin).
    """

    TYPE: ClassVar[str] = "request"
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    resume_token_ids: list[int] = field(default_factory=list)
    resume_num_chars: int = 0
    session_id: str | None = None
    kv_retention_s: float | None = None
    priority: int = 0  # higher = more important; a worker's queue serves higher priorities first
    trace_context: dict[str, str] = field(default_factory=dict)  # W3C traceparent/tracestate of the request's span

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV must exist before the next one is sampled (prompt + resumed output)."""
        return len(self.prompt_token_ids) + len(self.resume_token_ids)

    def resumed(self, token_ids: list[int], num_chars: int) -> Request:
        """This request continued after `token_ids` (output already delivered, `num_chars` of text)."""
        return dataclasses.replace(self, resume_token_ids=list(token_ids), resume_num_chars=num_chars)


@dataclass
class TokenDelta(WireMessage):
    """New output of one request since the last delta; `finish_reason` is set on the last one."""

    TYPE: ClassVar[str] = "token_delta"
    request_id: str
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None  # a FinishReason value
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # per token of `token_ids`, when the request asked for logprobs: [token_id, logprob, [[id, logprob], ...]]
    # (the top alternatives, most likely first); computed from the model's raw distribution (before temperature,
    # top-k/top-p), as vLLM and OpenAI report them
    logprobs: list[list] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class KVEvent(WireMessage):
    """A change in which blocks a worker holds. `stored` lists hashes in chain order with their parent."""

    TYPE: ClassVar[str] = "kv_event"
    kind: EventKind
    block_hashes: list[int]
    parent_hash: int | None = None
    tier: Tier = Tier.DEVICE

    def __post_init__(self) -> None:
        self.kind, self.tier = EventKind(self.kind), Tier(self.tier)


@dataclass
class PrefillResult(WireMessage):
    """What one worker hands another: where a request's KV blocks are (and, after a prefill, the first token).

    `regions[i]` says which of the owner's registered regions block `block_ids[i]` is in (Tier.DEVICE: its KV
    cache; Tier.CPU: its CPU tier).  The blocks hold the KV of the first `num_tokens` tokens of prompt + resumed
    output; `first_token` is set when the owner ran the prefill (None: only a prefix is offered, the reader
    computes the rest).  The blocks stay held on the owner until the reader's NIXL notification (naming
    `request_id`) or the lease runs out.
    """

    TYPE: ClassVar[str] = "prefill_result"
    request_id: str
    agent_name: str
    block_ids: list[int]
    regions: list[str]
    num_tokens: int
    first_token: int | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens the owner found cached instead of computing
    first_logprobs: list | None = None  # the first token's logprob entry (TokenDelta.logprobs), when asked


@dataclass
class Heartbeat(WireMessage):
    """A worker's answer to the router's liveness probe: who it is (a restart changes `incarnation`), whether its
    step loop progresses, and the load/latency figures the router and /metrics use."""

    TYPE: ClassVar[str] = "heartbeat"
    worker: str
    incarnation: str
    role: str
    pid: int
    node_id: str
    steps: int  # engine steps completed so far
    has_work: bool
    step_busy_s: float  # how long the current step has been running (0: none running)
    consecutive_step_failures: int
    agent_name: str  # the NIXL agent of this incarnation
    counters: dict[str, float] = field(default_factory=dict)  # cumulative figures for /metrics
    gauges: dict[str, float] = field(default_factory=dict)  # current levels (blocks in use, queue lengths)


@dataclass
class KVEventBatch(WireMessage):
    """KV events a worker publishes, numbered per worker so the router can spot a gap (and ask for a snapshot).

    A batch with `snapshot=True` replaces everything the router knew of the worker: `events` then holds one
    `stored` event per tier with every hash the worker currently holds there.
    """

    TYPE: ClassVar[str] = "kv_event_batch"
    worker: str
    seq_no: int
    events: list[dict]
    snapshot: bool = False

    @classmethod
    def of(cls, worker: str, seq_no: int, events: list[KVEvent], snapshot: bool = False) -> KVEventBatch:
        return cls(worker, seq_no, [dataclasses.asdict(e) for e in events], snapshot)

    def kv_events(self) -> list[KVEvent]:
        return [KVEvent(**e) for e in self.events]
