"""Wire-level types shared by workers, router and bench.

Everything that crosses a process boundary is a dataclass here with an explicit msgpack schema
(`to_wire` / `from_wire`): field names are checked, every value is checked against its annotation and
enums come back as enums (also as map keys), nothing is pickled; anything else raises `WireFormatError`.
The block-hash function lives here too, because workers, router and bench must agree on it bit for bit.

Telemetry is typed as well (disagg/stats.py): a worker's figures travel as `WorkerStats` (in its `Heartbeat`),
the router's own as `RouterCounters`; labels are enum keys (`Tier`, `SourceKind`, `CorruptReason`, `ServePath`,
...), never text folded into a key.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from disagg.isolation import adapter_salted
from disagg.sampling import MAX_LOGPROBS as MAX_LOGPROBS  # re-exported: requests carry SamplingParams
from disagg.sampling import SamplingParams as SamplingParams
from disagg.wire import WireMessage as WireMessage  # re-exported: transfer/ messages derive from it


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

    def __str__(self) -> str:  # text output (logs, CLI) shows "stop" as the engine's plain strings did
        return self.value


class SourceKind(str, enum.Enum):
    """Where a KV load reads from (the KV connector's sources; a label of `WorkerStats.loaded_blocks`)."""

    PEER = "peer"  # another worker's memory over the transport
    TIERS = "tiers"  # this worker's CPU / disk tiers


class CorruptReason(str, enum.Enum):
    """Why a disk-tier block file was refused."""

    MISSING = "missing"
    TRUNCATED = "truncated"
    FOREIGN = "foreign"
    CHECKSUM = "checksum"
    HEADER = "header"


class WorkerState(str, enum.Enum):
    """A worker as the router's health monitor sees it (router/health.py drives the transitions)."""

    STARTING = "starting"  # restarted (or rejoining): being wired back, not routed to yet
    READY = "ready"
    DRAINED = "drained"  # alive and finishing what it has, but given no new requests (a gray failure)
    DEAD = "dead"  # out of routing until it rejoins


class SleepState(str, enum.Enum):
    """A worker's KV memory (engine/sleep.py): held, or given back to the operating system while its model sleeps."""

    AWAKE = "awake"
    ASLEEP = "asleep"


class ServePath(str, enum.Enum):
    """How a served request's prefill ran."""

    DISAGGREGATED = "disaggregated"  # on a prefill worker, KV read by the decode worker
    LOCAL = "local"  # on the decode worker
    PEER_PREFIX = "peer_prefix"  # a peer's cached prefix read, the rest computed locally
    FALLBACK = "fallback"  # the remote prefill / peer prefix failed: computed locally
    MIGRATED = "migrated"  # a request resumed on another worker after its worker was lost


class PricedFrom(str, enum.Enum):
    """What a routing decision's predicted time to first token came from (router/placement.py)."""

    MEASURED = "measured"  # every worker priced reported its own fitted step-time model
    PRIOR = "prior"  # at least one was priced with the configured prior (cold start, or a worker reporting none)


class FallbackKind(str, enum.Enum):
    """What failed when a request fell back to computing on its decode worker."""

    PREFILL = "prefill"
    PEER_PREFIX = "peer_prefix"


# ---------------------------------------------------------------------------------------------- block hashing
ROOT_PARENT = b"disagg-root-v1\x00\x00"


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained content hash of one KV block: hash(parent block's hash, this block's token ids).

    Deterministic across processes and machines (blake2b, not Python's salted `hash`), 64-bit unsigned so it
    fits msgpack's uint64 and a numpy/torch int column.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(ROOT_PARENT if parent_hash is None else parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None) -> list[int]:
    """Hashes of every *full* block (a trailing partial one has none): `hash_block_tokens`' chain, packed once."""
    n = max(0, len(token_ids) // block_size) * block_size  # the tokens of the full blocks
    d, w, b = struct.pack(f"<{n}i", *token_ids[:n]), 4 * block_size, hashlib.blake2b
    p = ROOT_PARENT if parent_hash is None else parent_hash.to_bytes(8, "little")  # each digest: the next parent
    return [int.from_bytes(p := b(p + d[i : i + w], digest_size=8).digest(), "little") for i in range(0, 4 * n, w)]


# ---------------------------------------------------------------------------------------------- messages
# (the msgpack codec they share: disagg/wire.py)
@dataclass
class LoRARef:
    """A LoRA adapter a request runs with: its served name, its PEFT directory (a worker loads it from there on
    first use: engine/lora.py) and a digest of its files (models/adapters.py; "": not known).  All three are part of
    the request's block-hash salt (`Request.hash_salt`) and of a worker's adapter cache key."""

    name: str
    path: str
    digest: str = ""

    def key(self) -> tuple[str, str, str]:
        return self.name, self.path, self.digest


def hash_salt(cache_salt: str | None, lora: LoRARef | None) -> str | None:
    """The cache salt, wrapped by the adapter's identity when there is one: no KV is shared between the base model
    and an adapter, or two adapters."""
    return adapter_salted(cache_salt, *lora.key()) if lora is not None else cache_salt


@dataclass
class ImageInput:
    """An image of a request (disagg/vision/images.py): its content hash, the prompt span its placeholder ids hold,
    and its encoded file (`data`) or, once an encoder worker ran it, its embedding rows (`embedding`: float32
    little-endian [num_tokens, hidden]; b"": the serving worker encodes `data` itself)."""

    content_hash: str
    offset: int
    num_tokens: int
    data: bytes = b""
    embedding: bytes = b""

    def embedding_bytes(self, hidden_size: int) -> int:
        """The size a well-formed `embedding` has (float32 rows)."""
        return self.num_tokens * hidden_size * 4


@dataclass
class EncodeBatch(WireMessage):
    """Images to an encoder worker (their `data`) and back (their `embedding`; `data` dropped): E/PD's hop."""

    TYPE: ClassVar[str] = "encode_batch"
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class Request(WireMessage):
    """A tokenized generation request as the router hands it to a worker.

    `resume_token_ids`: output tokens the client already received from a worker that died (migration).  The new
    worker recomputes prompt + these tokens and continues with output index len(resume_token_ids), so greedy and
    seeded sampling produce exactly the tokens the first worker would have; `resume_num_chars` is how much of
    their text the client has seen, so the stream continues with no duplicate and no missing character.
    `session_id` / `kv_retention_s`: an agent session and how long its KV stays pinned in a CPU tier (None: none).
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
    cache_salt: str | None = None  # block hashes chain from this salt (disagg/isolation.py); None: unsalted
    tenant: str | None = None  # namespaces the session's pins (None: the default tenant)
    created: int = 0  # the API answer's `created` (unix seconds): a resumed stream repeats it (http/resume.py)
    # agent hints (http/hints.py), read by the router only: the output length the caller expects (the load book
    # counts it as decode work instead of max_tokens), and a head start in the caller's own admission queue
    expected_output_tokens: int | None = None
    queue_head_start_s: float = 0.0
    lora: LoRARef | None = None  # None: the base model
    images: list[ImageInput] = field(default_factory=list)  # their placeholder ids are in prompt_token_ids

    def hash_salt(self) -> str | None:
        """What its block hashes chain from (`hash_salt`): workers and the router both hash with it."""
        return hash_salt(self.cache_salt, self.lora)

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV must exist before the next one is sampled (prompt + resumed output)."""
        return len(self.prompt_token_ids) + len(self.resume_token_ids)

    def output_estimate(self) -> int:
        """The output tokens to count this request for: the caller's expectation, never past max_tokens."""
        hint = self.expected_output_tokens
        return self.sampling.max_tokens if hint is None else min(hint, self.sampling.max_tokens)

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
    finish_reason: FinishReason | None = None
    matched_stop: str | None = None  # the stop string that ended the request (finish_reason "stop"), if one did
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # per token of `token_ids`, when the request asked for logprobs: [token_id, logprob, [[id, logprob], ...]]
    # (the top alternatives, most likely first); computed from the model's raw distribution (before temperature,
    # top-k/top-p), as vLLM and OpenAI report them
    logprobs: list[list] | None = None
    # speculative decoding: tokens proposed and accepted for this request so far (usage: accepted/rejected
    # prediction tokens, as OpenAI's completion_tokens_details names them)
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0

    def __post_init__(self) -> None:  # the engine hands its reasons over as plain strings
        if self.finish_reason is not None:
            self.finish_reason = FinishReason(self.finish_reason)

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
    regions: list[Tier]
    num_tokens: int
    first_token: int | None = None
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0  # prompt tokens the owner found cached instead of computing
    first_logprobs: list | None = None  # the first token's logprob entry (TokenDelta.logprobs), when asked

    def __post_init__(self) -> None:  # the engine keeps its reasons as plain strings
        if self.finish_reason is not None:
            self.finish_reason = FinishReason(self.finish_reason)


@dataclass
class KVEventBatch(WireMessage):
    """KV events a worker publishes, numbered per worker so the router can spot a gap (and ask for a snapshot).

    A batch with `snapshot=True` replaces everything the router knew of the worker: `events` then holds one
    `stored` event per tier with every hash the worker currently holds there.
    """

    TYPE: ClassVar[str] = "kv_event_batch"
    worker: str
    seq_no: int
    events: list[KVEvent]
    snapshot: bool = False

    @classmethod
    def of(cls, worker: str, seq_no: int, events: list[KVEvent], snapshot: bool = False) -> KVEventBatch:
        # copies: the batch may be applied later (the simulator delays it) while the worker keeps going
        copies = [dataclasses.replace(e, block_hashes=list(e.block_hashes)) for e in events]
        return cls(worker, seq_no, copies, snapshot)

    def kv_events(self) -> list[KVEvent]:
        return list(self.events)


@dataclass
class KVEventPage(WireMessage):
    """One answer of a worker's feed: its incarnation (a restart resets the numbering) and the batches after the
    follower's cursor, oldest first (none: nothing new within the poll's timeout)."""

    TYPE: ClassVar[str] = "kv_event_page"
    incarnation: str
    batches: list[KVEventBatch]


@dataclass
class SleepReport(WireMessage):
    """A worker's answer to `sleep` or `wake`: its state now, the KV bytes given back to the operating system (0 for
    a wake), the call's time on the worker, and its process's resident memory after it."""

    TYPE: ClassVar[str] = "sleep_report"
    worker: str
    state: SleepState
    released_bytes: int
    seconds: float
    resident_bytes: int
