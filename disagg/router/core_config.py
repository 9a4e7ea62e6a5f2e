"""The routing core's deadlines and bounds (RouterCoreConfig): read by RouterCore (router/router.py) and by the
collaborators it hands them to (router/attempt.py), so it lives apart from both."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.router.roles import RoleChangeConfig


@dataclass
class RouterCoreConfig:
    rescore_on_dispatch: bool = True  # a queued request is routed when it leaves the queue (fresh index state)
    prefill_timeout_s: float = 120.0  # remote prefill not answered by then: the decode worker prefills locally
    export_timeout_s: float = 5.0  # a peer's prefix offer
    stream_start_timeout_s: float = 300.0  # first delta from the decode worker (its queue included)
    release_timeout_s: float = 5.0
    max_background_releases: int = 4096  # lease releases in flight off the request path (then callers wait)
    max_migrations: int = field(  # per request; then the client gets an explicit error
        default=3, metadata={"help": "times a request may move to another worker"}
    )
    roles: RoleChangeConfig = field(default_factory=RoleChangeConfig)  # runtime role changes (router/roles.py)
    max_decisions: int = 10_000  # bound of the decision log
    attach_timeout_s: float = 10.0  # a worker's answer to a resume (its journaled stream's request, or not found)
    event_poll_s: float = 1.0  # a long poll of a worker's KV events waits this long for one (router/event_follow.py)
    event_retry_s: float = 0.2  # after a failed poll (the worker is dead or restarting)
    death_poll_s: float = 0.05  # how often a streaming request checks that its worker is still in routing
    # block hashes of a KV event batch applied per hold of the router's lock: a decision on another thread waits
    # for one slice at most (~0.5 us a hash on the bench's cores, bench/router.py --scale)
    ingest_slice_blocks: int = 256
    native_index: bool = field(  # the prefix index's blocks in C++, worked on without the GIL (block_table.py)
        default=True, metadata={"help": "keep the prefix index in C++ (Python where no compiler is found)"}
    )
