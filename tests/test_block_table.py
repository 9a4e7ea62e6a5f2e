"""The prefix index's C++ block table against the Python reference, operation for operation: random stores,
drops, worker removals and evictions leave both with the same holders (in the same order) and every walk gives
the same matches (and the same in-flight sharing, the router's second table); the router core takes the C++
tables by default and falls back to Python with a warning; a native call lets other Python threads run (the
reason the table is native)."""

import ctypes
import logging
import random
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.protocol import EventKind, KVEvent, KVEventBatch, Tier
from disagg.router import native_table
from disagg.router.block_table import ALL_TIERS, PyBlockTable
from disagg.router.in_flight import MaskBlocks, TableBlocks
from disagg.router.index import PrefixIndex
from disagg.router.native_table import NativeBlockTable
from disagg.router.router import RouterCore
from disagg_kernels import native_build
from disagg_kernels.prefix_index import load_index_lib

WORKERS = ("a", "b", "c", "d", "e", "f")  # more than the 4 holders the C++ table keeps in a slot
TIERS = (Tier.DEVICE, Tier.CPU, Tier.DISK)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine (the Python table serves; tested below)")
    built, why = load_index_lib(tmp_path_factory.mktemp("index-build"))
    assert built is not None, why
    return built


def _same(py: PyBlockTable, native: NativeBlockTable, queries: list[list[int]]) -> None:
    assert len(py) == len(native)
    assert py.holders() == native.holders()
    for h in py.holders():
        assert list(py.owners(h).items()) == list(native.owners(h).items())  # arrival order, not only the set
    assert py.block_counts() == native.block_counts()
    for w in WORKERS:
        for mask in (1, 2, 4, ALL_TIERS):
            assert sorted(py.worker_blocks(w, mask)) == sorted(native.worker_blocks(w, mask))
    for q in queries:
        assert list(py.match(q).items()) == list(native.match(q).items())
        assert py.shared(frozenset(q)) == native.shared(frozenset(q))


def _chain(rng: random.Random, universe: int) -> list[int]:
    start = rng.randrange(universe)
    return [(start + i) % universe for i in range(rng.randint(0, 12))]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_the_native_table_is_the_python_one_operation_for_operation(lib, seed):
    rng = random.Random(seed)
    universe = rng.choice([20, 60, 400, 3000])
    max_blocks = rng.choice([8, 30, 10_000])  # small bounds evict: the oldest-stored must go in both
    py, native = PyBlockTable(max_blocks), NativeBlockTable(lib, max_blocks)
    for _ in range(rng.randint(20, 120)):
        roll, worker, bit = rng.random(), rng.choice(WORKERS), rng.choice((1, 2, 4))
        hashes = _chain(rng, universe) if rng.random() < 0.7 else rng.sample(range(universe), rng.randint(0, 10))
        if roll < 0.55:
            py.store(worker, hashes, bit), native.store(worker, hashes, bit)
        elif roll < 0.85:
            py.drop(worker, hashes, bit), native.drop(worker, hashes, bit)
        elif roll < 0.92:
            py.drop_all(worker), native.drop_all(worker)  # the worker's removal, or a snapshot's clear
        else:
            py.drop_all(worker, bit), native.drop_all(worker, bit)  # a CLEARED event of one tier
        if rng.random() < 0.2:
            _same(py, native, [_chain(rng, universe) for _ in range(5)])
    _same(py, native, [_chain(rng, universe) for _ in range(20)] + [list(range(universe))])


