"""The coordinator's history in a small SQLite file (``history.db``): global steps, held-out losses and
what each peer contributed, so the dashboard's plots and the leaderboard survive coordinator restarts.

The store never raises to its caller and never blocks for long (a busy file is waited on for at most
:data:`BUSY_TIMEOUT`). On the first database error — a corrupt, locked or unreadable file, or a schema
from an unknown version — it logs one warning, moves the file and its side files aside to
``history.db.broken-<unix time>``, starts a new file and refills its steps from ``history.jsonl``; if
even that fails it keeps the history in memory for the rest of the run. Errors after that drop the
write (debug log) or return an empty answer. It is safe to use from several threads: the main loop
writes while the dashboard's HTTP threads read. Everything it returns is plain JSON-ready data.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

from dedloc.logs import short_id

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 0.5
MAX_CLOCK_SKEW = 300.0
"""A peer record stamped further than this ahead of the coordinator's clock is ignored: one far-future
stamp would otherwise make every later record look old, freezing that peer's contribution."""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY, loss REAL, samples_per_second REAL,
    peers INTEGER, samples INTEGER, time REAL, reporters INTEGER);
CREATE TABLE IF NOT EXISTS heldout (step INTEGER PRIMARY KEY, loss REAL, time REAL);
CREATE TABLE IF NOT EXISTS peers (peer_id TEXT PRIMARY KEY, volunteer TEXT, device TEXT, client_mode INTEGER,
    samples INTEGER, reported INTEGER, samples_per_second REAL, step INTEGER, first_seen REAL, last_seen REAL);
