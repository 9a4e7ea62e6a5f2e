"""A worker's spans, built when a traced request finishes from the timeline its sequence recorded (arrival,
first admission, KV load, first token, finish), as children of the router's span for the request.  Built on the
engine thread from plain timestamps, so nothing OpenTelemetry runs inside the scheduler or the model step.

    prefill role              prefill.queue (arrival -> admitted), prefill.compute (admitted -> first token)
    decode, KV from a peer    decode.queue (arrival -> read starts), kv.transfer (the read), decode.compute
    computes its own prefill  prefill.queue, [kv.transfer for CPU/disk tier loads], prefill.compute,
                              decode.compute (first token -> finish)

and one root span per model step, `engine.step` (the engine's whole step: schedule, model, sampling), with what
the step computed and the model's own time: the step-time model's features, so a traced run shows how steps
inside a running cluster compare with the calibrated model (bench/sim/steps.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagg.protocol import Role
from disagg.tracing import (
    USAGE_CACHE_READ_INPUT_TOKENS,
    USAGE_INPUT_TOKENS,
    USAGE_OUTPUT_TOKENS,
    Clock,
    TracingConfig,
    extract,
    make_tracer,
)

if TYPE_CHECKING:  # the router process imports this module and must not import torch
    from disagg.engine.engine import StepRecord

STEP_TOKENS, STEP_SEQS = "disagg.step.tokens", "disagg.step.seqs"
STEP_ATTENTION_KPAIRS, STEP_EXECUTE_S = "disagg.step.attention_kpairs", "disagg.step.execute_s"


class WorkerSpans:
    def __init__(self, worker: str, role: Role, config: TracingConfig) -> None:
        self.worker, self.role = worker, role
        self.enabled = config.enabled
        self.tracer = make_tracer(config, "worker")
        self.clock = Clock()

    def _span(self, name: str, ctx: Any, start: float | None, end: float | None, **attributes: Any) -> None:
        if start is None or end is None:
            return
        span = self.tracer.start_span(
            name,
            context=ctx,
            start_time=self.clock.ns(start),
            attributes={"disagg.worker": self.worker, "disagg.role": self.role.value, **attributes},
        )
        span.end(end_time=self.clock.ns(max(start, end)))

    def step(self, step: StepRecord, start: float, end: float) -> None:
        self._span(
            "engine.step",
            None,
            start,
            end,
            **{
                STEP_TOKENS: step.tokens,
                STEP_SEQS: step.seqs,
                STEP_ATTENTION_KPAIRS: step.attention_kpairs,
                STEP_EXECUTE_S: step.execute_s,
            },
        )

    def record(self, seq: Any, reason: str) -> None:
        ctx = extract(seq.trace_context)
        if ctx is None:
            return
        first, done = seq.first_token_time, seq.finish_time
        usage = {USAGE_INPUT_TOKENS: seq.num_prompt_tokens, USAGE_CACHE_READ_INPUT_TOKENS: seq.num_cached_tokens}
        if seq.hold_kv:  # a remote prefill for another worker
            self._span("prefill.queue", ctx, seq.arrival_time, seq.scheduled_time)
            self._span(
                "prefill.compute",
                ctx,
                seq.scheduled_time,
                first,
                **usage,
                **{"disagg.preemptions": seq.num_preemptions},
            )
            return
        load = {
            "disagg.kv.source": seq.load_kind or "",
            "disagg.kv.blocks": seq.load_blocks,
            "disagg.kv.failed": seq.load_failed,
        }
        done_attrs = {
            USAGE_OUTPUT_TOKENS: len(seq.output_token_ids),
            "disagg.finish_reason": reason,
            "disagg.preemptions": seq.num_preemptions,
        }
        if seq.load_kind == "peer":  # its prefill ran elsewhere: queue, read, decode
            self._span("decode.queue", ctx, seq.arrival_time, seq.load_start)
            self._span("kv.transfer", ctx, seq.load_start, seq.load_end, **load)
            self._span("decode.compute", ctx, seq.load_end, done, **usage, **done_attrs)
            return
        self._span("prefill.queue", ctx, seq.arrival_time, seq.scheduled_time)
        compute_from = seq.scheduled_time
        if seq.load_kind == "tiers":
            self._span("kv.transfer", ctx, seq.load_start, seq.load_end, **load)
            compute_from = seq.load_end
        self._span("prefill.compute", ctx, compute_from, first, **usage)
        self._span("decode.compute", ctx, first, done, **done_attrs)
