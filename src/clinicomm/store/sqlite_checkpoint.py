"""A SQLite file's WAL checkpointed from a thread of its own, not inside the loop's commits.

In WAL mode a commit that takes the log past `wal_autocheckpoint` pages copies the log into
the database file and syncs it, inside that commit, on the committing connection's thread:
for `store.sqlite_raw` that is the event loop's, and every request waits for it. At
SQLite's default of 1,000 pages that was ~8 % of a SendGrid send's CPU (no checkpoint at
all, two pairs, Dec 6 2026); raising the threshold to 10,000 cut the CPU by ~4 % but made
each checkpoint ten times longer: `POST` p99 at 300 msg/s went from ~22 to ~35 ms.

`Checkpointer` runs `PRAGMA wal_checkpoint(PASSIVE)` every `interval` seconds (0.25) on its
own connection, in a daemon thread. Measured on SQLite against SQLite's default (Dec 6 2026,
interleaved, 1 s and 0.25 s intervals): SendGrid sends 0.521 to 0.542 → 0.468 to 0.504 ms
of service CPU per message and 1,773 to 1,856 → 1,969 to 2,160 msg/s; `POST` p99 at 300
msg/s 6.3 / 6.6 → 3.4 / 4.0 ms (with a 1 s interval: 11 to 12 ms, larger checkpoints). A
passive checkpoint copies what no reader still needs, without waiting for any reader or
writer to finish; the sqlite3 module releases the GIL while SQLite works, so the loop keeps
running. The connections' own threshold stays as a floor
(`store.db.WAL_AUTOCHECKPOINT_PAGES`): if this thread falls behind or stops, a commit still
checkpoints, later.

Contract: `start` once, `stop` once (it waits for the thread); the thread touches no metric
(`telemetry.metrics.LoopValue` is updated from the loop's thread only) and logs only the
failures it sees, once per run of failures.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger(__name__)

#: Seconds between checkpoints (1 s made each bigger and the tail of `POST` longer).
CHECKPOINT_INTERVAL = 0.25


class Checkpointer:
    """Checkpoints `path`'s WAL every `interval` seconds from a thread (module docstring)."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Checkpoints run (tests read it).
        self.runs = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        failing = False
        try:
            while not self._stop.wait(self.interval):
                try:
                    if connection is None:  # busy timeout 0: a passive checkpoint never waits
                        connection = sqlite3.connect(
                            self.path, timeout=0, isolation_level=None, check_same_thread=False
                        )
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.runs += 1
                    failing = False
                except sqlite3.Error as exc:
                    if not failing:
                        log.warning(
                            "WAL checkpoint failed; commits checkpoint past the threshold",
                            extra={
                                "event": "sqlite_checkpoint_failed",
                                "error": type(exc).__name__,
                            },
                        )
                    failing = True
        finally:
            if connection is not None:
                connection.close()
