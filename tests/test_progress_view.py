"""The volunteer's terminal view: its figures, its silence off a terminal, and log lines while it is live."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch
from hivemind.utils import logging as hivemind_logging
from rich.console import Console

from dedloc import logs
from dedloc.swarm.records import PeerMetrics
from peer.progress_view import PeerProgress, ProgressView, render
from peer.trainer import ONLINE_WINDOW, swarm_samples_per_second

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

SNAPSHOT = PeerProgress(
    global_step=12,
    total_steps=100,
    samples_accumulated=384,
    target_batch_size=512,
    my_samples_per_second=12.5,
    swarm_samples_per_second=48.25,
    peers=4,
    seconds_to_next_step=75.0,
    contributed=1536,
    loss=3.45678,
)


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100)


def text_of(console: Console) -> str:
    return ANSI.sub("", console.file.getvalue())


@pytest.fixture
def setup_logging(monkeypatch):
    """Sets up dedloc's real log handler when the test calls it — in the test body, so that it writes
    to the stderr that ``capsys`` reads there — and undoes it afterwards."""
    root, hivemind_logger = logging.getLogger(), logging.getLogger("hivemind")
    saved = root.level, hivemind_logger.level, hivemind_logging._current_mode
    monkeypatch.setattr(logs, "_handler", None)

    def setup() -> logging.StreamHandler:
        logs.setup_logging("info", "peer", "QmTestPeerXYZ123")
        return logs._handler

    yield setup
    if logs._handler is not None:
        root.removeHandler(logs._handler)
    root.setLevel(saved[0])
    hivemind_logger.setLevel(saved[1])
    hivemind_logging.use_hivemind_log_handler(saved[2])


def test_render_shows_every_figure():
    console = terminal()
    console.print(render(SNAPSHOT))
    out = text_of(console)
    assert "step 12/100" in out
    assert "384/512 samples" in out
    assert "me 12.5" in out and "swarm 48.2" in out
    assert "4 peers online" in out
    assert "next averaging in ~1m15s" in out
    assert "contributed 1,536 samples" in out
    assert "loss 3.4568" in out


def test_render_unknowns_and_countdown():
    unknown = PeerProgress(3, 10, 0, 64, 1.0, None, 1, None, 0)
    console = terminal()
    console.print(render(unknown))
    console.print(render(SNAPSHOT, elapsed=30.0))
    console.print(render(SNAPSHOT, elapsed=80.0))
    out = text_of(console)
    assert "swarm n/a" in out and "1 peer online" in out and "next averaging: unknown" in out
    assert "loss" not in out.split("next averaging: unknown")[1].split("\n")[0]
    assert "next averaging in ~45 s" in out
    assert "averaging now" in out


def test_live_view_draws_the_latest_snapshot():
    console = terminal()
    with ProgressView(enabled=True, console=console, capture_logs=False) as view:
        view.update(PeerProgress(1, 100, 8, 512, 2.0, None, 1, 5.0, 8))
        view.update(SNAPSHOT)
    out = text_of(console)
    final = out[out.rindex("step ") :]
    assert "step 12/100" in final and "384/512 samples" in final
    assert "me 12.5" in final and "swarm 48.2" in final and "4 peers online" in final
    assert "contributed 1,536 samples" in final
    assert re.search(r"next averaging in ~1m1\ds", final)


def test_disabled_view_writes_nothing(setup_logging):
    log_handler = setup_logging()
    console = terminal()
    stream = log_handler.stream
    view = ProgressView(enabled=False, console=console, capture_logs=True)
    with view:
        assert log_handler.stream is stream
        view.update(SNAPSHOT)
    assert console.file.getvalue() == ""
    assert log_handler.stream is stream


def test_default_follows_the_terminal():
    assert ProgressView(console=terminal()).enabled
    assert not ProgressView(console=Console(file=io.StringIO())).enabled
    assert ProgressView().enabled == sys.stdout.isatty()


def test_log_lines_go_above_the_live_view_and_back_to_stderr_after(setup_logging, capsys):
    setup_logging()
    console = terminal()
    log = logging.getLogger("peer.trainer")
    capsys.readouterr()
    view = ProgressView(enabled=True, console=console, capture_logs=True)
    view.start()
    view.update(SNAPSHOT)
    log.info("step=12 loss=3.4568 while live")
    view.stop()
    out = text_of(console)
    assert "step=12 loss=3.4568 while live" in out
    assert "[peer XYZ123]" in out  # dedloc's format, not some other handler's
    assert "while live" not in capsys.readouterr().err

    log.info("after the view stopped")
    assert "after the view stopped" in capsys.readouterr().err
    assert "after the view stopped" not in text_of(console)


def test_a_round_without_a_group_is_one_warning_line_other_errors_keep_their_traceback(setup_logging, capsys):
    """hivemind logs "could not find a group" with a traceback before handing the same exception to
    the caller, which deals with it: the volunteer sees one warning line. Other errors stay whole."""
    from hivemind.averaging.partition import AllreduceException

    setup_logging()
    capsys.readouterr()
    averager_log = logging.getLogger("hivemind.averaging.averager")
    for error in (AllreduceException("Averaging step failed: could not find a group"), ValueError("a real bug")):
        try:
            raise error
        except Exception as e:
            averager_log.exception(e)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "could not find a group" in line]
    assert len(lines) == 1 and "WARN" in lines[0], err
    assert err.count("Traceback") == 1 and "ValueError: a real bug" in err, err


def test_a_failed_state_download_from_one_peer_is_one_warning_line(setup_logging, capsys):
    """hivemind logs a state download that failed midway with its traceback and asks the next peer: one
    warning line naming the error. An exception logged with another message keeps its traceback."""
    setup_logging()
    capsys.readouterr()
    averager_log = logging.getLogger("hivemind.averaging.averager")
    for message in ("Failed to download state from QmPeer - {!r}", "Something else broke: {!r}"):
        try:
            torch.zeros(49152).reshape(128, 512)
        except RuntimeError as e:
            averager_log.exception(message.format(e))
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "Failed to download state from QmPeer" in line]
    assert "WARN" in line and "invalid for input of size 49152" in line and "next peer" in line, err
    assert err.count("Traceback") == 1 and "Something else broke" in err, err


def test_a_round_cancelled_by_its_timeout_is_one_warning_line(setup_logging, capsys):
    """hivemind logs "Unable to run All-Reduce" over the CancelledError of a round that outlived its
    timeout (both tracebacks), and asyncio then reports the cancelled future: one warning line in all.
    The same message over another cause keeps its traceback."""
    import asyncio

    from hivemind.averaging.matchmaking import MatchmakingException

    setup_logging()
    capsys.readouterr()
    averager_log, asyncio_log = logging.getLogger("hivemind.averaging.averager"), logging.getLogger("asyncio")
    for cause in (asyncio.CancelledError(), ValueError("a real bug")):
        try:
            try:
                raise cause
            except BaseException as e:
                raise MatchmakingException(f"Unable to run All-Reduce: {e}")
        except MatchmakingException as e:
            averager_log.exception(e)
    try:
        raise asyncio.CancelledError()
    except asyncio.CancelledError as e:
        asyncio_log.error("Future exception was never retrieved", exc_info=e)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "hivemind.averaging.averager: Unable to run All-Reduce" in line]
    assert len(lines) == 2 and "WARN" in lines[0] and "outlived its timeout" in lines[0] and "ERROR" in lines[1], err
    assert "never retrieved" not in err and err.count("Traceback") == 2 and "ValueError: a real bug" in err, err


def test_swarm_rate_counts_only_other_peers_online():
    def metrics(peer: str, rate: float, age: float) -> PeerMetrics:
        return PeerMetrics(peer_id=peer, step=1, samples_per_second=rate, samples=0, time=1000.0 - age)

    records = [metrics("a", 10.0, 1.0), metrics("b", 2.5, ONLINE_WINDOW - 1), metrics("c", 100.0, ONLINE_WINDOW + 1)]
    assert swarm_samples_per_second(records, now=1000.0) == 12.5
    assert swarm_samples_per_second(records, now=1000.0, exclude="a") == 2.5
    assert swarm_samples_per_second([], now=1000.0) == 0.0


def test_a_reset_averaging_stream_is_one_warning_line(setup_logging, capsys):
    """A round's stream reset by the other peer: asyncio reports the ConnectionResetError left in a
    future by hivemind's stream reader, and the reader task left pending — one warning line in all.
    The same error from outside hivemind, and other pending tasks, are shown as they are."""
    import asyncio
    import gc

    from hivemind.utils.asyncio import aiter_with_timeout

    setup_logging()
    capsys.readouterr()

    async def orphan_the_error(from_hivemind: bool) -> None:
        async def reset():
            raise ConnectionResetError(104, "Connection reset by peer")
            yield  # an async generator, as hivemind's stream reader is

        try:
            if from_hivemind:
                async for _ in aiter_with_timeout(reset(), 1.0):
                    pass
            else:
                async for _ in reset():
                    pass
        except ConnectionResetError as e:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(e)  # nobody retrieves it: asyncio reports it when it is collected
            del future
            gc.collect()

    asyncio.run(orphan_the_error(from_hivemind=True))
    asyncio.run(orphan_the_error(from_hivemind=False))
    asyncio_log = logging.getLogger("asyncio")
    for coroutine in ("amap_in_executor.<locals>._put_items()", "something_else()"):
        asyncio_log.error(f"Task was destroyed but it is pending!\ntask: <Task pending name='Task-1' coro=<{coroutine} running>>")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "averaging stream was reset" in line]
    assert len(lines) == 1 and "WARN" in lines[0] and "ConnectionResetError" in lines[0], err
    assert err.count("Traceback") == 1 and err.count("never retrieved") == 1, err  # the one from outside hivemind
    assert "_put_items" not in err and "something_else" in err, err
