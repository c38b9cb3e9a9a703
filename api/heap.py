"""Keeping CPython's cyclic garbage collector off the push path when one process holds many connections.

Each open SSE or WebSocket stream is ~180 objects the collector tracks (the server's protocol, transport
and task, the request's scope, frames and exit stacks, the subscription). With 10,000 streams that is
1.8 million objects, and a full collection walks all of them: measured here 0.3-3 s each, a dozen of them
while 10,000 streams connected, none of which found anything to free. CPython starts a full collection
whenever the objects that survived into the oldest generation grew by a quarter, so a process that keeps
accepting connections keeps paying it, in the middle of whatever fan-out is running.

`HeapKeeper.tick()` (from the event log's housekeeping, once a second): when the open streams grew by
FREEZE_GROWTH since the last look, collect the young generations and `gc.freeze()`: everything alive
then moves to the permanent generation, which automatic collections never walk. What freezing costs is
cyclic garbage among frozen objects (a closed connection's cycles) waiting until the next unfreeze: so
when as many streams have closed as were frozen (at least FREEZE_GROWTH), or REFREEZE_S passed, one full
collection at a moment chosen here (`gc.unfreeze(); gc.collect(); gc.freeze()`), instead of a dozen
chosen by the allocator. Below FREEZE_GROWTH open streams nothing is done.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("latch.heap")

FREEZE_GROWTH = 1_000    # streams opened since the last freeze that make it worth another
REFREEZE_S = 600.0       # at the latest, a full collection (and a new freeze) this often while frozen


class HeapKeeper:
    def __init__(self) -> None:
        self.frozen_at_streams = 0   # open streams at the last freeze
        self.closed_since = 0        # streams closed since the last full collection
        self.last_full = time.monotonic()
        self.epoch = 0               # freezes so far: a stream opened before the last one was frozen with it
        self.full_collections = 0
        self.frozen = False          # gc.get_freeze_count() walks the whole permanent generation: kept here

    def stream_closed(self) -> None:
        self.closed_since += 1

    def tick(self, open_streams: int) -> None:
        now = time.monotonic()
        if self.frozen and (self.closed_since >= max(FREEZE_GROWTH, self.frozen_at_streams)
                                      or now - self.last_full >= REFREEZE_S):
            started = time.perf_counter()
            gc.unfreeze()
            freed = gc.collect()
            gc.freeze()
            self.epoch += 1
            self.full_collections += 1
            self.closed_since, self.last_full, self.frozen_at_streams = 0, now, open_streams
            log.info("full collection with %d streams open: %d objects freed in %.0f ms", open_streams, freed,
                     (time.perf_counter() - started) * 1000)
            return
        if open_streams - self.frozen_at_streams >= FREEZE_GROWTH:
            gc.collect(1)   # the young generations: what is garbage now is not frozen
            gc.freeze()
            self.frozen = True
            self.epoch += 1
            if self.frozen_at_streams == 0:
                self.last_full = now
            self.frozen_at_streams = open_streams
