"""TokenJournal (disagg/cluster/journal.py), alone: readers follow an entry from any position, a reader that leaves
early orphans it (a grace, then `on_orphan`), explicit drops and failures end it at once, finished entries expire
after their TTL and are bounded, and only the request's tenant may read it."""
import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.cluster.journal import JournalConfig, TokenJournal
from disagg.errors import OutputCorrupt, StreamNotFound
from disagg.protocol import FinishReason, Request, TokenDelta


def _req(rid="r", tenant=None):
    return Request(rid, [1, 2, 3], tenant=tenant)


def _delta(rid, token, last=False):
    return TokenDelta(rid, [token], f"<{token}>", FinishReason.LENGTH if last else None)


async def _read(reader, start=0):
    return [t for d in [d async for d in reader.deltas(start)] for t in d.token_ids]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), start=st.integers(0, 14), cut=st.integers(0, 12))
def test_a_reader_gets_every_delta_after_start_whenever_it_attaches(n, start, cut):
    async def go():
        journal = TokenJournal()
        first = journal.open(_req())
        for t in range(min(cut, n)):
            journal.append(_delta("r", t, last=t == n - 1))
        late = journal.attach("r", None)
        task = asyncio.ensure_future(_read(late, start))
        for t in range(min(cut, n), n):
            await asyncio.sleep(0)
            journal.append(_delta("r", t, last=t == n - 1))
        got = await task
        first.close()
        late.close()
        return got
    assert asyncio.run(go()) == list(range(n))[start:]


def test_only_the_requests_tenant_may_attach_and_others_see_not_found():
    journal = TokenJournal()
    journal.open(_req(tenant="alice"))
    assert journal.attach("r", "alice").request.request_id == "r"
    for tenant in ("bob", None):
        with pytest.raises(StreamNotFound) as info:
            journal.attach("r", tenant)
        assert info.value.code == "stream_not_found"
    with pytest.raises(StreamNotFound):
        journal.attach("nope", "alice")


def test_an_orphan_is_kept_for_its_grace_and_a_reader_coming_back_stops_the_clock():
    async def go():
        orphans = []
        journal = TokenJournal(JournalConfig(orphan_grace_s=0.05), on_orphan=orphans.append)
        journal.open(_req("kept")).close()  # the relay went away before the end
        await asyncio.sleep(0.02)
        back = journal.attach("kept", None)  # a reconnect within the grace
        await asyncio.sleep(0.1)
        assert "kept" in journal and orphans == []
        journal.append(_delta("kept", 7, last=True))
        assert await _read(back) == [7]
        back.close()
        journal.open(_req("gone")).close()
        await asyncio.sleep(0.1)  # nobody came back: aborted
        assert orphans == ["gone"] and "gone" not in journal and journal.orphans_aborted == 1
        with pytest.raises(StreamNotFound):
            journal.attach("gone", None)
        assert not journal.append(_delta("gone", 1))  # late output of the aborted request is dropped
    asyncio.run(go())


def test_a_finished_entry_is_never_orphaned_and_expires_after_its_ttl():
    async def go():
        clock, orphans = Clock(), []
        journal = TokenJournal(JournalConfig(orphan_grace_s=0.01, ttl_s=5.0), on_orphan=orphans.append, clock=clock)
        reader = journal.open(_req())
        journal.append(_delta("r", 1, last=True))
        reader.close()
        await asyncio.sleep(0.05)
        assert orphans == [] and await _read(journal.attach("r", None)) == [1]
        clock.now = 4.9
        assert "r" in journal
        clock.now = 5.1
        assert "r" not in journal
        with pytest.raises(StreamNotFound):
            journal.attach("r", None)
        journal.open(_req())  # the id is free again
    asyncio.run(go())


def test_finished_entries_are_bounded_by_count_and_tokens_oldest_first():
    journal = TokenJournal(JournalConfig(max_entries=2, max_tokens=100))
    for rid in ("a", "b", "c"):
        journal.open(_req(rid))
        journal.append(_delta(rid, 1, last=True))
    assert "a" not in journal and "b" in journal and "c" in journal
    journal = TokenJournal(JournalConfig(max_entries=10, max_tokens=3))
    for rid in ("a", "b"):
        journal.open(_req(rid))
        journal.append(TokenDelta(rid, [1, 2], "", FinishReason.STOP))
    assert "a" not in journal and "b" in journal
    journal.open(_req("live"))  # unfinished entries are not the journal's to evict
    for t in range(10):
        journal.append(_delta("live", t))
    assert "live" in journal


def test_drop_and_fail_end_an_entry_at_once_and_its_readers_are_told():
    async def go():
        orphans = []
        journal = TokenJournal(JournalConfig(orphan_grace_s=0.01), on_orphan=orphans.append)
        reader = journal.open(_req("a"))
        task = asyncio.ensure_future(_read(reader))
        await asyncio.sleep(0)
        assert journal.drop("a") and "a" not in journal
        with pytest.raises(StreamNotFound):
            await task
        reader.close()
        reader = journal.open(_req("b"))
        journal.append(_delta("b", 1))
        journal.fail("b", OutputCorrupt("nan", worker="w"))
        with pytest.raises(OutputCorrupt):
            await _read(reader)
        reader.close()
        await asyncio.sleep(0.05)
        assert orphans == []  # ended entries are not orphans
    asyncio.run(go())


def test_an_id_in_use_is_refused_while_its_stream_runs_and_reusable_once_it_finished():
    journal = TokenJournal()
    journal.open(_req())
    with pytest.raises(ValueError):
        journal.open(_req())
    journal.append(_delta("r", 1, last=True))
    journal.open(_req())  # a new generation under the old id replaces the finished stream
    assert "r" in journal and not journal.append(_delta("other", 2))
    journal.append(_delta("r", 3, last=True))
    assert journal._finished_tokens == 1  # the replaced entry's tokens left the bound's count
