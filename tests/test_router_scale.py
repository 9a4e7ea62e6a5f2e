"""Routing cost at scale changes no decision: the ranked policy (router/ranking.py) against scoring every worker,
the index walk against the straightforward one, sliced KV-event ingest against whole batches, and the one-pack
prompt hashing against hashing block by block, on random indexes, loads, sessions, tiers and worker states."""
import math
import random
import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.errors import ServiceUnavailable
from disagg.isolation import affinity, salt_root
from disagg.protocol import (
    EventKind, KVEvent, KVEventBatch, LoRARef, Request, Role, Tier, hash_block_tokens, hash_prompt_blocks,
)
from disagg.router.core_config import RouterCoreConfig
from disagg.router.index import Ingest, PrefixIndex, TierMatch
from disagg.router.native_score import CANDIDATES
from disagg.router.prompt_hash import NativePromptHasher, make_prompt_hasher
from disagg.router.policy import PolicyConfig, RoutingPolicy
from disagg.router.router import RouterCore

BLOCK = 4
TIERS = (Tier.DEVICE, Tier.CPU, Tier.DISK)


# ---------------------------------------------------------------------------------------------- references
def reference_match(index: PrefixIndex, block_hashes: list[int]) -> dict[str, TierMatch]:
    """The index walk as it was before the routing-cost work: every worker, every block."""
    owners_of = index.table.owners
    matches: dict[str, TierMatch] = {}
    if not block_hashes or not owners_of(block_hashes[0]):
        return matches
    first = owners_of(block_hashes[0])
    active = dict(first)
    in_tier_phase: set[str] = set()
    cpu_run_open = set(active)
    for worker in active:
        matches[worker] = TierMatch()
    for h in block_hashes:
        owners = owners_of(h)
        if not owners:
            break
        for worker in list(active):
            bits = owners.get(worker, 0)
            m = matches[worker]
            if worker not in in_tier_phase and bits & 1:
                m.device += 1
                m.exportable += 1
                continue
            if not bits & 6:
                del active[worker]
                continue
            in_tier_phase.add(worker)
            if bits & 2:
                m.cpu += 1
                if worker in cpu_run_open:
                    m.exportable += 1
            else:
                m.disk += 1
                cpu_run_open.discard(worker)
        if not active:
            break
    return {w: m for w, m in matches.items() if m.total}


def reference_decision(core: RouterCore, ref: RoutingPolicy, request: Request, session, only):
    """What RouterCore.route decided before: every eligible decode worker scored by RoutingPolicy.choose."""
    hashes = core.block_hashes(request)
    decode = [core.loads[n] for n in core.decode if core.health.routable(n) and (only is None or only(n))]
    if not decode:
        return None
    prefill = [core.loads[n] for n in core.prefill if core.health.routable(n)]
    lora = request.lora
    key = affinity(request.tenant, session, (lora.name, lora.path) if lora is not None else None)
    return ref.choose(request.num_tokens, reference_match(core.index, hashes), decode, prefill, key, frozenset(hashes))


def count_native_picks(core: RouterCore) -> Counter:
    """How the core's native candidates settle its decisions from now on: "settled", "unsettled" (the Python pick
    decides), "unrankable" or None (no eligible worker)."""
    outcomes, pick = Counter(), core.policy._scored_pick

    def counted(scored, eligible):
        picked = pick(scored, eligible)
        outcomes["settled" if isinstance(picked, tuple) else picked] += 1
        return picked

    core.policy._scored_pick = counted
    return outcomes


