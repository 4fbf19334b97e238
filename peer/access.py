"""A volunteer's access to a run with an allowlist: the invite becomes a token, and the token stays fresh.

Before joining the DHT (whose nodes refuse requests without a token) the peer asks the coordinator's
front desk for a token (:func:`dedloc.swarm.access.request_access`). Once in, it publishes the
token for the averagers of other peers to check, and renews it at half its lifetime through its DHT
node. A coordinator that refuses to renew (the volunteer was revoked) ends the peer with that reason.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial
from typing import Optional

import hivemind
from hivemind.p2p import PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse
from hivemind.utils import get_dht_time

from dedloc.swarm.access import (
    ACCESS_HANDLER, AccessRefused, access_request, fetch_revoked, install_token, members_key, read_access_answer,
    set_revoked, token_expiry,
)
from dedloc.swarm.identity import Identity
from dedloc.swarm.records import owner_subkey

logger = logging.getLogger(__name__)

RETRY_PERIOD = 30.0


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
        """Ask the coordinator for a fresh token now; raises what :func:`read_access_answer` raises."""
        request = access_request(self.identity, self.invite)
        data = self.dht.run_coroutine(
            partial(_ask_in_dht, coordinator_id=self.coordinator_id.to_base58(), request=request, timeout=timeout),
            return_future=True,
        ).result(timeout + 5.0)
        grant = read_access_answer(data, self.coordinator_id)
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
