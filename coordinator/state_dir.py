"""The coordinator's state directory: what it keeps across restarts.

Layout: ``identity.key`` (its libp2p identity, hence its peer id and join address), ``network.json``
(the ports it chose on first start — swarm and dashboard — reused on every restart so the printed
join command and dashboard URL stay valid, and the addresses of peers it last saw, to find the swarm
again after a restart), ``tokenizer.json``, ``coordinator.json`` (join information and dashboard URL,
rewritten at each start), ``history.jsonl`` (one line per global step), ``history.db`` (the
dashboard's store: steps, held-out losses, contributions; see :mod:`.history_store`),
``checkpoints/``, ``cache/`` and ``coordinator.lock``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from dedloc.errors import UserInputError

logger = logging.getLogger(__name__)

MAX_KNOWN_PEERS = 16


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StateDir:
    def __init__(self, path: Path):
        self.path = path
        self._lock = None

    def lock(self) -> None:
        """Hold an exclusive lock on the directory for the life of the process (one coordinator each)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / "coordinator.lock", "a+")
        except OSError as e:
            raise UserInputError(f"cannot use state directory {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserInputError(f"another coordinator is running with state directory {self.path}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def identity(self) -> Path:
        return self.path / "identity.key"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def history(self) -> Path:
        return self.path / "history.jsonl"

    # -- network.json ------------------------------------------------------------------------------
    def _network(self) -> dict:
        try:
            data = json.loads((self.path / "network.json").read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def remembered_port(self, key: str = "port") -> Optional[int]:
        """The swarm port (``port``) or dashboard port (``dashboard_port``) chosen on the first start."""
        port = self._network().get(key)
        return port if isinstance(port, int) and 0 < port < 65536 else None

    def known_peers(self) -> list[str]:
        peers = self._network().get("peers", [])
        return [p for p in peers if isinstance(p, str)][:MAX_KNOWN_PEERS] if isinstance(peers, list) else []

    def remember(
        self, port: Optional[int] = None, peers: Optional[list[str]] = None, dashboard_port: Optional[int] = None
    ) -> None:
        data = self._network()
        if port is not None:
            data["port"] = port
        if dashboard_port is not None:
            data["dashboard_port"] = dashboard_port
        if peers is not None:
            data["peers"] = peers[:MAX_KNOWN_PEERS]
        try:
            write_json_atomic(self.path / "network.json", data)
        except OSError as e:
            logger.warning(f"cannot write {self.path / 'network.json'}: {e.strerror or e}")

    # -- history -----------------------------------------------------------------------------------
    def last_recorded_step(self) -> int:
        """The last global step in ``history.jsonl`` (0 if none); a torn last line is ignored."""
        last = 0
        try:
            lines = self.history.read_text(encoding="utf-8").splitlines()
        except OSError:
            return 0
        for line in lines:
            try:
                last = max(last, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
        return last
