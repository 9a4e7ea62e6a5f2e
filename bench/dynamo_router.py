"""Like-for-like prefix-hit ratio against NVIDIA Dynamo's KV router: the Mooncake traces replayed through
Dynamo's own router code in front of the same simulated workers as bench/router.py, device only.

Dynamo runs in its own venv (nothing in disagg/ imports this module or dynamo):

    python3 -m venv /tmp/dynenv && /tmp/dynenv/bin/pip install ai-dynamo-runtime==1.6.1 pyzmq msgpack
    nice -n 10 .venv/bin/python -m bench.router --dynamo-python /tmp/dynenv/bin/python

bench.router's driver (compare() below) runs our router's grid in this venv and `-m bench.dynamo_router` under
the Dynamo interpreter for Dynamo's: every (trace, overlap weight, temperature) through both.

What is Dynamo's: `dynamo.llm.SelectionService` (ai-dynamo-runtime 1.6.1), Dynamo's runtime-free selection core.
It holds Dynamo's KV indexer (radix tree over the workers' KV events), its active-sequence load accounting
(per worker: prefill tokens of requests not yet prefilled, decode blocks of all in-flight requests with shared
prefix blocks once) and its DefaultWorkerSelector (lib/kv-router/src/scheduling/selector/default.rs and mod.rs):
logit = prefill_load_scale * max(0, worker's pending prefill blocks + the request's blocks - overlap blocks)
+ decode blocks with the request's, the lowest logit wins (random among ties) at temperature 0, else a softmax
over the logits normalised to their range, divided by the temperature (read in Dynamo's repository near, not
exactly at, 1.6.1).  In 1.6.1 overlap_score_weight is an alias of prefill_load_scale; both knobs are set the way
a deployment sets them, DYN_OVERLAP_SCORE_WEIGHT and DYN_ROUTER_TEMPERATURE, read when the service starts.
A request is booked with select_and_reserve (Dynamo hashes its tokens itself, block size 1: one trace hash_id
per block, as our router sees it), marked prefill_complete when its prefill ends and freed when it finishes.
KV events reach the service as vLLM's do: a msgpack KVEventBatch per worker on a ZMQ PUB socket that the service
subscribes to (kv_events_endpoint).  Nothing of Dynamo's is re-implemented here.

What is ours, shared with bench/router.py so both routers face identical workers: SimWorker (real BlockPool,
LRU eviction), the replay loop (arrivals in timestamp order, prefill at 20k tok/s over the uncached part, 30 ms
per output token, computed blocks announced when their prefill ends) and both metrics, measured on the workers.

Dynamo applies KV events asynchronously.  Before each decision the replay waits until the service has applied
every event published so far (each worker that published since the last decision flips a sentinel block, and
the replay polls overlap_scores until every flip shows), so Dynamo decides on the same cache state our
RouterCore does.  Dynamo's softmax sampling is unseeded: rows with temperature > 0 vary from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.common import print_table
from bench.router import TRACES, CoreRouter, GridOptions, SimConfig, load_trace, oracle, run_replay
from disagg.options import add_options
from disagg.protocol import EventKind, KVEventBatch
from disagg.router.policy import PolicyConfig, PolicyKind

REPO = Path(__file__).resolve().parents[1]
SENTINEL_TOKEN = 2**32 - 1  # a block (block size 1: one token) no trace has; flipped to fence each worker's events
SENTINEL_HASH = 2**64 - 1  # its block hash on every worker


class DynamoRouter:
    """Dynamo's SelectionService behind the replay's router interface (the twin of bench.router.CoreRouter)."""

    def __init__(self, names: list[str], weight: float, temperature: float, loop: asyncio.AbstractEventLoop) -> None:
        import msgpack
        import zmq
        from dynamo.llm import SelectionService

        os.environ["DYN_OVERLAP_SCORE_WEIGHT"] = repr(float(weight))
        os.environ["DYN_ROUTER_TEMPERATURE"] = repr(float(temperature))
        self.pack, self.loop = msgpack.packb, loop
        self.service = SelectionService(indexer_threads=1)  # one indexer thread: a worker's events apply in order
        self.ids = {name: k + 1 for k, name in enumerate(names)}
        self.names = {k: name for name, k in self.ids.items()}
        self.sockets, self.seq = {}, dict.fromkeys(names, 0)
        self.sentinel = dict.fromkeys(names, False)  # the sentinel block's state as last published per worker
        self.dirty: set[str] = set()  # published since the last fence
        self.tokens: dict[int, int] = {}  # chained block hash -> the block's trace hash_id (its one token)
        for name in names:
            socket = zmq.Context.instance().socket(zmq.PUB)
            port = socket.bind_to_random_port("tcp://127.0.0.1")
            self.sockets[name] = socket
            self._call(
                self.service.upsert_worker,
                {
                    "worker_id": self.ids[name],
                    "endpoint": name,
                    "block_size": 1,
                    "kv_events_endpoint": f"tcp://127.0.0.1:{port}",
                },
            )
        self._connect()

    def _call(self, method: Callable, *args):
        async def call():
            return await method(*args)

        return self.loop.run_until_complete(call())

    def _publish(self, name: str, events: list) -> None:
        """One vLLM KVEventBatch [ts, events, dp_rank] as (topic, sequence number, payload)."""
        payload = self.pack([time.time(), events, 0])
        self.sockets[name].send_multipart([b"", self.seq[name].to_bytes(8, "big"), payload])
        self.seq[name] += 1

    def _flip(self, name: str) -> None:
        self.sentinel[name] = not self.sentinel[name]
        if self.sentinel[name]:
            self._publish(name, [["BlockStored", [SENTINEL_HASH], None, [SENTINEL_TOKEN], 1, None, None]])
        else:
            self._publish(name, [["BlockRemoved", [SENTINEL_HASH], None]])

    def _pending(self) -> set[str]:
        """Workers whose last sentinel flip the service has not applied yet."""
        scores = self._call(self.service.overlap_scores, {"token_ids": [SENTINEL_TOKEN]})
        shown = {self.names[w["worker_id"]]: w["device_blocks"] > 0 for w in scores["workers"]}
        return {name for name in self.sentinel if shown.get(name, False) != self.sentinel[name]}

    def _connect(self, timeout_s: float = 30) -> None:
        """ZMQ drops what a PUB socket sends before the subscriber is connected: store the sentinel until the
        service shows it for every worker."""
        deadline = time.monotonic() + timeout_s
        self.sentinel = dict.fromkeys(self.sentinel, True)
        while waiting := self._pending():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Dynamo never saw the KV events of {sorted(waiting)}")
            for name in waiting:
                self._publish(name, [["BlockStored", [SENTINEL_HASH], None, [SENTINEL_TOKEN], 1, None, None]])
            time.sleep(0.05)

    def _fence(self) -> None:
        """Return once the service has applied every event published so far (a worker's events apply in order)."""
        for name in self.dirty:
            self._flip(name)
        self.dirty.clear()
        while self._pending():
            time.sleep(0.0001)

    def route(self, i: int, ids: list[int], hashes: list[int]) -> tuple[str, str]:
        self.tokens.update(zip(hashes, ids))
        self._fence()
        ticket = f"q{i}"
        chosen = self._call(self.service.select_and_reserve, {"selection_id": ticket, "token_ids": ids})
        return self.names[chosen["worker_id"]], ticket

    def prefilled(self, ticket: str) -> None:
        self._call(self.service.prefill_complete, ticket)

    def finished(self, ticket: str) -> None:
        self._call(self.service.free_reservation, ticket)

    def kv_events(self, batch: KVEventBatch) -> None:
        events: list[list] = []
        for e in batch.kv_events():
            if e.kind is EventKind.STORED:
                tokens = [self.tokens[h] for h in e.block_hashes]
                events.append(["BlockStored", e.block_hashes, e.parent_hash, tokens, 1, None, None])
            elif e.kind is EventKind.REMOVED:
                events.append(["BlockRemoved", e.block_hashes, None])
            else:
                events.append(["AllBlocksCleared"])
        self._publish(batch.worker, events)
        self.dirty.add(batch.worker)

    def close(self) -> None:
        self.service.shutdown()
        for socket in self.sockets.values():
            socket.close(linger=0)


def sweep(
    make_router: Callable, trace: list[dict], sim: SimConfig, weights: list[float], temperatures: list[float]
) -> list[dict]:
    """One replay per (overlap weight, temperature); make_router(names, weight, temperature) builds the router."""
    rows = []
    for weight in weights:
        for temperature in temperatures:
            t0 = time.perf_counter()
            router = make_router(sim.names(), weight, temperature)
            row = run_replay(router, trace, sim)
            if hasattr(router, "close"):
                router.close()
            rows.append(
                {
                    "overlap_weight": weight,
                    "temperature": temperature,
                    "hit_ratio": row["hit_ratio"],
                    "load_max_over_mean": row["load_max_over_mean"],
                    "replay_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps({"router": type(router).__name__, **rows[-1]}), file=sys.stderr, flush=True)
    return rows


def best(rows: list[dict]) -> dict:
    """The setting with the most hits (the better-balanced one on a tie)."""
    return max(rows, key=lambda r: (round(r["hit_ratio"], 6), -r["load_max_over_mean"]))


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def core_router(names: list[str], weight: float, temperature: float) -> CoreRouter:
    config = PolicyConfig(kind=PolicyKind.KV, seed=0, peer_pull=False, overlap_weight=weight, temperature=temperature)
    return CoreRouter(names, config)


def run_dynamo(args: argparse.Namespace, sim: SimConfig, names: list[str]) -> dict:
    """This module under Dynamo's interpreter, same grid and workers; its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dynamo.json"
        cmd = [
            args.dynamo_python,
            "-m",
            "bench.dynamo_router",
            "--traces",
            ",".join(names),
            "--weights",
            args.weights,
            "--temperatures",
            args.temperatures,
            "--sim",
            json.dumps(asdict(sim)),
            "--out",
            str(out),
        ]
        subprocess.run(cmd + (["--limit", str(args.limit)] if args.limit else []), cwd=REPO, check=True)
        return json.loads(out.read_text())


def compare(args: argparse.Namespace) -> dict:
    """bench.router --grid / --dynamo-python: our router and Dynamo's over the same grid, same workers."""
    sim = SimConfig(args.workers, args.blocks, args.prefill_tok_s, args.tpot_ms)
    names = args.traces.split(",")
    dynamo = run_dynamo(args, sim, names) if args.dynamo_python else None
    results: dict[str, Any] = {"cpu": cpu_model(), "sim": asdict(sim), "traces": {}}
    if dynamo:
        results["dynamo"] = {k: v for k, v in dynamo.items() if k != "traces"}
    for name in names:
        trace = load_trace(TRACES / name, args.limit)
        ours = sweep(core_router, trace, sim, floats(args.weights), floats(args.temperatures))
        theirs = dynamo["traces"][name] if dynamo else []
        table = [
            {
                "weight": r["overlap_weight"],
                "temp": r["temperature"],
                "ours hit": r["hit_ratio"],
                "ours load": r["load_max_over_mean"],
            }
            for r in ours
        ]
        for row, d in zip(table, theirs):
            row.update({"dynamo hit": d["hit_ratio"], "dynamo load": d["load_max_over_mean"]})
        print_table(table, f"{name} ({len(trace)} requests): device only, {sim.workers} workers x {sim.blocks} blocks")
        entry = {
            "requests": len(trace),
            "oracle": oracle(trace)["hit_ratio"],
            "disagg": ours,
            "best": {"disagg": best(ours)},
        }
        if theirs:
            entry["dynamo"], entry["best"]["dynamo"] = theirs, best(theirs)
        print_table([{"router": k, **v} for k, v in entry["best"].items()], f"{name}: each router at its best")
        results["traces"][name] = entry
    return results


@dataclass
class DynamoSideOptions:
    traces: str = field(metadata={"help": "trace file names, comma-separated"})
    out: str = field(metadata={"help": "JSON file the results go to"})
    sim: str = field(default="{}", metadata={"help": "SimConfig fields as JSON"})


def main(argv: list[str] | None = None) -> None:
    """Dynamo's side (run by compare() under Dynamo's interpreter): the grid through DynamoRouter, as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, DynamoSideOptions)
    add_options(parser, GridOptions)
    args = parser.parse_args(argv)
    os.environ.setdefault("DYN_LOG", "error")  # the service logs every selection at info
    sim = SimConfig(**json.loads(args.sim))
    loop = asyncio.new_event_loop()
    results: dict[str, Any] = {
        "version": version("ai-dynamo-runtime"),
        "router": "dynamo.llm.SelectionService (DefaultWorkerSelector)",
        "traces": {},
    }
    for name in args.traces.split(","):
        trace = load_trace(TRACES / name, args.limit)
        make = lambda names, weight, temperature: DynamoRouter(names, weight, temperature, loop)
        results["traces"][name] = sweep(make, trace, sim, floats(args.weights), floats(args.temperatures))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
