"""Tracing: GenAI semantic-convention names (pinned), W3C context across processes, one connected trace per
request with every stage (in-process workers with real engines; the real cluster is in test_tracing_cluster.py),
and a hung collector that costs requests nothing."""
import asyncio
import socket
import threading
import time

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as semconv

from disagg import tracing as tr
from disagg.cluster.spans import STEP_ATTENTION_KPAIRS, STEP_EXECUTE_S, STEP_SEQS, STEP_TOKENS
from disagg.protocol import Request, Role, SamplingParams
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore
from tests.fakes import LocalWorkerHandle, local_worker

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_attribute_names_follow_the_pinned_genai_semantic_conventions():
    pinned = {tr.OPERATION: "gen_ai.operation.name", tr.PROVIDER_NAME: "gen_ai.provider.name",
              tr.REQUEST_MODEL: "gen_ai.request.model", tr.REQUEST_MAX_TOKENS: "gen_ai.request.max_tokens",
              tr.REQUEST_TEMPERATURE: "gen_ai.request.temperature", tr.REQUEST_TOP_P: "gen_ai.request.top_p",
              tr.REQUEST_SEED: "gen_ai.request.seed", tr.REQUEST_STREAM: "gen_ai.request.stream",
              tr.RESPONSE_ID: "gen_ai.response.id", tr.RESPONSE_FINISH_REASONS: "gen_ai.response.finish_reasons",
              tr.USAGE_INPUT_TOKENS: "gen_ai.usage.input_tokens", tr.USAGE_OUTPUT_TOKENS: "gen_ai.usage.output_tokens",
              tr.USAGE_CACHE_READ_INPUT_TOKENS: "gen_ai.usage.cache_read.input_tokens",
              tr.CONVERSATION_ID: "gen_ai.conversation.id"}
    for ours, literal in pinned.items():
        assert ours == literal
    # and they are the installed semconv package's own constants
    assert tr.OPERATION == semconv.GEN_AI_OPERATION_NAME and tr.PROVIDER_NAME == semconv.GEN_AI_PROVIDER_NAME
    assert tr.USAGE_INPUT_TOKENS == semconv.GEN_AI_USAGE_INPUT_TOKENS
    assert tr.USAGE_CACHE_READ_INPUT_TOKENS == semconv.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS
    assert tr.RESPONSE_FINISH_REASONS == semconv.GEN_AI_RESPONSE_FINISH_REASONS
    assert tr.CONVERSATION_ID == semconv.GEN_AI_CONVERSATION_ID
    assert tr.SEMCONV_SCHEMA_URL.endswith("/1.44.0")


def test_off_by_default_and_context_round_trips():
    assert isinstance(tr.make_tracer(None, "router"), trace.NoOpTracer)
    tracer = tr.make_tracer(None, "x", exporter=InMemorySpanExporter())
    with tracer.start_as_current_span("root") as root:
        carrier = tr.inject(root)
    assert carrier["traceparent"].startswith("00-")
    ctx = tr.extract(carrier)
    assert trace.get_current_span(ctx).get_span_context().trace_id == root.get_span_context().trace_id
    assert tr.extract({}) is None and tr.extract(None) is None


def _traced_cluster(model_dir):
    """A prefill worker and two decode workers in-process, router and workers exporting to memory."""
    router_spans, worker_spans = InMemorySpanExporter(), InMemorySpanExporter()
    p = LocalWorkerHandle(local_worker("p", model_dir, Role.PREFILL))
    d1 = LocalWorkerHandle(local_worker("d1", model_dir, Role.DECODE))
    d2 = LocalWorkerHandle(local_worker("d2", model_dir, Role.DECODE))
    for h in (p, d1, d2):
        h.worker.spans.enabled = True
        h.worker.spans.tracer = tr.make_tracer(None, "worker", exporter=worker_spans)
        h.worker.engine.on_finish = h.worker.spans.record
    core = RouterCore({"p": p}, {"d1": d1, "d2": d2}, PolicyConfig(seed=0, min_remote_prefill_tokens=16), 16,
                      tracer=tr.make_tracer(None, "router", exporter=router_spans))
    return core, (p, d1, d2), router_spans, worker_spans


def _flush(core, handles):
    for tracer in (core.tracer, *(h.worker.spans.tracer for h in handles)):
        assert tr.flush(tracer)


