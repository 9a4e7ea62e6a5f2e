import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pytest

from disagg.engine.block_pool import BlockPool, NoFreeBlocksError
from disagg.protocol import hash_prompt_blocks


def test_allocate_free_and_prefix_reuse():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    hashes = hash_prompt_blocks(list(range(32)), 16)
    pool.cache_blocks(ids, hashes, None)
    assert [e.kind for e in pool.drain_events()] == ["stored"]
    pool.free(ids)
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 2
    hits = pool.lookup_prefix(hashes)
    assert hits == ids
    pool.touch(hits)
    assert pool.num_free_blocks == 2
    pool.free(hits)


def test_empty_blocks_are_reused_before_cached_ones_and_eviction_is_lru():
    pool = BlockPool(3)
    a = pool.allocate(1)
    ha = hash_prompt_blocks([1] * 16, 16)
    pool.cache_blocks(a, ha, None)
    pool.free(a)
    b = pool.allocate(2)  # the two empty blocks, not the cached one
    assert a[0] not in b and pool.lookup_prefix(ha) == a
    c = pool.allocate(1)  # now the cached block must be evicted
    assert c == a and pool.lookup_prefix(ha) == []
    kinds = [e.kind for e in pool.drain_events()]
    assert kinds == ["stored", "removed"]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.free(b + c)


def test_double_free_is_an_error():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(ids)


def test_stored_event_parents_follow_the_chain_across_skipped_blocks():
    pool = BlockPool(8)
    hashes = hash_prompt_blocks(list(range(64)), 16)
    first = pool.allocate(2)
    pool.cache_blocks(first, hashes[:2], None)
    more = pool.allocate(2)
    pool.cache_blocks(first + more, hashes, None)  # first two already cached: one event for the last two
    events = pool.drain_events()
    assert events[1].block_hashes == hashes[2:] and events[1].parent_hash == hashes[1]


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / cache / free / lookup sequences against a model of the pool's contract."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(8)
        self.held: list[list[int]] = []  # what our "sequences" hold
        self.cached_view: set[int] = set()  # router-side view rebuilt from events only
        self.counter = 0

    @rule(n=st.integers(1, 4))
    def allocate(self, n):
        if n > self.pool.num_free_blocks:
            return
        self.held.append(self.pool.allocate(n))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def cache_and_maybe_free(self, data):
        ids = self.held[data.draw(st.integers(0, len(self.held) - 1))]
        tokens = [data.draw(st.integers(0, 3)) for _ in range(16 * len(ids))]
        self.pool.cache_blocks(ids, hash_prompt_blocks(tokens, 16), None)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        ids = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.free(ids)

    @rule(data=st.data())
    def hit(self, data):
        hashes = list(self.pool._cached)
        if hashes:
            h = data.draw(st.sampled_from(hashes))
            hits = self.pool.lookup_prefix([h])
            self.pool.touch(hits)
            self.held.append(hits)

    @rule()
    def drain(self):
        for e in self.pool.drain_events():
            if e.kind == "stored":
                assert not (set(e.block_hashes) & self.cached_view), "stored twice without removal"
                self.cached_view.update(e.block_hashes)
            elif e.kind == "removed":
                assert set(e.block_hashes) <= self.cached_view, "removed a hash never stored"
                self.cached_view.difference_update(e.block_hashes)

    @invariant()
    def consistent(self):
        refs = {}
        for ids in self.held:
            for i in ids:
                refs[i] = refs.get(i, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_count >= 0
            assert block.ref_count == refs.get(block.block_id, 0)
            assert (block.ref_count == 0) == self.pool.is_free(block.block_id), "free xor in use"
        assert self.pool.num_free_blocks + len(refs) == self.pool.num_blocks
        for h, block_id in self.pool._cached.items():
            assert self.pool.blocks[block_id].block_hash == h

    def teardown(self):
        self.drain()
        assert self.cached_view == set(self.pool._cached), "events replay to the pool's cached set"


TestPoolProperties = PoolMachine.TestCase
TestPoolProperties.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
