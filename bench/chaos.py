"""`disagg bench chaos`: replay one workload twice against one cluster - clean, then while faults are injected on
a schedule - and report, per fault: requests lost, outputs that differ from the clean run (a wrong, missing or
duplicated token changes the text), latency the fault added to the requests it touched, the longest stall they
saw, time until the faulted worker was out of routing and until it served again (the end of the first request
that started after the fault and succeeded through it - not the READY event, also reported - against a worker's
measured cold start), router endpoint downtime, and the blocks, leases or adopted blocks left over at the end.
Each fault kind is injected --injections times (default 3); `by_kind` gives the median and the worst.

Faults: kill-decode / kill-prefill (SIGKILL of the worker process), stop-decode / stop-prefill (SIGSTOP: a hung
process the supervisor must detect and kill), kill-router (SIGKILL of the router actor), read-fail / read-hang
(NIXL reads on a decode worker fail, or hang past their deadline, via the worker's fault-injection transport);
silent faults on a decode (or aggregated) worker: corrupt-weights, nan-logits, slow-5x (bench/chaos_silent.py:
injected into the running worker; detected by the canaries, the per-step checks, the gray-failure detector).
The workload is greedy with ignore_eos, so the clean run is the reference for every output.  The health events
that took a worker out of routing with no fault to explain them are counted (`false_outs`: on the clean run,
every one is a false positive of the detectors).

    disagg bench chaos --agent coding_agent --sessions 6 --session-rate 0.5 --prefill 1 --decode 2 \\
        --faults kill-decode,kill-prefill,stop-decode,read-fail,read-hang,kill-router --out bench/results/chaos
    disagg bench chaos --agent short_chat --prefill 0 --decode 3 --canary --gray-failures \\
        --faults corrupt-weights,nan-logits,slow-5x --out bench/results/chaos_silent     # (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench.chaos_silent import (
    CHAOS_CANARY,
    DETECT_GOAL_S,
    SILENT_FAULTS,
    await_silent,
    check_detectors,
    healthy_outs,
    inject_silent,
    is_silent,
    wrong_after_detection,
)
from bench.replay import ReplayResult, add_replay_args, replay, replay_config
from disagg.config import EngineConfig
from disagg.options import add_options, from_options
from disagg.router.canary import CanaryConfig
from disagg.router.outliers import OutlierConfig
from disagg.router.watch import SilentConfig
from disagg.stats import RouterCounters, WorkerStats
from disagg.workload.metrics import RequestRecord, percentile
from disagg.workload.options import load_workload

FAULTS = (
    "kill-decode",
    "kill-prefill",
    "stop-decode",
    "stop-prefill",
    "kill-router",
    "read-fail",
    "read-hang",
    *SILENT_FAULTS,
)
_CANARY = ("enabled", "idle_interval_s", "busy_interval_s")  # the canary / gray-failure options (as disagg serve's)
_OUTLIERS = ("enabled", "ratio")

# KV cache per worker, MiB: the size the published chaos results were measured at (docs/benchmarks.md, "128 MiB
# KV"), so reruns compare. Half the lab's LAB_KV_CACHE_MB: a chaos run holds 1 prefill + 2 decode workers and
# the router on a 2-core box and starts replacements for killed workers mid-run (their cache allocation is part
# of the measured cold start). The commit that chose it (b125d88) gives no reason; this is the likely one.
CHAOS_KV_CACHE_MB = 128


@dataclass
class ChaosOptions:
    """`disagg bench chaos`'s own settings (the engine's come from EngineConfig, the workload's from bench.replay)."""

    prefill: int = field(default=1, metadata={"help": "prefill workers"})
    decode: int = field(default=2, metadata={"help": "decode workers"})
    faults: str = field(
        default="kill-decode,kill-prefill,stop-decode,read-fail,read-hang,kill-router",
        metadata={"help": f"comma-separated fault kinds ({', '.join(FAULTS)})"},
    )
    fault_interval: float = field(default=20.0, metadata={"help": "seconds between faults"})
    injections: int = field(default=3, metadata={"help": "times each fault kind is injected"})
    recovery_timeout: float = field(default=90.0, metadata={"help": "seconds to wait for a fault's recovery"})
    read_timeout: float = field(default=3.0, metadata={"help": "workers' KV read deadline"})
    settle: float = field(default=30.0, metadata={"help": "seconds to wait for blocks to come back"})
    threads: int = field(default=1, metadata={"help": "compute threads per worker"})
    out: str = field(default="bench/results/chaos", metadata={"help": "output directory"})


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # wall clock
    out_of_routing_s: float | None = None
    ready_s: float | None = None  # the router's READY event for the restarted worker
    serving_again_s: float | None = None  # the first successful request served through it after the fault
    endpoint_back_s: float | None = None
    note: str = ""