PRAGMA user_version = {SCHEMA_VERSION};
"""
STEP_COLUMNS = "step, loss, samples_per_second, peers, samples, time, reporters"
INSERT_STEP = f"INSERT OR REPLACE INTO steps ({STEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
LAST_STEP = "COALESCE(MAX(step), 0)"
PEER_COLUMNS = "peer_id, volunteer, device, client_mode, samples, samples_per_second, step, first_seen, last_seen"
NEW_PEER = dict(volunteer=None, device=None, client_mode=None, samples=0, reported=0)

# errors about the statement or its values, not the file: moving the file aside would not help
CALLER_ERRORS = (sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.IntegrityError, sqlite3.DataError)


def _step_row(record: Mapping[str, Any]) -> tuple:
    loss = record.get("loss")
    return (
        int(record["step"]),
        None if loss is None else float(loss),
        float(record.get("samples_per_second", 0.0)),
        int(record.get("peers", 0)),
        int(record.get("samples", 0)),
        float(record.get("time", 0.0)),
        int(record.get("reporters", 0)),
    )


class HistoryStore:
    def __init__(self, path: Path, jsonl: Optional[Path]):
        """Use :meth:`open`."""
        self.path, self.jsonl = path, jsonl
        self._db: Optional[sqlite3.Connection] = None
        self._lock = threading.Lock()
        self._recovered = False

    @classmethod
    def open(cls, path: Path, jsonl: Optional[Path] = None) -> HistoryStore:
        """Open or create the store at ``path``; steps ``jsonl`` has beyond the file's last are copied in."""
        store = cls(Path(path), None if jsonl is None else Path(jsonl))
        with store._lock:
            try:
                store._db = store._connect(str(store.path))
            except sqlite3.Error as e:
                store._recover(e)
        return store

    def _connect(self, target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, timeout=BUSY_TIMEOUT, check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"unknown schema version {version}")
            db.execute("PRAGMA journal_mode=WAL")
            if version == 0:
                db.executescript(SCHEMA)
            self._catch_up(db)
        except BaseException:
            db.close()
            raise
        return db

    def _catch_up(self, db: sqlite3.Connection) -> None:
        if self.jsonl is None:
            return
        last = db.execute(f"SELECT {LAST_STEP} FROM steps").fetchone()[0]
        rows = []
        try:
            with open(self.jsonl, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        row = _step_row(json.loads(line))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # a torn last line, left by a crash mid-write
                    if row[0] > last:
                        rows.append(row)
        except OSError:
            return
        if rows:
            with db:
                db.executemany(INSERT_STEP, rows)
            logger.info(f"restored {len(rows)} steps into {self.path.name} from {self.jsonl.name}")

    def _recover(self, error: sqlite3.Error) -> None:
        """Move the bad file aside and start a new one; in memory if even that fails. Lock held."""
        self._recovered = True
        self._close()
        aside = f"{self.path}.broken-{int(time.time())}"
        logger.warning(f"history store {self.path} is unusable ({error}); setting it aside as {Path(aside).name}")
        try:
            for suffix in ("", "-wal", "-shm", "-journal"):
                if os.path.lexists(f"{self.path}{suffix}"):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            self._db = self._connect(str(self.path))
        except (OSError, sqlite3.Error) as e:
            logger.warning(f"cannot recreate {self.path} ({e}); keeping this run's history in memory only")
            self._db = self._connect(":memory:")

    def _run(self, what: str, action: Callable[[sqlite3.Connection], T], default: T) -> T:
        with self._lock:
            for attempt in range(2):
                try:
                    if self._db is None:
                        raise sqlite3.ProgrammingError("the store is closed")
                    return action(self._db)
                except (ValueError, TypeError, AttributeError, KeyError) as e:
                    logger.debug(f"history store: {what} dropped, malformed input: {e!r}")
                    return default
                except sqlite3.Error as e:
                    if attempt or self._recovered or isinstance(e, CALLER_ERRORS):
                        logger.debug(f"history store: {what} dropped: {e!r}")
                        return default
                    self._recover(e)
            return default

    # -- global steps ------------------------------------------------------------------------------
    def add_step(self, record: Mapping[str, Any]) -> None:
        """Record one global step (``StepRecord.to_json()``); recording a step again replaces it."""
        self._run("add_step", lambda db: _commit(db, INSERT_STEP, _step_row(record)), None)

    def steps(self, since: int = 0, limit: int = 10000) -> list[dict]:
        """Steps after ``since``, ascending; of more than ``limit``, the newest ``limit``."""
        sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE step > ? ORDER BY step DESC LIMIT ?"
        return self._run("steps", lambda db: [dict(row) for row in db.execute(sql, (since, limit))][::-1], [])

    def last_step(self) -> int:
        return self._run("last_step", lambda db: db.execute(f"SELECT {LAST_STEP} FROM steps").fetchone()[0], 0)

    # -- held-out evaluations ----------------------------------------------------------------------
    def add_heldout(self, step: int, loss: float, time: Optional[float] = None) -> None:
        """``time`` defaults to now: the checkpointer's ``on_heldout(step, loss)`` passes none."""
        row = lambda: (int(step), float(loss), _now() if time is None else float(time))
        self._run("add_heldout", lambda db: _commit(db, "INSERT OR REPLACE INTO heldout VALUES (?, ?, ?)", row()), None)

    def heldout(self) -> list[dict]:
        sql = "SELECT step, loss, time FROM heldout ORDER BY step"
        return self._run("heldout", lambda db: [dict(row) for row in db.execute(sql)], [])

    def heldout_steps(self) -> set[int]:
        sql = "SELECT step FROM heldout"
        return self._run("heldout_steps", lambda db: {row[0] for row in db.execute(sql)}, set())

    # -- contributions -----------------------------------------------------------------------------
    def update_contributions(self, metrics: Mapping[str, Any], now: float) -> None:
        """Add what each peer contributed since its previous record (``PeerMetrics``-like values).

        A peer's ``samples`` is its running total since its process started, so a smaller value than
        last time means the peer restarted: all of it is new. A record no newer than the last one
        seen from that peer (the same record polled again) adds nothing.
        """
        def write(db: sqlite3.Connection) -> None:
            with db:
                for m in metrics.values():
                    old = db.execute("SELECT * FROM peers WHERE peer_id = ?", (m.peer_id,)).fetchone()
                    if m.time > now + MAX_CLOCK_SKEW or (old is not None and m.time <= old["last_seen"]):
                        continue
                    old = dict(NEW_PEER, first_seen=m.time) if old is None else old
                    added = m.samples - old["reported"] if m.samples >= old["reported"] else m.samples
                    volunteer, device, mode = (getattr(m, key, None) for key in ("volunteer", "device", "client_mode"))
                    volunteer = old["volunteer"] if volunteer is None else str(volunteer)
                    device = old["device"] if device is None else str(device)
                    mode = old["client_mode"] if mode is None else int(bool(mode))
                    total, reported = old["samples"] + int(added), int(m.samples)
                    row = (str(m.peer_id), volunteer, device, mode, total, reported, float(m.samples_per_second))
                    row += (int(m.step), old["first_seen"], float(m.time))
                    db.execute("INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

        self._run("update_contributions", write, None)

    def peers(self, alive_within: Optional[float] = None, now: Optional[float] = None) -> list[dict]:
        """Every peer seen in the run (or, with ``alive_within``, seen less than that many seconds
        before ``now``), most samples contributed first; ``samples`` is the total over its sessions."""
        cutoff = -float("inf") if alive_within is None else (time.time() if now is None else now) - alive_within
        sql = f"SELECT {PEER_COLUMNS} FROM peers WHERE last_seen > ? ORDER BY samples DESC, peer_id"
        rows = self._run("peers", lambda db: [dict(row) for row in db.execute(sql, (cutoff,))], [])
        return [dict(row, client_mode=None if row["client_mode"] is None else bool(row["client_mode"])) for row in rows]

    def leaderboard(self, limit: int = 20) -> list[dict]:
        """Samples contributed over the whole run per volunteer name (a peer without one stands under
        its short id), most first."""
        board: dict[str, dict] = {}
        for peer in self.peers():
            name = peer["volunteer"] or short_id(peer["peer_id"])
            entry = board.setdefault(name, dict(name=name, samples=0, peers=0, last_seen=peer["last_seen"]))
            entry["samples"] += peer["samples"]
            entry["peers"] += 1
            entry["last_seen"] = max(entry["last_seen"], peer["last_seen"])
        return sorted(board.values(), key=lambda entry: (-entry["samples"], entry["name"]))[:limit]

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error as e:
                logger.debug(f"history store: close failed: {e!r}")
            self._db = None


def _commit(db: sqlite3.Connection, sql: str, params: tuple) -> None:
    with db:
        db.execute(sql, params)


def _now() -> float:  # for methods whose ``time`` argument hides the module
    return time.time()
