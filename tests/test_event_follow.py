"""KV events pulled by the router: the worker's feed (cluster/event_feed.py) and the router's followers
(router/event_follow.py) - cursor, long poll, window, restarts, and failures."""

import asyncio

import pytest

from disagg.cluster.event_feed import EventFeed
from disagg.errors import WorkerLost
from disagg.protocol import EventKind, KVEvent, KVEventBatch, KVEventPage, Tier
from disagg.router.event_follow import EventFollowers
from disagg.router.index import PrefixIndex


def _batch(seq: int, *hashes: int, worker: str = "w") -> KVEventBatch:
    return KVEventBatch.of(worker, seq, [KVEvent(EventKind.STORED, list(hashes), tier=Tier.DEVICE)])


def test_the_feed_answers_what_follows_the_cursor_and_waits_for_the_next_batch():
    async def go():
        feed = EventFeed("i0", keep=8)
        for seq in range(3):
            await feed.append(_batch(seq, seq))
        assert [b.seq_no for b in (await feed.since("i0", 0, 0.0)).batches] == [1, 2]
        assert (await feed.since("i0", 2, 0.0)).batches == []
        waiting = asyncio.ensure_future(feed.since("i0", 2, 5.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # a long poll: nothing new yet
        await feed.append(_batch(3, 3))
        page = await asyncio.wait_for(waiting, 1.0)
        assert [b.seq_no for b in page.batches] == [3] and page.incarnation == "i0"
        empty = await asyncio.wait_for(feed.since("i0", 3, 0.05), 1.0)  # the wait ends empty at its timeout
        assert empty.batches == []

    asyncio.run(go())


def test_a_follower_of_another_incarnation_or_behind_the_window_gets_the_whole_window():
    async def go():
        feed = EventFeed("i1", keep=3)
        for seq in range(5):
            await feed.append(_batch(seq, seq))
        assert len(feed) == 3
        assert [b.seq_no for b in (await feed.since("i0", 40, 0.0)).batches] == [2, 3, 4]  # an earlier life
        assert [b.seq_no for b in (await feed.since("i1", 0, 0.0)).batches] == [2, 3, 4]  # 1 fell out: a gap

    asyncio.run(go())


def test_the_page_travels_as_a_typed_message():
    page = KVEventPage("i0", [_batch(0, 1, 2), _batch(1, 3)])
    back = KVEventPage.from_wire(page.to_wire())
    assert back == page and isinstance(back.batches[0], KVEventBatch)


class _FeedHandle:
    """A worker handle over an EventFeed; `lost` makes the next polls fail as a dead worker's do."""

    def __init__(self, feed: EventFeed) -> None:
        self.name, self.feed, self.lost, self.polls = "w", feed, 0, 0

    async def kv_events(self, incarnation: str, after_seq: int, timeout_s: float) -> KVEventPage:
        self.polls += 1
        if self.lost:
            self.lost -= 1
            raise WorkerLost("w is dead", worker="w")
        return await self.feed.since(incarnation, after_seq, timeout_s)


async def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_the_follower_applies_batches_in_order_and_follows_a_restart():
    async def go():
        index = PrefixIndex()
        index.add_worker("w")
        handle = _FeedHandle(EventFeed("i0", keep=16))
        followers = EventFollowers({"w": handle}, index.apply, poll_s=0.2, retry_s=0.01)
        followers.start()
        for seq in range(3):
            await handle.feed.append(_batch(seq, 100 + seq))
        await _until(lambda: followers.counts.batches == 3)
        assert index.match([100])["w"].device == 1 and index.match([102])["w"].device == 1
        # the worker dies (polls fail), then comes back as a new incarnation numbering from 0 again
        handle.lost = 3
        handle.feed = EventFeed("i1", keep=16)
        await handle.feed.append(_batch(0, 200))
        await _until(lambda: followers.counts.batches == 4)
        assert followers.counts.failures == 3
        assert index.needs_snapshot("w")  # seq 0 after 2: the index asks for a snapshot, as for any gap
        await followers.stop()
        assert all(t.done() for t in followers._tasks) or followers._tasks == []

    asyncio.run(go())


def test_stopping_the_followers_ends_their_long_polls():
    async def go():
        handle = _FeedHandle(EventFeed("i0", keep=4))
        followers = EventFollowers({"w": handle}, lambda batch: None, poll_s=30.0, retry_s=0.01)
        followers.start()
        await _until(lambda: handle.polls == 1)
        await asyncio.wait_for(followers.stop(), 2.0)  # not 30 s: the poll is cancelled

    asyncio.run(go())


def test_the_feed_needs_room_for_a_batch():
    with pytest.raises(ValueError):
        EventFeed("i0", keep=0)


def test_a_snapshot_older_than_a_delivered_batch_is_applied_and_another_is_asked_for():
    """A snapshot's fetch can race the pulled feed: batches 0-2 arrive, then a snapshot taken at 1.  The index
    takes it (better than nothing) but asks for a fresh one: the worker may publish nothing more that would show
    the gap, and the snapshot misses batch 2's changes."""
    index = PrefixIndex()
    index.add_worker("w")
    for seq in range(3):
        assert index.apply(_batch(seq, 100 + seq))
    assert not index.needs_snapshot("w")
    old = KVEventBatch.of("w", 1, [KVEvent(EventKind.STORED, [100, 101], tier=Tier.DEVICE)], snapshot=True)
    assert index.apply(old)
    assert index.needs_snapshot("w")  # 102 is missing: a fresh snapshot is due
    fresh = KVEventBatch.of("w", 2, [KVEvent(EventKind.STORED, [100, 101, 102], tier=Tier.DEVICE)], snapshot=True)
    assert index.apply(fresh) and not index.needs_snapshot("w")
    assert index.blocks_of("w") == {100, 101, 102}
