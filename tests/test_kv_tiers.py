"""CPU and disk tiers behind an engine: round trips device -> CPU -> disk -> device give the no-cache tokens,
corrupt or slow disk blocks become misses (recompute, counted), failed writes stay invisible, a restarted
worker serves from its disk directory, pins expire, and nothing leaks."""
import os
import shutil
import time
from pathlib import Path

import pytest

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.kv.disk_tier import HEADER_BYTES, CorruptBlock, DiskTier, DiskTierBusy
from disagg.kv.store import TierConfig
from disagg.kv.tier_index import LruBlocks, TierIndex
from disagg.protocol import CorruptReason, EventKind, SamplingParams, Tier, hash_prompt_blocks
from tests.kvutil import Node, run, settle, tokens

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = list(range(40, 40 + 80))  # 5 full blocks of 16


def _no_cache(model_dir, prompt, sampling=GREEDY, **cfg):
    cfg = {"num_blocks": 64, "block_size": 16, "max_model_len": 512, **cfg}
    engine = LLMEngine(EngineConfig(model=str(model_dir), enable_prefix_caching=False, **cfg))
    return engine.generate([prompt], sampling)[0].token_ids


def _tiers(tmp_path, cpu_blocks=32, disk=True, **kw):
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # tiny llama: 2 layers x K,V x 16 tokens x 2 kv heads x 16 dims x fp32
    return TierConfig(cpu_bytes=cpu_blocks * block_bytes, disk_dir=str(tmp_path / "disk") if disk else "",
                      disk_bytes=256 * block_bytes, **kw)


def _serve(node, rid, prompt=PROMPT, sampling=GREEDY):
    node.engine.add_request(rid, prompt, sampling)
    out = run([node], [rid])[rid]
    node.store.flush()
    node.engine.step()  # commit the stores
    return out


def _drop_device_cache(node):
    assert node.engine.pool.reset_prefix_cache()


def _demote_everything(node):
    """Push every unpinned CPU block to disk (as memory pressure would) and wait for the writes."""
    node.store.flush()
    node.store.demote()
    node.store.flush()


def test_round_trip_device_cpu_disk_device_equals_no_cache(tiny_llama_dir, tmp_path):
    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path))
    expected = _no_cache(tiny_llama_dir, PROMPT)
    assert tokens(_serve(node, "first")) == expected
    hashes = hash_prompt_blocks(PROMPT, 16)
    assert all(h in node.store.index.cpu for h in hashes)  # write-through: every computed block reached the CPU tier

    _drop_device_cache(node)
    out = _serve(node, "from-cpu")
    assert tokens(out) == expected
    assert node.store.stats.loaded_blocks[Tier.CPU] == 4  # 4 usable blocks: the 5th holds the token to compute
    assert out[0].num_cached_tokens == 64

    _drop_device_cache(node)
    _demote_everything(node)
    assert all(node.store.index.on_disk(h) for h in hashes[:4])
    assert not any(h in node.store.index.cpu for h in hashes[:4])
    out = _serve(node, "from-disk")
    assert tokens(out) == expected
    assert node.store.stats.loaded_blocks[Tier.DISK] == 4 and out[0].num_cached_tokens == 64
    assert settle([node])


def test_round_trip_with_the_default_model(smollm_dir, tmp_path):
    node = Node(smollm_dir, tiers=TierConfig(cpu_bytes=64 << 20, disk_dir=str(tmp_path / "d"), disk_bytes=256 << 20),
                num_blocks=None, kv_cache_memory_mb=64)
    prompt = node.engine.tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about the sea. " * 4}])
    expected = _no_cache(smollm_dir, prompt, num_blocks=None, kv_cache_memory_mb=64)
    assert tokens(_serve(node, "a", prompt)) == expected
    _drop_device_cache(node)
    assert tokens(_serve(node, "cpu", prompt)) == expected
    _drop_device_cache(node)
    _demote_everything(node)
    assert tokens(_serve(node, "disk", prompt)) == expected
    assert node.store.stats.loaded_blocks[Tier.CPU] > 0 and node.store.stats.loaded_blocks[Tier.DISK] > 0


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _corruptions():
    def bit_flip(tier, h):
        _flip_byte(tier.path(h), HEADER_BYTES + 100)

    def truncate(tier, h):
        path = tier.path(h)
        path.write_bytes(path.read_bytes()[:HEADER_BYTES + 10])

    def foreign(tier, h):  # the same block written by an engine with another fingerprint
        other = DiskTier(tier.dir.parent.parent / "other-engine", "f" * 16, tier.capacity_bytes, tier.block_bytes)
        payload = tier.read_file(h)
        other.write_file(h, payload)
        shutil.copy(other.path(h), tier.path(h))

    def missing(tier, h):
        os.unlink(tier.path(h))

    return {"checksum": bit_flip, "truncated": truncate, "foreign": foreign, "missing": missing}


