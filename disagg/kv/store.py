"""TieredStore: the CPU and disk tiers behind one worker, as a KV source (loads) and sink (write-through stores).

It is the I/O mover over a pure tier index (kv/tier_index.py: what each tier holds, LRU, pins, and the KVEvents,
tagged with their tier, that `drain_events` hands to the worker): it owns the CPU tier's memory (kv/cpu_tier.py),
the disk tier's files (kv/disk_tier.py), the block copier (device <-> CPU, off the engine thread) and the disk
I/O threads, and changes the index when a move completes.

Policy:
  * store    every newly computed full block is copied device -> CPU right after the step that computed it
             (write-through, the copy off the step's critical path: the store holds a reference on the device
             block until the copy completes, so the block cannot be reused meanwhile and stays readable).  A
             block becomes visible to lookups - and is announced to the router - only when its copy completed.
  * demote   when free CPU slots fall under the low watermark, least recently used unpinned blocks are written
             to disk (if there is a disk tier and they are not there yet) and then leave the CPU tier; while the
             write runs they stay readable in CPU memory.  Without a disk tier they are simply dropped.
  * load     a sequence's leading blocks missing on the device are copied back from CPU (a slice copy) or read
             from disk (on an I/O thread into a staging buffer, verified, then copied in by the scheduler thread,
             so a load abandoned past its deadline can never write into a reused block).
  * pin      a session's blocks can be pinned for a TTL: pinned blocks are never demoted or evicted from the CPU
             tier.  Pins are per session, expire on time and fit a per-worker budget (oldest pins go first).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from disagg.kv.copier import BlockCopier, CopyJob
from disagg.kv.cpu_tier import CpuTier
from disagg.kv.disk_tier import CorruptBlock, DiskTier
from disagg.kv.load import KVLoad, KVTiers, LoadHandle, LoadState, handle_if_started, handle_of
from disagg.kv.seam import BlockPool
from disagg.kv.tier_config import TierConfig, TierGauges, TierStats
from disagg.kv.tier_index import LruBlocks, TierIndex
from disagg.protocol import CorruptReason, KVEvent, Tier

log = logging.getLogger(__name__)


@dataclass
class _TierLoad(LoadHandle):
    cpu_job: CopyJob | None
    cpu_slots: list[int]
    disk_futures: list[Future]  # one per chunk of disk positions, each read in order on an I/O thread
    disk_chunks: list[list[int]]  # indices into the load's blocks that come from disk, per future
    slots_released: bool = False

    def pending(self) -> bool:
        return (self.cpu_job is not None and not self.cpu_job.done()) or not all(f.done() for f in self.disk_futures)


@dataclass
class _Store:
    job: CopyJob
    device_blocks: list[int]
    hashes: list[int]
    slots: list[int]


class TieredStore(KVTiers):
    def __init__(
        self,
        config: TierConfig,
        pool: BlockPool,
        device_kv: torch.Tensor,
        fingerprint: str,
        disk_opener: Callable[..., Any] = open,
    ) -> None:
        self.config = config
        self.pool = pool
        self.device_kv = device_kv
        block_shape = tuple(device_kv.shape[1:])
        block_bytes = device_kv[0].numel() * device_kv.element_size()
        num_slots = config.cpu_bytes // block_bytes
        if num_slots < 1:
            raise ValueError(f"cpu tier of {config.cpu_bytes} bytes holds no {block_bytes}-byte block")
        self.cpu = CpuTier(num_slots, block_shape, device_kv.dtype, pin_memory=device_kv.is_cuda)
        self.disk = (
            DiskTier(config.disk_dir, fingerprint, config.disk_bytes, block_bytes, config.disk_fsync, disk_opener)
            if config.disk_dir
            else None
        )
        self.copier = BlockCopier(device_kv.device)
        self._direct = not device_kv.is_cuda  # disk blocks are read straight into (host) device blocks
        self._io = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="kv-disk")
        disk_index = LruBlocks(self.disk.capacity_blocks) if self.disk is not None else None
        pins = int(num_slots * config.pin_budget_fraction)
        self.index = TierIndex(LruBlocks(), disk_index, pins, config.tenant_pin_share)
        if self.disk is not None:  # take back what a previous run left on disk (past a smaller capacity: deleted)
            for h in self.index.restore_disk(self.disk.scanned):
                self.disk.delete(h)
        self.load_s_per_block: dict[Tier, float] = {}
        self._stores: list[_Store] = []
        self._storing: set[int] = set()  # hashes whose store copy is in flight
        self._demoting: dict[int, tuple[Future, int]] = {}  # hash -> (write future, cpu slot)

    @property
    def stats(self) -> TierStats:
        return self.index.stats

    @property
    def pin_budget(self) -> int:
        return self.index.pin_budget

    @property
    def _disk(self) -> DiskTier:
        """The disk tier, on paths only reached when it exists."""
        assert self.disk is not None, "disk tier used while off"
        return self.disk

    # ------------------------------------------------------------------ lookups
    def lookup(self, block_hashes: list[int], count: bool = True) -> list[Tier]:
        """The tier of each of the leading `block_hashes` held in CPU or on disk (CPU preferred)."""
        return self.index.lookup(block_hashes, count)

    def tier_hashes(self) -> dict[Tier, list[int]]:
        return self.index.tier_hashes()

    # ------------------------------------------------------------------ loads (KVSource)
    def start(self, load: KVLoad) -> None:
        cpu_src, cpu_dst, disk_pos = [], [], []
        for i, (tier, h) in enumerate(zip(load.tiers, load.block_hashes)):
            if tier is Tier.CPU:
                slot = self.index.cpu.get(h)
                if slot is None:  # evicted between plan and start: load only the run before it
                    load.tiers, load.block_hashes = load.tiers[:i], load.block_hashes[:i]
                    break
                self.cpu.ref(slot)
                self.index.touch(Tier.CPU, h)
                cpu_src.append(slot)
                cpu_dst.append(load.dst_block_ids[i])
            else:
                disk_pos.append(i)
        job = self.copier.copy(self.cpu.tensor, cpu_src, self.device_kv, cpu_dst) if cpu_src else None
        n = max(1, min(self.config.io_threads, len(disk_pos)))
        chunks = [disk_pos[k * len(disk_pos) // n : (k + 1) * len(disk_pos) // n] for k in range(n)] if disk_pos else []
        futures = [
            self._io.submit(
                self._read_chunk, [load.block_hashes[i] for i in chunk], [load.dst_block_ids[i] for i in chunk]
            )
            for chunk in chunks
        ]
        load.handle = _TierLoad(job, cpu_src, futures, chunks)

    def _read_chunk(self, hashes: list[int], dst_blocks: list[int]) -> list[memoryview | None | CorruptBlock]:
        """I/O thread: read blocks in order, stopping after the first bad one.  On a CPU device a block is read
        straight into its destination block and verified there (None); on a GPU into a host buffer that poll()
        copies in."""
        out: list[memoryview | None | CorruptBlock] = []
        for h, dst in zip(hashes, dst_blocks):
            try:
                if self._direct:
                    self._disk.read_into(h, self.device_kv[dst].view(-1).view(torch.uint8).numpy().data)
                    out.append(None)
                else:
                    out.append(self._disk.read_file(h))
            except CorruptBlock as exc:
                out.append(exc)
                break
        return out

    def poll(self, load: KVLoad) -> LoadState:
        tl = handle_of(load, _TierLoad)
        if tl.pending():
            return LoadState.PENDING
        if tl.cpu_job is not None:
            tl.cpu_job.wait()  # re-raises a failed copy
        self._release_slots(tl)
        bad = len(load.block_hashes)
        results: dict[int, memoryview | None | CorruptBlock] = {}
        for chunk, future in zip(tl.disk_chunks, tl.disk_futures):
            results.update(zip(chunk, future.result()))
        for i in sorted(i for chunk in tl.disk_chunks for i in chunk):
            payload = results.get(i, CorruptBlock(CorruptReason.MISSING, "not read after an earlier failure"))
            if isinstance(payload, CorruptBlock):
                if i in results:
                    self._on_corrupt(load.block_hashes[i], payload)
                bad = min(bad, i)
                continue
            if i < bad:
                if payload is not None:
                    self._copy_in(payload, load.dst_block_ids[i])
                self.index.touch(Tier.DISK, load.block_hashes[i])
        load.num_ok_blocks = min(bad, len(load.block_hashes))
        self._account(load)
        return LoadState.DONE

    def _copy_in(self, payload: memoryview, dst_block: int) -> None:
        src = torch.frombuffer(payload, dtype=torch.uint8)
        self.device_kv[dst_block].view(-1).view(torch.uint8).copy_(src)

    def _account(self, load: KVLoad) -> None:
        n, elapsed = load.num_ok_blocks, time.monotonic() - load.started
        tier = self.stats.count_load(load.tiers[:n], len(load.block_hashes), elapsed, self.cpu.block_bytes)
        if tier is not None:  # the slowest tier of the load: its measured time per block
            a, per_block, old = self.config.ewma_alpha, elapsed / n, self.load_s_per_block.get(tier)
            self.load_s_per_block[tier] = per_block if old is None else (1 - a) * old + a * per_block

    def _on_corrupt(self, block_hash: int, exc: CorruptBlock) -> None:
        log.warning("disk KV block %016x unusable (%s): recomputing", block_hash, exc)
        self.stats.corrupt[exc.reason] += 1
        if self.index.forget_disk(block_hash):
            self._disk.delete(block_hash)

    def _release_slots(self, tl: _TierLoad) -> None:
        if not tl.slots_released:
            for slot in tl.cpu_slots:
                self.cpu.unref(slot)
            tl.slots_released = True

    def abandon(self, load: KVLoad) -> bool:
        tl = handle_if_started(load, _TierLoad)
        if tl is None:
            return True
        writing = (tl.cpu_job is not None and not tl.cpu_job.done()) or (
            self._direct and not all(f.done() for f in tl.disk_futures)
        )
        if writing:
            return False  # a copy or read thread may still write the destination blocks
        self._release_slots(tl)
        return True  # staged disk payloads only reach device blocks in poll(), on this thread

    def settled(self, load: KVLoad) -> bool:
        return self.abandon(load)

    # ------------------------------------------------------------------ stores (write-through)
    def store(self, block_ids: list[int], block_hashes: list[int]) -> None:
        blocks, hashes, slots = [], [], []
        for b, h in zip(block_ids, block_hashes):
            if h in self.index.cpu or h in self._storing or h in hashes:
                continue
            slot = self.cpu.reserve()
            if slot is None:
                slot = self._evict_one()
            if slot is None:
                self.stats.store_skipped += 1
                continue
            blocks.append(b)
            hashes.append(h)
            slots.append(slot)
        if not blocks:
            return
        self.pool.touch(blocks)  # held until the copy completes: not reusable, still readable
        self._storing.update(hashes)
        self._stores.append(
            _Store(self.copier.copy(self.device_kv, blocks, self.cpu.tensor, slots), blocks, hashes, slots)
        )

    def _evict_one(self) -> int | None:
        victims = self.index.cpu_victims(1, self._keep)
        if not victims:
            return None
        self._drop_cpu(victims[0])
        return self.cpu.reserve()

    def _keep(self, block_hash: int) -> bool:
        """Besides pinned blocks: a block being read (a load, a peer, its demotion) stays in CPU."""
        slot = self.index.cpu.get(block_hash)
        return block_hash in self._demoting or (slot is not None and self.cpu.is_referenced(slot))

    def _drop_cpu(self, block_hash: int) -> None:
        slot = self.index.cpu.get(block_hash)
        assert slot is not None  # only committed blocks are dropped
        self.cpu.release(slot)
        self.index.drop_cpu([block_hash])

    def _finish_stores(self, wait: bool = False) -> None:
        pending = []
        for st in self._stores:
            if not (wait or st.job.done()):
                pending.append(st)
                continue
            st.job.wait()
            self.pool.free(st.device_blocks)
            committed = [h for h, slot in zip(st.hashes, st.slots) if self._commit_cpu(h, slot)]
            self._storing.difference_update(st.hashes)
            if committed:
                self.stats.bytes_stored[Tier.CPU] += len(committed) * self.cpu.block_bytes
                self.index.stored(Tier.CPU, committed)
        self._stores = pending

    def _commit_cpu(self, block_hash: int, slot: int) -> bool:
        """The store into `slot` completed: make it visible.  False (slot freed) if the hash is already here."""
        if block_hash in self.index.cpu:
            self.cpu.release(slot)
            return False
        self.index.cpu.add(block_hash, slot)
        return True

    # ------------------------------------------------------------------ demotion to disk
    def _demote(self) -> None:
        want = int(self.cpu.num_slots * self.config.low_watermark) - self.cpu.num_free - len(self._demoting)
        if want > 0:
            self.demote(want)

    def demote(self, n: int | None = None) -> None:
        """Start moving the n (None: all) least recently used unpinned CPU blocks to disk (or drop them)."""
        for h in self.index.cpu_victims(self.cpu.num_slots if n is None else n, self._keep):
            if self.disk is None or self.index.on_disk(h):
                self._drop_cpu(h)
                continue
            slot = self.index.cpu.get(h)
            assert slot is not None  # a victim is a committed CPU block
            self.cpu.ref(slot)
            payload = self.cpu.tensor[slot].view(-1).view(torch.uint8).numpy().data
            self._demoting[h] = (self._io.submit(self.disk.write_file, h, payload), slot)

    def _finish_demotions(self, wait: bool = False) -> None:
        for h, (future, slot) in list(self._demoting.items()):
            if not (wait or future.done()):
                continue
            del self._demoting[h]
            self.cpu.unref(slot)
            try:
                future.result()
            except (OSError, ValueError) as exc:
                self.stats.write_failures += 1
                log.warning("disk tier write of %016x failed (%s); block stays in CPU", h, exc)
                continue
            disk = self._disk
            evicted, added = self.index.commit_disk(h)
            for old in evicted:
                disk.delete(old)
            if added:
                self.stats.bytes_stored[Tier.DISK] += disk.block_bytes
            if h in self.index.cpu and not self.cpu.is_referenced(slot) and not self.index.is_pinned(h):
                self._drop_cpu(h)

    # ------------------------------------------------------------------ pins
    def pin(  # a tenant's session's blocks, for ttl_s (replacing that session's previous pin): how many are pinned
        self, session: str, hashes: list[int], ttl_s: float, now: float | None = None, tenant: str | None = None
    ) -> int:
        return self.index.pin(session, hashes, ttl_s, time.monotonic() if now is None else now, tenant)

    def is_pinned_session(self, session: str, tenant: str | None = None) -> bool:
        return self.index.is_pinned_session(session, tenant)

    @property
    def num_pinned_blocks(self) -> int:
        return self.index.num_pinned_blocks

    # ------------------------------------------------------------------ peers: CPU slots read over NIXL
    def export(self, block_hashes: list[int]) -> list[int]:
        """Reference the CPU slots of the leading `block_hashes` held in CPU (for a peer's read)."""
        slots = []
        for h in block_hashes:
            slot = self.index.cpu.get(h)
            if slot is None:
                break
            self.cpu.ref(slot)
            slots.append(slot)
        return slots

    def release_export(self, slots: list[int]) -> None:
        for slot in slots:
            self.cpu.unref(slot)

    # ------------------------------------------------------------------ upkeep
    def tick(self) -> None:
        self._finish_stores()
        self._finish_demotions()
        self.index.expire_pins(time.monotonic())
        self._demote()

    def flush(self) -> None:
        """Wait for every store and demotion in flight (tests, shutdown)."""
        self._finish_stores(wait=True)
        self._finish_demotions(wait=True)

    def drain_events(self) -> list[KVEvent]:
        return self.index.drain_events()

    def gauges(self) -> TierGauges:
        g = TierGauges(
            cpu_blocks=len(self.index.cpu),
            cpu_capacity_blocks=self.cpu.num_slots,
            pinned_blocks=self.num_pinned_blocks,
            pinned_sessions=self.index.num_pinned_sessions,
            stores_in_flight=len(self._stores),
            demotions_in_flight=len(self._demoting),
        )
        if self.disk is not None and self.index.disk is not None:
            g.disk_blocks = len(self.index.disk)
            g.disk_bytes = len(self.index.disk) * self.disk.file_bytes
            g.disk_capacity_bytes = self.disk.capacity_bytes
        return g

    def shutdown(self) -> None:
        self.flush()
        self._io.shutdown(wait=True)
        self.copier.shutdown()
        if self.disk is not None:
            self.disk.close()
