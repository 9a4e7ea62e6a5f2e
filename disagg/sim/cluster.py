"""A simulated cluster in virtual time: engines with the real block pool, scheduler, KV events and KV handoff
(leases, import of only the missing blocks), a stand-in runner priced by a StepTimeModel, and the real
RouterCore deciding every request from the KV events the workers publish.

The workers, their event loop and the priced peer read are in sim/worker.py; each request is the router's own
Flight (router/flight.py), driven by sim/flights.py: a disaggregated request is prefilled (its first token, blocks
leased) on a prefill worker, then handed to the decode worker's engine with the prefill result, exactly as the
real worker does - its KV connector reads the missing blocks through a SimPeerSource priced at the model's
transfer bandwidth, then emits the first token.  Kills, restarts and role changes happen here.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.model_store import DEFAULT_VOCAB_SIZE
from disagg.planner.policy import PlannerConfig
from disagg.protocol import Request, SamplingParams, TokenDelta
from disagg.router.admission import AdmissionConfig, CapacityConfig
from disagg.router.decision import Decision
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore, RouterCoreConfig
from disagg.sim.admission import SimAdmission
from disagg.sim.cores import CoresConfig, SharedCores, SharedSteps
from disagg.sim.flights import SimFlights
from disagg.sim.runner import SimRunner, sim_model_config
from disagg.sim.tiers import SimTiers
from disagg.sim.timemodel import StepTimeModel
from disagg.sim.worker import EventLoop, SimPeerSource, SimWorker


@dataclass
class SimClusterConfig:
    num_prefill: int = 0  # 0: aggregated workers
    num_decode: int = 16
    # the router's policy; an unseeded one is seeded 0 here: ties between equal workers are broken at random, and
    # an unseeded draw made runs differ (the first request's worker)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    num_blocks: int = 4096  # KV blocks per worker
    block_size: int = EngineConfig.block_size
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    prefill_chunk_target_ms: float = 0.0  # EngineConfig's: 0, fixed chunks
    max_model_len: int = 2048
    vocab_size: int = DEFAULT_VOCAB_SIZE
    event_delay_s: float = 0.001  # KV events reach the router this long after the step that made them ...
    event_jitter_s: float = 0.0  # ... plus up to this much more (independently per batch: batches can reorder,
    # and a gap makes the router take a snapshot, as the real router actor does)
    snapshot_delay_s: float = 0.05  # the blocking snapshot pull a gap triggers
    heartbeat_interval_s: float = 0.2  # the router's health probe (HealthConfig): KV size and prefill speed
    link_contention: bool = True  # KV reads into one worker share its link (one at a time)
    cores: int = 0  # CPU cores the workers share (0: each worker has its own); steps stretch when oversubscribed
    threads_per_worker: int = 1
    corun_slowdown: float = 1.0  # with shared cores: a step's factor while another worker computes (sim/cores.py)
    corun_by_tokens: tuple[tuple[int, float], ...] = ()  # ... by the step's size: (max tokens, factor) pairs
    busy_factors: tuple[tuple[int, float], ...] = ()  # ... by how many others compute: (count, factor) pairs
    serving_cpu_per_request_s: float = 0.0  # with shared cores: CPU the router, HTTP, Ray and client spend ...
    serving_cpu_per_token_s: float = 0.0  # ... per request and per streamed token (bench/sim/machine.py measures)
    idle_serving_cores: float = 0.0  # ... and with no request at all
    serving_cpu_per_handoff_s: float = 0.0  # ... and more per remote prefill (a second worker call, the NIXL read)
    handoff_overhead_s: float = 0.0  # fixed cost of handing a remote prefill to the decode worker, beyond the
    # transfer itself (the prefill call returning, the decode call, the read's set-up; bench/sim/machine.py)
    planner: PlannerConfig | None = None  # roles change at runtime (None: a static split)
    # what a real cluster on one machine adds (fitted by bench/sim/validate.py on one real run): a fixed cost per
    # request before it reaches a worker (HTTP, router, RPC), and slower steps (the router, HTTP server and Ray
    # share the cores with the engines)
    request_overhead_s: float = 0.0
    step_slowdown: float = 1.0
    cpu_tier_blocks: int = 0  # CPU KV tier per worker (0: no tiers)
    disk_tier_blocks: int = 0
    session_hints: bool = False  # requests carry their agent session and a KV retention pin (as replay does)
    kv_retention_s: float = 300.0
    admission: AdmissionConfig | None = None  # the router's queue (None: dispatch at once)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    rescore_on_dispatch: bool = True  # False: a queued request keeps the worker chosen on arrival


class SimCluster:
    def __init__(self, config: SimClusterConfig, model: StepTimeModel) -> None:
        self.config, self.model = config, model
        self.loop = EventLoop()
        mc = sim_model_config(config.vocab_size, config.max_model_len)
        engine_cfg = EngineConfig(
            model="simulated",
            block_size=config.block_size,
            num_blocks=config.num_blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            prefill_chunk_target_ms=config.prefill_chunk_target_ms,
            max_model_len=config.max_model_len,
            kv_lease_timeout_s=1e9,
            kv_load_timeout_s=1e9,
        )  # virtual time: loads are priced, not timed out

        self._engine_cfg, self._mc = engine_cfg, mc

        def worker(name: str) -> SimWorker:
            sim_worker = SimWorker(name, *self._new_engine(), self)
            self._attach(sim_worker)
            return sim_worker

        self.prefill = {f"prefill-{i}": worker(f"prefill-{i}") for i in range(config.num_prefill)}
        self.decode = {f"decode-{i}": worker(f"decode-{i}") for i in range(config.num_decode)}
        self.router = RouterCore(
            dict.fromkeys(self.prefill),
            dict.fromkeys(self.decode),
            config.policy if config.policy.seed is not None else dataclasses.replace(config.policy, seed=0),
            block_size=config.block_size,
            config=RouterCoreConfig(rescore_on_dispatch=config.rescore_on_dispatch),
            admission=config.admission or AdmissionConfig(),
            capacity=config.capacity,
        )
        self.admission = SimAdmission(self) if config.admission is not None else None
        for w in self.workers:
            w.heartbeat()
        self.flights = SimFlights(self)  # each request's Flight (disagg/router/flight.py), driven in virtual time
        self.counters = {"remote_prefills": 0, "transferred_blocks": 0}
        self._queries = self._hits = 0
        self._rng = random.Random(0)
        self.staleness: list[int] = []  # per request: predicted - found cached tokens (as the API's histogram)
        self.cores = SharedCores(
            CoresConfig(
                cores=config.cores,
                threads_per_worker=config.threads_per_worker,
                corun_slowdown=config.corun_slowdown,
                corun_by_tokens=config.corun_by_tokens,
                busy_factors=config.busy_factors,
                cpu_per_request_s=config.serving_cpu_per_request_s,
                cpu_per_token_s=config.serving_cpu_per_token_s,
                cpu_per_handoff_s=config.serving_cpu_per_handoff_s,
                idle_serving_cores=config.idle_serving_cores,
            )
        )
        self.steps = SharedSteps(self.cores, lambda: self.loop.now, self.loop.at)  # steps on shared cores

    def _attach(self, worker: SimWorker, disk: Any = None) -> None:
        tiers = None
        if self.config.cpu_tier_blocks:
            tiers = SimTiers(
                self.config.cpu_tier_blocks,
                self.config.disk_tier_blocks,
                self.model.cpu_load_s_per_block,
                self.model.disk_load_s_per_block,
                lambda: self.loop.now,
                self.loop.at,
                worker.kick,
            )
            if disk is not None:  # a restarted worker finds its disk tier again
                tiers.disk = disk
        worker.tiers = tiers
        worker.engine.attach(peer=SimPeerSource(self, worker), tiers=tiers)

    def _new_engine(self) -> tuple[LLMEngine, SimRunner]:
        runner = SimRunner(self.model, self._mc, self.config.num_blocks)
        runner.step_slowdown, runner.shared_cores = self.config.step_slowdown, bool(self.config.cores)
        return LLMEngine(dataclasses.replace(self._engine_cfg), runner), runner

    @property
    def workers(self) -> list[SimWorker]:
        return [*self.prefill.values(), *self.decode.values()]

    def worker(self, name: str) -> SimWorker:
        return self.prefill[name] if name in self.prefill else self.decode[name]

    def contention(self, tokens: int = 0) -> float:
        """The factor a step of `tokens` tokens starting now begins at because the workers share the cores (1: no
        contention); `SharedSteps` recomputes it as other steps start and end."""
        if not self.config.cores:
            return 1.0
        return self.cores.slowdown(1 + len(self.steps), self.loop.now, tokens)

    def send_events(self, worker: SimWorker, batch: Any) -> None:
        """Deliver a worker's KV event batch after the configured delay (and jitter, so batches may arrive out of
        order); a gap makes the router need a snapshot, which arrives `snapshot_delay_s` later."""
        cfg = self.config
        delay = cfg.event_delay_s + (self._rng.uniform(0, cfg.event_jitter_s) if cfg.event_jitter_s else 0.0)

        def arrive() -> None:
            self.router.on_kv_events(batch)
            if self.router.index_needs_snapshot(worker.name) and not worker.snapshot_pending:
                worker.snapshot_pending = True
                self.loop.at(self.loop.now + cfg.snapshot_delay_s, lambda: self._snapshot(worker))

        self.loop.at(self.loop.now + delay, arrive)

    def _snapshot(self, worker: SimWorker) -> None:
        from disagg.protocol import EventKind, KVEvent, KVEventBatch

        worker.snapshot_pending = False
        events = [KVEvent(EventKind.STORED, hashes, tier=tier) for tier, hashes in worker.engine.kv_hashes().items()]
        self.router.on_kv_events(KVEventBatch.of(worker.name, worker._seq_no, events, snapshot=True))
        self.counters["snapshots"] = self.counters.get("snapshots", 0) + 1

    def set_role(self, name: str, role: Any) -> None:
        """Move a worker to another role now (router/roles.py's routing step; its in-flight work finishes in
        place, as the real worker's does)."""
        from disagg.protocol import Role

        worker = self.prefill.pop(name, None) or self.decode.pop(name)
        (self.prefill if role is Role.PREFILL else self.decode)[name] = worker
        self.router.set_routing_role(name, role)

    # ------------------------------------------------------------------ faults (see bench/sim/faults.py)
    def kill_worker(self, name: str, detect_s: float, restart_s: float) -> None:
        """Kill a worker now: its work is lost; `detect_s` later the router's health monitor takes it out of
        routing and its requests migrate (resumed after the tokens already delivered), as the real router
        does; `restart_s` after the kill it rejoins as a new incarnation with an empty cache."""
        worker = next(w for w in self.workers if w.name == name)
        worker.alive, worker.busy = False, False
        worker.incarnation += 1
        self.steps.cancel(worker)
        self.loop.at(self.loop.now + detect_s, lambda: self._detected(worker))
        self.loop.at(self.loop.now + restart_s, lambda: self._restarted(worker))

    def _detected(self, worker: SimWorker) -> None:
        from disagg.errors import WorkerLost

        self.router.health.on_failure(worker.name, WorkerLost(f"{worker.name} killed"))
        self.flights.worker_lost(worker.name)

    def _restarted(self, worker: SimWorker) -> None:
        old_tiers = worker.tiers
        worker.engine, worker.runner = self._new_engine()
        self._attach(worker, disk=old_tiers.disk if old_tiers is not None else None)
        worker.alive, worker._seq_no = True, -1
        worker.heartbeat()  # a new incarnation: the router sees the restart
        self.router.health.mark_ready(worker.name)

    def submit(
        self,
        request: Request,
        on_token: Callable[[float, TokenDelta], None],
        session: str | None = None,
        on_reject: Callable[[float, Exception], None] | None = None,
        tenant: str = "default",
        priority: int = 0,
    ) -> None:
        """Start a request: through the admission queue if there is one (on_reject(time, error) if it is
        refused), else at once.  on_token(time, delta) is called for every token (the last is finished)."""
        if self.config.request_overhead_s:  # HTTP, the router's parsing, the RPC: before the queue sees it
            self.loop.at(
                self.loop.now + self.config.request_overhead_s,
                lambda: self._submit(request, on_token, session, on_reject, tenant, priority),
            )
        else:
            self._submit(request, on_token, session, on_reject, tenant, priority)

    def _submit(
        self,
        request: Request,
        on_token: Callable[[float, TokenDelta], None],
        session: str | None,
        on_reject: Callable[[float, Exception], None] | None,
        tenant: str,
        priority: int,
    ) -> None:
        if self.admission is None:
            self.dispatch(request, on_token, session, tenant=tenant, arrival=self.loop.now)
        else:
            self.admission.submit(request, on_token, session, on_reject or (lambda now, exc: None), tenant, priority)

    def dispatch(
        self,
        request: Request,
        on_token: Callable[[float, TokenDelta], None],
        session: str | None = None,
        decision: Decision | None = None,
        priority: int | None = None,
        tenant: str = "default",
        arrival: float | None = None,
    ) -> None:
        """Start a request now (it reached the router at `arrival`): with `decision` if it was routed on arrival,
        else routed now (with `priority`: out of the admission queue, among the workers with room)."""
        self.cores.on_request(self.loop.now)
        arrival = self.loop.now if arrival is None else arrival
        self.flights.start(request, on_token, session, arrival, tenant, decision, priority)

    def deliver(self, worker: SimWorker, delta: TokenDelta) -> None:
        self.flights.deliver(worker, delta)

    def count_prefix(self, prompt_tokens: int, cached_tokens: int, predicted: int) -> None:
        """A prompt's prefix-cache outcome where it was computed, and the router's prediction error for it."""
        self._queries += prompt_tokens
        self._hits += cached_tokens
        self.staleness.append(predicted - cached_tokens)

    def release_lease(self, owner: str, request_id: str) -> None:
        worker = self.prefill.get(owner) or self.decode.get(owner)
        if worker is not None and worker.engine.connector.release_lease(request_id):
            worker.kick()

    def run(self, until: float = float("inf")) -> None:
        self.loop.run(until)

    def prefix_cache(self) -> dict[str, float]:
        """Prompt tokens looked up / found in the prefix cache of the worker that computed the prefill."""
        q, h = self._queries, self._hits
        return {"query_tokens": q, "hit_tokens": h, "hit_ratio": h / q if q else 0.0}

    def staleness_summary(self) -> dict[str, Any] | None:
        """The router's prediction error over the run (predicted - found cached tokens, per request): the shares
        exact / over- / under-predicted, as `bench replay` reports them, plus percentiles of the error."""
        errors = sorted(self.staleness)
        if not errors:
            return None
        n = len(errors)

        def pct(p: float) -> int:
            return errors[min(n - 1, int(p / 100 * n))]

        return {
            "requests": n,
            "exact": sum(e == 0 for e in errors) / n,
            "over_predicted": sum(e > 0 for e in errors) / n,
            "under_predicted": sum(e < 0 for e in errors) / n,
            "error_tokens_p1": pct(1),
            "error_tokens_p50": pct(50),
            "error_tokens_p99": pct(99),
            "mean_abs_error_tokens": sum(abs(e) for e in errors) / n,
        }


def sampling_for(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
