"""Tracing: OpenTelemetry spans for every request, from the HTTP handler through the router, the prefill worker,
the KV transfer and the decode worker, connected across processes by W3C trace context.

Off by default: without an endpoint (`--otlp-endpoint`) or a span file directory the tracer is OpenTelemetry's
no-op tracer, so the instrumentation costs a few attribute lookups per request.  On, spans go through a bounded
BatchSpanProcessor (a background thread; a full queue drops spans) to the standard OTLP/HTTP exporter (with a
short timeout) or to JSON-lines files: a dead or slow collector never fails or slows a request.

Context crosses processes inside the msgpack `Request` (`trace_context`: the W3C `traceparent` / `tracestate`
headers as a dict), and an incoming HTTP `traceparent` header is honoured, so a client's trace continues here.

Attribute names follow the OpenTelemetry GenAI semantic conventions as shipped in
opentelemetry-semantic-conventions 0.66b2 (schema 1.44.0): gen_ai.operation.name, gen_ai.provider.name,
gen_ai.request.model / max_tokens / temperature / top_p / seed, gen_ai.response.id / finish_reasons,
gen_ai.usage.input_tokens / output_tokens / cache_read.input_tokens, gen_ai.conversation.id.  Names of our own
live under `disagg.` (worker, tier, reason, ...).

Spans (see docs/architecture.md for their timing): "{operation} {model}" (the request, SERVER kind) with children
router.queue, router.route, then per worker prefill.queue, prefill.compute, kv.transfer, decode.queue,
decode.compute; events: migration, fallback, preemption.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SEMCONV_SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
PROVIDER = "disagg"

# GenAI semantic-convention attribute names (pinned: opentelemetry-semantic-conventions 0.66b2, schema 1.44.0)
OPERATION = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_SEED = "gen_ai.request.seed"
REQUEST_STREAM = "gen_ai.request.stream"
RESPONSE_ID = "gen_ai.response.id"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
CONVERSATION_ID = "gen_ai.conversation.id"

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass
class TracingConfig:
    otlp_endpoint: str | None = field(  # OTLP over HTTP
        default=None,
        metadata={"help": "export OpenTelemetry spans over OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces"},
    )
    file_dir: str | None = field(  # one file per process; the bench reads them
        default=None, metadata={"flag": "--trace-dir", "help": "also write spans as JSON lines into this directory"}
    )
    sampling_ratio: float = field(  # a client's sampled traceparent is always followed
        default=1.0, metadata={"flag": "--trace-sample-ratio", "help": "share of new traces sampled"}
    )
    export_timeout_s: float = 2.0
    max_queue_size: int = 4096  # spans waiting for export; beyond it they are dropped, requests never wait

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint or self.file_dir)


class JsonLinesExporter(SpanExporter):
    """Spans as JSON lines in `<dir>/<service>-<pid>.jsonl` (for the bench harness's stage breakdown)."""

    def __init__(self, directory: str, service: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._path = Path(directory) / f"{service}-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_dict(s)) for s in spans]
        with self._lock, self._path.open("a") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx, parent = span.context, span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in span.events
        ],
        "service": span.resource.attributes.get("service.name"),
    }


def make_tracer(config: TracingConfig | None, service: str, exporter: SpanExporter | None = None) -> trace.Tracer:
    """A tracer for one process role ("router", "worker").  No endpoint, file or exporter: the no-op tracer."""
    config = config or TracingConfig()
    if exporter is None and not config.enabled:
        return trace.NoOpTracer()
    resource = Resource.create({"service.name": f"disagg-{service}"})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sampling_ratio)))
    exporters = [exporter] if exporter is not None else []
    if config.file_dir:
        exporters.append(JsonLinesExporter(config.file_dir, service))
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=config.export_timeout_s))
    _PROVIDERS[tracer := provider.get_tracer("disagg", schema_url=SEMCONV_SCHEMA_URL)] = provider
    for e in exporters:
        provider.add_span_processor(
            BatchSpanProcessor(
                e,
                max_queue_size=config.max_queue_size,
                schedule_delay_millis=200,
                export_timeout_millis=int(config.export_timeout_s * 1000),
            )
        )
    return tracer


# the provider behind each tracer make_tracer built (for flush); weak, so a dropped tracer takes its provider along
_PROVIDERS: weakref.WeakKeyDictionary[trace.Tracer, TracerProvider] = weakref.WeakKeyDictionary()


def flush(tracer: trace.Tracer, timeout_s: float = 10.0) -> bool:
    """Export every span `tracer` has ended so far (its batch processors otherwise export every 200 ms); True once
    done within `timeout_s`. A no-op tracer has nothing to flush."""
    provider = _PROVIDERS.get(tracer)
    return provider is None or provider.force_flush(int(timeout_s * 1000))


def inject(span: trace.Span) -> dict[str, str]:
    """W3C trace context of `span` as headers (carried in the msgpack Request)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def extract(carrier: dict[str, str] | None) -> Context | None:
    """The context in W3C headers (an HTTP request's, or a Request's trace_context); None if absent."""
    if not carrier or "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


class Clock:
    """Converts this process's time.monotonic() readings (what the engine records) to epoch nanoseconds."""

    def __init__(self) -> None:
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._offset_ns
