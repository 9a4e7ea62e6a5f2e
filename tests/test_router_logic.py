"""Prefix index and routing policy: plain Python, no Ray, no HTTP."""
import hypothesis.strategies as st
from hypothesis import given, settings

from disagg.protocol import KVEvent, KVEventBatch, Tier, hash_prompt_blocks
from disagg.router.index import PrefixIndex
from disagg.router.policy import PolicyConfig, RoutingPolicy, WorkerLoad


def _batch(worker, seq, *events, snapshot=False):
    return KVEventBatch.of(worker, seq, list(events), snapshot)


def _totals(matches):
    return {w: m.total for w, m in matches.items()}


def test_longest_prefix_match_per_worker():
    idx = PrefixIndex()
    hashes = hash_prompt_blocks(list(range(64)), 16)  # 4 blocks
    assert idx.apply(_batch("a", 0, KVEvent("stored", hashes[:3])))
    assert idx.apply(_batch("b", 0, KVEvent("stored", hashes[:1])))
    assert _totals(idx.match(hashes)) == {"a": 3, "b": 1}
    assert _totals(idx.match(hash_prompt_blocks(list(range(1, 65)), 16))) == {}
    assert idx.apply(_batch("a", 1, KVEvent("removed", [hashes[1]])))
    assert _totals(idx.match(hashes)) == {"a": 1, "b": 1}  # a chain broken at block 1 stops the match there
    assert idx.apply(_batch("b", 1, KVEvent("cleared", [])))
    assert _totals(idx.match(hashes)) == {"a": 1}


def test_gap_requires_snapshot_and_snapshot_recovers():
    idx = PrefixIndex()
    h = hash_prompt_blocks(list(range(48)), 16)
    assert idx.apply(_batch("w", 0, KVEvent("stored", h[:1])))
    assert not idx.apply(_batch("w", 2, KVEvent("stored", h[1:2])))  # seq 1 lost
    assert idx.needs_snapshot("w")
    assert not idx.apply(_batch("w", 3, KVEvent("stored", h[2:])))  # still refused until the snapshot
    assert idx.apply(_batch("w", 3, KVEvent("stored", h), snapshot=True))
    assert not idx.needs_snapshot("w") and _totals(idx.match(h)) == {"w": 3}
    assert idx.apply(_batch("w", 4, KVEvent("removed", h[2:])))
    assert _totals(idx.match(h)) == {"w": 2}


def test_worker_restart_resets_sequence_and_is_detected():
    idx = PrefixIndex()
    h = hash_prompt_blocks(list(range(32)), 16)
    idx.apply(_batch("w", 0, KVEvent("stored", h)))
    idx.apply(_batch("w", 1, KVEvent("removed", h[1:])))
    assert not idx.apply(_batch("w", 0, KVEvent("stored", h[:1])))  # a restarted worker starts at 0 again
    assert idx.needs_snapshot("w")


def test_memory_bound_drops_oldest_entries():
    idx = PrefixIndex(max_blocks=10)
    h = hash_prompt_blocks(list(range(16 * 25)), 16)
    idx.apply(_batch("w", 0, KVEvent("stored", h)))
    assert idx.num_blocks == 10 and len(idx.blocks_of("w")) == 10
    assert _totals(idx.match(h)) == {}  # the head of the chain was evicted: never over-report


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["stored", "removed", "cleared"]),
                          st.lists(st.integers(0, 30), max_size=6)), max_size=60))
def test_index_equals_ground_truth_after_random_event_streams(stream):
    idx = PrefixIndex()
    truth: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    seq = {"a": 0, "b": 0, "c": 0}
    for worker, kind, hashes in stream:
        assert idx.apply(_batch(worker, seq[worker], KVEvent(kind, hashes)))
        seq[worker] += 1
        if kind == "stored":
            truth[worker] |= set(hashes)
        elif kind == "removed":
            truth[worker] -= set(hashes)
        else:
            truth[worker].clear()
    for worker, blocks in truth.items():
        assert idx.blocks_of(worker) == blocks
    for h in range(31):
        holders = {w for w, b in truth.items() if h in b}
        assert set(idx.match([h])) == holders


def _engine_walk(held: dict[str, set[int]], chain: list[int]) -> tuple[int, int, int]:
    """How an engine serves `chain`: its device run, then blocks from CPU (preferred) or disk."""
    device = cpu = disk = 0
    i = 0
    while i < len(chain) and chain[i] in held["device"]:
        device, i = device + 1, i + 1
    while i < len(chain) and (chain[i] in held["cpu"] or chain[i] in held["disk"]):
        if chain[i] in held["cpu"]:
            cpu += 1
        else:
            disk += 1
        i += 1
    return device, cpu, disk


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["stored", "removed", "cleared"]),
                          st.sampled_from(["device", "cpu", "disk"]), st.lists(st.integers(0, 11), max_size=6)),
                max_size=80),
       st.lists(st.integers(0, 11), min_size=1, max_size=8))