# ---------------------------------------------------------------------------------------------- a random cluster
class World:
    """A RouterCore and a reference policy with the same seed, driven by random events, loads and states."""

    def __init__(self, seed: int, decode_workers: tuple[int, int] = (1, 12), native: bool = True) -> None:
        rng = self.rng = random.Random(seed)
        config = PolicyConfig(
            seed=seed,
            overlap_weight=rng.choice([0.0, 1.0, 6.0, 2.5]),
            queue_weight=rng.choice([0.0, 1.0, 0.3, 2.0]),
            affinity_bonus=rng.choice([0.0, 4.0, 1.5]),
            cpu_load_cost=rng.choice([0.05, 2.0]),
            disk_load_cost=rng.choice([0.3, 0.7]),
            adapter_affinity_bonus=rng.choice([8.0, 0.5]),
            peer_pull=rng.random() < 0.7,
            min_remote_prefill_tokens=rng.choice([8, 64]),
        )
        n_decode, n_prefill = rng.randint(*decode_workers), rng.choice([0, 0, 1, 3])
        self.names = [f"w{i}" for i in range(n_decode + n_prefill)]
        prefill = {n: None for n in self.names[n_decode:]}
        tables = RouterCoreConfig(native_index=native)  # C++ tables and scoring, or the Python ones
        self.core = RouterCore(prefill, {n: None for n in self.names[:n_decode]}, config, BLOCK, tables)
        self.ref = RoutingPolicy(config, BLOCK)
        self.seq = dict.fromkeys(self.names, -1)
        self.chains = [[rng.randrange(100) for _ in range(BLOCK * 12)] for _ in range(6)]
        self.tickets: list = []

    def prompt(self) -> list[int]:
        chain, rng = self.rng.choice(self.chains), self.rng
        return chain[: rng.randint(0, len(chain))] + [rng.randrange(100) for _ in range(rng.randint(1, 9))]

    def kv_events(self) -> None:
        rng, w = self.rng, self.rng.choice(self.names)
        hashes = hash_prompt_blocks(self.prompt(), BLOCK)
        start = rng.randint(0, max(0, len(hashes) - 1)) if rng.random() < 0.2 else 0  # a hole, sometimes
        kind = rng.choice([EventKind.STORED] * 3 + [EventKind.REMOVED, EventKind.CLEARED])
        self.seq[w] += 1
        event = KVEvent(kind, hashes[start:] if kind is not EventKind.CLEARED else [], tier=rng.choice(TIERS))
        self.core.on_kv_events(KVEventBatch(w, self.seq[w], [event]))

    def route(self, i: int) -> None:
        rng, core = self.rng, self.core
        lora = rng.choice([None, None, LoRARef("a1", "/adapters/a1")])  # no session: its adapter's affinity
        request = Request(f"r{i}", self.prompt(), tenant=rng.choice([None, "t"]), lora=lora)
        session = rng.choice([None, None, "s1", "s2", "s3"])
        allowed = set(rng.sample(self.names, rng.randint(0, len(self.names))))
        only = rng.choice([None, allowed.__contains__])
        expected = reference_decision(core, self.ref, request, session, only)
        if expected is None:
            with pytest.raises(ServiceUnavailable):
                core.route(request, session, only=only)
            return
        got = core.route(request, session, only=only)
        for name in ("decode_worker", "prefill_worker", "overlap_blocks", "reason", "match", "peer_worker",
                     "peer_blocks", "prefill_cached_blocks"):
            assert getattr(got, name) == getattr(expected, name), name
        assert got.costs.items() <= expected.costs.items() or any(math.isnan(c) for c in expected.costs.values())
        assert got.decode_worker in got.costs or not got.costs
        if rng.random() < 0.7:
            self.tickets.append(core.begin(got, request.num_tokens, core.block_hashes(request)))

    def run(self, steps: int, events: float, routes: float) -> None:
        """`steps` random steps: KV events, routed requests (each checked against the reference) or churn, in these
        shares (the rest churn)."""
        for i in range(steps):
            roll = self.rng.random()
            if roll < events:
                self.kv_events()
            elif roll < events + routes:
                self.route(i)
            else:
                self.churn()

    def churn(self) -> None:
        """Loads, measured tier costs, health and roles move."""
        rng, core = self.rng, self.core
        roll, w = rng.random(), rng.choice(self.names)
        if roll < 0.3 and self.tickets:
            ticket = self.tickets.pop(rng.randrange(len(self.tickets)))
            core.progress(ticket, rng.randint(1, 9))
            if rng.random() < 0.6:
                core.end(ticket)
            else:
                self.tickets.append(ticket)
        elif roll < 0.4:  # set directly, as tests and heartbeats do
            core.loads[w].active_blocks = rng.choice([0, 3, 10, 10_000])
        elif roll < 0.5:
            core.loads[w].tier_cost = {Tier.CPU: rng.choice([0.02, 0.5, 3.0, math.inf]), Tier.DISK: rng.random()}
        elif roll < 0.65:
            rng.choice([core.health.drain, core.health.undrain, core.health.take_out, core.health.mark_ready])(w, "t")
        elif roll < 0.75 and (w in core.prefill or len(core.decode) > 1):
            core.set_routing_role(w, Role.PREFILL if w in core.decode else Role.DECODE)


