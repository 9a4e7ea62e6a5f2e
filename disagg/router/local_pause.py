"""The health supervisor's own clock: is the router itself paused? (router/health.py's pause rule.)

A starved router's event loop (a busier process on its cores, a long synchronous call) may not run for seconds;
every heartbeat of that stretch then times out at once, and every worker would be declared dead together. The
supervisor ticks every heartbeat interval; a tick that comes more than `local_pause_s` late is a local pause
(Cassandra's failure detector has the same rule), whose length the monitor does not count as any worker's
silence. Pure: the clock is passed in.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class PauseClock:
    def __init__(self, interval_s: float, local_pause_s: float, loud_s: float) -> None:
        """`loud_s`: a pause this long is logged as a warning (shorter ones at debug: no log line per hiccup)."""
        self.interval_s, self.local_pause_s, self.loud_s = interval_s, local_pause_s, loud_s
        self.last: float | None = None  # the latest tick (None: not ticking, so never paused)
        self.ticks = 0
        self.count = 0  # pauses seen, and their total length (/metrics)
        self.seconds = 0.0

    def tick(self, now: float) -> float:
        """A tick at `now`; the pause it ends (0: none)."""
        last, self.last = self.last, now
        self.ticks += 1
        paused = 0.0 if last is None else now - last - self.interval_s
        if paused <= self.local_pause_s:
            return 0.0
        self.count += 1
        self.seconds += paused
        level = logging.WARNING if paused >= self.loud_s else logging.DEBUG
        log.log(level, "router paused for %.1fs: not counted as its workers' silence", paused)
        return paused

    def paused(self, now: float) -> bool:
        """In a pause its next tick has not yet ended."""
        return self.last is not None and now - self.last > self.interval_s + self.local_pause_s

    def stop(self) -> None:
        """The supervisor stopped: the time until it ticks again is no pause."""
        self.last = None
