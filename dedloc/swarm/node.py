"""Starting a DHT node with dedloc's network defaults.

Local swarms, tests and benchmarks must keep their traffic on loopback (or inside namespaces the tests
create), so NAT traversal — UPnP/NAT-PMP port mapping and AutoNAT probing of the local network — is off
unless asked for (``nat_traversal=True``, for volunteers on the real internet).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Optional, Sequence

import hivemind
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.auth import AuthorizerBase

from dedloc.errors import SwarmUnreachableError, UserInputError
from dedloc.swarm.addresses import parse_maddr
from dedloc.swarm.identity import Identity

logger = logging.getLogger(__name__)


@dataclass
class NetworkOptions:
    """Where a node listens and what it tells others to dial."""

    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: Sequence[str] = ()
    nat_traversal: bool = False
    """Let p2pd map ports (UPnP/NAT-PMP) and probe reachability (AutoNAT). Off for local runs."""
    client_mode: bool = False
    """Accept no incoming connections (for peers behind NAT); a client-mode node still trains."""
    extra: dict = field(default_factory=dict)


def start_dht(
    identity: Identity,
    network: NetworkOptions,
    initial_peers: Sequence[str] = (),
    validators: Iterable[RecordValidatorBase] = (),
    startup_timeout: float = 20.0,
    stop: Optional[threading.Event] = None,
    authorizer: Optional[AuthorizerBase] = None,
) -> hivemind.DHT:
    """Start a DHT node (in its own child process, with its own p2pd) and wait until it is ready.

    The child processes ignore SIGINT: a Ctrl-C in the terminal reaches the whole process group, and
    the node must be shut down by its parent, in order, not killed from under it. The caller keeps
    its own handler, so a stop (``stop`` set) while waiting raises KeyboardInterrupt.

    Raises :class:`SwarmUnreachableError` when ``initial_peers`` cannot be reached or joined within
    ``startup_timeout`` and :class:`UserInputError` when the listen or announce address cannot be used.
    With an ``authorizer`` (a run with an allowlist) every DHT request and response is signed and checked.
    """
    for maddr in network.announce_maddrs:
        parsed = parse_maddr(maddr)
        if re.search(r"/(tcp|udp)/0(/|$)", str(parsed)) or "/p2p/" in str(parsed):
            raise UserInputError(f"announce address {maddr!r} must name a fixed port and no /p2p/ part")
    kwargs = dict(
        host_maddrs=list(network.host_maddrs),
        announce_maddrs=list(network.announce_maddrs) or None,
        identity_path=str(identity.path),
        nat_port_map=network.nat_traversal,
        auto_nat=network.nat_traversal,
        client_mode=network.client_mode,
        startup_timeout=startup_timeout,
        check_if_identity_free=False,
        authorizer=authorizer,
        **network.extra,
    )
    dht = _DHTProcess(
        initial_peers=list(initial_peers) or None, start=False, record_validators=list(validators), **kwargs
    )
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the DHT process and its p2pd
    try:
        dht.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + startup_timeout + 5.0
    try:
        while True:
            try:
                dht.wait_until_ready(timeout=0.5)
                break
            except (TimeoutError, concurrent.futures.TimeoutError):
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the DHT node did not start within {startup_timeout:.0f} s") from None
    except KeyboardInterrupt:
        _discard(dht)
        raise
    except Exception as e:
        _discard(dht)
        text = f"{type(e).__name__}: {e}".strip().splitlines()[-1]
        if isinstance(e, P2PDaemonError) and "address already in use" in text:
            raise UserInputError(f"cannot listen on {', '.join(network.host_maddrs)}: {text}") from None
        if initial_peers:
            raise SwarmUnreachableError(
                f"cannot reach the swarm at {', '.join(initial_peers)} ({text}); check the address, and whether "
                "this machine can reach it"
            ) from None
        if isinstance(e, P2PDaemonError) and "listen" in text:
            raise UserInputError(f"cannot listen on {', '.join(network.host_maddrs)}: {text}") from None
        raise
    _make_command_pipe_blocking(dht)
    return dht


class _DHTProcess(hivemind.DHT):
    """hivemind's DHT process, saying in one line (no raw traceback) when a command's sender exited first.

    In hivemind 1.1.12 every command sent to the DHT process carries its reply pipe, which the DHT
    process fetches from the sending process when it reads the command. A sender that exited in the
    meantime (an averager process stopped while its DHT request was queued, a peer leaving) makes
    that fetch fail: refused (hivemind logs the traceback and goes on) or cut short (``EOFError``,
    which ends the DHT process with Python's traceback). At shutdown either is harmless.
    """

    def run(self) -> None:
        logging.getLogger("hivemind.dht.dht").addFilter(_sender_gone_in_one_line)
        try:
            super().run()
        except EOFError:
            logger.warning(f"the DHT process stopped: {_SENDER_GONE} (EOFError)")


_SENDER_GONE = "a command's sender exited before the command was read"


def _sender_gone_in_one_line(record: logging.LogRecord) -> bool:
    """Turns hivemind's traceback for a command whose sender is gone into a one-line warning."""
    error = record.exc_info[1] if record.exc_info else None
    if record.funcName == "_run" and isinstance(error, (ConnectionRefusedError, FileNotFoundError)):
        record.msg, record.args = f"{_SENDER_GONE} ({type(error).__name__})", ()
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _discard(dht: hivemind.DHT) -> None:
    """Stop a DHT process that failed to start (it may still be bootstrapping)."""
    if dht.is_alive():
        dht.terminate()
        dht.join(5)


def _make_command_pipe_blocking(dht: hivemind.DHT) -> None:
    """Work around a hivemind 1.1.12 race that kills the DHT process on any command over ~4 kB.

    ``DHT.run`` watches its end of the command pipe with uvloop's ``add_reader``, which switches the
    pipe to non-blocking mode; a command the parent has not finished writing (pipe writes over 4 kB are
    not atomic) then makes the child's ``recv`` fail with EAGAIN, and the DHT process dies with
    "EOFError: Ran out of input" (reported by hivemind users, e.g. gensyn-ai/rl-swarm#77 and #216).
    The parent shares that pipe's file description with the child, so switching it back to blocking
    here makes ``recv`` wait for the whole message. Called after the DHT reported ready, i.e. after
    ``add_reader`` ran in the child.
    """
    os.set_blocking(dht._inner_pipe.fileno(), True)


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The full multiaddrs (with ``/p2p/<id>``) others can use to join through this node."""
    return [str(m) for m in dht.get_visible_maddrs(latest=True)]


async def _connected_peer_maddrs(dht: hivemind.DHT, node) -> list[str]:
    """Runs inside the DHT process: full multiaddrs of the peers p2pd is connected to."""
    return [f"{addr}/p2p/{info.peer_id.to_base58()}" for info in await node.p2p.list_peers() for addr in info.addrs]


def connected_peer_maddrs(dht: hivemind.DHT, timeout: float = 5.0) -> list[str]:
    """Addresses of the peers this node is connected to now (empty if the DHT does not answer in time)."""
    try:
        return list(dht.run_coroutine(_connected_peer_maddrs, return_future=True).result(timeout))
    except Exception as e:
        logger.debug(f"cannot list connected peers: {e!r}")
        return []


async def _ping_peers(dht: hivemind.DHT, node, peer_ids: Sequence[str], timeout: float) -> list[str]:
    """Runs inside the DHT process: ping each peer at once; those that answer within ``timeout`` go
    (back) into the routing table. An unreachable peer (a dial can hang far longer) does not hold up the rest."""
    pings = {asyncio.ensure_future(node.protocol.call_ping(PeerID.from_base58(p))): p for p in peer_ids}
    done, pending = await asyncio.wait(pings, timeout=timeout)
    for ping in pending:
        ping.cancel()
    return [pings[ping] for ping in done if not ping.cancelled() and ping.exception() is None and ping.result() is not None]


def ping_peers(dht: hivemind.DHT, peer_ids: Sequence[str], timeout: float = 5.0) -> list[str]:
    """The peers among ``peer_ids`` (base58) that answer a DHT ping within ``timeout`` seconds (about).

    A peer that answers is put back into this node's routing table: after a network outage has emptied
    it, this is what reconnects the node to the DHT (hivemind refreshes its routing table only from
    peers already in it, and never re-contacts its initial peers).
    """
    if not peer_ids:
        return []
    try:
        future = dht.run_coroutine(partial(_ping_peers, peer_ids=list(peer_ids), timeout=timeout), return_future=True)
        return list(future.result(timeout + 5.0))
    except Exception as e:
        logger.debug(f"cannot ping peers: {e!r}")
        return []


def tcp_port(maddrs: Sequence[str]) -> Optional[int]:
    """The TCP port in the first address that has one."""
    for maddr in maddrs:
        found = re.search(r"/tcp/(\d+)", maddr)
        if found:
            return int(found.group(1))
    return None
