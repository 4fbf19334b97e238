"""A volunteer's access to a run with an allowlist: the invite becomes a token, and the token stays fresh.

Before joining the DHT (whose nodes refuse requests without a token) the peer asks the coordinator's
front desk for a token over a short-lived libp2p node of its own identity. Once in, it publishes the
token for the averagers of other peers to check, and renews it at half its lifetime through its DHT
node. A coordinator that refuses to renew (the volunteer was revoked) ends the peer with that reason.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPublicKey

from dedloc.errors import SwarmUnreachableError, UserInputError
from dedloc.swarm.access import (
    ACCESS_HANDLER, CLOCK_TOLERANCE, fetch_revoked, install_token, members_key, parse_token, set_revoked, token_expiry,
    token_problem,
)
from dedloc.swarm.identity import Identity, peer_id_of_public_key
from dedloc.swarm.records import owner_subkey

logger = logging.getLogger(__name__)

RETRY_PERIOD = 30.0


@dataclass(frozen=True)
class AccessGrant:
    """What the coordinator answered: a token (None for an open run) and its own public key."""

    token: Optional[AccessToken]
    authority: RSAPublicKey


class AccessRefused(UserInputError):
    """The coordinator refused this peer (not on the allowlist, revoked, clock off): exit code 2."""


def _request(identity: Identity, invite: Optional[str]) -> bytes:
    return MSGPackSerializer.dumps(dict(invite=invite, public_key=identity.public_key.to_bytes(), time=get_dht_time()))


def _read_answer(data: bytes, coordinator_id: PeerID) -> AccessGrant:
    """Check the desk's answer; :class:`AccessRefused` with its message when it refused."""
    answer = MSGPackSerializer.loads(data) if len(data) < 16384 else None
    if not isinstance(answer, dict) or not isinstance(answer.get("authority"), bytes):
        raise SwarmUnreachableError("the coordinator sent a malformed answer to the access request")
    authority = RSAPublicKey.from_bytes(answer["authority"])
    if peer_id_of_public_key(authority) != coordinator_id:
        raise SwarmUnreachableError("the access desk that answered is not the coordinator of the join address")
    skew = get_dht_time() - float(answer.get("time", 0.0))
    if abs(skew) > CLOCK_TOLERANCE:
        direction = "ahead of" if skew > 0 else "behind"
        raise AccessRefused(f"your clock is {abs(skew):.0f} s {direction} the coordinator's (more than the "
                            f"{CLOCK_TOLERANCE:.0f} s the swarm tolerates): set it right (enable time "
                            "synchronisation, e.g. NTP) and start again")
    if answer.get("error") == "open":
        return AccessGrant(None, authority)
    if "error" in answer:
        raise AccessRefused(f"the coordinator {answer.get('message', 'refused this peer')}"
                            if answer.get("error") == "refused" else str(answer.get("message")))
    token = parse_token(answer.get("token"))
    problem = "no token" if token is None else token_problem(token, authority)
    if problem is not None:
        raise SwarmUnreachableError(f"the coordinator issued an unusable access token ({problem})")
    return AccessGrant(token, authority)


def request_access(identity: Identity, join_maddrs: list[str], coordinator_id: PeerID, invite: Optional[str],
                   timeout: float = 30.0) -> AccessGrant:
    """Ask the coordinator for a token before joining (a libp2p node of this identity that only dials
    out, for the length of the request). :class:`SwarmUnreachableError` when the coordinator does not
    answer, :class:`AccessRefused` when it refuses."""

    async def ask() -> bytes:
        p2p = await P2P.create(
            initial_peers=join_maddrs, identity_path=str(identity.path), check_if_identity_free=False,
            no_listen=True, nat_port_map=False, auto_nat=False, use_relay=False, startup_timeout=timeout,
        )
        try:
            response = await asyncio.wait_for(
                p2p.call_protobuf_handler(coordinator_id, ACCESS_HANDLER, ExpertRequest(metadata=_request(identity, invite)),
                                          ExpertResponse),
                timeout,
            )
            return response.metadata
        finally:
            await p2p.shutdown()

    try:
        data = asyncio.run(ask())
    except Exception as e:
        text = f"{type(e).__name__}: {e}".strip().splitlines()[-1]
        raise SwarmUnreachableError(
            f"cannot ask the coordinator at {', '.join(join_maddrs)} for access ({text}); check the address"
        ) from None
    return _read_answer(data, coordinator_id)


