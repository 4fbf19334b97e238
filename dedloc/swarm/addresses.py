"""Join addresses: full multiaddrs that end in ``/p2p/<peer id>``.

The first address a user passes to ``--join`` names the coordinator: its peer id is the key the
published run config must be signed with. Further addresses are extra bootstrap peers.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Sequence

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from dedloc.errors import UserInputError

EXAMPLE = "/ip4/203.0.113.7/tcp/31337/p2p/QmXc...  (the coordinator prints the exact one)"


@dataclass(frozen=True)
class JoinAddresses:
    maddrs: tuple[Multiaddr, ...]
    coordinator_id: PeerID

    @property
    def as_strings(self) -> list[str]:
        return [str(m) for m in self.maddrs]


def parse_maddr(text: str) -> Multiaddr:
    """Parse one multiaddr; :class:`UserInputError` names it when malformed."""
    text = text.strip()
    if not text.startswith("/"):
        raise UserInputError(f"malformed address {text!r}: a multiaddr starts with '/', e.g. {EXAMPLE}")
    try:
        return Multiaddr(text)
    except Exception as e:
        raise UserInputError(f"malformed address {text!r}: {e}") from None


def peer_id_of(maddr: Multiaddr, original: str) -> PeerID:
    try:
        value = maddr.value_for_protocol("p2p")
    except Exception:
        value = None
    if not value:
        raise UserInputError(f"address {original!r} lacks the peer id: it must end in /p2p/<peer id>, e.g. {EXAMPLE}")
    try:
        return PeerID.from_base58(value)
    except Exception:
        raise UserInputError(f"address {original!r} has a malformed peer id {value!r}") from None


def parse_join_addresses(texts: Sequence[str]) -> JoinAddresses:
    """Validate ``--join`` values (each may also hold several addresses separated by commas or spaces)."""
    items = [part for text in texts for part in text.replace(",", " ").split()]
    if not items:
        raise UserInputError(f"--join needs the coordinator's address, e.g. {EXAMPLE}")
    maddrs = []
    ids = []
    for item in items:
        maddr = parse_maddr(item)
        protocols = {p.name for p in maddr.protocols()}
        if not protocols & {"tcp", "udp", "quic", "quic-v1", "p2p-circuit"}:
            raise UserInputError(f"address {item!r} has no transport (tcp/udp) part, e.g. {EXAMPLE}")
        ids.append(peer_id_of(maddr, item))
        maddrs.append(maddr)
    return JoinAddresses(maddrs=tuple(maddrs), coordinator_id=ids[0])


def listen_maddr(host: str, port: int) -> str:
    """The multiaddr to listen on for ``--host``/``--port``."""
    if not 0 <= port <= 65535:
        raise UserInputError(f"--port must be in 0..65535 (got {port})")
    if not host or any(c.isspace() or c == "/" for c in host):
        raise UserInputError(f"--host must be an IP address (got {host!r})")
    family = "ip6" if ":" in host else "ip4"
    return parse_maddr(f"/{family}/{host}/tcp/{port}").__str__()


def announce_maddr(text: str) -> str:
    """``--announce HOST:PORT`` (``[IPv6]:PORT`` for IPv6; HOST an IP address or a DNS name) as the
    multiaddr to announce; :class:`UserInputError` when malformed."""
    found = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\s/\[\]]+):(\d{1,5})", text.strip())
    if found is None:
        raise UserInputError(f"--announce {text!r} must be HOST:PORT, e.g. 203.0.113.7:31337 (a port forwarded to this machine)")
    host, port = (found.group(1), found.group(2)) if found.group(1) else (found.group(3), found.group(4))
    if not 0 < int(port) < 65536:
        raise UserInputError(f"--announce {text!r}: the port must be in 1..65535")
    try:
        ip = ipaddress.ip_address(host)
        return f"/{'ip6' if ip.version == 6 else 'ip4'}/{ip}/tcp/{int(port)}"
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+", host) or host.replace(".", "").isdigit():
        raise UserInputError(f"--announce {text!r}: {host!r} is neither an IP address nor a host name")
    return f"/dns/{host.rstrip('.')}/tcp/{int(port)}"
