"""A peer's upload bandwidth, measured against the coordinator (:mod:`dedloc.swarm.bandwidth`): on
shaped links in network namespaces (root; elsewhere skipped with the reason), and the probe's rules
(one at a time, a cool-down per peer, admitted peers only) on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hivemind.p2p import P2P
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from dedloc.swarm import bandwidth
from dedloc.swarm.bandwidth import ProbeDesk, ProbeRefused, probe_upload, serve_upload_probe

NODE = str(Path(__file__).with_name("upload_probe_node.py"))
P2P_OPTIONS = dict(nat_port_map=False, auto_nat=False, use_relay=False)


@pytest.mark.timeout(180)
def test_the_measured_upload_follows_the_link(network):
    coordinator = network.add_host("coordinator", up_mbit=100, down_mbit=100)
    server = subprocess.Popen(coordinator.command([sys.executable, NODE, "serve", coordinator.address]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        maddr = server.stdout.readline().strip()
        assert "/p2p/" in maddr, maddr
        measured = {}
        for up_mbit in (4, 16):
            volunteer = network.add_host(f"up{up_mbit}", up_mbit=up_mbit, down_mbit=50)
            out = subprocess.run(volunteer.command([sys.executable, NODE, "probe", maddr]), capture_output=True,
                                 text=True, timeout=90)
            assert out.returncode == 0, out.stderr[-2000:]
            measured[up_mbit] = float(out.stdout.strip().splitlines()[-1])
        print(f"measured upload (Mbit/s) by shaped uplink: {measured}")
        for up_mbit, mbps in measured.items():
            # tbf passes the rate minus the headers (TCP/IP, libp2p's framing and encryption)
            assert 0.8 * up_mbit <= mbps <= 1.05 * up_mbit, measured
    finally:
        server.stdin.close()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def _nodes(count: int, desk: ProbeDesk):
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], **P2P_OPTIONS)
    await serve_upload_probe(server, desk)
    maddrs = [str(m) for m in await server.get_visible_maddrs()]
    clients = [await P2P.create(initial_peers=maddrs, **P2P_OPTIONS) for _ in range(count)]
    return server, clients


@pytest.mark.timeout(60)
def test_one_probe_at_a_time_once_a_minute_admitted_peers_only():
    async def scenario():
        refused_id = []
        desk = ProbeDesk(admitted=lambda peer_id: peer_id not in refused_id)
        server, (first, second, stranger) = await _nodes(3, desk)
        refused_id.append(stranger.peer_id)
        try:
            both = await asyncio.gather(probe_upload(first, server.peer_id), probe_upload(second, server.peer_id),
                                        return_exceptions=True)
            rates = [r for r in both if isinstance(r, float)]
            busy = [r for r in both if isinstance(r, ProbeRefused)]
            assert len(rates) == 1 and rates[0] > 20, both  # loopback: far faster than any home uplink
            assert [r.kind for r in busy] == ["busy"], both
            prober = first if isinstance(both[0], float) else second
            with pytest.raises(ProbeRefused, match="one upload probe per"):
                await probe_upload(prober, server.peer_id)
            with pytest.raises(ProbeRefused, match="not admitted"):
                await probe_upload(stranger, server.peer_id)
        finally:
            for node in (first, second, stranger, server):
                await node.shutdown()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_peer_that_stalls_mid_probe_does_not_hold_up_the_others(monkeypatch):
    monkeypatch.setattr(bandwidth, "PROBE_TIMEOUT", 2.0)  # the desk's deadline for one probe

    async def scenario():
        server, (staller, other) = await _nodes(2, ProbeDesk())
        acknowledged = asyncio.Event()

        async def one_chunk_then_nothing():
            yield ExpertRequest(metadata=bytes(bandwidth.CHUNK_BYTES))
            await asyncio.Event().wait()  # never sends again, never ends the stream

        async def stall():
            async for _ in await staller.iterate_protobuf_handler(server.peer_id, bandwidth.PROBE_HANDLER,
                                                                  one_chunk_then_nothing(), ExpertResponse):
                acknowledged.set()  # the desk took this probe

        stalling = asyncio.create_task(stall())
        try:
            await asyncio.wait_for(acknowledged.wait(), 10)
            began, refusals = time.monotonic(), 0
            while True:  # busy while the stalled probe holds the desk, then measured
                try:
                    mbps = await probe_upload(other, server.peer_id)
                    break
                except ProbeRefused as e:
                    assert e.kind == "busy" and time.monotonic() - began < 10, e
                    refusals += 1
                    await asyncio.sleep(0.2)
            assert refusals >= 1 and mbps > 0, (refusals, mbps)
        finally:
            stalling.cancel()
            for node in (staller, other, server):
                await node.shutdown()

    asyncio.run(scenario())
