"""Helpers for engine-level KV tests: engines wired to in-process peers (LocalTransport) and tiers."""
from __future__ import annotations

import itertools
import time

from disagg.cluster.worker_config import kv_fingerprint
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.kv.peer import PeerSource
from disagg.kv.store import TierConfig, TieredStore
from disagg.protocol import TokenDelta
from tests.fake_transport import FaultyTransport, LocalTransport

_names = itertools.count()


class Node:
    """One engine with its transport and tiers, ticked the way a worker ticks it."""

    def __init__(self, model_dir, tiers: TierConfig | None = None, name: str | None = None, **engine_cfg) -> None:
        cfg = dict(model=str(model_dir), num_blocks=64, block_size=16, max_model_len=512, num_threads=1)
        cfg.update(engine_cfg)
        self.engine = LLMEngine(EngineConfig(**cfg))
        self.name = name or f"node-{next(_names)}"
        self.store = None
        fingerprint = kv_fingerprint(self.engine)  # what a worker computes: tiers' directory, peers' layout
        if tiers is not None:
            self.store = TieredStore(tiers, self.engine.pool, self.engine.kv_tensor, fingerprint)
        self.transport = FaultyTransport(LocalTransport(self.name))
        self.transport.register(self.engine.kv_tensor, self.store.cpu.tensor if self.store else None, fingerprint)
        self.peer = PeerSource(self.transport, orphan_timeout_s=5.0)
        self.engine.attach(peer=self.peer, tiers=self.store)

    def tick(self) -> list[TokenDelta]:
        for message in self.transport.notifications():
            self.engine.connector.release_lease(message.decode())
        self.engine.connector.expire_leases()
        return self.engine.step()

    def baseline_free(self) -> bool:
        e = self.engine
        return (e.pool.num_free_blocks == e.pool.num_blocks and not e.connector.leases.leases
                and e.connector.num_adopted_blocks == 0)


def connect(*nodes: Node) -> None:
    layouts = [n.transport.layout() for n in nodes]
    for n in nodes:
        n.transport.set_peers(layouts)


def run(nodes: list[Node], request_ids: list[str], timeout_s: float = 60.0) -> dict[str, list[TokenDelta]]:
    """Tick every node until each request has a finished delta; returns the deltas per request."""
    out: dict[str, list[TokenDelta]] = {rid: [] for rid in request_ids}
    deadline = time.monotonic() + timeout_s
    while not all(d and d[-1].finished for d in out.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"unfinished: {[r for r, d in out.items() if not d or not d[-1].finished]}")
        for node in nodes:
            for delta in node.tick():
                if delta.request_id in out:
                    out[delta.request_id].append(delta)
    return out


def settle(nodes: list[Node], seconds: float = 10.0) -> bool:
    """Tick until every node is back to its baseline (no blocks held, no leases, nothing adopted)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for node in nodes:
            node.tick()
            if node.store is not None:
                node.store.flush()
        if all(n.baseline_free() for n in nodes):
            return True
        time.sleep(0.01)
    return False


def tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text(deltas: list[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)
