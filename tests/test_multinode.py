"""Beyond one machine: a two-node Ray cluster (a head started with `ray start --head`, a second raylet joined with
`ray start --address`, both given --node-ip-address=127.0.0.1, which Ray's cluster mode maps to this host's own
address), the prefill worker placed on one node and the decode worker on the
other by Ray custom resources, and a disaggregated request whose KV crosses nodes over NIXL (UCX kept on `lo`
by the transport configuration, as tests must)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.protocol import SamplingParams

BIN = Path(sys.executable).parent
PROMPT = [{"role": "user", "content": "Write three sentences about lighthouses, their keepers, and the sea at "
                                      "night, in a calm tone."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STOP_GRACE_S = 3


def _ray(*args: str, env: dict) -> subprocess.Popen:
    # --block keeps each raylet in its own process group, so teardown stops this cluster and nothing else
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             "--disable-usage-stats", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_nodes(address: str, n: int, env: dict, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode == 0 and len(re.findall(r"^\s*1 node_", out.stdout, re.M)) >= n:
            return
        time.sleep(2)
    pytest.fail(f"the {n}-node cluster did not come up: {out.stdout[-1500:]} {out.stderr[-1500:]}")


@pytest.fixture(scope="module")
def two_nodes():
    gcs = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
    # a second raylet needs Ray's cluster mode (conftest turns it off to keep single-node tests on loopback); in
    # it Ray maps 127.0.0.1 to this host's own address, so the traffic still never leaves the host
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    head = _ray("--head", f"--port={gcs}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                '--resources={"node_a": 4}', env=env)
    address = f"127.0.0.1:{gcs}"
    procs = [head]
    try:
        _wait_nodes(address, 1, env)  # the head answers before the second node joins it
        procs.append(_ray(f"--address={address}", '--resources={"node_b": 4}', env=env))
        _wait_nodes(address, 2, env)
        yield address, env
    finally:
        for proc in reversed(procs):
            try:  # `ray start --block` takes ~30 s to wind down; the whole group goes after a short grace
                os.killpg(proc.pid, 15)
                proc.wait(timeout=STOP_GRACE_S)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


# The driver runs in a fresh process: a pytest process that already ran (and shut down) a local Ray instance
# cannot place actors on an external cluster it joins afterwards (Ray keeps per-process state), as a real
# `disagg serve --address` process never has to.
DRIVER = r"""
import json, re, sys
import httpx, openai, ray
from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.stats import Heartbeat
from disagg.router.policy import PolicyConfig
from disagg.transfer.config import TransportConfig

address, model_dir, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ray.init(address=address, _node_ip_address="127.0.0.1")
engine = EngineConfig(model=model_dir, kv_cache_memory_mb=128, num_threads=1)
service = Service(ClusterConfig(num_prefill=1, num_decode=1, engine=engine, address=address,
                                prefill_resources={"node_a": 1}, decode_resources={"node_b": 1},
                                router_resources={"node_a": 1}, transport=TransportConfig(ucx_net_devices="lo")),
                  RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)))
try:
    [prefill] = service.cluster.prefill_by_name.values()
    [decode] = service.cluster.decode_by_name.values()
    nodes = [Heartbeat.from_wire(ray.get(w.heartbeat.remote())).node_id for w in (prefill, decode)]
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="x", max_retries=0, timeout=120)
    before = httpx.get(f"{service.url}/metrics").text
    reply = client.chat.completions.create(model=model_dir.rstrip("/").split("/")[-1], messages=prompt,
                                           max_tokens=24, temperature=0)
    after = httpx.get(f"{service.url}/metrics").text
    stats = Heartbeat.from_wire(ray.get(decode.heartbeat.remote())).stats
    counters = {"transfer_bytes": stats.transfer_bytes, "failed_loads": stats.failed_loads} if stats else {}
    print("RESULT " + json.dumps({"nodes": nodes, "text": reply.choices[0].message.content,
                                  "before": before, "after": after, "counters": counters}))
finally:
    service.shutdown()
    ray.shutdown()
"""


def test_disaggregated_request_crosses_nodes(two_nodes, smollm_dir):
    address, env = two_nodes
    run = subprocess.run([sys.executable, "-c", DRIVER, address, str(smollm_dir), json.dumps(PROMPT)],
                         env={**env, "UCX_NET_DEVICES": "lo"}, capture_output=True, text=True, timeout=600)
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and line, run.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    assert len(set(out["nodes"])) == 2, "prefill and decode workers must sit on different nodes"
    local = LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=64, max_model_len=512))
    expected = local.generate([local.tokenizer.encode_chat(PROMPT)], SamplingParams(max_tokens=24, temperature=0))[0]
    assert out["text"] == expected.text
    # the KV really moved (a failed read would count as path="fallback" and recompute on the decode node)
    assert _count(out["after"], "disaggregated") == _count(out["before"], "disaggregated") + 1
    assert _count(out["after"], "fallback") == _count(out["before"], "fallback")
    assert out["counters"]["transfer_bytes"] > 0 and out["counters"]["failed_loads"] == 0  # read over NIXL


def _count(metrics: str, path: str) -> float:
    return sum(float(m) for m in re.findall(rf'disagg:requests_by_path_total{{[^}}]*path="{path}"[^}}]*}} (\S+)',
                                            metrics))
