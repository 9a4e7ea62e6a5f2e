"""Tenant cache isolation (issue 23): salted block hashes on the engine, the tiers and the router's index alike;
sessions and pins namespaced by tenant with a per-tenant pin budget; tenant names hashed in /metrics.  In-process:
the simulator runs the real engine (block pool, scheduler, prefix cache) and the real RouterCore."""
from disagg.http.schemas import ChatCompletionRequest
from disagg.isolation import DEFAULT_TENANT, IsolationConfig, tenant_label
from disagg.kv.tier_index import LruBlocks, TierIndex
from disagg.protocol import Request
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.sim.cluster import SimCluster, SimClusterConfig, sampling_for
from disagg.sim.timemodel import StepTimeModel
from disagg.telemetry import QueueView, queue_metrics

MODEL = StepTimeModel(base=0.01, per_token=0.001, per_seq=0.002, per_attn=0.0, transfer_latency=0.005,
                      transfer_bandwidth=1e9, bytes_per_block=1_000_000)
PROMPT = list(range(300, 396))  # 6 full blocks of 16
ISOLATED = IsolationConfig()


def _request(rid, tenant, cache_salt=None, config=ISOLATED, prompt=PROMPT):
    return Request(rid, list(prompt), sampling_for(2), cache_salt=config.cache_salt(tenant, cache_salt),
                   tenant=None if tenant == DEFAULT_TENANT else tenant)


def _cached_tokens(cluster, request):
    """Run one request to the end; the cached_tokens its usage would report."""
    deltas = []
    cluster.submit(request, lambda t, d: deltas.append(d))
    cluster.run()
    assert deltas and deltas[-1].finished
    return max(d.num_cached_tokens for d in deltas)


def _one_worker():
    return SimCluster(SimClusterConfig(num_decode=1, num_blocks=64, max_model_len=1024), MODEL)


def _four_workers():
    return SimCluster(SimClusterConfig(num_decode=4, num_blocks=256, policy=PolicyConfig(kind=PolicyKind.KV, seed=0)),
                      MODEL)


def test_cross_tenant_probe_via_cached_tokens_finds_nothing_but_the_same_tenant_hits():
    cluster = _one_worker()
    assert _cached_tokens(cluster, _request("a1", "alice")) == 0
    assert _cached_tokens(cluster, _request("b1", "bob")) == 0  # bob probes alice's prefix: no hit
    assert _cached_tokens(cluster, _request("d1", DEFAULT_TENANT)) == 0  # nor does the default tenant
    assert _cached_tokens(cluster, _request("a2", "alice")) == len(PROMPT) - 16  # alice hits her own prefix


def test_the_default_tenant_hashes_exactly_as_before():
    """No tenant and no cache_salt: no salt, so unsalted clients (and the simulator's golden runs) are unchanged."""
    assert ISOLATED.cache_salt(DEFAULT_TENANT) is None and ISOLATED.cache_salt(None) is None
    cluster = _one_worker()
    _cached_tokens(cluster, Request("plain", list(PROMPT), sampling_for(2)))
    assert _cached_tokens(cluster, _request("d1", DEFAULT_TENANT)) == len(PROMPT) - 16


def test_same_cache_salt_or_share_group_shares_hits_across_tenants():
    cluster = _one_worker()
    _cached_tokens(cluster, _request("a1", "alice", cache_salt="team-x"))
    assert _cached_tokens(cluster, _request("b1", "bob", cache_salt="team-x")) == len(PROMPT) - 16
    assert _cached_tokens(cluster, _request("c1", "carol", cache_salt="team-y")) == 0
    grouped = IsolationConfig(share_groups={"alice": "g", "bob": "g"})
    _cached_tokens(cluster, _request("a2", "alice", config=grouped, prompt=PROMPT[::-1]))
    assert _cached_tokens(cluster, _request("b2", "bob", config=grouped, prompt=PROMPT[::-1])) == len(PROMPT) - 16
    assert _cached_tokens(cluster, _request("c2", "carol", config=grouped, prompt=PROMPT[::-1])) == 0


def test_a_client_salt_cannot_name_a_tenants_or_groups_chain():
    grouped = IsolationConfig(share_groups={"alice": "g"})
    tenant_salts = {grouped.cache_salt("alice"), grouped.cache_salt("bob")}
    assert grouped.cache_salt("mallory", "alice") not in tenant_salts
    assert grouped.cache_salt("mallory", "g") not in tenant_salts
    assert grouped.cache_salt("mallory", "bob") not in tenant_salts


