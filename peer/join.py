"""Joining a swarm: reach the coordinator's DHT and fetch the run it published, verified.

A peer needs only the join address: the run config and tokenizer come from the manifest record the
coordinator signed with the key whose peer id is in that address. The address may also come from a file
the coordinator writes (:func:`read_join_file`) or from its dashboard's ``/api/join``
(:func:`dedloc.swarm.join_url.expand_join`: ``--join http://coordinator:8080``, for docker compose and
other private networks; that answer is not authenticated).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hivemind
from hivemind.p2p import PeerID

from dedloc.errors import SwarmUnreachableError, UserInputError
from dedloc.lifecycle import GracefulExit, poll_until
from dedloc.swarm.records import RunManifest, fetch_manifest

logger = logging.getLogger(__name__)


def wait_for_manifest(
    dht: hivemind.DHT, coordinator_id: PeerID, timeout: float, stop: GracefulExit, poll: float = 0.5
) -> RunManifest:
    """Poll the DHT for the coordinator's manifest until ``timeout``.

    Raises :class:`SwarmUnreachableError` if none shows up, and :class:`IncompatibleSwarmError`
    (from :func:`parse_manifest`) if it is for another protocol version or fails its hashes.
    """
    return poll_until(
        lambda: fetch_manifest(dht, coordinator_id),
        timeout,
        stop,
        lambda: SwarmUnreachableError(
            f"reached the swarm, but no run published by coordinator {coordinator_id.to_base58()} "
            f"appeared within {timeout:.0f} s: is the address that of a running dedloc coordinator?"
        ),
        poll,
    )


def read_join_file(path: Path, timeout: float, stop: GracefulExit, poll: float = 0.5) -> list[str]:
    """Join addresses from a file the coordinator writes (``--join-file``), waiting for it to appear."""
    poll_until(
        lambda: True if path.exists() else None,
        timeout,
        stop,
        lambda: SwarmUnreachableError(f"the coordinator's join file {path} did not appear within {timeout:.0f} s"),
        poll,
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        join = data["join"]
        if not isinstance(join, list) or not all(isinstance(item, str) for item in join):
            raise TypeError
        return join
    except OSError as e:
        raise UserInputError(f"cannot read join file {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        raise UserInputError(f"{path} is not a join file written by `dedloc coordinator --join-file`") from None
