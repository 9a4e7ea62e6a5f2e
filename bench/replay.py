"""Replay a trace against any OpenAI-compatible endpoint: open loop, streaming, bounded in count and time.

Requests go out at the trace's timestamps (scaled by --time-scale), or at a fixed or Poisson --rate.  Requests
that belong to an agent session (session_id) are sent in turn order: turn k leaves think_time after turn k-1
finished, so a slow server slows its own agents down, as real agents would.  Prompts are token ids
(/v1/completions), so no tokenizer is needed on this side and prefix sharing is exact.

    python -m bench.replay --url http://127.0.0.1:8000 --trace mooncake_conversation_trace.jsonl --limit 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from bench.report import ReportOptions
from bench.scrape import routing_summary, scrape_prefix_cache, scrape_routing, scrape_staleness, staleness_summary
from disagg.model_store import DEFAULT_VOCAB_SIZE
from disagg.options import add_options, from_options
from disagg.workload.metrics import SLO, RequestRecord, compute_metrics, parse_slos
from disagg.workload.options import add_workload_args, load_workload
from disagg.workload.record import TraceRequest, TraceScale, send_units
from disagg.workload.report import write_report

ARRIVALS = ("trace", "fixed", "poisson")
# ReplayConfig's fields that are options of every replaying CLI (the rest come from the workload or the caller)
REPLAY_OPTIONS = (
    "arrival",
    "rate",
    "max_duration_s",
    "request_timeout_s",
    "ignore_eos",
    "session_hints",
    "kv_retention_s",
    "progress",
)

SEND_GAP_S = 0.001  # between the sends of requests due at the same moment: their order on the wire is the trace's


@dataclass
class ReplayMainOptions:
    """`disagg bench replay`'s own options."""

    url: str = field(metadata={"help": "OpenAI-compatible server, e.g. http://127.0.0.1:8000"})
    model_name: str | None = field(default=None, metadata={"help": "model id to request (default: the first listed)"})
    api_key: str | None = field(default=None, metadata={"help": "sent as 'Authorization: Bearer KEY'"})
    label: str = field(default="replay", metadata={"help": "the run's name in the report"})
    out: str = field(default="bench/results/replay", metadata={"help": "output directory"})


@dataclass
class ReplayConfig:
    """One replay; the fields with help are `disagg bench replay`'s options (shared with chaos and compare)."""

    url: str
    model: str | None = None  # None: the first model the endpoint lists
    vocab_size: int = DEFAULT_VOCAB_SIZE  # token ids are drawn below this (SmolLM2's vocabulary by default)
    scale: TraceScale = field(default_factory=TraceScale)
    # "trace" | "fixed" | "poisson"; the latter two pace requests (or sessions) at `rate`
    arrival: str = field(default="trace", metadata={"choices": ARRIVALS, "help": "when each request is sent"})
    rate: float | None = field(default=None, metadata={"help": "requests (sessions) per second for fixed/poisson"})
    max_requests: int | None = None
    # nothing is sent after this; requests in flight may finish
    max_duration_s: float | None = field(
        default=None, metadata={"flag": "--max-duration", "help": "send nothing after this many seconds"}
    )
    request_timeout_s: float = field(
        default=600.0, metadata={"flag": "--timeout", "help": "per-request limit in seconds"}
    )
    # generate exactly the trace's output length
    ignore_eos: bool = field(default=True, metadata={"help": "--no-ignore-eos: let the model stop early"})
    api_key: str | None = None
    seed: int = 0
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    record_text: bool = False  # keep each output's text (chaos runs compare it with a no-fault run)
    session_hints: bool = field(
        default=False,
        metadata={"help": "send each agent session's id (`user`) and a KV retention pin (`kv_retention`)"},
    )
    kv_retention_s: float = field(default=300.0, metadata={"help": "pin TTL sent with --session-hints"})
    # a server that takes text prompts only and has no ignore_eos (llama-cpp-python's): each prompt's token ids
    # are sent as their text, and the trace's output length as min_tokens
    detokenize: Callable[[list[int]], str] | None = None

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be trace, fixed or poisson, not {self.arrival!r}")
        if self.arrival != "trace" and not (self.rate and self.rate > 0):
            raise ValueError(f"arrival={self.arrival} needs a positive rate")