@pytest.mark.parametrize("reason", sorted(_corruptions()))
def test_corrupt_disk_block_is_a_counted_miss_never_wrong_tokens(tiny_llama_dir, tmp_path, reason):
    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path))
    expected = _no_cache(tiny_llama_dir, PROMPT)
    _serve(node, "warm")
    _drop_device_cache(node)
    _demote_everything(node)
    hashes = hash_prompt_blocks(PROMPT, 16)
    _corruptions()[reason](node.store.disk, hashes[2])  # the third block goes bad
    out = _serve(node, "after")
    assert tokens(out) == expected
    assert node.store.stats.corrupt == {CorruptReason(reason): 1}
    assert all(type(k) is CorruptReason for k in node.store.stats.corrupt)
    assert node.store.stats.loaded_blocks[Tier.DISK] == 2  # the two blocks before it were still used
    assert not node.store.index.on_disk(hashes[2])  # forgotten, and the router told
    assert out[0].num_cached_tokens == 32
    assert settle([node])


def test_disk_load_past_its_deadline_is_a_miss(tiny_llama_dir, tmp_path, monkeypatch):
    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path))
    node.engine.connector.load_timeout_s = 0.2
    expected = _no_cache(tiny_llama_dir, PROMPT)
    _serve(node, "warm")
    _drop_device_cache(node)
    _demote_everything(node)
    real_read = node.store.disk.read_into

    def slow_read(h, out):  # stands in for a stalled disk (cannot be produced on demand here)
        time.sleep(0.6)
        return real_read(h, out)

    monkeypatch.setattr(node.store.disk, "read_into", slow_read)
    out = _serve(node, "slow")
    assert tokens(out) == expected
    assert node.engine.scheduler.stats.failed_loads == 1 and out[0].num_cached_tokens == 0
    assert settle([node])  # the late reads landed in blocks held back until they finished, then freed


def test_failed_disk_write_is_never_visible(tiny_llama_dir, tmp_path):
    def full_disk(path, mode="r", *args, **kwargs):  # every write hits ENOSPC, as on a full volume
        if "w" in mode:
            raise OSError(28, "No space left on device")
        return open(path, mode, *args, **kwargs)

    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path))
    node.store.disk._open = full_disk
    _serve(node, "warm")
    _drop_device_cache(node)
    _demote_everything(node)
    assert node.store.stats.write_failures >= 4
    assert len(node.store.index.disk) == 0 and not list(node.store.disk.dir.iterdir())  # no temp file left
    events = node.engine.drain_kv_events()
    assert not any(e.tier is Tier.DISK and e.kind is EventKind.STORED for e in events)
    assert node.store.lookup(hash_prompt_blocks(PROMPT, 16)) == [Tier.CPU] * 5  # the blocks stayed in memory


