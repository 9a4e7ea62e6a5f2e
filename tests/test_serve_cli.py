"""`disagg serve`'s options are generated from the config dataclasses (disagg/options.py) under the names the
README, docs and deploy files use; these pin what each option sets (the values the hand-written parser gave)."""
import pytest

from disagg.cluster.launch import ClusterConfig, RouterConfig
from disagg.http.config import AgentConfig, IdleConfig
from disagg.http.response_store import ResponseStoreConfig
from disagg.cluster.serve_cli import build_parser, cluster_config_from_args, router_config_from_args
from disagg.config import EngineConfig
from disagg.kv.tier_config import TierConfig
from disagg.planner.policy import PlannerConfig
from disagg.router.admission import AdmissionConfig, CapacityConfig
from disagg.router.core_config import RouterCoreConfig
from disagg.router.placement import Placement
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.tracing import TracingConfig
from disagg.transfer.config import TransportConfig


def _parse(argv):
    args = build_parser().parse_args(argv)
    return cluster_config_from_args(args), router_config_from_args(args), args


def test_defaults_are_the_serving_defaults():
    cluster, router, args = _parse([])
    assert cluster == ClusterConfig(engine=EngineConfig(kv_cache_memory_mb=512, num_threads=1),
                                    tiers=TierConfig(cpu_bytes=256 << 20, disk_bytes=1 << 30))
    assert cluster.tiers.disk_root is None  # the default root, a directory per worker under it
    assert router == RouterConfig(port=8000, policy=PolicyConfig(ttft_target_s=2.0, tpot_target_s=0.2))  # SLOs
    assert not args.smoke_test and args.question


def test_every_option_sets_its_field():
    cluster, router, args = _parse([
        "--address", "127.0.0.1:6379", "--host", "0.0.0.0", "--port", "8001", "--prefill", "2", "--decode", "3",
        "--policy", "round_robin", "--ucx-net-devices", "lo", "--router-resources", '{"r": 1}', "--model", "/m",
        "--kv-cache-mb", "100", "--max-model-len", "1024", "--threads", "3", "--block-size", "32",
        "--nixl-progress-delay-us", "5", "--cpu-tier-mb", "64", "--disk-tier-dir", "", "--disk-tier-mb", "10",
        "--max-migrations", "1", "--tenant-weights", "a=2,b=0.5", "--queue-max-requests", "7", "--max-running", "9",
        "--max-prefill-queue-tokens", "11", "--queue-deadline-s", "3", "--otlp-endpoint", "http://x", "--planner",
        "--slo-ttft-ms", "500", "--slo-tpot-ms", "50", "--trace-sample-ratio", "0.5", "--trace-dir", "/t",
        "--api-key", "k", "--smoke-test", "--placement", "cost", "--prefill-chunk-target-ms", "150",
        "--min-prefill-chunk", "16", "--responses-max-per-tenant", "5", "--responses-ttl-s", "60",
        "--max-num-batched-tokens", "2048",
        "--tool-turn-retention-s", "0", "--pin-budget-fraction", "0.25", "--tenant-pin-share", "0.1",
        "--sleep-after-idle-s", "30", "--wake-on-request", "--flexible-workers",
    ])
    tracing = TracingConfig(otlp_endpoint="http://x", file_dir="/t", sampling_ratio=0.5)
    assert cluster == ClusterConfig(
        num_prefill=2, num_decode=3, address="127.0.0.1:6379",
        engine=EngineConfig(model="/m", kv_cache_memory_mb=100, max_model_len=1024, num_threads=3, block_size=32,
                            prefill_chunk_target_ms=150.0, min_prefill_chunk=16, max_num_batched_tokens=2048),
        tiers=TierConfig(cpu_bytes=64 << 20, disk_bytes=10 << 20, disk_root="", pin_budget_fraction=0.25,
                         tenant_pin_share=0.1), tracing=tracing,
        transport=TransportConfig(ucx_net_devices="lo", progress_delay_us=5), router_resources={"r": 1.0})
    assert router == RouterConfig(
        host="0.0.0.0", port=8001, api_key="k", policy=PolicyConfig(kind=PolicyKind.ROUND_ROBIN, placement=Placement.COST, ttft_target_s=0.5,
                                                            tpot_target_s=0.05, flexible=True),
        core=RouterCoreConfig(max_migrations=1),
        planner=PlannerConfig(enabled=True, ttft_slo_s=0.5, tpot_slo_s=0.05),
        capacity=CapacityConfig(max_running=9, max_prefill_queue_tokens=11),
        admission=AdmissionConfig(max_queued_requests=7, default_deadline_s=3.0, tenant_weights={"a": 2.0, "b": 0.5}),
        responses=ResponseStoreConfig(max_per_tenant=5, ttl_s=60.0), agents=AgentConfig(tool_turn_retention_s=0.0),
        idle=IdleConfig(sleep_after_idle_s=30.0, wake_on_request=True))
    assert args.smoke_test


def test_no_cpu_tier_means_no_tiers_and_tracing_stays_off_unless_asked():
    cluster, _, _ = _parse(["--cpu-tier-mb", "0", "--trace-sample-ratio", "0.1"])
    assert cluster.tiers is None and cluster.tracing is None
    cluster, _, _ = _parse(["--trace-dir", "/t"])
    assert cluster.tracing == TracingConfig(file_dir="/t")


def test_bad_values_are_refused():
    for argv in (["--policy", "random"], ["--prefill", "two"], ["--router-resources", "[1]"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_serve_stops_on_a_signal_however_many_arrive():
    """`disagg serve` waits for Ctrl-C / SIGTERM; a burst of signals (a second Ctrl-C, a supervisor's TERM after an
    INT) must stop it too - a handler that set a threading.Event could deadlock the main thread on the Event's lock."""
    import os
    import signal
    import threading
    import time

    from disagg.cluster.serve_cli import wait_for_stop

    late = []  # signals of the burst that arrive after it returned land here, not in Python's default handlers

    def after(signum, _frame):
        late.append(signum)

    defaults = {sig: signal.signal(sig, after) for sig in (signal.SIGINT, signal.SIGTERM)}

    def burst():
        time.sleep(0.2)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGINT):
            os.kill(os.getpid(), sig)

    sender = threading.Thread(target=burst, daemon=True)
    sender.start()
    started = time.monotonic()
    try:
        assert wait_for_stop() is signal.SIGINT
        assert time.monotonic() - started < 5
        assert signal.getsignal(signal.SIGTERM) is after  # the previous handlers are back
        sender.join()
    finally:
        for sig, handler in defaults.items():
            signal.signal(sig, handler)
