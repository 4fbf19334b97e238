"""One log format for every dedloc process: time, role and short peer id, logger, message.

hivemind's own loggers are routed into the same handler (quieter than ours unless ``--log-level
debug``), and colour is used only on a terminal. While a live display is drawn on the terminal,
:func:`log_through` sends the same lines through its rich console so they print above it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from rich.console import Console

LEVELS = ("debug", "info", "warning", "error")


class _Formatter(logging.Formatter):
    COLOURS = {logging.WARNING: "\033[33m", logging.ERROR: "\033[31m", logging.CRITICAL: "\033[31m"}

    def __init__(self, tag: str, colour: bool):
        super().__init__(fmt=f"%(asctime)s %(levelname)-7s [{tag}] %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.colour and record.levelno in self.COLOURS:
            return f"{self.COLOURS[record.levelno]}{text}\033[0m"
        return text


class _KnownHivemindNoise(logging.Filter):
    """Hides (unless at debug level) tracebacks hivemind 1.1.12 logs for races it survives:

    - an averaging round that found no group: ``DecentralizedAverager._step`` (and the optimizer,
      for a round it tags along with) logs the AllreduceException with its traceback and then deals
      with it or hands it to its caller, which does (the optimizer steps alone, the final round
      downloads the others' state). It is shown as one warning line;
    - the DHT process unpickling a command whose sender — a forked averager process that is shutting
      down — is already gone (``multiprocessing.resource_sharer`` fails with ConnectionResetError /
      FileNotFoundError / EOFError); the command was a goodbye that no longer matters;
    - ``DecentralizedAverager._step`` setting the result of an averaging round the optimizer had
      already cancelled ("Task exception was never retrieved ... InvalidStateError ... CANCELLED");
    - an all-reduce cancelled because its round outlived the step's timeout: hivemind logs "Unable to
      run All-Reduce" over the CancelledError with both tracebacks, the round fails for its caller
      (which deals with it as with any failed round), and asyncio later reports the cancelled
      round's future as never retrieved. It is shown as one warning line;
    - an averaging RPC refused to a peer without access (``NotAdmitted``), logged once per peer by
      :mod:`dedloc.swarm.access`; hivemind's P2P logs the handler's exception each time;
    - a stream of an averaging round reset by the other peer (its round ended early, e.g. a part that
      came too late): the round ends half-done and is dealt with as any such round, but hivemind's
      stream reader (``amap_in_executor``) leaves the ConnectionResetError in a future nobody reads,
      and its reader task pending; asyncio reports both when they are collected. It is shown as one
      warning line;
    - a state download from one peer that failed midway (``_load_state_from_peers`` logs the exception
      with its traceback, then asks the next peer; every caller in dedloc retries or goes on without
      the state when none served it). In CI a streamed tensor once arrived a chunk short ("shape
      [128, 512] is invalid for input of size 49152"), as in hivemind issue #504: shown as one warning
      line that names the error.
    Everything else hivemind logs is shown as it is.
    """

    def __init__(self, show: bool):
        super().__init__()
        self.show = show

    def filter(self, record: logging.LogRecord) -> bool:
        if self.show:
            return True
        if record.name == "asyncio" and not record.exc_info and "amap_in_executor" in record.getMessage() \
                and "Task was destroyed but it is pending" in record.getMessage():
            return False  # the reader task of a reset averaging stream (below)
        if not isinstance(record.exc_info, tuple) or record.exc_info[1] is None:
            return True
        error, trace = record.exc_info[1], record.exc_info[2]
        frames = []
        while trace is not None:
            frames.append(trace.tb_frame.f_code.co_filename)
            trace = trace.tb_next
        if record.name.startswith("hivemind.") and "could not find a group" in str(error):
            return _as_warning_line(record, str(error))
        if record.name.startswith("hivemind.") and "Unable to run All-Reduce" in str(error) \
                and isinstance(error.__context__, asyncio.CancelledError):
            return _as_warning_line(record, f"{str(error).rstrip(': ')}: the round was cancelled (it outlived its timeout)")
        if record.name == "asyncio" and isinstance(error, asyncio.CancelledError):
            return False  # a cancelled round's future that nobody awaited (above)
        if record.name == "asyncio" and isinstance(error, ConnectionError) \
                and any("hivemind" in f and f.endswith(("p2p_daemon.py", "asyncio.py")) for f in frames):
            return _as_warning_line(record, f"hivemind: an averaging stream was reset by the other peer "
                                            f"({type(error).__name__}: {error}); its round ends without that part")
        if record.name.startswith("hivemind.dht") and any(f.endswith("resource_sharer.py") for f in frames):
            return False
        if record.name == "asyncio" and type(error).__name__ == "InvalidStateError" and "CANCELLED" in str(error):
            return False
        if record.name.startswith("hivemind.averaging") and str(record.msg).startswith("Failed to download state from"):
            return _as_warning_line(record, f"{record.getMessage()}; the download goes on with the next peer")
        if record.name.startswith("hivemind.") and type(error).__name__ == "NotAdmitted":
            return False  # a refused intruder: dedloc.swarm.access logged it once, in one line
        return True


def _as_warning_line(record: logging.LogRecord, message: str) -> bool:
    """Rewrites ``record`` in place as one warning line saying ``message``, without its traceback."""
    record.msg, record.args = message, ()
    record.exc_info, record.exc_text = None, None
    record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
    return True


_handler: Optional[logging.Handler] = None


def setup_logging(level: str = "info", role: str = "dedloc", peer_id: Optional[str] = None) -> None:
    """Configure the root logger once per process; later calls update the tag and level."""
    global _handler
    from hivemind.utils import logging as hivemind_logging

    tag = role if peer_id is None else f"{role} {short_id(peer_id)}"
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_handler)
    _handler.setFormatter(_Formatter(tag, colour=sys.stderr.isatty()))
    numeric = getattr(logging, level.upper())
    for old in list(_handler.filters):
        _handler.removeFilter(old)
    _handler.addFilter(_KnownHivemindNoise(show=numeric <= logging.DEBUG))
    root.setLevel(numeric)
    hivemind_logging.use_hivemind_log_handler("nowhere")  # hivemind records propagate to our handler
    logging.getLogger("hivemind").setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
    for noisy in ("datasets", "transformers", "filelock", "urllib3", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING if numeric > logging.DEBUG else numeric)


def log_through(console: "Console") -> Callable[[], None]:
    """Write this process's log lines through ``console`` until the returned function is called.

    A rich live display redraws itself by moving the cursor up over its last frame; a line written
    straight to the same terminal meanwhile is overwritten or torn. Through the console, each line is
    printed above the display instead. Call the returned function when the display stops: it flushes
    and puts the handler's own stream back. Without :func:`setup_logging` there is nothing to route.
    """
    from rich.file_proxy import FileProxy

    handler = _handler
    if not isinstance(handler, logging.StreamHandler):
        return lambda: None
    original = handler.stream
    proxy = FileProxy(console, original)
    handler.setStream(proxy)

    def restore() -> None:
        if handler.stream is proxy:
            handler.setStream(original)

    return restore


def short_id(peer_id: str) -> str:
    """The last 6 characters of a base58 peer id: enough to tell peers apart in logs."""
    return str(peer_id)[-6:]
