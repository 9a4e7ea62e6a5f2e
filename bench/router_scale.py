"""Routing cost at scale: RouterCore.route() with 256 workers and 1M indexed blocks while a second thread applies
KV event batches at the rate such a cluster publishes them (issue 23, part 4).

Setup: the index holds `indexed_blocks` blocks in chains of `chain_blocks`, each chain held by 1-3 random workers
(device + CPU tier, as with the CPU tier's write-through); every worker carries `inflight` requests (the load
terms the policy weighs).  Then 2 x `decisions` requests, each a random chain's first 1-`chain_blocks` blocks
plus an uncached tail, are routed once each, timed alternately as (a) `route(request)`, prompt block hashing
included, and (b) `route(request, hashes=...)`, the decision given the hashes (hashed just before: its index
entries as cold as (a)'s).  After each, the request is booked (`begin`), the one booked `inflight` x workers / 2
earlier passes its first token (`progress`), the oldest ends (`end`): loads move as in serving.  Requests arrive
at `decision_rate` (0: back to back); `lag` is how late the routing thread started one (it waits for the GIL
while the ingest thread runs).  The max includes the interpreter's garbage collections.

Ingest: a thread publishes each worker's batches round-robin at `event_rate` block-hash events per second, the
way workers do: one batch per engine step, numbered per worker, each a step's worth of prefilled blocks stored on
device and in the CPU tier and as many of the worker's oldest blocks removed from both (a full cache evicts as
much as it stores).  It applies them through `RouterCore.on_kv_events`, i.e. under the router's lock, in the
router's slices; it applies whatever is due, then sleeps to the next batch (as a Ray actor thread waits for
the next call).  Default rates, derived from the cluster (docs/benchmarks.md "Decision latency"):
  event_rate    = workers x prefill_tok_s / block_size x 4 (stored + removed, device + CPU)
  decision_rate = workers x prefill_tok_s / request_tokens (each request's uncached prompt is prefilled once)

    .venv/bin/python -m bench.router --scale      # = python -m bench.router_scale; -> bench/results/router_scale.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import random
import statistics
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from bench.common import emit, print_table
from disagg.config import EngineConfig
from disagg.heap import settle_heap
from disagg.options import add_options, from_options
from disagg.protocol import EventKind, KVEvent, KVEventBatch, KVEventPage, Request, Tier, hash_prompt_blocks
from disagg.router.decision import Decision
from disagg.workload.metrics import percentile

BLOCK = EngineConfig.block_size
EVENTS_PER_BLOCK = 4  # a prefilled block: stored on device and CPU; an evicted one: removed from both


@dataclass
class ScaleOptions:
    workers: int = field(default=256, metadata={"help": "decode workers"})
    indexed_blocks: int = field(default=1_000_000, metadata={"help": "blocks in the prefix index at the start"})
    chain_blocks: int = field(default=50, metadata={"help": "blocks per indexed prefix chain"})
    decisions: int = field(default=5000, metadata={"help": "decisions timed of each kind, (a) and (b)"})
    repeats: int = field(default=3, metadata={"help": "runs, each on a fresh core; medians and ranges reported"})
    inflight: int = field(default=8, metadata={"help": "in-flight requests per worker (the policy's load terms)"})
    prefill_tok_s: float = field(default=20_000, metadata={"help": "per-worker prefill speed the rates derive from"})
    step_tokens: int = field(default=512, metadata={"help": "prefill tokens per engine step (one batch per step)"})
    request_tokens: int = field(default=2048, metadata={"help": "uncached prompt tokens per request (rates)"})
    event_rate: float | None = field(
        default=None, metadata={"help": "block-hash events/s applied live (default: derived; 0: no ingest)"}
    )
    decision_rate: float | None = field(
        default=None, metadata={"help": "requests/s routed (default: derived; 0: back to back)"}
    )
    ingest: str = field(
        default="loop",
        metadata={
            "choices": ["loop", "thread"],
            "help": "loop: batches decoded from wire bytes and applied on the routing thread between decisions, "
            "as the router's event followers do; thread: applied from a second thread (GIL contention)",
        },
    )
    seed: int = 0
    out: str | None = field(default="bench/results/router_scale.json", metadata={"help": "JSON output"})

    def rates(self) -> tuple[float, float]:
        """(events/s, decisions/s), derived from the cluster unless given."""
        blocks_s = self.workers * self.prefill_tok_s / BLOCK
        events = blocks_s * EVENTS_PER_BLOCK if self.event_rate is None else self.event_rate
        decisions = self.workers * self.prefill_tok_s / self.request_tokens
        return events, decisions if self.decision_rate is None else self.decision_rate


def _tokens(seed: int, chain: int, n: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + chain)
    return list(struct.unpack(f"<{n}H", rng.randbytes(2 * n)))


class Cluster:
    """The routing core and what its workers hold (per worker, oldest first)."""

    def __init__(self, opts: ScaleOptions, seed: int) -> None:
        from disagg.router.router import RouterCore  # its import pulls the serving stack: not at module import

        self.opts, self.seed, self.rng = opts, seed, random.Random(seed)
        self.steps_rng = random.Random(seed + 1)  # the ingest thread's
        self.names = [f"w{i}" for i in range(opts.workers)]
        self.core = RouterCore({}, {n: None for n in self.names}, block_size=BLOCK)
        self.held: dict[str, deque[int]] = {n: deque() for n in self.names}
        self.seq = dict.fromkeys(self.names, -1)
        self.chains: list[list[int]] = []  # hashes per chain
        for c in range(opts.indexed_blocks // opts.chain_blocks):
            hashes = hash_prompt_blocks(_tokens(seed, c, opts.chain_blocks * BLOCK), BLOCK)
            self.chains.append(hashes)
            for w in self.rng.sample(self.names, self.rng.randint(1, 3)):
                self.publish(w, hashes, [])
        self.tickets: deque = deque()
        for i in range(opts.workers * opts.inflight):  # the load the timed requests meet
            request = self.request(i)[0]
            self.book(request, self.core.route(request))

    def batch(self, worker: str, stored: list[int], removed: list[int]) -> KVEventBatch:
        """One step's batch from `worker` (what it holds moves on as if the batch were applied)."""
        self.seq[worker] += 1
        events = [KVEvent(EventKind.STORED, stored), KVEvent(EventKind.STORED, stored, tier=Tier.CPU)]
        if removed:
            events += [KVEvent(EventKind.REMOVED, removed), KVEvent(EventKind.REMOVED, removed, tier=Tier.CPU)]
        self.held[worker].extend(stored)
        return KVEventBatch(worker, self.seq[worker], events)

    def publish(self, worker: str, stored: list[int], removed: list[int]) -> int:
        """One step's batch from `worker`, applied; returns the block-hash events in it."""
        self.core.on_kv_events(self.batch(worker, stored, removed))
        return 2 * (len(stored) + len(removed))

    def next_step(self, worker: str, blocks: int) -> tuple[list[int], list[int]]:
        """A prefill step on `worker`: a random chain's leading `blocks` stored, as many of its oldest evicted."""
        chain = self.chains[self.steps_rng.randrange(len(self.chains))]
        held = self.held[worker]
        return chain[:blocks], [held.popleft() for _ in range(min(blocks, len(held)))]

    def step(self, worker: str, blocks: int) -> int:
        return self.publish(worker, *self.next_step(worker, blocks))

    def pages(self, count: int, blocks: int) -> list[tuple[bytes, int]]:
        """`count` step batches round-robin over the workers, each as the wire bytes of the page a follower's
        long poll returns (one batch a page), with its block-hash events."""
        workers, out = itertools.cycle(self.names), []
        for _ in range(count):
            worker = next(workers)
            stored, removed = self.next_step(worker, blocks)
            page = KVEventPage("run", [self.batch(worker, stored, removed)])
            out.append((page.to_wire(), 2 * (len(stored) + len(removed))))
        return out

    def request(self, i: int) -> tuple[Request, list[int]]:
        c = self.rng.randrange(len(self.chains))
        n = self.rng.randint(1, self.opts.chain_blocks)
        tail = [self.rng.randrange(50_000) for _ in range(self.rng.randint(1, 40))]
        prompt = _tokens(self.seed, c, n * BLOCK) + tail
        return Request(f"r{i}", prompt), self.chains[c][:n]

    def book(self, request: Request, decision: Decision, hashes: list[int] | None = None) -> None:
        """Count a routed request (untimed): the oldest one ends, a younger one passes its first token."""
        hashes = self.core.block_hashes(request) if hashes is None else hashes
        self.tickets.append(self.core.begin(decision, request.num_tokens, hashes))
        if len(self.tickets) > self.opts.workers * self.opts.inflight:
            self.core.end(self.tickets.popleft())
        if self.tickets and (middle := self.tickets[len(self.tickets) // 2]).queued:
            self.core.progress(middle, 1)


def _ingest(cluster: Cluster, rate: float, stop: threading.Event, applied: list[int]) -> None:
    """Apply each worker's step batches round-robin at `rate` block-hash events/s until `stop`."""
    opts = cluster.opts
    blocks = max(1, opts.step_tokens // BLOCK)
    per_batch = 2 * blocks * 2  # stored + removed, device + CPU
    interval = per_batch / rate
    workers = itertools.cycle(cluster.names)
    start = time.perf_counter()
    done = 0
    while not stop.is_set():
        due = int((time.perf_counter() - start) / interval) + 1
        while done < due and not stop.is_set():
            applied[0] += cluster.step(next(workers), blocks)
            applied[1] += 1
            done += 1
        time.sleep(max(0.0, start + done * interval - time.perf_counter()))


def _stats(samples: list[float], scale: float = 1e6) -> dict[str, float]:
    return {f"p{q}": percentile(samples, q) * scale for q in (50, 90, 99)} | {"max": max(samples) * scale}


def measure(opts: ScaleOptions, seed: int) -> dict:
    """One run on a fresh core: decision latencies (us) and the ingest rate achieved."""
    cluster = Cluster(opts, seed)
    return measure_loop(opts, cluster) if opts.ingest == "loop" else measure_thread(opts, cluster)


_SPIN_S = 300e-6  # the loop sleeps until this close to an item's arrival, then spins (sleep overshoots by ~0.1 ms)


def measure_loop(opts: ScaleOptions, cluster: Cluster) -> dict:
    """Ingest on the routing thread (`--ingest loop`, the router's way: its event followers apply each page on the
    serving event loop, between two decisions).  Decisions and event pages arrive on one schedule and are served
    in arrival order; a decision's latency is counted from its arrival, so the time it waits behind a page being
    decoded and applied is in it ("from arrival"), beside its own time ("service")."""
    event_rate, decision_rate = opts.rates()
    blocks = max(1, opts.step_tokens // BLOCK)
    requests = [cluster.request(i)[0] for i in range(2 * opts.decisions)]
    span = len(requests) / decision_rate if decision_rate > 0 else 0.0
    interval = 2 * blocks * 2 / event_rate if event_rate > 0 else 0.0
    pages = cluster.pages(int(span / interval) if interval else 0, blocks)
    arrivals = sorted(
        [(i / decision_rate if decision_rate > 0 else 0.0, 0, i) for i in range(len(requests))]
        + [(j * interval, 1, j) for j in range(len(pages))]
    )
    # What is built so far out of the collector's generations, as the router process does once it is up
    # (disagg/heap.py); here that is also the bench's own data (chains, requests, pages: millions of objects a
    # router does not hold), so a collection costs what the router's own live objects cost.
    settle_heap("bench.router_scale")
    core, clock = cluster.core, time.perf_counter
    service: dict[str, list[float]] = {"route_us": [], "decision_us": []}
    waited: dict[str, list[float]] = {"route_us": [], "decision_us": []}
    applied, began = [0, 0], clock()
    for due_s, kind, i in arrivals:
        due = began + due_s
        if (ahead := due - clock()) > _SPIN_S:
            time.sleep(ahead - _SPIN_S)
        while clock() < due:
            pass
        if kind == 1:
            payload, events = pages[i]
            for batch in KVEventPage.from_wire(payload).batches:
                core.on_kv_events(batch)
            applied[0], applied[1] = applied[0] + events, applied[1] + 1
            continue
        request = requests[i]
        name = "decision_us" if i % 2 else "route_us"
        t0 = clock()  # (a): route() with its hashing (what route(request) does); (b): the decision given them
        hashes = core.block_hashes(request)
        if i % 2:
            t0 = clock()
        decision = core.route(request, hashes=hashes)
        done = clock()
        service[name].append(done - t0)
        waited[name].append(done - due)
        cluster.book(request, decision, hashes)  # the request's load booked with its hashes, as the router does
    elapsed = clock() - began
    gc.unfreeze()
    return {
        **{name: _stats(samples) for name, samples in service.items()},
        **{f"{name[:-3]}_from_arrival_us": _stats(samples) for name, samples in waited.items()},
        "events_per_s": applied[0] / elapsed,
        "batches_per_s": applied[1] / elapsed,
        "decisions_per_s": len(requests) / elapsed,
        "indexed_blocks": core.index.num_blocks,
    }


def measure_thread(opts: ScaleOptions, cluster: Cluster) -> dict:
    """Ingest on a second thread (`--ingest thread`): decision latencies (us) and the ingest rate achieved."""
    event_rate, decision_rate = opts.rates()
    requests = [cluster.request(i)[0] for i in range(2 * opts.decisions)]
    stop, applied = threading.Event(), [0, 0]
    ingest = threading.Thread(target=_ingest, args=(cluster, event_rate, stop, applied), daemon=True)
    if event_rate > 0:
        ingest.start()
    core, whole, given, lag = cluster.core, [], [], []
    clock = time.perf_counter
    began = clock()
    for i, request in enumerate(requests):
        if decision_rate > 0:
            due = began + i / decision_rate
            time.sleep(max(0.0, due - clock()))
            lag.append(max(0.0, clock() - due))
        if i % 2:  # (b)
            hashes = core.block_hashes(request)
            t0 = clock()
            decision = core.route(request, hashes=hashes)
            given.append(clock() - t0)
        else:  # (a)
            t0 = clock()
            decision = core.route(request)
            whole.append(clock() - t0)
        cluster.book(request, decision)
    elapsed = clock() - began
    stop.set()
    if event_rate > 0:
        ingest.join()
    return {
        "route_us": _stats(whole),
        "decision_us": _stats(given),
        "start_lag_us": _stats(lag) if lag else None,
        "events_per_s": applied[0] / elapsed,
        "batches_per_s": applied[1] / elapsed,
        "decisions_per_s": len(requests) / elapsed,
        "indexed_blocks": core.index.num_blocks,
    }


def _summary(runs: list[dict]) -> dict:
    """Median and range over runs of every figure."""

    def agg(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = {k: agg([r[key][k] for r in runs]) for k in value}
        elif isinstance(value, (int, float)):
            out[key] = agg([r[key] for r in runs])
    return out


def run(opts: ScaleOptions) -> dict:
    event_rate, decision_rate = opts.rates()
    runs = [measure(opts, opts.seed + r) for r in range(opts.repeats)]
    summary = _summary(runs)
    rows = [
        {"figure": f"{name} {q}", **{k: v for k, v in summary[name][q].items()}}
        for name in ("route_us", "decision_us", "route_from_arrival_us", "decision_from_arrival_us")
        if name in summary
        for q in ("p50", "p90", "p99", "max")
    ]
    rows.append({"figure": "events/s applied", **summary["events_per_s"]})
    print_table(rows, f"routing at {opts.workers} workers, {opts.indexed_blocks:,} blocks, {event_rate:,.0f} events/s")
    return {"target": {"event_rate": event_rate, "decision_rate": decision_rate}, "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, ScaleOptions)
    args = parser.parse_args(argv)
    opts = from_options(ScaleOptions, args)
    results = run(opts)
    results["settings"] = vars(args)
    emit(results, opts.out)


if __name__ == "__main__":
    main()
