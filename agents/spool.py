"""The agent's durable spool: evidence windows the server has not acknowledged yet, and the
latest heartbeat state, in one SQLite file on the host (``DATA_DIR/spool.db`` unless
``--spool-path``).

Every completed window goes through the spool: it is written here first, then sent, inline
with a heartbeat (the newest, up to ``Heartbeat.evidence``'s 2048) or replayed in batches
(``POST /v1/nodes/{name}/evidence``, oldest first) when more are waiting, as after an
outage. The server stores each window once, keyed by (node, GPU, start_s), so sending a
window again is harmless and the spool never needs to know what the server already has.

Invariants:

- A window leaves the spool only once the server has acknowledged it: an ``EvidenceAck``
  for its batch, or the 200 of the heartbeat that carried it. A crash between the server's
  commit and the delete here means the window is sent once more, and counted a duplicate.
- A window is on disk when ``add`` returns: WAL journal, ``synchronous=FULL``, so neither
  ``kill -9`` nor a power cut loses an acknowledged add (one fsync per heartbeat interval
  at most, nothing on a host that spends its power on GPUs).
- (uuid, start_s) is unique here too: a window added twice is kept once.
- Replay is oldest first (insertion order, which is time order for each GPU).
- The file is bounded (``max_bytes``, the pages in use). When it is full, new windows are
  refused, counted and logged at error level; old ones are never dropped to make room, as
  the oldest cover the start of the outage, which is what the server most needs to hear.
  The agent cordons its node well before that (``near_full``); see ``agents/agent.py``.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from scheduler.client import ApiError
from scheduler.schemas import EvidenceAck, EvidenceWindow

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""About 45 days of windows for 8 GPUs: a window takes about 130 bytes on disk, index
included (measured: 24 h of 8 GPUs, 11,520 windows, in 1.5 MB)."""

NEAR_FULL = 0.9
"""The fill above which the agent cordons its node (see ``agents/agent.py``)."""

REPLAY_BATCH = 2048
"""Windows per replayed request: a few hundred kilobytes of JSON."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL,
    start_s INTEGER NOT NULL,
    end_s INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    utilization_pct_avg INTEGER,
    energy_mj INTEGER,
    process_seen INTEGER,
    UNIQUE (uuid, start_s)
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = "id, uuid, start_s, end_s, samples, utilization_pct_avg, energy_mj, process_seen"


class SpoolError(Exception):
    """The spool file cannot be opened or written (a full disk, a read-only folder)."""


@dataclass(frozen=True, slots=True)
class Replayed:
    """What one replay achieved: windows acknowledged (stored new, duplicates), windows the
    server refused for good, and whether windows are still waiting."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    requests: int = 0
    pending: int = 0
    error: str | None = None  # why it stopped early (unreachable, refused)


