"""The router process's heap settles after start-up (disagg/heap.py): what exists then is frozen out of the
collector's generations, so full collections no longer walk it; what is made later is collected as before."""
import gc

from disagg.heap import settle_heap


class Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it


def test_settling_freezes_what_start_up_built_and_later_garbage_is_still_collected():
    built = [Node() for _ in range(10_000)]
    try:
        frozen = settle_heap("test")
        # the freeze count, read again: other threads of this process (left by earlier tests in the same run) may
        # free a few frozen objects in between (2 fewer, once, in the full suite); none are added
        assert frozen >= 10_000 and frozen - 100 <= gc.get_freeze_count() <= frozen
        walked = {id(o) for o in gc.get_objects()}
        assert not any(id(node) in walked for node in built[:100])  # out of every collection's walk
        later = Node()
        alive = {id(later)}
        del later
        assert gc.collect() >= 1  # the cycle made after the freeze is collected
        assert not alive & {id(o) for o in gc.get_objects() if isinstance(o, Node)}
    finally:
        gc.unfreeze()  # this test process goes on: give its objects back to the collector