async def _ask_in_dht(dht: hivemind.DHT, node, coordinator_id: str, request: bytes, timeout: float) -> bytes:
    """Runs inside the DHT process: one access request over its libp2p node."""
    response = await asyncio.wait_for(
        node.p2p.call_protobuf_handler(PeerID.from_base58(coordinator_id), ACCESS_HANDLER,
                                       ExpertRequest(metadata=request), ExpertResponse),
        timeout,
    )
    return response.metadata


class AccessKeeper(threading.Thread):
    """Keeps this peer's token published and fresh: renews it at half its lifetime (retrying every
    30 s while the coordinator does not answer) and republishes it so that it survives DHT churn.
    A refusal to renew (the volunteer was revoked) sets ``refused`` with the reason and calls ``on_refused``."""

    def __init__(self, dht: hivemind.DHT, identity: Identity, coordinator_id: PeerID, invite: Optional[str],
                 token: AccessToken, on_refused=None):
        super().__init__(name="access-keeper", daemon=True)
        self.dht, self.identity, self.coordinator_id, self.invite = dht, identity, coordinator_id, invite
        self.token = token
        self.lifetime = max(60.0, token_expiry(token) - get_dht_time())
        self.refused: Optional[str] = None
        self.revoked: frozenset[str] = frozenset()
        self.on_refused = on_refused
        self._halt = threading.Event()

    def publish(self, timeout: float = 10.0) -> bool:
        """Store this peer's token where other peers' averagers look it up (a subkey only this identity can write)."""
        try:
            return bool(self.dht.store(
                members_key(self.coordinator_id), subkey=owner_subkey(self.identity.public_key),
                value=self.token.SerializeToString(), expiration_time=token_expiry(self.token), return_future=True,
            ).result(timeout))
        except Exception as e:
            logger.debug(f"cannot publish the access token: {e!r}")
            return False

    def renew(self, timeout: float = 15.0) -> None:
        """Ask the coordinator for a fresh token now; raises what :func:`_read_answer` raises."""
        request = _request(self.identity, self.invite)
        data = self.dht.run_coroutine(
            partial(_ask_in_dht, coordinator_id=self.coordinator_id.to_base58(), request=request, timeout=timeout),
            return_future=True,
        ).result(timeout + 5.0)
        grant = _read_answer(data, self.coordinator_id)
        if grant.token is None:
            return  # the run became open
        self.token = grant.token
        install_token(self.dht, grant.token)
        self.publish()
        logger.info(f"access token renewed for {(token_expiry(grant.token) - get_dht_time()) / 60:.0f} min")

    def run(self) -> None:
        last_publish = time.monotonic()
        while not self._halt.wait(5.0):
            if token_expiry(self.token) - get_dht_time() < self.lifetime / 2:
                try:
                    self.renew()
                except AccessRefused as e:
                    self.refused = str(e)
                    logger.error(f"access ended: {e}")
                    if self.on_refused is not None:
                        self.on_refused(str(e))
                    return
                except Exception as e:
                    left = token_expiry(self.token) - get_dht_time()
                    log = logger.warning if left > 0 else logger.error
                    log(f"cannot renew the access token ({type(e).__name__}: {e}); "
                        + (f"it expires in {left:.0f} s, retrying" if left > 0 else "it has expired: the swarm refuses this peer until the coordinator answers"))
                    self._halt.wait(RETRY_PERIOD)
                    continue
                last_publish = time.monotonic()
            elif time.monotonic() - last_publish > 60.0:
                self.publish()
                last_publish = time.monotonic()
            revoked = fetch_revoked(self.dht, self.coordinator_id)
            if revoked is not None and revoked != self.revoked:
                self.revoked = revoked
                set_revoked(self.dht, sorted(revoked))  # this node's DHT refuses them too
                if self.token.username in revoked:
                    self.refused = f"the organiser revoked the access of volunteer {self.token.username!r}"
                    logger.error(f"access ended: {self.refused}")
                    if self.on_refused is not None:
                        self.on_refused(self.refused)
                    return

    def stop(self) -> None:
        self._halt.set()
