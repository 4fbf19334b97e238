"""Whether other peers can open connections to this one: the coordinator dials back.

A volunteer behind a home router or a firewall can dial out but cannot be dialled. hivemind does not
expose libp2p's own reachability verdict (AutoNAT), and a peer that announces addresses nobody can
reach makes every group it joins wait for parts that never arrive. So, before it starts its DHT node,
a peer opens a TCP listener on the address and port it is going to listen on (:class:`DialBackListener`)
and asks the coordinator, in the same request as its access (see :mod:`dedloc.swarm.access`), to
connect back. The listener answers every connection with a nonce that only this peer and the
coordinator know, so an answer proves the coordinator reached *this* peer.

The coordinator (:func:`dial_back`) dials only the IP addresses that the asking peer's own libp2p
connection comes from — it is no port scanner for anyone else — on at most :data:`MAX_PORTS` ports the
peer names: its listen port, or the ports of the addresses it announces (a port forwarded on the
router: ``--announce HOST:PORT``). A peer that nobody reached runs in client mode: it opens every
connection itself and still trains and averages (it reduces no share of the all-reduce and serves no
state downloads). A peer listening on loopback while the coordinator is elsewhere ends up there too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import threading
from typing import Optional, Sequence

from hivemind.p2p import P2P, PeerID

from dedloc.errors import UserInputError

logger = logging.getLogger(__name__)

MAGIC = b"dedloc-dial-back/1\n"
"""What the listener sends before the nonce (a stray service on the port does not send it)."""
NONCE_BYTES = 16
MAX_PORTS = 4
MAX_ADDRESSES = 4
DIAL_TIMEOUT = 3.0
"""Seconds the coordinator gives one dial-back, connecting and reading the nonce together."""


def listen_host_port(maddr: str) -> tuple[str, int]:
    """Host and TCP port of a listen multiaddr such as ``/ip4/0.0.0.0/tcp/0``."""
    found = re.fullmatch(r"/(ip4|ip6)/([^/]+)/tcp/(\d+)", maddr.strip())
    if found is None:
        raise UserInputError(f"cannot listen on {maddr!r}: expected /ip4/HOST/tcp/PORT")
    return found.group(2), int(found.group(3))


def with_port(maddr: str, port: int) -> str:
    """``maddr`` (``/ip4/HOST/tcp/PORT``) with ``port``."""
    return re.sub(r"/tcp/\d+$", f"/tcp/{port}", maddr.strip())


def announced_ports(announce_maddrs: Sequence[str]) -> list[int]:
    """The TCP ports of the announced addresses, in order, without repeats."""
    ports: list[int] = []
    for maddr in announce_maddrs:
        found = re.search(r"/tcp/(\d+)", maddr)
        if found and int(found.group(1)) not in ports:
            ports.append(int(found.group(1)))
    return ports


class DialBackListener:
    """A TCP listener on ``host``:``port`` (port 0: any free one, see :attr:`port`) that answers every
    connection with :data:`MAGIC` and this listener's nonce, until :meth:`close`.

    :class:`UserInputError` when the address cannot be listened on (in use, not this machine's)."""

    def __init__(self, host: str, port: int):
        self.nonce = os.urandom(NONCE_BYTES)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as p2pd's own IPv6 listener: IPv4 is not answered on it
            self._socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            self._socket.bind((host, port))
            self._socket.listen(16)
        except OSError as e:
            self._socket.close()
            raise UserInputError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self.connections = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dial-back listener", daemon=True)
        self._thread.start()

    def request(self, ports: Sequence[int] = ()) -> dict:
        """What the coordinator is asked: dial these ports (default: the listener's own) and expect the nonce."""
        return dict(ports=list(ports or [self.port])[:MAX_PORTS], nonce=self.nonce)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._socket.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        """Send the nonce (one thread per connection: a stranger that lingers holds up nobody)."""
        with connection:
            try:
                connection.settimeout(DIAL_TIMEOUT)
                connection.sendall(MAGIC + self.nonce)
                # the dialling side closes first: no connection of this port is left in TIME_WAIT here
                connection.recv(1)
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self._socket.close()

    def __enter__(self) -> "DialBackListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_dial_back_request(request: object) -> Optional[tuple[list[int], bytes]]:
    """The ports and nonce of a dial-back request received over the network; None when malformed."""
    if not isinstance(request, dict):
        return None
    ports, nonce = request.get("ports"), request.get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES or not isinstance(ports, list):
        return None
    if not 0 < len(ports) <= MAX_PORTS or not all(type(p) is int and 0 < p < 65536 for p in ports):
        return None
    return list(dict.fromkeys(ports)), nonce


async def _answers(ip: str, port: int, nonce: bytes, timeout: float) -> bool:
    async def dial() -> bool:
        reader, writer = await asyncio.open_connection(ip, port)
        try:
            return await reader.readexactly(len(MAGIC) + NONCE_BYTES) == MAGIC + nonce
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(dial(), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False


def _maddr(ip: str, port: int) -> str:
    return f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}"


async def dial_addresses(ips: Sequence[str], ports: Sequence[int], nonce: bytes,
                         timeout: float = DIAL_TIMEOUT) -> list[str]:
    """Dial every ``ip``:``port`` at once; the multiaddrs that answered with ``nonce``."""
    targets = [(ip, port) for ip in ips[:MAX_ADDRESSES] for port in ports[:MAX_PORTS]]
    answered = await asyncio.gather(*(_answers(ip, port, nonce, timeout) for ip, port in targets))
    return [_maddr(ip, port) for (ip, port), ok in zip(targets, answered) if ok]


async def observed_ips(p2p: P2P, peer_id: PeerID) -> list[str]:
    """The IP addresses that ``peer_id``'s connections to this node come from."""
    ips: list[str] = []
    for info in await p2p.list_peers():
        if info.peer_id != peer_id:
            continue
        for addr in info.addrs:
            if "p2p-circuit" in str(addr):  # relayed: the address is the relay's
                continue
            found = re.match(r"/(ip4|ip6)/([^/]+)/", str(addr))
            if found is None:
                continue
            try:
                ip = str(ipaddress.ip_address(found.group(2)))
            except ValueError:
                continue
            if ip not in ips:
                ips.append(ip)
    return ips


MAX_CONCURRENT_DIAL_BACKS = 8
_dial_backs: Optional[asyncio.Semaphore] = None  # the coordinator's, created in its event loop on first use
_dialling: set = set()  # peers with a dial-back in flight


async def dial_back(p2p: P2P, peer_id: PeerID, request: object) -> Optional[list[str]]:
    """Runs on the coordinator: the addresses at which ``peer_id`` answered a dial-back (see the module
    doc), or None when the request is malformed, the peer's connection cannot be seen, the same peer
    already has one in flight, or anything fails. At most :data:`MAX_CONCURRENT_DIAL_BACKS` run at once
    (each at most ``MAX_ADDRESSES × MAX_PORTS`` connections for :data:`DIAL_TIMEOUT`)."""
    global _dial_backs
    parsed = parse_dial_back_request(request)
    if parsed is None or peer_id in _dialling:
        return None
    ports, nonce = parsed
    if _dial_backs is None:
        _dial_backs = asyncio.Semaphore(MAX_CONCURRENT_DIAL_BACKS)
    _dialling.add(peer_id)
    try:
        async with _dial_backs:
            ips = await observed_ips(p2p, peer_id)
            if not ips:
                return None
            reached = await dial_addresses(ips, ports, nonce)
    except Exception as e:
        logger.debug(f"dial-back to peer {peer_id.to_base58()} failed: {e!r}")
        return None
    finally:
        _dialling.discard(peer_id)
    logger.debug(f"dial-back to peer {peer_id.to_base58()} at {ips} ports {ports}: reached {reached or 'none'}")
    return reached
