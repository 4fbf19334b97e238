"""Joining a swarm: reach the coordinator's DHT and fetch the run it published, verified.

A peer needs only the join address: the run config and tokenizer come from the manifest record the
coordinator signed with the key whose peer id is in that address.
"""

from __future__ import annotations

import logging
import time

import hivemind
from hivemind.p2p import PeerID

from dedloc.errors import SwarmUnreachableError
from dedloc.lifecycle import GracefulExit
from dedloc.swarm.records import RunManifest, fetch_manifest

logger = logging.getLogger(__name__)


def wait_for_manifest(
    dht: hivemind.DHT, coordinator_id: PeerID, timeout: float, stop: GracefulExit, poll: float = 0.5
) -> RunManifest:
    """Poll the DHT for the coordinator's manifest until ``timeout``.

    Raises :class:`SwarmUnreachableError` if none shows up, and :class:`IncompatibleSwarmError`
    (from :func:`parse_manifest`) if it is for another protocol version or fails its hashes.
    """
    deadline = time.monotonic() + timeout
    while True:
        manifest = fetch_manifest(dht, coordinator_id)
        if manifest is not None:
            return manifest
        if stop.is_set():
            raise KeyboardInterrupt
        if time.monotonic() >= deadline:
            raise SwarmUnreachableError(
                f"reached the swarm, but no run published by coordinator {coordinator_id.to_base58()} "
                f"appeared within {timeout:.0f} s: is the address that of a running dedloc coordinator?"
            )
        stop.wait(poll)