def test_a_large_table_grows_and_deletes_as_the_reference(lib):
    """Past its first capacity (the C++ table doubles), with drops shifting probed entries back, and evictions."""
    rng = random.Random(11)
    py, native = PyBlockTable(30_000), NativeBlockTable(lib, 30_000)
    hashes = [rng.getrandbits(64) for _ in range(40_000)] + list(range(2_000))  # uniform, then dense small keys
    for start in range(0, len(hashes), 500):
        part, worker = hashes[start : start + 500], rng.choice(WORKERS)
        py.store(worker, part, 1), native.store(worker, part, 1)
        gone = rng.sample(part, 200)
        py.drop(worker, gone, 1), native.drop(worker, gone, 1)
    _same(py, native, [hashes[i : i + 20] for i in range(0, len(hashes), 997)])
    for w in WORKERS[:3]:
        py.drop_all(w), native.drop_all(w)
    _same(py, native, [hashes[i : i + 20] for i in range(0, len(hashes), 997)])


def test_hashes_use_all_64_bits_and_many_workers(lib):
    py, native = PyBlockTable(), NativeBlockTable(lib)
    rng = random.Random(7)
    chain = [rng.getrandbits(64) for _ in range(50)] + [2**64 - 1, 0]
    workers = [f"w{i}" for i in range(40)]  # more holders of one block than the match buffer starts with
    for i, w in enumerate(workers):
        py.store(w, chain[: 10 + i], 1 + (i % 2)), native.store(w, chain[: 10 + i], 1 + (i % 2))
    assert list(py.match(chain).items()) == list(native.match(chain).items())
    assert len(native.match(chain)) == 40 and native.owners(2**64 - 1) == py.owners(2**64 - 1)


def test_a_hash_outside_uint64_from_a_faulty_worker_is_left_out_not_an_error(lib):
    native = NativeBlockTable(lib)
    native.store("w", [1, -1, 2**64, 2], 1)
    assert sorted(native.worker_blocks("w")) == [1, 2] and native.match([1])["w"].device == 1
    native.drop("w", [-5, 1], 1)
    assert native.worker_blocks("w") == [2]


def test_a_prefix_index_over_each_table_applies_batches_alike(lib):
    rng = random.Random(3)
    indexes = [PrefixIndex(table=PyBlockTable(64)), PrefixIndex(table=NativeBlockTable(lib, 64))]
    seq = dict.fromkeys(WORKERS, -1)
    for _ in range(300):
        w = rng.choice(WORKERS)
        seq[w] += rng.choice([1] * 9 + [2])  # now and then a gap: both ask for a snapshot
        kind = rng.choice([EventKind.STORED] * 3 + [EventKind.REMOVED, EventKind.CLEARED])
        hashes = [] if kind is EventKind.CLEARED else _chain(rng, 200)
        batch = KVEventBatch(w, seq[w], [KVEvent(kind, hashes, tier=rng.choice(TIERS))], snapshot=rng.random() < 0.05)
        assert len({index.apply(batch) for index in indexes}) == 1
        query = _chain(rng, 200)
        assert list(indexes[0].match(query).items()) == list(indexes[1].match(query).items())
    assert indexes[0].table.holders() == indexes[1].table.holders()
    for w in WORKERS:
        assert indexes[0].blocks_of(w, Tier.CPU) == indexes[1].blocks_of(w, Tier.CPU)
        indexes[0].remove_worker(w), indexes[1].remove_worker(w)
    assert indexes[0].num_blocks == indexes[1].num_blocks == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_in_flight_blocks_in_the_native_table_are_the_bit_masks_answer_for_answer(lib, seed):
    """The router's in-flight blocks (router/in_flight.py): requests begin and end on random workers, holding
    random prompts' blocks (a block a worker already holds is not held again, as WorkerLoad reports them); every
    prompt's `sharing` is the same from the C++ table, the Python table and the bit masks."""
    rng = random.Random(seed)
    universe = rng.choice([20, 200, 3000])
    workers = [f"w{i}" for i in range(rng.choice([3, 40]))]  # 40: past the table's first buffer of 16 workers
    kept = [MaskBlocks(), TableBlocks(NativeBlockTable(lib, 1 << 40)), TableBlocks(PyBlockTable(1 << 40))]
    held: dict[str, set[int]] = {w: set() for w in workers}
    for _ in range(rng.randint(20, 300)):
        worker, hashes = rng.choice(workers), set(_chain(rng, universe))
        if rng.random() < 0.6:
            new = sorted(hashes - held[worker])
            held[worker] |= set(new)
            for k in kept:
                k.hold(worker, new)
        else:
            gone = sorted(hashes & held[worker])
            held[worker] -= set(gone)
            for k in kept:
                k.release(worker, gone)
        query = frozenset(_chain(rng, universe) + rng.sample(range(universe), 3) + [-1, 1 << 64])  # 2 never held
        expected = {w: len(query & blocks) for w, blocks in held.items() if query & blocks}
        assert [k.sharing(query) for k in kept] == [expected] * 3