@dataclass
class ReplayResult:
    records: list[RequestRecord]
    duration_s: float
    not_sent: int
    prefix_cache: dict[str, float] | None
    model: str
    started_at: float = 0.0  # wall clock (time.time()) of the run's t=0, to line records up with other logs
    staleness: dict[str, Any] | None = None  # the router's prediction error of cached tokens (our server only)
    role_changes: list[dict] | None = None  # workers moved between roles during the run (planner runs)
    routing: dict[str, Any] | None = None  # placement prediction error and routes by mode (our server only)

    def metrics(self, slo: SLO, extra_slos: list[SLO] | None = None) -> dict[str, Any]:
        m = compute_metrics(self.records, max(self.duration_s, 1e-9), slo, self.prefix_cache, extra_slos)
        m["not_sent"] = self.not_sent
        if self.staleness is not None:
            m["staleness"] = self.staleness
        if self.routing is not None:
            m["routing"] = self.routing
        return m


def _arrivals(trace: list[TraceRequest], units: list[list[int]], cfg: ReplayConfig) -> list[float]:
    rate = cfg.rate or 0.0  # positive for fixed and poisson arrivals (ReplayConfig checks)
    if cfg.arrival == "fixed":
        return [i / rate for i in range(len(units))]
    if cfg.arrival == "poisson":
        rng, t, out = random.Random(cfg.seed), 0.0, []
        for _ in units:
            out.append(t)
            t += rng.expovariate(rate)
        return out
    t0 = min(r.timestamp_ms for r in trace)
    return [cfg.scale.seconds(trace[u[0]].timestamp_ms - t0) for u in units]