@pytest.mark.parametrize("native", [True, False], ids=["cpp-scoring", "python-ranking"])
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_ranked_decisions_are_the_full_scorings(native, seed):
    world = World(seed, native=native)
    assert (world.core.ranking.scorer is not None) == native
    world.run(120, events=0.35, routes=0.4)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_native_scoring_past_its_candidates_is_the_full_scoring(seed):
    """More decode workers than the native call returns candidates (router/native_score.py): a decision it settles,
    and one it leaves to the Python pick (every candidate refused by `only`, or ties past the last one), are both
    the full scoring's; the native path is taken, not skipped."""
    world = World(seed, decode_workers=(CANDIDATES + 1, 2 * CANDIDATES + 8))
    assert world.core.ranking.scorer is not None
    outcomes = count_native_picks(world.core)
    world.run(150, events=0.3, routes=0.5)
    assert outcomes["settled"] > 0, outcomes


def test_a_nan_cost_never_wins_on_either_path():
    """Overlap weight 0 and a measured CPU price of -inf (a faulty heartbeat) on the worker holding the prompt in its
    CPU tier: its cost is 0 x -inf = NaN.  The native scoring hands such a decision to the full scoring, where a
    NaN cost never wins (the minimum of NaN and a number depended on their order before); the Python tables the
    same."""
    prompt = list(range(4 * BLOCK + 1))
    for native in (True, False):
        config = RouterCoreConfig(native_index=native)
        core = RouterCore({}, {"w0": None, "w1": None}, PolicyConfig(seed=0, overlap_weight=0.0), BLOCK, config)
        assert (core.ranking.scorer is not None) == native
        stored = KVEvent(EventKind.STORED, hash_prompt_blocks(prompt, BLOCK), tier=Tier.CPU)
        assert core.on_kv_events(KVEventBatch("w0", 0, [stored]))
        core.loads["w0"].tier_cost = {Tier.CPU: -math.inf}
        for i in range(5):
            assert core.route(Request(f"r{i}", prompt)).decode_worker == "w1"
        with pytest.raises(TypeError):  # replaced whole or not at all: an edit in place would skip the C++ copy
            core.loads["w0"].tier_cost[Tier.CPU] = 0.5  # type: ignore[index]


def test_repeated_hashes_count_once_in_the_shared_blocks_term():
    """A caller's hash list with repeats (chained hashes never repeat; a list handed to route() may): the native
    scoring counts each in-flight block once, as the Python policy's set does."""
    for native in (True, False):
        core = RouterCore({}, {"a": None, "b": None}, PolicyConfig(seed=1), BLOCK, RouterCoreConfig(native_index=native))
        prompt = list(range(8 * BLOCK + 1))
        hashes = hash_prompt_blocks(prompt, BLOCK)
        held = core.begin(core.route(Request("held", prompt), only="a".__eq__), len(prompt), hashes)  # a holds all 8
        core.progress(held, 1)  # past its first token: nothing queued on a
        core.loads["a"].active_blocks = 12  # its in-flight requests hold the prompt's 8 full blocks, and 4 more
        # nothing cached anywhere: a costs 6 x 9 + (12 + 9 - shared), b costs 6 x 9 + 9.  Shared counted once (8):
        # a 67, b 63, b wins; counted once per repeat (16), a would cost 59 and win
        repeated = hashes + hashes
        assert core.route(Request("r", prompt), hashes=repeated).decode_worker == "b"
        ref = RoutingPolicy(PolicyConfig(seed=1), BLOCK)
        decode = [core.loads["a"], core.loads["b"]]
        assert ref.choose(len(prompt), {}, decode, [], None, frozenset(repeated)).decode_worker == "b"


