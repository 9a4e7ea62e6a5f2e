"""Router benchmark: decision latency at scale, and the prefix-hit ratio of routing policies on the real traces,
with and without CPU / disk tiers behind each worker, and like-for-like against NVIDIA Dynamo's router.

1. Latency: RouterCore.route() (block hashing + index match + policy) with 64 workers and 100k indexed blocks
   (bench/router_scale.py; `--scale`: its own run, 256 workers and 1M blocks with live KV-event ingest).
2. Hit ratio: the Mooncake traces replayed in timestamp order through the real RouterCore in front of simulated
   workers.  Each worker has a real BlockPool (LRU prefix cache of --blocks blocks, one block per trace hash_id)
   and, with tiers, a CPU tier and a disk tier modelled as LRU sets of hashes: write-through to CPU for every
   computed block (as the real TieredStore does), CPU overflow demoted to disk.  Workers publish real, tier-tagged
   KV events; a request's computed blocks are announced when its prefill would have finished, not at admission.
   A request holds its blocks while in flight: prefill at --prefill-tok-s over its uncached part (tier hits cost
   --cpu-load-cost / --disk-load-cost of computing), then --tpot-ms per output token, so the policy's load terms
   see real concurrency.  Hit ratio = prompt blocks served from any cache (device, CPU, disk) / prompt blocks;
   the device column counts device hits only.  The oracle is an infinite cache shared by all workers.  Load
   max/mean: the most loaded worker's in-flight blocks (blocks its pool holds for running requests) over the
   mean, sampled at each arrival and averaged.
3. --grid: our kv policy, device only, over overlap weight x temperature (--weights, --temperatures).  With
   --dynamo-python, the same grid through NVIDIA Dynamo's router too (bench/dynamo_router.py, run by that
   interpreter): same traces, same simulated workers and replay loop (this module's), device only.  Reports the
   full grid and each router at its best setting.

    .venv/bin/python -m bench.router
    .venv/bin/python -m bench.router --dynamo-python /tmp/dynenv/bin/python   # see bench/dynamo_router.py
    .venv/bin/python -m bench.router --scale [bench/router_scale.py's options]   # -> router_scale.json
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import emit, print_table
from bench.router_scale import ScaleOptions, measure
from bench.router_scale import main as scale_main
from disagg.engine.block_pool import BlockPool, NoFreeBlocksError
from disagg.options import add_options
from disagg.protocol import EventKind, KVEvent, KVEventBatch, Request, Tier, hash_prompt_blocks
from disagg.router.load import LoadTicket
from disagg.router.policy import PolicyConfig, PolicyKind

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces"
TRACE_NAMES = ("mooncake_synthetic_trace.jsonl", "mooncake_conversation_trace.jsonl")


def load_trace(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.open()]
    return rows[:limit] if limit else rows


class _LRU:
    """A tier modelled as an LRU set of block hashes with a capacity in blocks."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, h: int) -> bool:
        return h in self.items

    def put(self, h: int) -> list[int]:
        """Insert or refresh `h`; returns what fell out."""
        if h in self.items:
            self.items.move_to_end(h)
            return []
        self.items[h] = None
        out = []
        while len(self.items) > self.capacity:
            out.append(self.items.popitem(last=False)[0])
        return out


