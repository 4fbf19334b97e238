"""The coordinator's front desk: turns a volunteer's invite into an access token, and says when a run is open.

Peers reach it over libp2p (handler :data:`~dedloc.swarm.access.ACCESS_HANDLER`), whose connections
authenticate the caller's identity key: the token is issued for the key the caller proves to hold.
The desk runs inside the coordinator's DHT process (it is registered there, with the coordinator's
identity bound as that process's signing key) and re-reads the allowlist whenever the file changes,
so adding or revoking a volunteer takes effect at once, without a restart.

Requests and answers are msgpack maps in the ``metadata`` of hivemind's ``ExpertRequest`` /
``ExpertResponse`` protobufs; nothing received is unpickled. A request may also ask the desk to dial
the peer back (``"dial_back"``, see :mod:`dedloc.swarm.reachability`): the answer of an admitted peer
then carries ``"reachable"``, the addresses at which the desk reached it. The same process serves the
upload probe (:mod:`dedloc.swarm.bandwidth`) to the peers the desk admits.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Optional

import hivemind
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from dedloc.allowlist import Allowlist, load_allowlist
from dedloc.errors import UserInputError
from dedloc.swarm.access import (
    ACCESS_HANDLER, ALLOWLIST_HINT, CLOCK_TOLERANCE, clock_skew_message, mint_token, token_bytes,
)
from dedloc.swarm.bandwidth import ProbeDesk, serve_upload_probe
from dedloc.swarm.identity import peer_id_of_public_key
from dedloc.swarm.reachability import dial_back

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096


class AccessDesk:
    """Answers access requests: ``{"invite": str | None, "public_key": bytes, "time": float}`` from the peer
    ``remote_id`` → ``{"token": bytes}``, or ``{"error": kind, "message": str}`` with kind ``open`` (no
    allowlist: no token needed), ``refused``, ``clock`` or ``malformed``; every answer carries the
    coordinator's ``time`` and public key (``authority``)."""

    def __init__(self, allowlist_path: Optional[Path], run_id: str, lifetime: float):
        self.allowlist_path, self.run_id, self.lifetime = allowlist_path, run_id, lifetime
        self._allowlist: Optional[Allowlist] = None
        self._stamp: Optional[tuple] = None
        self._refused: set[str] = set()
        self._granted: dict[PeerID, tuple[str, float]] = {}  # peer → (volunteer, token expiry)

    def allowlist(self) -> Optional[Allowlist]:
        """The allowlist, re-read when the file changed; a file that became unreadable or malformed
        keeps the previous version in force (logged)."""
        if self.allowlist_path is None:
            return None
        try:
            stat = os.stat(self.allowlist_path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError as e:
            stamp = ("missing", str(e))
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._allowlist = load_allowlist(self.allowlist_path)
                logger.info(f"allowlist loaded: {len(self._allowlist.volunteer)} volunteers, "
                            f"{len(self._allowlist.revoked_names)} revoked")
            except UserInputError as e:
                logger.error(f"{e}; the previous allowlist stays in force" if self._allowlist else f"{e}; admitting nobody")
                self._allowlist = self._allowlist or Allowlist()
        return self._allowlist

    def answer(self, request: dict, remote_id: PeerID) -> dict:
        authority = RSAPrivateKey.process_wide()
        now = get_dht_time()
        reply = dict(time=now, authority=authority.get_public_key().to_bytes())
        allowlist = self.allowlist()
        if allowlist is None:
            return dict(reply, error="open", message=f"run '{self.run_id}' is open: no invite is needed")
        invite, public_key, their_time = request.get("invite"), request.get("public_key"), request.get("time")
        if (invite is not None and (not isinstance(invite, str) or len(invite) > 256)) \
                or not isinstance(public_key, bytes) or not isinstance(their_time, (int, float)):
            return dict(reply, error="malformed", message="a malformed access request")
        try:
            holder = RSAPublicKey.from_bytes(public_key)
            proven = peer_id_of_public_key(holder) == remote_id
        except Exception:
            proven = False
        if not proven:
            return dict(reply, error="malformed", message="the access request names a key this connection does not hold")
        skew = float(their_time) - now
        if abs(skew) > CLOCK_TOLERANCE:
            return dict(reply, error="clock", message=clock_skew_message(skew))
        volunteer = allowlist.admit(invite, remote_id.to_base58())
        if volunteer is None or volunteer.revoked:
            problem = "an invite that is not on the allowlist" if invite else "no invite"
            if volunteer is not None:
                problem = f"the invite of volunteer {volunteer.name!r}, which the organiser revoked"
            if remote_id.to_base58() not in self._refused:
                self._refused.add(remote_id.to_base58())
                logger.warning(f"refused access to peer {remote_id.to_base58()}: {problem} ({ALLOWLIST_HINT})")
            advice = "start the peer with --invite (ask the organiser for one)" if not invite else "ask the organiser for a new invite"
            return dict(reply, error="refused", message=f"refused: {problem}; this peer is {ALLOWLIST_HINT} "
                                                        f"'{self.run_id}': {advice}")
        token = mint_token(authority, volunteer.name, holder, now + self.lifetime)
        if len(self._granted) > 10_000:  # forget expired grants (peers with a new identity at every start)
            self._granted = {peer: grant for peer, grant in self._granted.items() if grant[1] > now}
        self._granted[remote_id] = (volunteer.name, now + self.lifetime)
        logger.info(f"access token for volunteer {volunteer.name!r} (peer {remote_id.to_base58()}) until "
                    f"{self.lifetime / 60:.0f} min from now")
        return dict(reply, token=token_bytes(token))

    def admits(self, peer_id: PeerID) -> bool:
        """Whether ``peer_id`` may use the coordinator's other services (the upload probe): always in an
        open run; else while it holds a token this desk issued to a volunteer not revoked since."""
        allowlist = self.allowlist()
        if allowlist is None:
            return True
        name, expires_at = self._granted.get(peer_id, (None, 0.0))
        return expires_at > get_dht_time() and any(v.name == name and not v.revoked for v in allowlist.volunteer)


async def _serve(dht: hivemind.DHT, node, desk: AccessDesk) -> None:
    """Runs inside the DHT process: register the desk's libp2p handler, and the upload probe
    (:mod:`dedloc.swarm.bandwidth`) for the peers the desk admits."""

    async def handle(request: ExpertRequest, context: P2PContext) -> ExpertResponse:
        try:
            if len(request.metadata) > MAX_REQUEST_BYTES:
                raise ValueError("too large")
            fields = MSGPackSerializer.loads(request.metadata)
            if not isinstance(fields, dict):
                raise ValueError("not a map")
        except Exception:
            fields = {}
        answer = desk.answer(fields, context.remote_id)
        if "dial_back" in fields and answer.get("error") in (None, "open"):
            answer["reachable"] = await dial_back(node.p2p, context.remote_id, fields["dial_back"])
            answer["time"] = get_dht_time()  # the dial-back's seconds are not clock skew
        return ExpertResponse(metadata=MSGPackSerializer.dumps(answer))

    await node.p2p.add_protobuf_handler(ACCESS_HANDLER, handle, ExpertRequest)
    await serve_upload_probe(node.p2p, ProbeDesk(admitted=desk.admits))


def serve_access(dht: hivemind.DHT, desk: AccessDesk, timeout: float = 10.0) -> None:
    """Open the desk on the coordinator's running DHT node."""
    dht.run_coroutine(partial(_serve, desk=desk), return_future=True).result(timeout)
