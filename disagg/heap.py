"""The router process's Python heap: what start-up builds (the models' tables and tokenizers, the HTTP app and its
schemas, the Ray handles) is moved out of the collector's generations once the process is up (`settle_heap`).

Why: CPython's full collection walks every tracked object in the heap, and the router's start-up leaves it tens
of thousands of them that live as long as the process; each full collection then pauses the serving event loop
(where routing decisions and KV event ingest run) in proportion to them.  `gc.freeze()` (Python 3.7+) moves them
to a permanent generation the collector no longer walks, as vLLM (`freeze_gc_heap` after warm-up) and SGLang
(`freeze_gc`) do in their serving processes.  Objects made later are collected as before; a frozen object that
becomes garbage is freed by reference counting as usual; a frozen cycle (an unloaded model's routing core) waits
for the next `settle_heap`, which the model unload calls.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle_heap(context: str) -> int:
    """Collect, then freeze what is left: the number of objects now out of the collector's walks.  What an earlier
    call froze is collected again first (a model unloaded since: its routing core holds reference cycles), so
    calling it after such a change frees what the change left."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "%s: %d objects frozen out of the collector (%.0f ms)", context, frozen, (time.perf_counter() - started) * 1e3
    )
    return frozen