class SimWorker:
    """A worker stand-in: real block pool and KV events, optional CPU/disk tiers, no model."""

    def __init__(self, name: str, num_blocks: int, cpu_blocks: int = 0, disk_blocks: int = 0) -> None:
        self.name, self.pool, self.seq_no = name, BlockPool(num_blocks), -1
        self.cpu = _LRU(cpu_blocks) if cpu_blocks else None
        self.disk = _LRU(disk_blocks) if disk_blocks else None
        self._events: list[KVEvent] = []

    def admit(self, hashes: list[int]) -> tuple[int, int, int, list[int], list[int]]:
        """(device hits, cpu hits, disk hits, blocks held, blocks to compute) for a new request, as the engine
        would serve it: device prefix first, then the tiers, then compute."""
        hits = self.pool.lookup_prefix(hashes)
        self.pool.touch(hits)
        n_cpu = n_disk = 0
        for h in hashes[len(hits) :]:
            if self.cpu is not None and h in self.cpu:
                n_cpu += 1
            elif self.disk is not None and h in self.disk:
                n_disk += 1
            else:
                break
        loaded = n_cpu + n_disk
        try:
            fresh = self.pool.allocate(len(hashes) - len(hits))
        except NoFreeBlocksError:  # everything is in flight: serve uncached, cache nothing
            return len(hits), 0, 0, hits, []
        start = len(hits)
        if loaded:  # loaded blocks are in the device cache at once
            self._cache(fresh[:loaded], hashes[start : start + loaded], hashes[start - 1] if start else None)
        return len(hits), n_cpu, n_disk, hits + fresh, fresh[loaded:]

    def prefill_done(self, blocks: list[int], hashes: list[int], parent: int | None) -> None:
        """The computed blocks become cached (and stored to CPU): announced now, not at admission."""
        self._cache(blocks, hashes, parent)

    def _cache(self, blocks: list[int], hashes: list[int], parent: int | None) -> None:
        self.pool.cache_blocks(blocks, hashes, parent)
        if self.cpu is None:
            return
        stored, demoted = [], []
        for h in hashes:
            if h not in self.cpu:
                stored.append(h)
            for out in self.cpu.put(h):
                demoted.append(out)
        self._events.append(KVEvent(EventKind.STORED, stored, tier=Tier.CPU))
        if demoted:
            self._events.append(KVEvent(EventKind.REMOVED, demoted, tier=Tier.CPU))
            if self.disk is not None:
                dropped = [o for h in demoted for o in self.disk.put(h)]
                self._events.append(KVEvent(EventKind.STORED, demoted, tier=Tier.DISK))
                if dropped:
                    self._events.append(KVEvent(EventKind.REMOVED, dropped, tier=Tier.DISK))

    def events(self) -> KVEventBatch | None:
        events = self.pool.drain_events() + self._events
        self._events = []
        if not events:
            return None
        self.seq_no += 1
        return KVEventBatch.of(self.name, self.seq_no, events)


@dataclass
class SimConfig:
    """The simulated cluster every router faces, here and in bench/dynamo_router.py."""

    workers: int = field(default=8, metadata={"help": "simulated workers"})
    blocks: int = field(default=4096, metadata={"help": "device prefix-cache blocks per simulated worker"})
    prefill_tok_s: float = field(default=20_000, metadata={"help": "simulated prefill speed, tokens/s"})
    tpot_ms: float = field(default=30, metadata={"help": "simulated time per output token, ms"})
    block_tokens: int = 512  # tokens per trace hash_id
    cpu_blocks: int = 0
    disk_blocks: int = 0
    cpu_load_cost: float = 0.05
    disk_load_cost: float = 0.3

    def names(self) -> list[str]:
        return [f"w{i}" for i in range(self.workers)]


@dataclass
class GridOptions:
    """The weight x temperature grid (here and in bench/dynamo_router.py)."""

    limit: int | None = field(default=None, metadata={"help": "first N requests of each trace"})
    weights: str = field(default="1,2,4,6,8", metadata={"help": "grid: overlap weights"})
    temperatures: str = field(default="0,0.5,1", metadata={"help": "grid: temperatures"})


@dataclass
class RouterOptions:
    """`bench.router`'s own options (the simulated cluster's come from SimConfig, the grid's from GridOptions)."""

    cpu_blocks: str = field(default="0,16384", metadata={"help": "CPU tier sizes to compare (blocks per worker)"})
    disk_blocks: int = field(default=65536, metadata={"help": "disk tier per worker when a CPU tier is on"})
    decisions: int = field(default=5000, metadata={"help": "routing decisions timed for the latency table"})
    grid: bool = field(default=False, metadata={"help": "only the device-only weight x temperature grid"})
    scale: bool = field(
        default=False, metadata={"help": "only the decision latency at scale (bench/router_scale.py's options)"}
    )
    dynamo_python: str | None = field(
        default=None, metadata={"help": "interpreter of a venv with ai-dynamo-runtime: grid for both routers"}
    )
    traces: str = field(default=",".join(TRACE_NAMES), metadata={"help": "grid: trace files, in run order"})
    out: str | None = field(
        default=None,
        metadata={"help": "default bench/results/router.json (router_vs_dynamo.json with --grid / --dynamo-python)"},
    )


