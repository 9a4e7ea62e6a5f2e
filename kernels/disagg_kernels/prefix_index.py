"""ctypes binding of `prefix_index.cpp`, the router's prefix index storage in C++, of `route_score.cpp`, a routing
decision's scoring over it, and of `block_hash.cpp`, a prompt's block hashes (torch-free: the router process loads
them).  Every call runs without the GIL (ctypes releases it), so KV event ingest on one thread and routing
decisions on another proceed side by side.  `load_index_lib()` builds the library once per machine (cached, as
the quantized kernels are) and returns None with the reason when it cannot: the router then keeps its index in
Python (`disagg/router/block_table.py`'s `PyBlockTable`) and says so.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from disagg_kernels.native_build import build_library

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("prefix_index.cpp", "route_score.cpp", "block_hash.cpp"))
# no -march: nothing here vectorizes, one build serves any CPU; no contraction into fused multiply-adds, so the
# routing cost (route_score.cpp) rounds as the Python expression it mirrors does
_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off"]
_u64p = ctypes.POINTER(ctypes.c_uint64)
_i64p = ctypes.POINTER(ctypes.c_int64)
_i32p = ctypes.POINTER(ctypes.c_int32)


class IndexLib:
    """The compiled functions, typed (argument and result types declared once)."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        table, i32, i64, u8 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint8
        signatures = {
            "pi_new": ([i64], table),
            "pi_free": ([table], None),
            "pi_size": ([table], i64),
            "pi_store": ([table, i32, ctypes.c_void_p, i64, u8], None),
            "pi_drop": ([table, i32, ctypes.c_void_p, i64, u8], None),
            "pi_drop_all": ([table, i32, u8], None),
            "pi_worker_blocks": ([table, i32, u8, _u64p, i64], i64),
            "pi_worker_counts": ([table, _i64p, i32], None),
            "pi_owners": ([table, ctypes.c_uint64, _i32p, ctypes.POINTER(u8), i32], i32),
            "pi_match": ([table, ctypes.c_void_p, i64, _i32p, _i64p, i32], i32),
            "pi_shared": ([table, ctypes.c_void_p, i64, _i32p, _i64p, i32], i32),
            "pi_route": ([ctypes.c_void_p, ctypes.c_void_p, i64], i32),  # (RouteCall*, hashes, n)
            "bh_chain": ([ctypes.c_char_p, i64, ctypes.c_char_p, i64, i64, ctypes.c_void_p], None),
        }
        for name, (args, result) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        self.new, self.free, self.size = lib.pi_new, lib.pi_free, lib.pi_size
        self.store, self.drop, self.drop_all = lib.pi_store, lib.pi_drop, lib.pi_drop_all
        self.worker_blocks, self.worker_counts = lib.pi_worker_blocks, lib.pi_worker_counts
        self.owners, self.match, self.shared = lib.pi_owners, lib.pi_match, lib.pi_shared
        self.route = lib.pi_route  # route_score.cpp: a decision's scoring in one call
        self.chain = lib.bh_chain  # block_hash.cpp: a prompt's chained block hashes


def load_index_lib(cache_dir: Path) -> tuple[IndexLib | None, str]:
    """The compiled index and "", or None and why not (the caller keeps its index in Python)."""
    try:
        return IndexLib(build_library("prefix_index", _SOURCES, _FLAGS, cache_dir)), ""
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
