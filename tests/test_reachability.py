"""The coordinator dials a peer back before it joins: reached, the peer accepts connections; not reached
(firewall, NAT, loopback-only), it runs in client mode. The swarm-level check — a peer in a namespace
that accepts no incoming connections still contributes — is in ``test_client_mode.py``."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from dedloc.coordinator.admission import AccessDesk, serve_access
from dedloc.errors import UserInputError
from dedloc.swarm.access import ask_the_desk
from dedloc.swarm.addresses import announce_maddr
from dedloc.swarm.identity import Identity
from dedloc.swarm.node import NetworkOptions, start_dht, visible_maddrs
from dedloc.swarm.reachability import (
    DialBackListener,
    announced_ports,
    dial_addresses,
    listen_host_port,
    parse_dial_back_request,
    with_port,
)

pytestmark = pytest.mark.timeout(90)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_dial_back_reaches_only_the_listener_with_its_nonce():
    with DialBackListener("127.0.0.1", 0) as listener, DialBackListener("127.0.0.1", 0) as stranger:
        assert listener.port != stranger.port
        ports = [listener.port, stranger.port, _closed_port()]
        reached = asyncio.run(dial_addresses(["127.0.0.1"], ports, listener.nonce, timeout=2.0))
        assert reached == [f"/ip4/127.0.0.1/tcp/{listener.port}"]  # the other answers with another nonce
        assert listener.connections == 1 and stranger.connections == 1


def test_a_silent_service_on_the_port_is_not_taken_for_the_peer():
    with socket.socket() as silent:  # accepts the connection (the kernel does) but never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        reached = asyncio.run(dial_addresses(["127.0.0.1"], [port], b"x" * 16, timeout=0.5))
    assert reached == []


def test_dial_back_requests_from_the_network_are_checked():
    good = dict(ports=[31337], nonce=b"n" * 16)
    assert parse_dial_back_request(good) == ([31337], b"n" * 16)
    for bad in (None, [], dict(good, nonce=b"short"), dict(good, ports=[]), dict(good, ports=[0]),
                dict(good, ports=[70000]), dict(good, ports=list(range(1, 10))), dict(good, ports=["22"]),
                dict(good, ports=[True]), dict(good, ports=[1.5])):
        assert parse_dial_back_request(bad) is None, bad


def test_listen_and_announce_addresses():
    assert listen_host_port("/ip4/0.0.0.0/tcp/0") == ("0.0.0.0", 0)
    assert with_port("/ip4/10.0.0.2/tcp/0", 4242) == "/ip4/10.0.0.2/tcp/4242"
    assert announced_ports(["/ip4/203.0.113.7/tcp/31337", "/dns/x.example/tcp/31337", "/ip4/1.2.3.4/tcp/80"]) == [31337, 80]
    assert announce_maddr("203.0.113.7:31337") == "/ip4/203.0.113.7/tcp/31337"
    assert announce_maddr("[2001:db8::1]:4000") == "/ip6/2001:db8::1/tcp/4000"
    assert announce_maddr("home.example.org:4000") == "/dns/home.example.org/tcp/4000"
    for bad in ("203.0.113.7", "203.0.113.7:0", "host:99999", ":4000", "a b:1", "1.2.3:4", "/ip4/1.2.3.4/tcp/1"):
        with pytest.raises(UserInputError):
            announce_maddr(bad)
    with pytest.raises(UserInputError, match="cannot listen"):
        DialBackListener("192.0.2.1", 0)  # not an address of this machine


@pytest.fixture
def coordinator():
    """A coordinator's DHT node with its access desk open (an open run), on loopback."""
    identity = Identity.create_ephemeral()
    previous = RSAPrivateKey._process_wide_key
    identity.bind_to_process()  # the desk signs as the coordinator: the DHT process inherits the key
    try:
        dht = start_dht(identity, NetworkOptions(), validators=[RSASignatureValidator()])
    finally:
        RSAPrivateKey._process_wide_key = previous
    try:
        serve_access(dht, AccessDesk(None, "run", 600))
        yield identity, visible_maddrs(dht)
    finally:
        dht.shutdown()
        identity.discard()


def test_the_desk_dials_back_the_port_the_peer_names_at_the_address_it_comes_from(coordinator):
    coordinator_identity, join = coordinator
    peer = Identity.create_ephemeral()
    try:
        with DialBackListener("127.0.0.1", 0) as listener:
            grant = ask_the_desk(peer, join, coordinator_identity.peer_id, None, dial_back=listener.request())
            assert grant is not None and grant.token is None  # an open run
            assert grant.reachable == (f"/ip4/127.0.0.1/tcp/{listener.port}",)
            # a port where nothing of this peer listens: tried, and not reached
            grant = ask_the_desk(peer, join, coordinator_identity.peer_id, None,
                                 dial_back=listener.request([_closed_port()]))
            assert grant.reachable == ()
        # without the question, no verdict
        assert ask_the_desk(peer, join, coordinator_identity.peer_id, None).reachable is None
    finally:
        peer.discard()


def test_a_malformed_dial_back_answer_gives_no_verdict():
    """What the desk answers comes from the network: only well-formed addresses count as a verdict."""
    from hivemind.utils import MSGPackSerializer, get_dht_time

    from dedloc.swarm.access import read_access_answer

    coordinator = Identity.create_ephemeral()
    try:
        def answer(reachable):
            return read_access_answer(MSGPackSerializer.dumps(dict(
                time=get_dht_time(), authority=coordinator.public_key.to_bytes(), error="open", reachable=reachable,
            )), coordinator.peer_id).reachable

        assert answer(["/ip4/10.0.0.2/tcp/4242", "/ip6/::1/tcp/80"]) == ("/ip4/10.0.0.2/tcp/4242", "/ip6/::1/tcp/80")
        assert answer([]) == ()
        for bad in ("/ip4/10.0.0.2/tcp/4242", ["/dns/x/tcp/1"], ["/ip4/999.0.0.1/tcp/1"], ["/ip4/10.0.0.2/tcp/0"],
                    [b"/ip4/10.0.0.2/tcp/1"], ["/ip4/10.0.0.2/tcp/1"] * 17, None):
            assert answer(bad) is None, bad
    finally:
        coordinator.discard()
