from __future__ import annotations

import pytest

from dedloc.errors import UserInputError
from dedloc.swarm.addresses import listen_maddr, parse_join_addresses

PEER = "QmTgbGgCzEpnNPfoxYVq8oDUPKP3ZTDTZUUHER1vJwWN9i"


def test_parses_full_address():
    join = parse_join_addresses([f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER}"])
    assert join.coordinator_id.to_base58() == PEER
    assert join.as_strings == [f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER}"]


def test_several_addresses_first_is_coordinator():
    other = "QmS4KTxbivGJDBEE1b7VbLZtFDD3tPPsQKn4HZkcumqrNB"
    join = parse_join_addresses([f"/ip4/10.0.0.1/tcp/1/p2p/{PEER},/ip4/10.0.0.2/tcp/2/p2p/{other}"])
    assert join.coordinator_id.to_base58() == PEER and len(join.maddrs) == 2


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:4000", "starts with '/'"),
        ("/ip4/127.0.0.1/tcp/4000", "lacks the peer id"),
        ("/ip4/999.0.0.1/tcp/4000/p2p/" + PEER, "malformed address"),
        ("/ip4/127.0.0.1/tcp/4000/p2p/notapeerid0", "multihash"),
        ("/ip4/127.0.0.1/p2p/" + PEER, "no transport"),
        ("", "needs the coordinator's address"),
    ],
)
def test_malformed_addresses(address, expected):
    with pytest.raises(UserInputError, match=expected):
        parse_join_addresses([address])


def test_listen_address():
    assert listen_maddr("0.0.0.0", 31337) == "/ip4/0.0.0.0/tcp/31337"
    assert listen_maddr("::1", 0) == "/ip6/::1/tcp/0"
    with pytest.raises(UserInputError):
        listen_maddr("127.0.0.1", 70000)
