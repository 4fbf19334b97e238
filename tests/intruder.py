"""Fault injector for tests: an intruder built from plain hivemind calls (no dedloc peer code) tries every
way into a run with an allowlist, and prints one JSON line per attempt: ``{"attempt": …, "outcome": …,
"message": …}`` with outcome ``refused`` (an error naming the refusal), ``failed`` (no way in at all) or
``succeeded``.

    python tests/intruder.py RUN_PREFIX COORDINATOR_MADDR PEER_MADDR
"""

from __future__ import annotations

import asyncio
import json
import sys

import hivemind
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

QUIET = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False, use_relay=False)


def report(attempt: str, outcome: str, message: str = "") -> None:
    print(json.dumps(dict(attempt=attempt, outcome=outcome, message=message[:300])), flush=True)


class SelfSignedAuthorizer(TokenAuthorizerBase):
    """Holds a token the intruder signed itself, claiming a volunteer's name."""

    async def get_token(self) -> AccessToken:
        token = AccessToken(username="alice", public_key=self.local_public_key.to_bytes(),
                            expiration_time=repr(get_dht_time() + 600))
        token.signature = self._local_private_key.sign(token.SerializeToString())
        return token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return True

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False


def try_dht(attempt: str, coordinator: str, prefix: str, **kwargs) -> None:
    """Join the DHT; if that works, write a record and read the run's records."""
    try:
        dht = hivemind.DHT(initial_peers=[coordinator], start=True, startup_timeout=20, **QUIET, **kwargs)
    except Exception as e:
        report(f"{attempt}: join the DHT", "failed", f"{type(e).__name__}: {e}")
        return
    try:
        stored = dht.store(f"{prefix}_graffiti", value={"samples": 10**9}, expiration_time=get_dht_time() + 60)
        report(f"{attempt}: write a record", "succeeded" if stored else "failed")
        found = dht.get(f"{prefix}_grad_averager.all_averagers", latest=True)
        report(f"{attempt}: read the swarm's records", "succeeded" if found is not None else "failed")
    finally:
        dht.shutdown()


async def try_averaging(prefix: str, peer_maddr: str) -> None:
    """Call a member's averaging handlers directly over libp2p."""
    peer_id = PeerID.from_base58(peer_maddr.rsplit("/p2p/", 1)[1])
    p2p = await P2P.create(initial_peers=[peer_maddr], **QUIET)
    part = serialize_torch_tensor(torch.full((16,), 1e6))

    async def parts():
        yield averaging_pb2.AveragingData(group_id=b"g" * 32, tensor_part=part, weight=1000.0)

    calls = {
        "download the state": (f"{prefix}_state_averager::TrainingStateAverager.rpc_download_state",
                               averaging_pb2.DownloadRequest(), averaging_pb2.DownloadData),
        "join an averaging group": (f"{prefix}_grad_averager::ReportingGradientAverager.rpc_join_group",
                                    averaging_pb2.JoinRequest(schema_hash=b"", expiration=get_dht_time() + 10),
                                    averaging_pb2.MessageFromLeader),
        "send a gradient part": (f"{prefix}_grad_averager::ReportingGradientAverager.rpc_aggregate_part",
                                 parts(), averaging_pb2.AveragingData),
    }
    try:
        for attempt, (handler, request, response_type) in calls.items():
            try:
                stream = await p2p.iterate_protobuf_handler(peer_id, handler, request, response_type)
                received = [message async for message in stream]
                report(attempt, "succeeded", f"{len(received)} messages")
            except Exception as e:
                text = str(e)
                report(attempt, "refused" if "allowlist" in text else "failed", f"{type(e).__name__}: {text}")
    finally:
        await p2p.shutdown()


def main(prefix: str, coordinator: str, peer_maddr: str) -> None:
    RSAPrivateKey.process_wide()
    try_dht("no token", coordinator, prefix)
    try_dht("a self-signed token", coordinator, prefix, authorizer=SelfSignedAuthorizer())
    asyncio.run(try_averaging(prefix, peer_maddr))


if __name__ == "__main__":
    main(*sys.argv[1:4])
