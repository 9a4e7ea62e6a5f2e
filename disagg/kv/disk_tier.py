"""Disk tier: one file per KV block under `<root>/<engine fingerprint>/`, written atomically, verified on load.

File = 48-byte header + payload (the block's bytes in the cache's block layout):

    magic "DKVB" | version u16 | pad | fingerprint 16 ascii | block hash u64 | payload bytes u64 | xxh3-64 u64

The checksum is XXH3-64 (xxhash): it runs at memory speed, where crc32 cost more than reading a page-cached
block (bench/offload.py).

Writes go to a temp file that is renamed over the final name only when complete (optionally fsynced first), and
the block joins the index - and is announced to the router - only after the rename: a failed write (disk full,
I/O error) leaves nothing a lookup can see.  A load re-checks everything: magic, version, fingerprint, hash,
length and checksum; any mismatch (a bit flip, a truncated file, a file from another model or layout, a file
gone missing) is a `CorruptBlock`, which the store turns into a miss (recompute) and a counter, never into KV.

On start the directory is scanned (temp files left by a crash are deleted) and every well-formed block file is
listed (`scanned`), least recently modified first, for the tier index (kv/tier_index.py) to take back, so a
restarted worker serves its previous prefixes from disk.  Which blocks the tier holds, in what LRU order, is the
tier index's: this class only keeps the files.

Thread model: `write_file` / `read_file` do I/O and touch no shared state (they run on the store's I/O
threads); files are only deleted by the engine thread (`delete`, for blocks the index evicted or found corrupt).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from disagg.protocol import CorruptReason

_MAGIC = b"DKVB"
_VERSION = 2
_HEADER = struct.Struct("<4sH2x16sQQQ")
HEADER_BYTES = _HEADER.size
_SUFFIX = ".kv"


class DiskTierBusy(OSError):
    """Another live process owns this disk tier directory."""


CORRUPT_REASONS = ("missing", "truncated", "foreign", "checksum", "header")


class CorruptBlock(Exception):
    """A block file that must not be used, and why (counted by reason in TierStats)."""

    def __init__(self, reason: CorruptReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


class DiskTier:
    def __init__(
        self,
        root: str | Path,
        fingerprint: str,
        capacity_bytes: int,
        block_bytes: int,
        fsync: bool = False,
        opener: Callable[..., Any] = open,
    ) -> None:
        if len(fingerprint) != 16:
            raise ValueError("fingerprint must be 16 hex characters")
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        # one owner per directory (two workers sharing it would evict each other's files); the lock dies with
        # the process, so a restarted worker takes its directory back
        self._lock = open(Path(root) / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DiskTierBusy(f"{root} is in use by another process") from None
        self.fingerprint = fingerprint
        self.capacity_bytes = capacity_bytes
        self.block_bytes = block_bytes
        self.file_bytes = HEADER_BYTES + block_bytes
        self.fsync = fsync
        self._open = opener  # injectable so tests can simulate a full or failing disk
        self.num_discarded_on_scan = 0
        self.scanned = self._scan()  # blocks found on start, oldest first: the tier index takes them from here
        self.num_rescanned = len(self.scanned)

    def close(self) -> None:
        self._lock.close()

    # ------------------------------------------------------------------ files (engine thread)
    def _scan(self) -> list[int]:
        """The hashes of the well-formed block files here, least recently modified first."""
        entries = []
        for path in self.dir.iterdir():
            if path.name.endswith(".tmp"):  # a write that never committed
                path.unlink(missing_ok=True)
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            try:
                block_hash = int(path.name[: -len(_SUFFIX)], 16)
                stat = path.stat()
            except (ValueError, OSError):
                continue
            if stat.st_size != self.file_bytes:  # truncated or another layout: not worth a slot
                path.unlink(missing_ok=True)
                self.num_discarded_on_scan += 1
                continue
            entries.append((stat.st_mtime_ns, block_hash))
        return [block_hash for _, block_hash in sorted(entries)]

    @property
    def capacity_blocks(self) -> int:
        return self.capacity_bytes // self.file_bytes

    def delete(self, block_hash: int) -> None:
        """Remove a block's file (evicted, or found corrupt)."""
        self.path(block_hash).unlink(missing_ok=True)

    def path(self, block_hash: int) -> Path:
        return self.dir / f"{block_hash:016x}{_SUFFIX}"

    # ------------------------------------------------------------------ I/O (any thread)
    def write_file(self, block_hash: int, payload: bytes | memoryview) -> None:
        """Write atomically (temp + rename). Raises OSError; on failure nothing is left behind."""
        if len(payload) != self.block_bytes:
            raise ValueError(f"payload of {len(payload)} bytes, blocks have {self.block_bytes}")
        header = _HEADER.pack(
            _MAGIC, _VERSION, self.fingerprint.encode(), block_hash, len(payload), xxhash.xxh3_64_intdigest(payload)
        )
        final = self.path(block_hash)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{id(payload):x}.tmp")
        try:
            with self._open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read_file(self, block_hash: int) -> memoryview:
        """The verified payload of a block (a fresh writable buffer); raises CorruptBlock when the file must not
        be used."""
        out = memoryview(bytearray(self.block_bytes))
        self.read_into(block_hash, out)
        return out

    def read_into(self, block_hash: int, out: memoryview) -> None:
        """Read a block's payload straight into `out` (block_bytes long) and verify it there; raises CorruptBlock
        (leaving `out` with garbage) when the file must not be used."""
        header = bytearray(HEADER_BYTES)
        try:
            with open(self.path(block_hash), "rb", buffering=0) as f:
                got = f.readinto(header)
                if got < HEADER_BYTES:
                    raise CorruptBlock(CorruptReason.TRUNCATED, f"{got} header bytes")
                magic, version, fingerprint, stored_hash, length, digest = _HEADER.unpack_from(header)
                if magic != _MAGIC or version != _VERSION:
                    raise CorruptBlock(CorruptReason.HEADER, f"magic {magic!r} version {version}")
                if fingerprint.decode(errors="replace") != self.fingerprint or stored_hash != block_hash:
                    raise CorruptBlock(CorruptReason.FOREIGN, f"fingerprint {fingerprint!r}, hash {stored_hash:016x}")
                size = f.readinto(out)
                extra = f.read(1)
        except FileNotFoundError:
            raise CorruptBlock(CorruptReason.MISSING, str(self.path(block_hash))) from None
        if length != self.block_bytes or size != length or extra:
            raise CorruptBlock(CorruptReason.TRUNCATED, f"{size} of {length} payload bytes")
        if xxhash.xxh3_64_intdigest(out) != digest:
            raise CorruptBlock(CorruptReason.CHECKSUM, f"block {block_hash:016x}")
