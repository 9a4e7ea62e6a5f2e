"""The client side of a simulated run: it sends a trace's requests into a SimCluster in virtual time, open loop
(at the trace's scaled timestamps, or at a fixed rate; an agent session's next turn after the previous one ends
plus its think time), and records each request exactly as `bench replay` records a real one (TTFT, ITLs, E2E,
cached tokens, refusals)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from tqdm import tqdm

from disagg.protocol import Request, TokenDelta
from disagg.sim.cluster import SimCluster, sampling_for
from disagg.workload.metrics import RequestRecord
from disagg.workload.record import TraceRequest, TraceScale, send_units


class OpenLoop:
    def __init__(self, trace: list[TraceRequest], scale: TraceScale, cluster: SimCluster, progress: bool) -> None:
        self.trace, self.scale, self.cluster = trace, scale, cluster
        self.config = cluster.config
        self.records: dict[int, RequestRecord] = {}
        self.bar = tqdm(total=len(trace), desc="simulate", unit="req", disable=not progress, leave=False)

    def start(self, arrival_rate: float | None) -> None:
        """Schedule the first request of every unit (a lone request, or an agent session's first turn)."""
        t0 = min(r.timestamp_ms for r in self.trace)
        for n, unit in enumerate(send_units(self.trace)):
            at = n / arrival_rate if arrival_rate else self.scale.seconds(self.trace[unit[0]].timestamp_ms - t0)
            self.cluster.loop.at(at, functools.partial(self.send, unit, 0))

    def finish(self) -> list[RequestRecord]:
        """Every request's record, by trace index; one that never completed is reported, not hidden."""
        self.bar.close()
        for i in range(len(self.trace)):
            record = self.records.get(i)
            if record is None or (record.e2e_s is None and record.error is None):
                self.records.setdefault(i, RequestRecord(i, 0, 0, 0.0)).error = "never completed in simulation"
        return [self.records[i] for i in sorted(self.records)]

    def send(self, unit: list[int], k: int) -> None:
        i = unit[k]
        req, config, now = self.trace[i], self.config, self.cluster.loop.now
        prompt = self.scale.prompt(req, config.vocab_size, salt=i)[: config.max_model_len - 1]
        max_tokens = max(1, min(self.scale.output_len(req), config.max_model_len - len(prompt)))
        record = RequestRecord(i, len(prompt), max_tokens, now, req.session_id, req.turn)
        self.records[i] = record
        hints = config.session_hints and req.session_id is not None  # what `bench replay --session-hints` sends
        request = Request(
            f"r{i}",
            prompt,
            sampling_for(max_tokens),
            session_id=req.session_id if hints else None,
            kv_retention_s=config.kv_retention_s if hints else None,
            priority=req.priority,
        )
        self.cluster.submit(
            request,
            self._on_token(record, unit, k),
            session=req.session_id if hints else None,
            on_reject=self._on_reject(record, unit, k),
            tenant=req.tenant or "default",
            priority=req.priority,
        )

    def _on_token(self, record: RequestRecord, unit: list[int], k: int) -> Callable[[float, TokenDelta], None]:
        last = [record.start_s]

        def on_token(now: float, delta: TokenDelta) -> None:
            if record.ttft_s is None:
                record.ttft_s = now - record.start_s
                record.cached_tokens = delta.num_cached_tokens  # what the API reports as cached_tokens
            else:
                record.itl_s.append(now - last[0])
            last[0] = now
            record.output_tokens += len(delta.token_ids)
            if delta.finished:
                record.e2e_s = now - record.start_s  # (the router's SLO window is the Flight's RecordLatency)
                self._next_turn(unit, k, now)

        return on_token

    def _on_reject(self, record: RequestRecord, unit: list[int], k: int) -> Callable[[float, Exception], None]:
        def on_reject(now: float, exc: Exception) -> None:  # a 429, as the replay records it
            record.error = f"HTTP 429: {exc}"
            record.refused_s, record.refusal_code = now - record.start_s, getattr(exc, "code", None)
            self._next_turn(unit, k, now)

        return on_reject

    def _next_turn(self, unit: list[int], k: int, now: float) -> None:
        self.bar.update(1)
        if k + 1 < len(unit):
            nxt = self.trace[unit[k + 1]]
            self.cluster.loop.at(now + self.scale.seconds(nxt.think_time_ms), functools.partial(self.send, unit, k + 1))
