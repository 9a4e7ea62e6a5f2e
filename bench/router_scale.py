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
from disagg.options import add_options, from_options
from disagg.protocol import EventKind, KVEvent, KVEventBatch, Request, Tier, hash_prompt_blocks
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

    def publish(self, worker: str, stored: list[int], removed: list[int]) -> int:
        """One step's batch from `worker`; returns the block-hash events in it."""
        self.seq[worker] += 1
        events = [KVEvent(EventKind.STORED, stored), KVEvent(EventKind.STORED, stored, tier=Tier.CPU)]
        if removed:
            events += [KVEvent(EventKind.REMOVED, removed), KVEvent(EventKind.REMOVED, removed, tier=Tier.CPU)]
        self.core.on_kv_events(KVEventBatch(worker, self.seq[worker], events))
        self.held[worker].extend(stored)
        return 2 * (len(stored) + len(removed))

    def step(self, worker: str, blocks: int) -> int:
        """A prefill step on `worker`: a random chain's leading `blocks` stored, as many of its oldest evicted."""
        chain = self.chains[self.steps_rng.randrange(len(self.chains))]
        held = self.held[worker]
        removed = [held.popleft() for _ in range(min(blocks, len(held)))]
        return self.publish(worker, chain[:blocks], removed)

    def request(self, i: int) -> tuple[Request, list[int]]:
        c = self.rng.randrange(len(self.chains))
        n = self.rng.randint(1, self.opts.chain_blocks)
        tail = [self.rng.randrange(50_000) for _ in range(self.rng.randint(1, 40))]
        prompt = _tokens(self.seed, c, n * BLOCK) + tail
        return Request(f"r{i}", prompt), self.chains[c][:n]

    def book(self, request: Request, decision: Decision) -> None:
        """Count a routed request (untimed): the oldest one ends, a younger one passes its first token."""
        self.tickets.append(self.core.begin(decision, request.num_tokens, self.core.block_hashes(request)))
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
        for name in ("route_us", "decision_us")
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