class CoreRouter:
    """Our RouterCore behind the replay's router interface (bench/dynamo_router.py puts Dynamo's behind it):
    route(i, ids, hashes) -> (worker, ticket) books the request; prefilled(ticket) when its prefill is done;
    finished(ticket) when it ends; kv_events(batch) delivers a worker's events."""

    def __init__(self, names: list[str], config: PolicyConfig) -> None:
        # Imported here, not at the top: bench/dynamo_router.py imports this module in Dynamo's venv, which has
        # msgpack (for disagg.protocol) but not the serving router's dependencies (opentelemetry).
        from disagg.router.router import RouterCore

        self.core = RouterCore({}, {n: None for n in names}, config, block_size=1)

    def route(self, i: int, ids: list[int], hashes: list[int]) -> tuple[str, LoadTicket]:
        decision = self.core.route(Request(f"q{i}", ids), hashes=hashes)
        return decision.decode_worker, self.core.begin(decision, len(ids), hashes)

    def prefilled(self, ticket: LoadTicket) -> None:
        self.core.progress(ticket, 1)

    def finished(self, ticket: LoadTicket) -> None:
        self.core.end(ticket)

    def kv_events(self, batch: KVEventBatch) -> None:
        self.core.on_kv_events(batch)


def run_replay(router, trace: list[dict], sim: SimConfig) -> dict:
    """Replay `trace` through `router` (a CoreRouter or the like) in front of sim.workers SimWorkers."""
    workers = {n: SimWorker(n, sim.blocks, sim.cpu_blocks, sim.disk_blocks) for n in sim.names()}
    pending: list[tuple[float, int, str, tuple]] = []  # (time, order, kind, payload)
    order = itertools.count()
    totals = {"blocks": 0, "device": 0, "cpu": 0, "disk": 0}

    def publish(worker: SimWorker) -> None:
        batch = worker.events()
        if batch is not None:
            router.kv_events(batch)

    def advance(now: float) -> None:
        while pending and pending[0][0] <= now:
            _, _, kind, payload = heapq.heappop(pending)
            if kind == "prefilled":
                name, blocks, hashes, parent, ticket = payload
                workers[name].prefill_done(blocks, hashes, parent)
                router.prefilled(ticket)
            else:
                name, blocks, ticket = payload
                workers[name].pool.free(blocks)
                router.finished(ticket)
            publish(workers[name])

    imbalance: list[float] = []  # max / mean in-flight blocks over workers, sampled at each arrival
    for i, row in enumerate(trace):
        now = row["timestamp"] / 1000
        advance(now)
        held = [w.pool.num_blocks - w.pool.num_free_blocks for w in workers.values()]
        if sum(held):
            imbalance.append(max(held) * len(held) / sum(held))
        ids = row["hash_ids"]  # one id per 512-token block; as "tokens" with block_size=1 each is one block
        hashes = hash_prompt_blocks(ids, 1)  # the router's chained hashes, as a worker has
        name, ticket = router.route(i, ids, hashes)
        worker = workers[name]
        n_dev, n_cpu, n_disk, held, compute = worker.admit(hashes)
        publish(worker)
        totals["blocks"] += len(hashes)
        totals["device"] += n_dev
        totals["cpu"] += n_cpu
        totals["disk"] += n_disk
        uncached_tokens = max(0, row["input_length"] - (n_dev + n_cpu + n_disk) * sim.block_tokens)
        loading = (n_cpu * sim.cpu_load_cost + n_disk * sim.disk_load_cost) * sim.block_tokens
        done_at = now + (uncached_tokens + loading) / sim.prefill_tok_s
        first = n_dev + n_cpu + n_disk
        heapq.heappush(
            pending,
            (
                done_at,
                next(order),
                "prefilled",
                (name, compute, hashes[first : first + len(compute)], hashes[first - 1] if first else None, ticket),
            ),
        )
        heapq.heappush(
            pending, (done_at + row["output_length"] * sim.tpot_ms / 1000, next(order), "done", (name, held, ticket))
        )
    advance(float("inf"))
    b = totals["blocks"]
    return {
        "hit_ratio": (totals["device"] + totals["cpu"] + totals["disk"]) / b,
        "device": totals["device"] / b,
        "cpu": totals["cpu"] / b,
        "disk": totals["disk"] / b,
        "load_max_over_mean": sum(imbalance) / len(imbalance) if imbalance else float("nan"),
    }


