"""Descriptor planning and leases: plain logic, no NIXL."""
import pytest
import torch

from disagg.engine.block_pool import BlockPool
from disagg.kv.leases import LeaseTable
from disagg.errors import TransferFailed
from disagg.protocol import Tier
from disagg.transfer.base import KVLayout, paired_runs, plan_regions


def test_paired_runs_merge_only_when_both_sides_are_consecutive():
    assert paired_runs([2, 3, 4, 9], [5, 6, 7, 8]) == [(2, 5, 3), (9, 8, 1)]
    assert paired_runs([1, 2], [4, 3]) == [(1, 4, 1), (2, 3, 1)]
    assert paired_runs([], []) == []


def test_plan_regions_cover_exactly_the_requested_blocks_in_every_layer():
    src_kv = torch.arange(8 * 3 * 2 * 4, dtype=torch.float32).view(8, 3, 2, 4)  # [blocks, layers, 2, ...]
    dst_kv = torch.zeros(6, 3, 2, 4)
    src = KVLayout.of(src_kv, "p", b"")
    dst = KVLayout.of(dst_kv, "d", b"")
    src_ids, dst_ids = [1, 2, 5], [0, 1, 4]
    (plan,) = plan_regions(src, dst, [(Tier.DEVICE, b) for b in src_ids], dst_ids)
    a, b = plan.src, plan.dst
    assert len(a) == len(b) == 2  # two runs, each covering every layer
    assert [n for _, n in a] == [n for _, n in b]
    # emulate the copy with the planned addresses and check it against tensor indexing
    src_bytes = src_kv.view(torch.uint8).flatten()
    dst_bytes = dst_kv.view(torch.uint8).flatten()
    sbase, dbase = src.region(Tier.DEVICE).base_addr, dst.region(Tier.DEVICE).base_addr
    for (sa, n), (da, _) in zip(a, b):
        dst_bytes[da - dbase:da - dbase + n] = src_bytes[sa - sbase:sa - sbase + n]
    assert torch.equal(dst_kv[dst_ids], src_kv[src_ids])
    assert dst_kv[[2, 3, 5]].abs().sum() == 0


def test_plan_regions_reads_device_and_cpu_tier_blocks_in_one_plan_on_a_dram_host():
    kv, tier, dst_kv = torch.zeros(8, 2, 4), torch.arange(4 * 2 * 4, dtype=torch.float32).view(4, 2, 4), torch.zeros(8, 2, 4)
    src = KVLayout.of(kv, "p", b"", cpu_tier=tier)
    dst = KVLayout.of(dst_kv, "d", b"")
    plans = plan_regions(src, dst, [(Tier.DEVICE, 3), (Tier.CPU, 1), (Tier.CPU, 2)], [0, 1, 2])
    assert len(plans) == 1 and plans[0].src_mem_type == "DRAM"  # both regions are host memory here
    cpu_base = src.region(Tier.CPU).base_addr
    assert (cpu_base + 1 * src.block_bytes, 2 * src.block_bytes) in plans[0].src  # the cpu run merged
    with pytest.raises(TransferFailed, match="no cpu region"):
        plan_regions(dst, src, [(Tier.CPU, 0)], [0])
    with pytest.raises(ValueError, match="block layout"):
        KVLayout.of(kv, "p", b"", cpu_tier=torch.zeros(4, 3, 4))


def test_plan_regions_rejects_out_of_range_and_mismatched_layouts():
    src = KVLayout.of(torch.zeros(4, 2, 8), "p", b"")
    with pytest.raises(TransferFailed, match="out of range"):
        plan_regions(src, src, [(Tier.DEVICE, 4)], [0])
    with pytest.raises(TransferFailed, match="out of range"):
        plan_regions(src, src, [(Tier.DEVICE, 0)], [9])
    with pytest.raises(TransferFailed, match="different KV layouts"):
        plan_regions(src, KVLayout.of(torch.zeros(4, 3, 8), "d", b""), [(Tier.DEVICE, 0)], [0])


def test_layout_roundtrips_through_msgpack():
    layout = KVLayout.of(torch.zeros(2, 4, 8), "p", b"\x00meta", cpu_tier=torch.zeros(3, 4, 8))
    back = KVLayout.from_wire(layout.to_wire())
    assert back == layout and set(back.regions) == {Tier.DEVICE, Tier.CPU}  # keyed by the Tier enum on both sides
    assert all(type(t) is Tier for t in back.regions) and back.region(Tier.CPU).num_blocks == 3


def test_leases_release_once_and_expire():
    pool = BlockPool(8)
    leases = LeaseTable(pool, timeout_s=10)
    leases.hold("a", pool.allocate(2), 20)
    leases.hold("b", pool.allocate(1), 5)
    assert leases.release("a") and not leases.release("a")
    assert leases.expire(now=0) == []
    assert leases.expire(now=1e12) == ["b"] and leases.num_expired == 1
    assert pool.num_free_blocks == 8


def test_leases_mixing_device_blocks_and_cpu_slots_release_both():
    pool = BlockPool(4)
    released = []
    leases = LeaseTable(pool, timeout_s=10, release_cpu=released.extend)
    blocks = pool.allocate(2)
    leases.hold("x", blocks + [7, 8], 64, regions=[Tier.DEVICE, Tier.DEVICE, Tier.CPU, Tier.CPU])
    assert pool.num_free_blocks == 2
    assert leases.release("x")
    assert pool.num_free_blocks == 4 and released == [7, 8]