def test_ranked_decisions_at_many_idle_and_tied_workers():
    # 64 idle workers, no prefix cached: every worker ties, the choice among them follows the routing order
    # (more ties than the native call's 16 candidates: the Python pick settles those, and must agree)
    core = RouterCore({}, {f"w{i}": None for i in range(64)}, PolicyConfig(seed=3), block_size=BLOCK)
    ref = RoutingPolicy(PolicyConfig(seed=3), BLOCK)
    outcomes = count_native_picks(core)
    for i in range(200):
        request = Request(f"r{i}", list(range(i % 7, i % 7 + 20)))
        expected = reference_decision(core, ref, request, None, None)
        assert core.route(request).decode_worker == expected.decode_worker
        if i % 3:
            core.begin(expected, request.num_tokens, core.block_hashes(request))
    assert outcomes["unsettled"] > 0 and outcomes["settled"] > 0, outcomes


def test_a_tier_a_worker_serves_none_of_the_prompt_from_adds_nothing_whatever_its_price():
    """A measured price of -inf for loading from CPU (a faulty heartbeat) on a worker holding none of the prompt in
    CPU: its cost stays a number (0 blocks x -inf was NaN, and the pick among NaN costs was arbitrary), so the less
    loaded worker wins; the price still counts where the worker does hold CPU blocks."""
    from disagg.router.ranking import WorkerLoad

    policy = RoutingPolicy(PolicyConfig(seed=0), BLOCK)
    busy, idle = WorkerLoad("busy", active_blocks=50), WorkerLoad("idle", tier_cost={Tier.CPU: -math.inf})
    decision = policy.choose(64, {}, [busy, idle], [])
    assert decision.decode_worker == "idle" and all(math.isfinite(c) for c in decision.costs.values())
    decision = policy.choose(64, {"idle": TierMatch(cpu=2)}, [busy, idle], [])
    assert decision.costs["idle"] == -math.inf


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_index_walk_is_the_straightforward_one(seed):
    world = World(seed)
    for _ in range(60):
        world.kv_events()
        hashes = hash_prompt_blocks(world.prompt(), BLOCK)
        got, expected = world.core.index.match(hashes), reference_match(world.core.index, hashes)
        assert list(got.items()) == list(expected.items())  # same workers, same order (the peer choice reads it)


def _random_batches(rng: random.Random, workers: list[str], n: int) -> list[KVEventBatch]:
    seq = dict.fromkeys(workers, -1)
    batches = []
    for _ in range(n):
        w = rng.choice(workers)
        seq[w] += 1
        events = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice([EventKind.STORED] * 3 + [EventKind.REMOVED, EventKind.CLEARED])
            hashes = [rng.randrange(300) for _ in range(rng.randint(0, 40))] if kind is not EventKind.CLEARED else []
            events.append(KVEvent(kind, hashes, tier=rng.choice(TIERS)))
        batches.append(KVEventBatch(w, seq[w], events, snapshot=rng.random() < 0.1))
    return batches


def _state(index: PrefixIndex) -> tuple:
    workers = ("a", "b", "c")
    return index.table.holders(), {w: (index.blocks_of(w), index.needs_snapshot(w)) for w in workers}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 17))
def test_sliced_ingest_leaves_the_index_as_whole_batches_do(seed, slice_blocks):
    rng = random.Random(seed)
    whole = PrefixIndex(max_blocks=rng.choice([50, 10_000]))
    sliced = PrefixIndex(max_blocks=whole.max_blocks)
    ingest = Ingest(sliced, threading.Lock(), slice_blocks)
    for batch in _random_batches(rng, ["a", "b", "c"], 40):
        assert whole.apply(batch) == ingest.apply(batch)
    assert _state(whole) == _state(sliced)