def test_restarted_worker_serves_previous_prefixes_from_disk(tiny_llama_dir, tmp_path):
    config = _tiers(tmp_path)
    node = Node(tiny_llama_dir, tiers=config)
    prompts = [list(range(i * 7, i * 7 + 64)) for i in range(1, 6)]
    for i, p in enumerate(prompts):
        _serve(node, f"p{i}", p)
    _demote_everything(node)
    on_disk = len(node.store.index.disk)
    assert on_disk >= 15
    node.store.shutdown()
    del node

    restarted = Node(tiny_llama_dir, tiers=_tiers(tmp_path))  # same disk directory, fresh process state
    assert len(restarted.store.index.disk) >= 0.95 * on_disk
    events = restarted.engine.drain_kv_events()
    assert any(e.tier is Tier.DISK and e.kind is EventKind.STORED and len(e.block_hashes) >= 0.95 * on_disk
               for e in events)  # re-announced to the router
    out = _serve(restarted, "again", prompts[2])
    assert tokens(out) == _no_cache(tiny_llama_dir, prompts[2])
    assert restarted.store.stats.loaded_blocks[Tier.DISK] == 3


def test_pins_keep_a_session_in_cpu_and_expire_on_time(tiny_llama_dir, tmp_path):
    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path, cpu_blocks=8, disk=False, pin_budget_fraction=0.75))
    node.engine.add_request("t1", PROMPT, GREEDY, session_id="s1", kv_retention_s=1.0)
    run([node], ["t1"])
    node.store.flush()
    node.engine.step()
    pinned = hash_prompt_blocks(PROMPT, 16)
    assert node.store.num_pinned_blocks == 5 and all(h in node.store.index.cpu for h in pinned)
    for i in range(4):  # other traffic that would push an unpinned session out of an 8-block CPU tier
        _serve(node, f"other{i}", [(7 * j + 100 * i) % 500 + 3 for j in range(64)])
    assert all(h in node.store.index.cpu for h in pinned)
    t0 = time.monotonic()
    while node.store.num_pinned_blocks and time.monotonic() - t0 < 3:
        node.tick()
        time.sleep(0.05)
    assert node.store.num_pinned_blocks == 0 and time.monotonic() - t0 <= 1.0 + 1.0  # TTL + 1 s
    assert settle([node])
    assert len(node.store.index.cpu) <= node.store.cpu.num_slots and not node.store.cpu._refs


def test_pin_budget_drops_the_oldest_session(tiny_llama_dir, tmp_path):
    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path, cpu_blocks=16, disk=False, pin_budget_fraction=0.5))
    store = node.store
    assert store.pin("a", list(range(1, 6)), ttl_s=100) == 5
    assert store.pin("b", list(range(10, 16)), ttl_s=200) == 6
    assert store.pin("c", list(range(20, 25)), ttl_s=300) == 5  # 16 > 8: "a" (oldest expiry), then "b" go
    assert not store.is_pinned_session("a") and store.num_pinned_blocks <= store.pin_budget
    assert store.is_pinned_session("c")


def test_next_turn_of_a_pinned_session_is_prefetched(tiny_llama_dir, tmp_path):
    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path, disk=False))
    node.engine.add_request("t1", PROMPT, GREEDY, session_id="s", kv_retention_s=30)
    run([node], ["t1"])
    node.store.flush()
    node.engine.step()
    _drop_device_cache(node)
    turn2 = PROMPT + list(range(400, 420))
    node.engine.add_request("t2", turn2, GREEDY, session_id="s", kv_retention_s=30)
    assert node.engine.connector.stats.prefetched_blocks == 0 and node.engine.connector._prefetches
    out = run([node], ["t2"])["t2"]
    assert tokens(out) == _no_cache(tiny_llama_dir, turn2)
    assert node.engine.connector.stats.prefetched_blocks == 5 and out[0].num_cached_tokens == 80


