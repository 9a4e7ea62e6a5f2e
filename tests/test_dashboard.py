"""The Grafana dashboard in deploy/ only queries metrics the code exports: every metric name in its PromQL
appears in a real /metrics scrape after a small workload (a worker with tiers, a request served from the CPU tier)."""
import asyncio
import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from disagg.kv.tier_config import TierConfig
from disagg.protocol import Request, SamplingParams
from disagg.router.metrics_view import cluster_snapshot
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore
from disagg.telemetry import RouterMetrics
from tests.fakes import LocalWorkerHandle, local_worker

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"


def _queried_metrics() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert len(exprs) >= 20
    return {m for e in exprs for m in re.findall(r"disagg:[a-z0-9_:]+", e)}


def test_every_dashboard_query_names_an_exported_metric(tiny_llama_dir):
    worker = LocalWorkerHandle(local_worker("w", tiny_llama_dir, tiers=TierConfig(cpu_bytes=2 << 20, disk_root="")))
    prompt = list(range(60, 60 + 80))

    async def go():
        core = RouterCore({}, {"w": worker}, PolicyConfig(seed=0), 16)
        metrics = RouterMetrics(lambda: cluster_snapshot(core))
        for i in range(2):
            async for _ in core.generate(Request(f"r{i}", prompt, SamplingParams(max_tokens=4, temperature=0))):
                pass
            await worker.worker.flush_tiers()
            worker.worker.engine.pool.reset_prefix_cache()
        # the CPU-tier hit must be in the worker's heartbeat before the scrape: probe until it is (bounded)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            await core.supervisor.probe("w")
            hb = core.health.workers["w"].heartbeat
            if hb is not None and hb.stats is not None and any(hb.stats.tier_hit_blocks.values()):
                break
            assert asyncio.get_running_loop().time() < deadline, "no tier hit reached the heartbeat"
            await asyncio.sleep(0.02)
        metrics.ttft.labels("default").observe(0.1)  # the HTTP layer observes these; here no HTTP request ran
        metrics.requests.labels("/v1/completions", "200").inc()
        return generate_latest(metrics.registry).decode()
    exported = set()
    for fam in text_string_to_metric_families(asyncio.run(go())):
        # a family is exported even while it has no series yet (e.g. no request has been refused so far)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(fam.type, [""])
        exported.update(fam.name + suffix for suffix in suffixes)
        exported.update(s.name for s in fam.samples)
    missing = sorted(_queried_metrics() - exported)
    assert not missing, f"dashboard queries metrics the code does not export: {missing}"