def replay(trace: list[dict], policy: str, sim: SimConfig, policy_args: dict | None = None) -> dict:
    config = PolicyConfig(
        kind=PolicyKind(policy),
        seed=0,
        peer_pull=False,
        cpu_load_cost=sim.cpu_load_cost,
        disk_load_cost=sim.disk_load_cost,
        **(policy_args or {}),
    )
    return {"policy": policy, **run_replay(CoreRouter(sim.names(), config), trace, sim)}


def oracle(trace: list[dict]) -> dict:
    seen: set[int] = set()
    total = hit = 0
    for row in trace:
        n = 0
        for h in row["hash_ids"]:
            if h not in seen:
                break
            n += 1
        hit += n
        total += len(row["hash_ids"])
        seen.update(row["hash_ids"])
    return {"policy": "oracle (infinite shared cache)", "hit_ratio": hit / total}


def policies(args: argparse.Namespace) -> dict:
    small = ScaleOptions(64, 100_000, decisions=args.decisions, inflight=0, event_rate=0, decision_rate=0)
    latency = measure(small, seed=0)  # no ingest, no load: bench/router_scale.py has those
    rows = [{"us": name, **figures} for name, figures in latency.items() if isinstance(figures, dict)]
    print_table(rows, "routing decision latency (RouterCore.route; with hashing, given the hashes)")
    results = {"latency": latency, "hit_ratio": {}}
    for name in reversed(TRACE_NAMES):
        trace = load_trace(TRACES / name, args.limit)
        rows = []
        for cpu in (int(c) for c in args.cpu_blocks.split(",")):
            sim = SimConfig(
                args.workers,
                args.blocks,
                args.prefill_tok_s,
                args.tpot_ms,
                cpu_blocks=cpu,
                disk_blocks=args.disk_blocks if cpu else 0,
            )
            for p in ("kv", "round_robin", "least_loaded"):
                row = replay(trace, p, sim)
                rows.append({"tiers": f"cpu {cpu} + disk {sim.disk_blocks}" if cpu else "device only", **row})
        rows.append({"tiers": "-", **oracle(trace), "device": None, "cpu": None, "disk": None})
        top = rows[-1]["hit_ratio"]
        for row in rows:
            row["vs_oracle"] = row["hit_ratio"] / top if top else float("nan")
        print_table(
            rows,
            f"prefix-hit ratio, {name} ({len(trace)} requests, {args.workers} workers x {args.blocks} device blocks)",
        )
        results["hit_ratio"][name] = rows
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--scale" in argv:  # the decision latency at scale, with its own options
        scale_main([a for a in argv if a != "--scale"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, SimConfig, only=("workers", "blocks", "prefill_tok_s", "tpot_ms"))
    add_options(parser, RouterOptions)
    add_options(parser, GridOptions)
    args = parser.parse_args(argv)
    grid = args.grid or bool(args.dynamo_python)
    if grid:
        from bench.dynamo_router import compare  # that module imports this one

        results = compare(args)
    else:
        results = policies(args)
    results["settings"] = vars(args)
    emit(results, args.out or f"bench/results/{'router_vs_dynamo' if grid else 'router'}.json")


if __name__ == "__main__":
    main()