def test_disk_tier_rejects_bad_payloads_and_scans_only_good_files(tmp_path):
    tier = DiskTier(tmp_path, "0" * 16, capacity_bytes=10_000, block_bytes=100)
    tier.write_file(7, bytes(range(100)))
    assert bytes(tier.read_file(7)) == bytes(range(100))
    with pytest.raises(ValueError):
        tier.write_file(8, b"short")
    (tier.dir / "0000000000000009.kv").write_bytes(b"garbage")  # wrong size: discarded on scan
    (tier.dir / "000000000000000a.kv.123.tmp").write_bytes(b"x")  # an interrupted write
    with pytest.raises(DiskTierBusy):  # one live owner per directory
        DiskTier(tmp_path, "0" * 16, capacity_bytes=10_000, block_bytes=100)
    tier.close()
    again = DiskTier(tmp_path, "0" * 16, capacity_bytes=10_000, block_bytes=100)
    assert again.scanned == [7] and again.num_discarded_on_scan == 1
    assert sorted(p.name for p in again.dir.iterdir()) == ["0000000000000007.kv"]
    with pytest.raises(CorruptBlock, match="missing"):
        again.read_file(99)
    again.close()
    small = DiskTier(tmp_path, "0" * 16, capacity_bytes=2 * (HEADER_BYTES + 100), block_bytes=100)
    assert small.capacity_blocks == 2
    index = TierIndex(LruBlocks(), LruBlocks(small.capacity_blocks), pin_budget=0)  # the store's bookkeeping
    assert index.restore_disk(small.scanned) == []
    for h in (1, 2, 3):
        small.write_file(h, bytes(100))
        evicted, added = index.commit_disk(h)
        assert added
        for old in evicted:
            small.delete(old)
    assert len(index.disk) == 2 and not index.on_disk(7) and index.on_disk(3)
    assert sorted(p.name for p in small.dir.iterdir() if p.suffix == ".kv") == [f"{h:016x}.kv" for h in (2, 3)]


def test_prefetch_never_takes_blocks_the_pool_does_not_have(tiny_llama_dir, tmp_path):
    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path, disk=False), num_blocks=40)
    prompt = list(range(10, 10 + 16 * 12))  # 12 full blocks
    _serve(node, "warm", prompt)
    hashes = hash_prompt_blocks(prompt, 16)
    pool = node.engine.pool
    held = pool.allocate(36)  # every empty block and the LRU tail of the prefix: 4 cached-free blocks remain
    pool.free(held[:1])  # plus one empty block
    assert pool.num_free_blocks == 5 and len(pool.lookup_prefix(hashes)) == 4
    # the 4 prefix hits are pinned while prefetch allocates: 1 block is really free, half of it is nothing
    assert node.engine.connector.prefetch(hashes) == 0
    pool.free(held[1:])
    assert node.engine.connector.prefetch(hashes) == 8  # room now: the 8 missing blocks come back from CPU
    node.store.flush()
    assert settle([node])


def test_tier_index_rules_without_io_or_threads():
    index = TierIndex(LruBlocks(), LruBlocks(capacity=2), pin_budget=2)
    for h in (1, 2, 3):
        index.cpu.add(h)
    index.stored(Tier.CPU, [1, 2, 3])
    index.commit_disk(4)
    assert index.lookup([1, 2, 4, 9]) == [Tier.CPU, Tier.CPU, Tier.DISK]  # CPU before disk, up to a miss
    assert index.pin("s", [1, 2], ttl_s=5, now=100.0) == 2
    index.touch(Tier.CPU, 3)
    assert index.cpu_victims(3) == [3]  # 1 and 2 are pinned
    index.unpin("s")
    assert index.cpu_victims(3, keep=lambda h: h == 3) == [1, 2]  # LRU order, the caller's keep honoured
    index.pin("s", [1], ttl_s=5, now=100.0)
    assert index.expire_pins(now=104.9) == 0 and index.expire_pins(now=105.0) == 1  # the caller's clock
    index.drop_cpu([1])
    evicted, added = index.commit_disk(5)
    evicted2, _ = index.commit_disk(6)
    assert added and evicted == [] and evicted2 == [4]  # room made first, least recently used out
    kinds = [(e.kind, e.tier, e.block_hashes) for e in index.drain_events()]
    assert kinds == [
        (EventKind.STORED, Tier.CPU, [1, 2, 3]),
        (EventKind.STORED, Tier.DISK, [4]),
        (EventKind.REMOVED, Tier.CPU, [1]),
        (EventKind.STORED, Tier.DISK, [5]),
        (EventKind.REMOVED, Tier.DISK, [4]),
        (EventKind.STORED, Tier.DISK, [6]),
    ] and index.drain_events() == []