def test_tiered_index_matches_what_each_engine_would_serve(stream, chain):
    idx = PrefixIndex()
    truth = {w: {"device": set(), "cpu": set(), "disk": set()} for w in "ab"}
    seq = {"a": 0, "b": 0}
    for worker, kind, tier, hashes in stream:
        assert idx.apply(_batch(worker, seq[worker], KVEvent(kind, hashes, tier=tier)))
        seq[worker] += 1
        if kind == "stored":
            truth[worker][tier] |= set(hashes)
        elif kind == "removed":
            truth[worker][tier] -= set(hashes)
        else:
            truth[worker][tier].clear()
    matches = idx.match(chain)
    for worker, held in truth.items():
        for tier, blocks in held.items():
            assert idx.blocks_of(worker, Tier(tier)) == blocks
        expected = _engine_walk(held, chain)
        m = matches.get(worker)
        got = (m.device, m.cpu, m.disk) if m else (0, 0, 0)
        assert got == expected, (worker, held, chain)


def _loads(*names):
    return [WorkerLoad(n) for n in names]


def test_kv_policy_prefers_the_worker_holding_the_prefix_but_weighs_load():
    policy = RoutingPolicy(PolicyConfig(kind="kv", seed=0), block_size=16)
    d = policy.choose(num_tokens=160, matches={"d1": 8}, decode=_loads("d0", "d1"), prefill=[])
    assert d.decode_worker == "d1" and d.overlap_blocks == 8 and d.prefill_worker is None
    busy = [WorkerLoad("d0"), WorkerLoad("d1", active_requests=20, active_blocks=50)]
    assert policy.choose(160, {"d1": 8}, busy, []).decode_worker == "d0"  # 50 blocks of load > 8 saved


def test_round_robin_and_least_loaded_baselines():
    rr = RoutingPolicy(PolicyConfig(kind="round_robin"), 16)
    picks = [rr.choose(100, {"d1": 6}, _loads("d0", "d1"), []).decode_worker for _ in range(4)]
    assert picks == ["d0", "d1", "d0", "d1"]  # ignores the prefix
    ll = RoutingPolicy(PolicyConfig(kind="least_loaded"), 16)
    loads = [WorkerLoad("d0", active_requests=3), WorkerLoad("d1", active_requests=1)]
    assert ll.choose(100, {"d0": 6}, loads, []).decode_worker == "d1"


def test_conditional_disaggregation():
    policy = RoutingPolicy(PolicyConfig(min_remote_prefill_tokens=64, max_prefill_queue_tokens=1000, seed=0), 16)
    decode, prefill = _loads("d0"), _loads("p0", "p1")
    assert policy.choose(40, {}, decode, prefill).prefill_worker is None  # short prompt: local
    cached = policy.choose(200, {"d0": 10}, decode, prefill)  # 160 of 200 cached on d0: 40 uncached
    assert cached.prefill_worker is None
    remote = policy.choose(400, {"p1": 20}, decode, prefill)
    assert remote.prefill_worker == "p1"  # the prefill worker holding the prefix
    saturated = [WorkerLoad("p0", queued_prefill_tokens=5000), WorkerLoad("p1", queued_prefill_tokens=2000)]
    assert policy.choose(400, {}, decode, saturated).prefill_worker is None


def test_session_affinity_is_a_soft_preference():
    policy = RoutingPolicy(PolicyConfig(seed=1, affinity_bonus=4), 16)
    first = policy.choose(64, {}, _loads("d0", "d1"), [], session="s1").decode_worker
    assert all(policy.choose(64, {}, _loads("d0", "d1"), [], session="s1").decode_worker == first
               for _ in range(5))
    loads = [WorkerLoad(n, active_blocks=100 if n == first else 0) for n in ("d0", "d1")]
    assert policy.choose(64, {}, loads, [], session="s1").decode_worker != first  # load wins over affinity


def test_softmax_temperature_spreads_near_ties():
    policy = RoutingPolicy(PolicyConfig(temperature=5.0, seed=3), 16)
    picks = {policy.choose(64, {"d0": 1}, _loads("d0", "d1"), []).decode_worker for _ in range(50)}
    assert picks == {"d0", "d1"}
