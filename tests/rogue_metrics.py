"""Fault injector for tests: join a swarm and publish malformed metrics records under this process's
own key (wrong types, negative counts, NaN loss, huge strings), then print this process's peer id.

    python tests/rogue_metrics.py JOIN_ADDRESS...
"""

from __future__ import annotations

import math
import sys
import time

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from dedloc.lifecycle import GracefulExit
from dedloc.swarm.addresses import parse_join_addresses
from dedloc.swarm.identity import Identity
from dedloc.swarm.node import NetworkOptions, start_dht
from dedloc.swarm.records import fetch_manifest, metrics_key, owner_subkey

BAD_RECORDS = [
    dict(peer_id="x", step="seven", samples_per_second=1.0, samples=1, time=0.0),  # wrong type
    dict(peer_id="x", step=1, samples_per_second=1.0, samples=-5, time=0.0),  # negative count
    dict(peer_id="x", step=1, loss=math.nan, samples_per_second=1.0, samples=1, time=0.0),  # NaN loss
    dict(peer_id="x", step=1, samples_per_second=1.0, samples=1, time=0.0, volunteer="v" * 100_000),  # huge string
    ["not", "a", "record"],
]


def main(join: list[str]) -> None:
    stop = GracefulExit.install("rogue")
    addresses = parse_join_addresses(join)
    identity = Identity.create_ephemeral()
    identity.bind_to_process()
    dht = start_dht(identity, NetworkOptions(), initial_peers=addresses.as_strings, validators=[RSASignatureValidator()])
    try:
        manifest = None
        while manifest is None:
            manifest = fetch_manifest(dht, addresses.coordinator_id)
        peer_id = identity.peer_id.to_base58()
        for record in BAD_RECORDS:
            if isinstance(record, dict):
                record = dict(record, peer_id=peer_id, time=time.time())
            try:
                dht.store(
                    metrics_key(manifest.swarm_prefix), subkey=owner_subkey(identity.public_key), value=record,
                    expiration_time=get_dht_time() + 60, return_future=True,
                ).result(10)
            except Exception as e:  # a node may refuse the record outright: that is fine too
                print(f"store refused: {e!r}", file=sys.stderr)
            if stop.wait(1.5):  # give the coordinator (it polls every second) a chance to read each one
                break
        print(peer_id, flush=True)
    finally:
        dht.shutdown()
        identity.discard()


if __name__ == "__main__":
    main(sys.argv[1:])