@dataclass
class Observer:
    """Polls the router for health events and routing decisions (they live in the router process, which a
    kill-router fault wipes: what was seen before is kept here)."""

    router: Any
    interval_s: float = 0.25
    events: dict[tuple, dict] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)  # each worker's health state at the last poll
    silent: dict[str, Any] | None = None  # the router's silent-failure watch counts at the last poll (None: off)
    decisions: dict[str, list[dict]] = field(default_factory=dict)
    counters: RouterCounters = field(default_factory=RouterCounters)  # summed over router restarts
    _last: RouterCounters = field(default_factory=RouterCounters)
    _base: RouterCounters = field(default_factory=RouterCounters)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, name="chaos-observer", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.interval_s):
            try:
                health = ray.get(self.router.health.remote(), timeout=2)
                decisions = ray.get(self.router.decisions.remote(2000), timeout=2)
            except (ray.exceptions.RayError, TimeoutError):
                continue  # the router is down or restarting
            for e in health["events"]:
                self.events[(e["worker"], e["state"], e["wall_time"])] = e
            self.states = {name: w["state"] for name, w in health["workers"].items()}
            self.silent = health.get("silent")
            now = RouterCounters.from_wire(health["counters"])
            if _dropped(now, self._last):  # a restarted router counts from 0 again
                self._base = _summed(self._base, self._last)
            self._last = now
            self.counters = _summed(self._base, now)
            seen: dict[str, int] = {}
            for d in decisions:
                rid = d["request_id"]
                seen[rid] = seen.get(rid, 0) + 1
                entries = self.decisions.setdefault(rid, [])
                if len(entries) < seen[rid]:
                    entries.append(d)

    def first_event(self, worker: str, state: str, after: float) -> float | None:
        times = [t for (w, s, t) in self.events if w == worker and s == state and t >= after]
        return min(times) if times else None


def _signal(actor: Any, sig: signal.Signals) -> int:
    import ray

    pid = ray.get(actor.pid.remote(), timeout=10)
    os.kill(pid, sig)
    return pid


def inject(kind: str, service: Any, rng: random.Random, hang_s: float, states: dict[str, str] | None = None) -> Fault:
    """Inject one fault on a worker of the kind's role (silent kinds: a READY one, per `states`, the router's
    health view, so that a drained or restarting worker is not chosen)."""
    import ray

    cluster = service.cluster
    role = "prefill" if kind.endswith("prefill") else "decode"
    pool = cluster.prefill_by_name if role == "prefill" else cluster.decode_by_name
    if kind == "kill-router":
        fault = Fault(kind, "router", time.time())
        _signal(service.router, signal.SIGKILL)
        return fault
    if not pool:
        raise ValueError(f"{kind}: this cluster has no {role} worker")
    ready = [n for n in sorted(pool) if not is_silent(kind) or (states or {}).get(n, "ready") == "ready"]
    name = rng.choice(ready or sorted(pool))
    fault = Fault(kind, name, time.time())
    if is_silent(kind):
        inject_silent(kind, pool[name])
    elif kind.startswith("kill"):
        _signal(pool[name], signal.SIGKILL)
    elif kind.startswith("stop"):
        _signal(pool[name], signal.SIGSTOP)
    elif kind == "read-fail":
        ray.get(pool[name].inject_fault.remote("read_fail", 3), timeout=10)
    elif kind == "read-hang":
        ray.get(pool[name].inject_fault.remote("read_hang", 2, hang_s), timeout=10)
    else:
        raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
    return fault