def test_the_router_core_keeps_its_index_in_cpp_and_falls_back_to_python(lib, monkeypatch, caplog):
    core = RouterCore({}, {"w": None})
    assert isinstance(core.index.table, NativeBlockTable) and isinstance(core.ranking.in_flight, TableBlocks)
    assert core.ranking.scorer is not None  # a decision's scoring in one call over both tables
    monkeypatch.setattr(native_table, "_library", lambda cache_dir: (None, "no C++ compiler found"))
    with caplog.at_level(logging.WARNING, logger="disagg.router.native_table"):
        core = RouterCore({}, {"w": None})
    assert isinstance(core.index.table, PyBlockTable) and isinstance(core.ranking.in_flight, MaskBlocks)
    assert core.ranking.scorer is None
    assert "no C++ compiler found" in caplog.text


def _spin(thread: threading.Thread) -> float:
    """Loop iterations per second this thread makes while `thread` runs."""
    count, start = 0, time.perf_counter()
    thread.start()
    while thread.is_alive():
        count += 1
    return count / (time.perf_counter() - start)


def test_a_native_call_lets_other_python_threads_run(lib):
    """The point of the native table: while one thread applies a big batch, another (routing) keeps running.
    The loop's rate beside the call is compared with its rate alone: a call holding the GIL stops it (ctypes.PyDLL
    instead of CDLL: under 15% here), one that releases it leaves it nearly whole."""
    native = NativeBlockTable(lib, 10_000_000)
    hashes = list(range(1, 3_000_001))
    alone = _spin(threading.Thread(target=time.sleep, args=(0.3,)))
    beside = _spin(threading.Thread(target=native.store, args=("w", hashes, 1)))
    assert len(native) == 3_000_000
    assert beside / alone > 0.5, (beside, alone)


def test_the_build_is_cached_by_its_sources(tmp_path, lib):
    first, _ = load_index_lib(tmp_path)
    assert first is not None and len(list(Path(tmp_path).glob("prefix_index-*.so"))) == 1
    load_index_lib(tmp_path)
    assert len(list(Path(tmp_path).glob("prefix_index-*.so"))) == 1


def test_a_changed_header_builds_a_new_library(tmp_path, lib):
    """The block kernels share cpu_blocks.h: a library built from the old text must not be loaded after it
    changes (the key would not move if it covered only the .cpp files)."""
    src, header, out = tmp_path / "k.cpp", tmp_path / "k.h", tmp_path / "cache"
    src.write_text('#include "k.h"\nextern "C" int answer() { return ANSWER; }\n')
    flags = ["-O1", "-shared", "-fPIC", "-std=c++17"]
    answers = []
    for value in (41, 42):
        header.write_text(f"#define ANSWER {value}\n")
        built = native_build.build_library("k", (src,), flags, out, headers=(header,))
        answers.append(ctypes.CDLL(str(built)).answer())
    assert answers == [41, 42] and len(list(out.glob("k-*.so"))) == 2


def test_the_kernel_librarys_build_key_names_every_header_its_sources_include():
    from disagg_kernels import cpu_quant

    included = {
        name
        for src in cpu_quant._SOURCES
        for name in re.findall(r'^#include "([^"]+)"', src.read_text(), flags=re.MULTILINE)
    }
    assert included and included == {h.name for h in cpu_quant._HEADERS}