def test_the_router_index_routes_by_salted_hashes():
    cluster = _four_workers()
    prefix = list(range(1000, 1160))  # 10 blocks
    _cached_tokens(cluster, _request("warm", "alice", prompt=prefix + [1]))
    holder = cluster.router.decision_of("warm").decode_worker
    again = cluster.router.route(_request("a2", "alice", prompt=prefix + [2]))
    assert again.decode_worker == holder and again.predicted_cached_tokens(len(prefix) + 1, 16) == len(prefix)
    probe = cluster.router.route(_request("b1", "bob", prompt=prefix + [2]))
    assert probe.predicted_cached_tokens(len(prefix) + 1, 16) == 0  # bob's hashes match nothing of alice's


def test_pin_hijack_another_tenants_session_id_does_not_replace_its_pin():
    index = TierIndex(LruBlocks(), None, pin_budget=10)
    index.pin("chat-1", [1, 2, 3], ttl_s=100, now=0, tenant="alice")
    index.pin("chat-1", [7, 8], ttl_s=100, now=0, tenant="bob")  # bob reuses alice's session id
    assert index.is_pinned_session("chat-1", "alice") and index.is_pinned_session("chat-1", "bob")
    assert all(index.is_pinned(h) for h in (1, 2, 3, 7, 8))
    index.unpin("chat-1", "bob")
    assert all(index.is_pinned(h) for h in (1, 2, 3)) and not index.is_pinned(7)


def test_router_session_affinity_is_namespaced_by_tenant():
    cluster = _four_workers()
    cluster.router.route(_request("a1", "alice", prompt=[5] * 40), session="s")
    assert list(cluster.router.policy._sessions) == [("alice", "s")]
    cluster.router.route(_request("b1", "bob", prompt=[6] * 40), session="s")
    assert set(cluster.router.policy._sessions) == {("alice", "s"), ("bob", "s")}


def test_a_tenants_long_ttl_pins_cannot_push_out_the_others():
    index = TierIndex(LruBlocks(), None, pin_budget=10, tenant_pin_share=0.5)
    index.pin("a1", [1, 2, 3, 4, 5], ttl_s=3600, now=0, tenant="alice")
    index.pin("b1", [11, 12, 13, 14, 15], ttl_s=10, now=0, tenant="bob")
    index.pin("a2", [21, 22, 23, 24, 25], ttl_s=3600, now=0, tenant="alice")  # over alice's share: her own go
    assert index.is_pinned_session("b1", "bob") and all(index.is_pinned(h) for h in range(11, 16))
    assert not index.is_pinned_session("a1", "alice") and index.is_pinned_session("a2", "alice")
    assert index.pin("a3", list(range(100, 120)), ttl_s=3600, now=0, tenant="alice") == 5  # capped at her share
    assert index.is_pinned_session("b1", "bob")


def test_the_request_body_accepts_vllms_cache_salt():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], cache_salt="team-x")
    assert body.cache_salt == "team-x"


def test_metrics_label_tenants_by_a_stable_hash_not_their_name():
    queue = QueueView({(0, "acme-corp"): 2, (0, DEFAULT_TENANT): 1}, 0, {}, {"acme-corp": 10.0})
    labels = {s.labels["tenant"] for family in queue_metrics(queue) for s in family.samples if "tenant" in s.labels}
    assert "acme-corp" not in labels
    assert labels == {tenant_label("acme-corp"), DEFAULT_TENANT}
    assert tenant_label("acme-corp") == tenant_label("acme-corp") != tenant_label("acme-corq")


def test_a_full_pin_budget_is_freed_from_the_biggest_holder_first():
    index = TierIndex(LruBlocks(), None, pin_budget=10, tenant_pin_share=0.6)
    index.pin("a1", [1, 2, 3, 4, 5, 6], ttl_s=3600, now=0, tenant="alice")
    index.pin("b1", [11, 12, 13, 14], ttl_s=10, now=0, tenant="bob")
    index.pin("c1", [21, 22], ttl_s=3600, now=0, tenant="carol")  # full: alice holds the most, her pin goes
    assert index.is_pinned_session("b1", "bob") and index.is_pinned_session("c1", "carol")
    assert not index.is_pinned_session("a1", "alice")


def test_serve_takes_share_groups_from_the_command_line():
    from disagg.cluster.serve_cli import build_parser, router_config_from_args

    args = build_parser().parse_args(["--cache-share-groups", "alice=g, bob=g"])
    assert router_config_from_args(args).isolation.share_groups == {"alice": "g", "bob": "g"}
    assert router_config_from_args(build_parser().parse_args([])).isolation.share_groups == {}