class _CountingLock:
    """A lock that records how many blocks the index holds at each release."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index, self.lock, self.sizes = index, threading.Lock(), []

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.sizes.append(self.index.num_blocks)
        self.lock.release()


def test_a_big_batch_never_holds_the_routers_lock_for_more_than_a_slice():
    index = PrefixIndex()
    lock = _CountingLock(index)
    ingest = Ingest(index, lock, 100)
    assert ingest.apply(KVEventBatch("w", 0, [KVEvent(EventKind.STORED, list(range(1000)))]))
    steps = [b - a for a, b in zip([0, *lock.sizes], lock.sizes)]
    assert max(steps) <= 100 and sum(steps) == 1000 and len(lock.sizes) >= 10
    # a gap applies nothing and flags the worker for a snapshot, as before
    assert not ingest.apply(KVEventBatch("w", 5, [KVEvent(EventKind.STORED, [7_000])]))
    assert index.needs_snapshot("w") and 7_000 not in index.blocks_of("w")
    # a snapshot replaces what the worker held, also in slices
    assert ingest.apply(KVEventBatch("w", 6, [KVEvent(EventKind.STORED, [1, 2, 3])], snapshot=True))
    assert index.blocks_of("w") == {1, 2, 3} and not index.needs_snapshot("w")


def test_a_worker_taken_out_during_a_batch_is_not_put_back_by_its_rest():
    index = PrefixIndex()
    steps = index.begin(KVEventBatch("w", 0, [KVEvent(EventKind.STORED, list(range(10)))]), 4)
    next(steps)  # 4 blocks in: the router releases its lock here, and the worker dies meanwhile
    index.remove_worker("w")
    list(steps)
    assert not index.has_worker("w") and index.num_blocks == 0


def test_the_router_core_ingests_in_its_configured_slices():
    core = RouterCore({}, {"w": None}, config=RouterCoreConfig(ingest_slice_blocks=8), block_size=BLOCK)
    assert core.ingest.slice_blocks == 8
    hashes = hash_prompt_blocks(list(range(40 * BLOCK)), BLOCK)
    assert core.on_kv_events(KVEventBatch("w", 0, [KVEvent(EventKind.STORED, hashes)]))
    assert core.index.match(hashes)["w"].device == 40


@given(st.lists(st.integers(0, 2**31 - 1), max_size=80), st.sampled_from([1, 2, 4, 16]),
       st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_prompt_hashes_are_the_block_by_block_chain(tokens, block_size, parent):
    expected, h = [], parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hash_block_tokens(h, tokens[start : start + block_size])
        expected.append(h)
    assert hash_prompt_blocks(tokens, block_size, parent) == expected


_NATIVE_HASH = make_prompt_hasher(native=True)


@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=300), st.sampled_from([1, 3, 16, 32, 33, 64]),
       st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_the_routers_native_prompt_hashing_is_the_reference(tokens, block_size, parent):
    """block_hash.cpp against protocol.hash_prompt_blocks (what every worker hashes with), bit for bit: messages of
    one and several BLAKE2b blocks (block sizes past 30 tokens), the root and salted parents, negative ids."""
    assert isinstance(_NATIVE_HASH, NativePromptHasher)
    assert _NATIVE_HASH(tokens, block_size, parent) == hash_prompt_blocks(tokens, block_size, parent)


def test_the_routers_native_prompt_hashing_is_the_reference_on_long_prompts():
    rng = random.Random(0)  # (hypothesis keeps its lists short: here every block size meets many full blocks)
    for block_size in (16, 30, 31, 32, 33, 64, 100):
        for _ in range(20):
            tokens = [rng.randrange(-(2**31), 2**31) for _ in range(rng.randint(block_size, 600))]
            parent = rng.choice([None, rng.randrange(2**64)])
            assert _NATIVE_HASH(tokens, block_size, parent) == hash_prompt_blocks(tokens, block_size, parent)


def test_a_prompt_the_native_hashing_cannot_take_is_refused_as_the_reference_refuses_it():
    for tokens, parent in (([2**31] * 16, None), ([-(2**31) - 1] * 16, None), ([1.5] * 16, None), ([1] * 16, -1)):
        with pytest.raises(Exception) as native:
            _NATIVE_HASH(tokens, 16, parent)
        with pytest.raises(Exception) as reference:
            hash_prompt_blocks(tokens, 16, parent)
        assert type(native.value) is type(reference.value)
    core = RouterCore({}, {"w": None}, block_size=BLOCK)
    request = Request("r", list(range(10 * BLOCK + 1)), cache_salt="tenant t")
    salted = hash_prompt_blocks(request.prompt_token_ids, BLOCK, salt_root(request.hash_salt()))
    assert core.block_hashes(request) == salted != hash_prompt_blocks(request.prompt_token_ids, BLOCK)