class Spool:
    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.refused_full = 0  # windows refused because the spool was full, since start
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open the evidence spool at {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a SQLite failure (a full disk) is a ``SpoolError``."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot write to the evidence spool {self.path}: {exc}") from exc

    # --- size -------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """Bytes of the database in use (pages minus free pages): what ``max_bytes`` bounds.
        Deleted windows free their pages for new ones, so the file itself does not shrink."""
        with self._lock:
            pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
            free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self._page_size

    def fill(self) -> float:
        return self.used_bytes() / self.max_bytes

    def near_full(self) -> bool:
        return self.fill() >= NEAR_FULL

    def pending(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM windows").fetchone()[0])

    # --- windows ----------------------------------------------------------------------------
    def add(self, windows: Sequence[EvidenceWindow]) -> int:
        """Keep ``windows`` until acknowledged; returns how many were new. When the spool is
        full nothing is added: the windows are refused, counted and logged (module doc)."""
        if not windows:
            return 0
        if self.used_bytes() >= self.max_bytes:
            self.refused_full += len(windows)
            log.error(
                "the evidence spool %s is full (%d MiB): %d window(s) refused, %d since start; "
                "the server has been unreachable too long, or refuses the replay",
                self.path,
                self.max_bytes // (1024 * 1024),
                len(windows),
                self.refused_full,
            )
            return 0
        rows = [
            (
                w.uuid,
                w.start_s,
                w.end_s,
                w.samples,
                w.utilization_pct_avg,
                w.energy_mj,
                None if w.process_seen is None else int(w.process_seen),
            )
            for w in windows
        ]
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO windows (uuid, start_s, end_s, samples, "
                "utilization_pct_avg, energy_mj, process_seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return db.total_changes - before

    def oldest(self, limit: int) -> list[tuple[int, EvidenceWindow]]:
        return self._select("ORDER BY id LIMIT ?", limit)

    def newest(self, limit: int) -> list[tuple[int, EvidenceWindow]]:
        """The newest ``limit`` windows, oldest of them first."""
        return self._select(
            "WHERE id IN (SELECT id FROM windows ORDER BY id DESC LIMIT ?) ORDER BY id", limit
        )

    def _select(self, clause: str, limit: int) -> list[tuple[int, EvidenceWindow]]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM windows {clause}", (limit,)).fetchall()
        return [
            (
                rid,
                EvidenceWindow(
                    uuid=uuid,
                    start_s=start_s,
                    end_s=end_s,
                    samples=samples,
                    utilization_pct_avg=util,
                    energy_mj=energy,
                    process_seen=None if seen is None else bool(seen),
                ),
            )
            for rid, uuid, start_s, end_s, samples, util, energy, seen in rows
        ]

    def remove(self, ids: Sequence[int]) -> None:
        """Forget windows the server has acknowledged."""
        if not ids:
            return
        with self._tx() as db:
            db.executemany("DELETE FROM windows WHERE id = ?", [(i,) for i in ids])

    # --- state ------------------------------------------------------------------------------
    def set_state(self, **values: str) -> None:
        """Keep small named values (the latest heartbeat, the clock offset) in one write."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", list(values.items())
            )

    def state(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # --- replay -----------------------------------------------------------------------------
    def replay(
        self,
        send: Callable[[list[EvidenceWindow]], EvidenceAck],
        *,
        batch: int = REPLAY_BATCH,
        keep: int = 0,
        until: Callable[[], bool] | None = None,
    ) -> Replayed:
        """Send waiting windows, oldest first, ``batch`` at a time, deleting each batch once
        acknowledged, until at most ``keep`` are left (the newest, for the next heartbeat to
        carry) or ``until()`` says stop.

        Stops, keeping the batch, at a connection error, a 5xx or a 4xx other than the two
        below; the caller tries again later. A batch refused as invalid (422) or too large
        (413) is split in halves and each half sent again, so one bad window cannot hold up
        the rest; a single window the server refuses as invalid is dropped and logged, as no
        retry will ever make the server take it.
        """
        stored = duplicates = refused = requests = 0
        error: str | None = None

        def _send(rows: list[tuple[int, EvidenceWindow]]) -> bool:
            nonlocal stored, duplicates, refused, requests, error
            requests += 1
            try:
                ack = send([w for _, w in rows])
            except ApiError as exc:
                if exc.status_code in (413, 422) and len(rows) > 1:
                    half = len(rows) // 2
                    return _send(rows[:half]) and _send(rows[half:])
                if exc.status_code == 422:
                    ((rid, w),) = rows
                    log.error(
                        "the server refused evidence window %s@%d for good: %s",
                        w.uuid,
                        w.start_s,
                        exc,
                    )
                    self.remove([rid])
                    refused += 1
                    return True
                error = str(exc)
                return False
            except ConnectionError as exc:
                error = str(exc)
                return False
            self.remove([rid for rid, _ in rows])
            stored += ack.stored
            duplicates += ack.duplicates
            return True

        while True:
            waiting = self.pending()
            if waiting <= keep or (until is not None and until()):
                break
            rows = self.oldest(min(batch, waiting - keep))
            if not rows or not _send(rows):
                break
        return Replayed(
            stored=stored,
            duplicates=duplicates,
            refused=refused,
            requests=requests,
            pending=self.pending(),
            error=error,
        )
