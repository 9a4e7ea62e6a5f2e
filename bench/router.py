"""Router benchmark: decision latency at scale, and prefix-hit ratio of routing policies on real traces.

1. Latency: RouterCore.route() (block hashing + index match + policy) with 64 workers and 100k indexed blocks.
2. Hit ratio: the Mooncake traces replayed through the real RouterCore (same index and policy code) in front of
   simulated workers: each has a real BlockPool (LRU prefix cache of --blocks blocks, one block per trace
   hash_id) and publishes real KV events to the router; no model runs.  A request holds its blocks while in
   flight for a simple time model (prefill --prefill-tok-s tokens/s over its uncached part, --tpot-ms per output
   token), so load terms in the policy see real concurrency.  The oracle is an infinite cache shared by all.

    .venv/bin/python -m bench.router
"""
from __future__ import annotations

import argparse
import heapq
import json
import random
import time
from pathlib import Path

from bench.common import emit, percentile, print_table
from disagg.engine.block_pool import BlockPool, NoFreeBlocksError
from disagg.protocol import KVEvent, KVEventBatch, Request, hash_prompt_blocks
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces"


def bench_latency(num_workers: int, num_blocks: int, decisions: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    names = [f"w{i}" for i in range(num_workers)]
    core = RouterCore({}, {n: None for n in names}, block_size=16)
    chain_len = 50
    chains = []
    seq = {n: 0 for n in names}
    for c in range(num_blocks // chain_len):
        tokens = [rng.randrange(50_000) for _ in range(chain_len * 16)]
        chains.append(tokens)
        hashes = hash_prompt_blocks(tokens, 16)
        for w in rng.sample(names, rng.randint(1, 3)):
            core.on_kv_events(KVEventBatch.of(w, seq[w], [KVEvent("stored", hashes)]))
            seq[w] += 1
    with_hash, index_only = [], []
    for i in range(decisions):
        chain = rng.choice(chains)
        prompt = chain[:16 * rng.randint(1, chain_len)] + [rng.randrange(50_000) for _ in range(rng.randint(1, 40))]
        request = Request(f"r{i}", prompt)
        t0 = time.perf_counter()
        core.route(request)
        with_hash.append(time.perf_counter() - t0)
        hashes = hash_prompt_blocks(prompt, 16)
        t0 = time.perf_counter()
        matches = core.index.match(hashes)
        core.policy.choose(len(prompt), matches, [core.loads[n] for n in names], [])
        index_only.append(time.perf_counter() - t0)
    return {"workers": num_workers, "indexed_blocks": core.index.num_blocks, "decisions": decisions,
            "p50_us": percentile(with_hash, 50) * 1e6, "p99_us": percentile(with_hash, 99) * 1e6,
            "p50_us_excl_hashing": percentile(index_only, 50) * 1e6,
            "p99_us_excl_hashing": percentile(index_only, 99) * 1e6}


def load_trace(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.open()]
    return rows[:limit] if limit else rows


class SimWorker:
    """A worker stand-in: real block pool and KV events, no model."""

    def __init__(self, name: str, num_blocks: int) -> None:
        self.name, self.pool, self.seq_no = name, BlockPool(num_blocks), -1

    def admit(self, hashes: list[int]) -> tuple[int, list[int]]:
        hits = self.pool.lookup_prefix(hashes)
        self.pool.touch(hits)
        try:
            fresh = self.pool.allocate(len(hashes) - len(hits))
        except NoFreeBlocksError:  # everything is in flight: serve uncached, cache nothing
            return len(hits), hits
        parent = hashes[len(hits) - 1] if hits else None
        self.pool.cache_blocks(fresh, hashes[len(hits):], parent)
        return len(hits), hits + fresh

    def events(self) -> KVEventBatch | None:
        events = self.pool.drain_events()
        if not events:
            return None
        self.seq_no += 1
        return KVEventBatch.of(self.name, self.seq_no, events)


def replay(trace: list[dict], policy: str, num_workers: int, blocks_per_worker: int, prefill_tok_s: float,
           tpot_ms: float, block_tokens: int = 512) -> dict:
    workers = {f"w{i}": SimWorker(f"w{i}", blocks_per_worker) for i in range(num_workers)}
    core = RouterCore({}, {n: None for n in workers}, PolicyConfig(kind=policy, seed=0), block_size=1)
    in_flight: list[tuple[float, int, str, list[int], int]] = []
    total = hit = 0
    for i, row in enumerate(trace):
        now = row["timestamp"] / 1000
        while in_flight and in_flight[0][0] <= now:
            _, _, name, blocks, n = heapq.heappop(in_flight)
            workers[name].pool.free(blocks)
            load = core.loads[name]
            load.active_requests -= 1
            load.active_blocks -= n
        ids = row["hash_ids"]  # one id per 512-token block; as "tokens" with block_size=1 each is one block
        decision = core.route(Request(f"q{i}", ids))
        worker = workers[decision.decode_worker]
        n_hit, blocks = worker.admit(hash_prompt_blocks(ids, 1))  # the router's chained hashes, as a worker has
        hashes = ids
        batch = worker.events()
        if batch is not None:
            core.on_kv_events(batch)
        total += len(hashes)
        hit += n_hit
        uncached_tokens = max(0, row["input_length"] - n_hit * block_tokens)
        duration = uncached_tokens / prefill_tok_s + row["output_length"] * tpot_ms / 1000
        load = core.loads[decision.decode_worker]
        load.active_requests += 1
        load.active_blocks += len(blocks)
        heapq.heappush(in_flight, (now + duration, i, decision.decode_worker, blocks, len(blocks)))
    return {"policy": policy, "hit_ratio": hit / total}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4096, help="prefix-cache blocks per simulated worker")
    parser.add_argument("--prefill-tok-s", type=float, default=20_000)
    parser.add_argument("--tpot-ms", type=float, default=30)
    parser.add_argument("--limit", type=int, default=None, help="first N requests of each trace")
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--out", default="bench/results/router.json")
    args = parser.parse_args()

    latency = bench_latency(64, 100_000, args.decisions)
    print_table([latency], "routing decision latency (RouterCore.route)")
    results = {"latency": latency, "hit_ratio": {}}
    for name in ("mooncake_conversation_trace.jsonl", "mooncake_synthetic_trace.jsonl"):
        trace = load_trace(TRACES / name, args.limit)
        rows = [replay(trace, p, args.workers, args.blocks, args.prefill_tok_s, args.tpot_ms)
                for p in ("kv", "round_robin", "least_loaded")] + [oracle(trace)]
        rr = rows[1]["hit_ratio"]
        for row in rows:
            row["vs_round_robin"] = row["hit_ratio"] / rr if rr else float("nan")
        print_table(rows, f"prefix-hit ratio, {name} ({len(trace)} requests, {args.workers} workers x "
                          f"{args.blocks} blocks)")
        results["hit_ratio"][name] = rows
    results["settings"] = vars(args)
    emit(results, args.out)


if __name__ == "__main__":
    main()