def await_recovery(fault: Fault, service: Any, observer: Observer, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    if fault.kind == "kill-router":
        while time.time() < deadline:
            try:
                if httpx.get(f"{service.url}/livez", timeout=0.5).status_code == 200:
                    fault.endpoint_back_s = time.time() - fault.at
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        fault.note = "endpoint not back in time"
        return
    if fault.kind.startswith("read"):
        return  # the worker stays in routing; the requests fall back
    if is_silent(fault.kind):
        await_silent(fault, service.cluster.workers_by_name[fault.target], observer, timeout_s)
        return
    while time.time() < deadline:
        dead = observer.first_event(fault.target, "dead", fault.at)
        ready = observer.first_event(fault.target, "ready", dead) if dead is not None else None
        if dead is not None:
            fault.out_of_routing_s = dead - fault.at
        if ready is not None:  # routable again; "serving again" is the first request it then serves (analyse)
            fault.ready_s = ready - fault.at
            return
        time.sleep(0.1)
    fault.note = "worker not back in time"


def measure_cold_start(service: Any) -> float:
    """Seconds for a fresh worker actor (same engine) to load and answer ready()."""
    import ray

    from disagg.cluster.actors import AggregatedWorker
    from disagg.cluster.worker_config import WorkerConfig

    t0 = time.perf_counter()
    probe = AggregatedWorker.options(max_restarts=0).remote(  # type: ignore[attr-defined]  # added by @ray.remote
        WorkerConfig("cold-start-probe", engine=service.cluster.config.engine, tiers=None).to_wire()
    )
    ray.get(probe.ready.remote(), timeout=300)
    elapsed = time.perf_counter() - t0
    ray.kill(probe)
    return elapsed


def _affected(
    fault: Fault,
    records: list[RequestRecord],
    started_at: float,
    observer: Observer,
    window_s: float,
    expected_e2e: dict[int, float],
) -> list[RequestRecord]:
    """Requests in flight between the fault and the moment the target was out of routing (or, for read faults,
    within `window_s` of it) that were routed through the target.  A failed request is in flight for as long as
    the clean run took to serve it (`expected_e2e`), not forever (or it is charged to every later fault)."""
    t = fault.at - started_at
    reads = fault.kind.startswith("read")
    if not reads:
        window_s = (fault.out_of_routing_s or fault.endpoint_back_s or 2.0) + 0.5
    out = []
    for r in records:
        end = r.start_s + (r.e2e_s if r.e2e_s is not None else expected_e2e.get(r.index, 0.0))
        if reads:  # injected read faults hit reads that start after the injection: disaggregated requests
            if not t <= r.start_s <= t + window_s:
                continue
        elif not (r.start_s <= t + window_s and end >= t):
            continue
        routes = observer.decisions.get(r.request_id or "", [])
        if fault.target == "router":
            out.append(r)
        elif reads and any(d["decode"] == fault.target and d["prefill"] for d in routes):
            out.append(r)
        elif not reads and any(fault.target in (d["decode"], d["prefill"], d.get("peer")) for d in routes):
            out.append(r)
    return out


def analyse(
    faults: list[Fault],
    clean: ReplayResult,
    faulted: ReplayResult,
    observer: Observer,
    cold_start_s: float | None,
    window_s: float,
) -> list[dict[str, Any]]:
    reference = {r.index: r for r in clean.records}
    rows = []
    for k, fault in enumerate(faults):
        next_at = faults[k + 1].at if k + 1 < len(faults) else None
        hit = _affected(
            fault,
            faulted.records,
            faulted.started_at,
            observer,
            window_s,
            {i: r.e2e_s for i, r in reference.items() if r.e2e_s is not None},
        )
        lost = [r for r in hit if not r.ok]
        wrong = [r for r in hit if r.ok and r.text != reference[r.index].text]
        added = [
            e2e - ref_e2e
            for r in hit
            if r.ok
            and reference[r.index].ok
            and (e2e := r.e2e_s) is not None
            and (ref_e2e := reference[r.index].e2e_s) is not None
        ]
        stall = [max(r.itl_s, default=0.0) for r in hit if r.ok]
        # what re-prefilling prompt + output costs, estimated from the clean run's TTFT for the prompt alone
        over = [
            max(r.itl_s, default=0.0) - ref_ttft * (r.prompt_tokens + r.output_tokens) / max(1, r.prompt_tokens)
            for r in hit
            if r.ok and (ref_ttft := reference[r.index].ttft_s) is not None
        ]
        rows.append(
            {
                "fault": fault.kind,
                "target": fault.target,
                "affected": len(hit),
                "lost": len(lost),
                "wrong_output": len(wrong),
                "added_latency_p50_ms": percentile(added, 50) * 1000,
                "added_latency_p99_ms": percentile(added, 99) * 1000,
                "max_stall_p99_ms": percentile(stall, 99) * 1000,
                "stall_over_reprefill_p99_ms": percentile(over, 99) * 1000,
                "out_of_routing_s": fault.out_of_routing_s,
                "ready_s": fault.ready_s,
                "serving_again_s": fault.serving_again_s,
                "cold_start_s": cold_start_s if fault.serving_again_s is not None else None,
                "endpoint_back_s": fault.endpoint_back_s,
                # silent faults: the goal on out_of_routing_s, and wrong outputs among requests started after it
                "detect_goal_s": DETECT_GOAL_S.get(fault.kind),
                "wrong_after_detection": (
                    wrong_after_detection(fault, next_at, faulted.records, faulted.started_at, reference)
                    if is_silent(fault.kind)
                    else None
                ),
                "note": fault.note,
            }
        )
    return rows


def serving_again(fault: Fault, records: list[RequestRecord], started_at: float, observer: Observer) -> float | None:
    """Seconds from the fault to the end of the first request that started after it, succeeded, and was served
    through the faulted worker (its last routing decision names it) - or, for the router, through the endpoint.
    None for read faults (the worker never leaves routing) or when no such request came."""
    if fault.kind.startswith("read"):
        return None
    # routed to it before its death was seen: such requests fell back or migrated; count only later ones
    since = fault.at + (fault.out_of_routing_s or 0.0)
    ends = []
    for r in records:
        if not r.ok or started_at + r.start_s < since:
            continue
        routes = observer.decisions.get(r.request_id or "", [])
        if fault.target == "router" or (routes and fault.target in (routes[-1]["decode"], routes[-1]["prefill"])):
            ends.append(started_at + r.start_s + (r.e2e_s or 0.0))
    return min(ends) - fault.at if ends else None


def by_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per fault kind, over its injections: how many, the median and the worst of each recovery figure, and the
    total lost / wrong (None where no injection produced the figure)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(r["fault"] for r in rows):
        mine = [r for r in rows if r["fault"] == kind]
        entry: dict[str, Any] = {
            "injections": len(mine),
            "lost": sum(r["lost"] for r in mine),
            "wrong_output": sum(r["wrong_output"] for r in mine),
        }
        for key in ("out_of_routing_s", "ready_s", "serving_again_s", "endpoint_back_s", "max_stall_p99_ms"):
            values = [r[key] for r in mine if r.get(key) is not None and r[key] == r[key]]
            entry[key] = (
                {"median": statistics.median(values), "worst": max(values), "n": len(values)} if values else None
            )
        if is_silent(kind):  # detected at all, and within the goal; wrong outputs after detection
            goal = DETECT_GOAL_S.get(kind)
            detected = [r["out_of_routing_s"] for r in mine if r.get("out_of_routing_s") is not None]
            entry["detected"] = len(detected)
            entry["within_goal"] = None if goal is None else sum(t <= goal for t in detected)
            entry["wrong_after_detection"] = sum(r.get("wrong_after_detection") or 0 for r in mine)
        out[kind] = entry
    return out


def _summed(a: RouterCounters, b: RouterCounters) -> RouterCounters:
    roles = {old: dict(to) for old, to in a.role_changes.items()}
    for old, to in b.role_changes.items():
        for new, n in to.items():
            roles.setdefault(old, {})[new] = roles.get(old, {}).get(new, 0) + n
    paths = {k: a.paths.get(k, 0) + b.paths.get(k, 0) for k in {**a.paths, **b.paths}}
    fallbacks = {k: a.fallbacks.get(k, 0) + b.fallbacks.get(k, 0) for k in {**a.fallbacks, **b.fallbacks}}
    return RouterCounters(a.migrations + b.migrations, paths, fallbacks, roles)


def _dropped(now: RouterCounters, before: RouterCounters) -> bool:
    """Whether some count went down: the router restarted (its counts start from 0 again)."""
    return (
        now.migrations < before.migrations
        or any(now.paths.get(k, 0) < n for k, n in before.paths.items())
        or any(now.fallbacks.get(k, 0) < n for k, n in before.fallbacks.items())
    )


def leftovers(service: Any, settle_s: float) -> list[dict[str, Any]]:
    """Each worker's blocks held, leases and adopted blocks once the run has drained (0 everywhere = no leak)."""
    import ray

    deadline = time.time() + settle_s
    while True:
        workers = service.cluster.workers_by_name
        answers = ray.get([w.stats.remote() for w in workers.values()], timeout=60)
        stats = {name: WorkerStats.from_wire(a) for name, a in zip(workers, answers)}
        rows = [
            {
                "worker": name,
                "blocks_held": s.kv_blocks_total - s.kv_blocks_free,
                "leases": s.leases,
                "adopted_blocks": s.adopted_blocks,
                "running": s.running,
            }
            for name, s in stats.items()
        ]
        if all(not (r["blocks_held"] or r["leases"] or r["adopted_blocks"]) for r in rows) or time.time() > deadline:
            return rows
        time.sleep(0.5)


def _silent_config(args: argparse.Namespace) -> SilentConfig:
    """The canaries and the gray-failure detector as the options ask (`disagg serve`'s options, the bench's pace)."""
    return SilentConfig(
        canary=from_options(CanaryConfig, args, prefix="canary-", only=_CANARY),
        outliers=from_options(OutlierConfig, args, prefix="outliers-", only=_OUTLIERS),
    )


def run_chaos(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from bench.compare import _warm, model_vocab_size
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.kv.tier_config import TierConfig
    from disagg.model_store import default_model_dir
    from disagg.router.policy import PolicyConfig, PolicyKind

    model = args.model or str(default_model_dir())
    args.vocab_size = model_vocab_size(model)
    trace, scale, workload = load_workload(args)
    engine = {
        "model": model,
        "kv_cache_memory_mb": args.kv_cache_memory_mb,
        "max_model_len": args.max_model_len,
        "num_threads": args.threads,
    }
    kinds = [f for f in args.faults.split(",") if f]
    faults_wanted = kinds * args.injections  # every kind injected --injections times, the kinds interleaved
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    silent = _silent_config(args)
    check_detectors(kinds, silent.canary.enabled, silent.outliers.enabled)
    service = Service(
        ClusterConfig(
            num_prefill=args.prefill,
            num_decode=args.decode,
            engine=EngineConfig(**engine),
            transport_wrapper="tests.fake_transport:FaultyTransport",
            transfer_timeout_s=args.read_timeout,
            tiers=TierConfig(disk_root=tempfile.mkdtemp(prefix="chaos-kv-")),
            allow_fault_injection=any(is_silent(k) for k in kinds),  # the workers take set_faults orders
        ),
        RouterConfig(policy=PolicyConfig(kind=PolicyKind.KV, min_remote_prefill_tokens=16), silent=silent),
    )
    observer = Observer(service.router)
    try:
        # a worker's cold start is the yardstick of the restart figures of process faults; silent ones need none
        cold_start = measure_cold_start(service) if not all(is_silent(k) for k in kinds) else None
        _warm(service.url, args.vocab_size, args.prefill + args.decode)
        cfg = replace(replay_config(args, service.url, scale), record_text=True)
        observer.start()  # from the clean run on: a worker taken out of routing there is a false positive
        clean_from = time.time()
        clean = asyncio.run(replay(trace, cfg))
        clean_to = time.time()
        box: dict[str, ReplayResult] = {}
        runner = threading.Thread(target=lambda: box.setdefault("r", asyncio.run(replay(trace, cfg))))
        runner.start()
        rng, faults, t0 = random.Random(args.seed), [], time.time()
        for k, kind in enumerate(faults_wanted):
            time.sleep(max(0.0, t0 + (k + 1) * args.fault_interval - time.time()))
            if not runner.is_alive():
                break
            fault = inject(kind, service, rng, args.read_timeout * 3, observer.states)
            print(f"[chaos] {kind} on {fault.target}", flush=True)
            await_recovery(fault, service, observer, args.recovery_timeout)
            faults.append(fault)
        runner.join()
        time.sleep(1.0)
        observer.stop()
        faulted = box["r"]
        for fault in faults:
            fault.serving_again_s = serving_again(fault, faulted.records, faulted.started_at, observer)
        rows = analyse(faults, clean, faulted, observer, cold_start, args.read_timeout * 2)
        reference = {r.index: r for r in clean.records}
        events = list(observer.events.values())
        summary = {
            "requests": len(faulted.records),
            "lost": sum(not r.ok for r in faulted.records),
            "wrong_output": sum(r.ok and r.text != reference[r.index].text for r in faulted.records),
            "clean_failed": sum(not r.ok for r in clean.records),
            "migrations": observer.counters.migrations,
            "fallbacks": {f"fallback:{k.value}": n for k, n in observer.counters.fallbacks.items()},
            "cold_start_s": cold_start,
            "silent_watch": observer.silent,  # canaries judged, workers condemned, drains (one router's life)
            # out of routing with no fault to explain it: on the clean run, the detectors' false positives
            "false_outs_clean": healthy_outs(events, [], clean_from, clean_to, 0.0),
            "false_outs_faulted": healthy_outs(events, faults, t0, time.time(), args.recovery_timeout),
        }
        return {
            "workload": workload,
            "scale": scale.describe(),
            "faults": rows,
            "by_kind": by_kind(rows),
            "summary": summary,
            "leftovers": leftovers(service, args.settle),
            "settings": {
                "prefill": args.prefill,
                "decode": args.decode,
                "fault_interval": args.fault_interval,
                "read_timeout": args.read_timeout,
                "engine": {**engine, "model": Path(model).name},  # the folder, not this machine's path
                "silent": {"canary": vars(silent.canary), "outliers": vars(silent.outliers)},
            },
        }
    finally:
        observer.stop()
        service.shutdown()
        ray.shutdown()


def markdown(result: dict[str, Any]) -> str:
    cols = [
        "fault",
        "target",
        "affected",
        "lost",
        "wrong_output",
        "added_latency_p50_ms",
        "added_latency_p99_ms",
        "max_stall_p99_ms",
        "stall_over_reprefill_p99_ms",
        "out_of_routing_s",
        "ready_s",
        "serving_again_s",
        "cold_start_s",
        "endpoint_back_s",
        "detect_goal_s",
        "wrong_after_detection",
    ]

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in result["faults"]]
    lines += _silent_table(result["by_kind"], fmt)
    s = result["summary"]
    lines += [
        "",
        f"Whole run: {s['requests']} requests, {s['lost']} lost, {s['wrong_output']} with an output that "
        f"differs from the clean run; {s['migrations']:.0f} migrations; fallbacks {s['fallbacks']}.",
        "Leftovers after draining: "
        + ", ".join(
            f"{r['worker']}: {r['blocks_held']} blocks, {r['leases']} leases, {r['adopted_blocks']} adopted"
            for r in result["leftovers"]
        ),
        f"Workers out of routing with no fault to explain it: {len(s['false_outs_clean'])} on the clean run, "
        f"{len(s['false_outs_faulted'])} on the faulted run.",
    ]
    return "\n".join(lines)


def _silent_table(kinds: dict[str, dict[str, Any]], fmt: Any) -> list[str]:
    """The fault table of the silent kinds: detection median (worst), goal, wrong outputs, lost."""
    rows = []
    for kind, e in kinds.items():
        if not is_silent(kind):
            continue
        t = e["out_of_routing_s"]
        detect = f"{fmt(t['median'])} ({fmt(t['worst'])})" if t else "-"
        rows.append(
            f"| {kind} | {e['injections']} | {e['detected']} | {detect} | {fmt(DETECT_GOAL_S.get(kind))} | "
            f"{fmt(e['within_goal'])} | {e['wrong_output']} | {e['wrong_after_detection']} | {e['lost']} |"
        )
    if not rows:
        return []
    head = (
        "| fault | injections | detected | out of routing s, median (worst) | goal s | within goal | "
        "wrong served (before detection) | wrong served after detection | lost |"
    )
    return ["", head, "|---|" + "---:|" * 8, *rows]


def passed(result: dict[str, Any]) -> bool:
    """No request lost; no wrong output but the corrupted worker's before its detection; none after it; no
    worker out of routing without a fault to explain it."""
    s, rows = result["summary"], result["faults"]
    explained = sum(r["wrong_output"] for r in rows if r["fault"] == "corrupt-weights")
    after = sum(r.get("wrong_after_detection") or 0 for r in rows)
    false_outs = s["false_outs_clean"] or s["false_outs_faulted"]
    return s["lost"] == 0 and s["wrong_output"] <= explained and after == 0 and not false_outs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg bench chaos", description=__doc__.splitlines()[0])
    add_options(parser, ChaosOptions)
    add_options(
        parser,
        EngineConfig,
        only=("model", "kv_cache_memory_mb", "max_model_len"),
        defaults={"kv_cache_memory_mb": CHAOS_KV_CACHE_MB},  # see CHAOS_KV_CACHE_MB
    )
    # silent faults' detectors: off unless asked (as in `disagg serve`), at the bench's canary pace (CHAOS_CANARY)
    add_options(parser, CanaryConfig, prefix="canary-", only=_CANARY, defaults=CHAOS_CANARY)
    add_options(parser, OutlierConfig, prefix="outliers-", only=_OUTLIERS)
    add_replay_args(parser)
    args = parser.parse_args(argv)
    if args.max_output_tokens is None:
        args.max_output_tokens = 64
    if args.max_input_tokens is None:
        args.max_input_tokens = args.max_model_len - args.max_output_tokens - 1
    result = run_chaos(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return 0 if passed(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
