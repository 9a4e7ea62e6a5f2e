"""The configs Ray actors are built from travel as msgpack WireMessages (never pickled): a WorkerConfig and a
RouterConfig with every nested config set away from its defaults come back equal, and garbage is refused with
the project's WireFormatError."""
import msgpack
import pytest

from disagg.cluster.journal import JournalConfig
from disagg.cluster.router_service import RouterConfig
from disagg.cluster.worker_config import WorkerConfig, worker_tiers
from disagg.config import EngineConfig, FaultConfig
from disagg.errors import WireFormatError
from disagg.kv.tier_config import TierConfig
from disagg.planner.policy import PlannerConfig
from disagg.protocol import Role
from disagg.router.admission import AdmissionConfig, CapacityConfig
from disagg.router.canary import CanaryConfig
from disagg.router.core_config import RouterCoreConfig
from disagg.router.health import HealthConfig
from disagg.router.outliers import OutlierConfig
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.router.watch import SilentConfig
from disagg.tracing import TracingConfig
from disagg.transfer.config import TransportConfig


def _worker() -> WorkerConfig:
    return WorkerConfig(
        name="decode-1-abc",
        role=Role.DECODE,
        engine=EngineConfig(model="/models/m", block_size=32, num_blocks=77, kv_cache_memory_mb=99, num_threads=3,
                            enable_prefix_caching=False, kv_lease_timeout_s=1.5,
                            faults=FaultConfig(corrupt_layer=1, nan_every=3, slow_factor=2.0)),
        tiers=TierConfig(cpu_bytes=3 << 20, disk_dir="/kv/decode-1", disk_bytes=5 << 20, disk_fsync=True,
                         low_watermark=0.25, disk_root="/kv"),
        transfer_timeout_s=2.5,
        transport_wrapper="tests.fake_transport:FaultyTransport",
        tracing=TracingConfig(otlp_endpoint="http://127.0.0.1:4318/v1/traces", file_dir="/spans", sampling_ratio=0.5),
        transport=TransportConfig(ucx_net_devices="lo", progress_delay_us=7),
        max_backoff_failures=3,
        journal=JournalConfig(orphan_grace_s=5.0, ttl_s=60.0, max_entries=9, max_tokens=999),
    )


def _router() -> RouterConfig:
    return RouterConfig(
        model="/models/m",
        host="0.0.0.0",
        port=8123,
        policy=PolicyConfig(kind=PolicyKind.LEAST_LOADED, overlap_weight=2.5, min_remote_prefill_tokens=16, seed=7,
                            peer_pull=False),
        core=RouterCoreConfig(max_migrations=1, prefill_timeout_s=20.0, attach_timeout_s=3.0),
        health=HealthConfig(heartbeat_interval_s=0.1, max_step_failures=9),
        silent=SilentConfig(canary=CanaryConfig(enabled=True, prompt=[1, 2, 3], fail_after=3),
                            outliers=OutlierConfig(enabled=True, ratio=4.0), check_interval_s=0.2),
        block_size=32,
        max_model_len=1024,
        served_model_name="m",
        api_key="k",
        api_keys={"k1": "alice", "k2": "bob"},
        admission=AdmissionConfig(max_queued_requests=3, default_deadline_s=2.0, tenant_weights={"alice": 2.0, "bob": 0.5}),
        capacity=CapacityConfig(max_running=5, max_kv_fraction=0.5),
        tracing=TracingConfig(file_dir="/spans"),
        planner=PlannerConfig(enabled=True, ttft_slo_s=0.5, min_decode=2),
        start_timeout_s=5.0,
    )


@pytest.mark.parametrize("config", [_worker(), WorkerConfig("w", tiers=None), _router(), RouterConfig()],
                         ids=["worker", "worker-defaults", "router", "router-defaults"])
def test_configs_round_trip_exactly_nested_values_and_enums_included(config):
    back = type(config).from_wire(config.to_wire())
    assert back == config
    assert back is not config


def test_enums_and_nested_configs_come_back_typed():
    worker, router = WorkerConfig.from_wire(_worker().to_wire()), RouterConfig.from_wire(_router().to_wire())
    assert worker.role is Role.DECODE and isinstance(worker.engine, EngineConfig)
    assert isinstance(worker.tiers, TierConfig) and isinstance(worker.tracing, TracingConfig)
    assert isinstance(worker.journal, JournalConfig) and worker.journal.orphan_grace_s == 5.0
    assert router.policy.kind is PolicyKind.LEAST_LOADED and isinstance(router.admission, AdmissionConfig)


def _body(config) -> dict:
    return msgpack.unpackb(config.to_wire(), raw=False)


@pytest.mark.parametrize("mutate", [
    lambda b: b.update(role="sideways"),  # not a Role
    lambda b: b["engine"].update(block_size="16"),  # a string where an int goes
    lambda b: b["engine"].update(flux=1),  # a field EngineConfig does not have
    lambda b: b["engine"].pop("model"),  # a field missing
    lambda b: b.update(tiers=[1, 2]),  # neither a TierConfig nor None
    lambda b: b["transport"].update(progress_delay_us=True),  # a bool is no int
    lambda b: b.update(type="router_config"),  # another message's tag
    lambda b: b["engine"].update(block_size=12),  # EngineConfig's own validation (a power of two)
], ids=["enum", "type", "extra", "missing", "optional", "bool", "tag", "validation"])
def test_a_worker_config_that_does_not_fit_its_schema_is_refused(mutate):
    body = _body(_worker())
    mutate(body)
    with pytest.raises(WireFormatError):
        WorkerConfig.from_wire(msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize("mutate", [
    lambda b: b["policy"].update(kind="random"),
    lambda b: b["admission"].update(tenant_weights={"alice": "heavy"}),
    lambda b: b.update(api_keys={"k": 1}),
    lambda b: b.update(planner=None),
    lambda b: b["tracing"].update(sampling_ratio=None),
], ids=["policy-kind", "weights", "api-keys", "planner", "tracing"])
def test_a_router_config_that_does_not_fit_its_schema_is_refused(mutate):
    body = _body(_router())
    mutate(body)
    with pytest.raises(WireFormatError):
        RouterConfig.from_wire(msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"garbage", msgpack.packb([1, 2]), msgpack.packb({"type": "x"})])
def test_garbage_bytes_are_refused(payload):
    for cls in (WorkerConfig, RouterConfig):
        with pytest.raises(WireFormatError):
            cls.from_wire(payload)


def test_worker_tiers_give_each_worker_its_own_disk_directory(monkeypatch, tmp_path):
    assert worker_tiers(None, "decode-0") is None
    assert worker_tiers(TierConfig(disk_root=str(tmp_path)), "decode-0").disk_dir == str(tmp_path / "decode-0")
    assert worker_tiers(TierConfig(disk_root=""), "decode-0").disk_dir == ""  # no disk tier
    assert worker_tiers(TierConfig(disk_dir="/mine", disk_root="/r"), "decode-0").disk_dir == "/mine"
    monkeypatch.setenv("DISAGG_KV_ROOT", str(tmp_path / "env"))
    tiers = TierConfig(cpu_bytes=1 << 20)
    assert worker_tiers(tiers, "prefill-1") == TierConfig(cpu_bytes=1 << 20, disk_dir=str(tmp_path / "env" / "prefill-1"))
    assert tiers.disk_dir == ""  # the cluster's config is left as it was