async def _send(
    client: httpx.AsyncClient, cfg: ReplayConfig, model: str, prompt: list[int], record: RequestRecord, t0: float
) -> None:
    body: dict[str, Any] = {
        "model": model,
        "prompt": cfg.detokenize(prompt) if cfg.detokenize is not None else prompt,
        "max_tokens": record.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos and cfg.detokenize is not None:
        body["min_tokens"] = record.max_tokens
    elif cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.session_hints and record.session_id is not None:
        body["user"] = record.session_id
        body["kv_retention"] = {"ttl_s": cfg.kv_retention_s}
    if cfg.record_text:
        record.text = ""
    start = time.perf_counter()
    record.start_s = start - t0
    try:
        await asyncio.wait_for(_stream(client, body, record, start), cfg.request_timeout_s)
    except asyncio.TimeoutError:
        record.error = f"timed out after {cfg.request_timeout_s:g}s"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"


async def _stream(client: httpx.AsyncClient, body: dict[str, Any], record: RequestRecord, start: float) -> None:
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            record.error = f"HTTP {resp.status_code}: {_error_message((await resp.aread()).decode(errors='replace'))}"
            return
        last, chunks, usage = start, 0, None
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                record.error = f"stream error: {_error_message(data)}"
                return
            record.request_id = record.request_id or obj.get("id")
            if obj.get("usage"):
                usage = obj["usage"].get("completion_tokens")
                cached = (obj["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                record.cached_tokens = cached if cached is not None else record.cached_tokens
            for choice in obj.get("choices") or []:
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece and record.text is not None:
                    record.text += piece
                if piece:
                    now = time.perf_counter()
                    if record.ttft_s is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last, chunks = now, chunks + 1
        record.output_tokens = usage if usage is not None else chunks
        if record.ttft_s is None:
            record.error = "no tokens streamed"
        else:
            record.e2e_s = time.perf_counter() - start


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"][:200]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def discover_model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def replay(trace: list[TraceRequest], cfg: ReplayConfig) -> ReplayResult:
    if cfg.max_requests is not None:
        trace = sorted(trace, key=lambda r: r.timestamp_ms)[: cfg.max_requests]
    if not trace:
        raise ValueError("the trace is empty")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=cfg.url.rstrip("/"),
        headers=headers,
        limits=limits,
        timeout=httpx.Timeout(cfg.request_timeout_s, connect=30.0),
    ) as client:
        model = cfg.model or await discover_model(client)
        before = await scrape_prefix_cache(client)
        stale_before = await scrape_staleness(client)
        routing_before = await scrape_routing(client)
        units = send_units(trace)
        arrivals = _arrivals(trace, units, cfg)
        records: dict[int, RequestRecord] = {}
        bar = tqdm(total=len(trace), desc="replay", unit="req", disable=not cfg.progress, leave=False)
        t0 = time.perf_counter()
        started_at = time.time()
        deadline = t0 + cfg.max_duration_s if cfg.max_duration_s else float("inf")

        async def run_unit(unit: list[int]) -> None:
            for k, i in enumerate(unit):
                req = trace[i]
                if k:
                    await asyncio.sleep(cfg.scale.seconds(req.think_time_ms))
                if time.perf_counter() >= deadline:
                    return
                record = RequestRecord(
                    i, cfg.scale.input_len(req), cfg.scale.output_len(req), 0.0, req.session_id, req.turn
                )
                record.model = req.model or model
                records[i] = record
                await _send(client, cfg, record.model, cfg.scale.prompt(req, cfg.vocab_size, salt=i), record, t0)
                bar.update(1)

        # one dispatcher starts the units in (arrival, trace index) order, at least SEND_GAP_S apart: requests with
        # the same timestamp (the Mooncake traces have bursts of a dozen) reach the router in trace order, run after
        # run, as the simulator sends them - not in whatever order their timers fire (with 40 requests that order
        # alone moved the simulator's goodput 0.03-0.10 req/s at 4 workers: docs/benchmarks.md)
        tasks = []
        for unit, at in sorted(zip(units, arrivals), key=lambda ua: (ua[1], ua[0][0])):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(run_unit(unit)))
            await asyncio.sleep(SEND_GAP_S)
        await asyncio.gather(*tasks)
        bar.close()
        ends = [t0 + r.start_s + (r.e2e_s or 0.0) for r in records.values()]
        duration = (max(ends) if ends else time.perf_counter()) - t0
        after = await scrape_prefix_cache(client)
        staleness = staleness_summary(stale_before, await scrape_staleness(client))
        routing = routing_summary(routing_before, await scrape_routing(client))
    prefix = None
    if before is None and after is not None:  # the counters had no sample yet (labelled per model: none served)
        before = {"queries": 0.0, "hits": 0.0}
    if before is not None and after is not None:
        queries = after["queries"] - before["queries"]
        hits = after["hits"] - before["hits"]
        prefix = {"query_tokens": queries, "hit_tokens": hits, "hit_ratio": hits / queries if queries else 0.0}
    ordered = [records[i] for i in sorted(records)]
    return ReplayResult(
        ordered, duration, len(trace) - len(ordered), prefix, model, started_at, staleness, routing=routing
    )


def add_replay_args(p: argparse.ArgumentParser) -> None:
    add_workload_args(p)
    add_options(p, ReplayConfig, only=REPLAY_OPTIONS[:4])
    add_options(p, SLO, prefix="slo-")
    add_options(p, ReportOptions)
    add_options(p, ReplayConfig, only=REPLAY_OPTIONS[4:])


def replay_config(args: argparse.Namespace, url: str, scale: TraceScale) -> ReplayConfig:
    """The replay the options ask for (the namespace also holds the workload's seed and vocabulary)."""
    return from_options(ReplayConfig, args, url=url, model=getattr(args, "model_name", None), scale=scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg bench replay", description=__doc__.splitlines()[0])
    add_options(parser, ReplayMainOptions)
    add_replay_args(parser)
    args = parser.parse_args(argv)
    trace, scale, workload = load_workload(args)
    result = asyncio.run(replay(trace, replay_config(args, args.url, scale)))
    metrics = result.metrics(from_options(SLO, args, prefix="slo-"), parse_slos(args.extra_slos))
    runs = [{"label": args.label, "metrics": metrics}]
    paths = write_report(
        args.out,
        runs,
        {
            "title": f"replay of {workload['name']} against {args.url}",
            "workload": workload,
            "scale": scale.describe(),
            "model": result.model,
        },
        {args.label: result.records},
    )
    print(paths["markdown"].read_text())
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0 if metrics["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