def test_one_connected_trace_per_request_with_every_stage(tiny_llama_dir):
    core, handles, router_spans, worker_spans = _traced_cluster(tiny_llama_dir)

    async def go():
        layouts = [await h.layout(1) for h in handles]
        for h in handles:
            await h.set_peers(layouts, 1)
        roots = []
        for i in range(3):
            root = core.tracer.start_span(f"text_completion tiny-{i}", kind=trace.SpanKind.SERVER,
                                          attributes={tr.RESPONSE_ID: f"r{i}"})
            async for _ in core.generate(Request(f"r{i}", list(range(30 + i, 80 + i)), GREEDY), span=root):
                pass
            root.end()
            roots.append(root)
        return roots
    roots = asyncio.run(go())
    _flush(core, handles)
    spans = list(router_spans.get_finished_spans()) + list(worker_spans.get_finished_spans())
    for root in roots:
        tid = root.get_span_context().trace_id
        mine = [s for s in spans if s.context.trace_id == tid]
        names = sorted(s.name for s in mine)
        assert names == sorted([root.name, "router.queue", "router.route", "prefill.queue", "prefill.compute",
                                "decode.queue", "kv.transfer", "decode.compute"]), names
        root_id = root.get_span_context().span_id
        assert all(s.parent.span_id == root_id for s in mine if s.name != root.name)  # connected
        start, end = root.start_time, root.end_time
        for s in mine:  # every stage lies inside the request
            assert start <= s.start_time <= s.end_time <= end + 1_000_000, s.name
        by_name = {s.name: s for s in mine}
        assert by_name["prefill.compute"].end_time <= by_name["kv.transfer"].start_time + 1_000_000
        assert by_name["kv.transfer"].attributes["disagg.kv.source"] == "peer"
        assert by_name["decode.compute"].attributes[tr.USAGE_OUTPUT_TOKENS] == 6
        assert by_name["router.route"].attributes["disagg.prefill_worker"] == "p"
    # and one root span per model step, with what it computed and the model's own time inside the step's
    steps = [s for s in spans if s.name == "engine.step"]
    assert steps and all(s.parent is None for s in steps)
    for s in steps:
        a = s.attributes
        assert a[STEP_TOKENS] >= a[STEP_SEQS] >= 1 and a[STEP_ATTENTION_KPAIRS] > 0
        assert 0 < a[STEP_EXECUTE_S] * 1e9 <= s.end_time - s.start_time + 1_000_000
    prefills = [s.attributes[STEP_TOKENS] for s in steps if s.attributes["disagg.worker"] == "p"]
    assert prefills == [50, 50, 50]  # the prefill worker computed each 50-token prompt in one step, nothing else


class SilentCollector:
    """A collector that accepts connections and never reads or answers (a hung OTLP endpoint): an export to it
    blocks for its whole timeout.  (A closed port refuses at once, so it cannot tell a synchronous exporter from
    a background one.)"""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/traces"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_hung_collector_costs_requests_nothing(tiny_llama_dir):
    collector = SilentCollector()
    # each export to it would block for 3 s: a request that waited for even one export would show it
    hung = tr.TracingConfig(otlp_endpoint=collector.url, export_timeout_s=3.0)
    w = LocalWorkerHandle(local_worker("w", tiny_llama_dir))

    async def go(tracer):
        core = RouterCore({}, {"w": w}, PolicyConfig(seed=0), 16, tracer=tracer)
        t0 = time.perf_counter()
        out = []
        for i in range(4):
            root = tracer.start_span("text_completion tiny", kind=trace.SpanKind.SERVER)
            tokens = [t async for d in core.generate(Request(f"x{i}", list(range(20, 60)), GREEDY), span=root)
                      for t in d.token_ids]
            root.end()
            out.append(tokens)
        return out, time.perf_counter() - t0
    try:
        traced, traced_s = asyncio.run(go(tr.make_tracer(hung, "router")))
        plain, plain_s = asyncio.run(go(trace.NoOpTracer()))
        # the exporter really tried the hung collector (so the timing below says something)
        deadline = time.monotonic() + 10
        while not collector.accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert collector.accepted, "no export reached the collector"
    finally:
        collector.close()
    assert traced == plain and all(len(t) == 6 for t in traced)
    assert traced_s < plain_s + 1.0, (traced_s, plain_s)  # exports block a background thread, never a request
