"""Averaging timeouts that follow the uplinks (:mod:`dedloc.swarm.timeouts`): the rules; a real round
between a fast and a slow (1 Mbit/s, network namespaces) uplink that completes only because its sender
timeout follows the slow member's announced upload; and averagers that allow their later rounds the time
the slowest uplink they averaged with needs."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

from dedloc.swarm.optimizer import ReducerShares
from dedloc.swarm.timeouts import (MAX_STRETCH, SAFETY, averaging_timeout_floor, round_reducer_timeout,
                                   round_sender_timeout, slowest_uplink, transfer_seconds, wire_bytes)

NODE = str(Path(__file__).with_name("averaging_node.py"))
PART = 2**19  # hivemind's part size (bytes on the wire)


def test_the_slowest_announced_uplink_counts_within_the_share_bounds():
    assert slowest_uplink([20.0, 5.0, 10.0]) == 5.0
    assert slowest_uplink([None, 0.0, 8.0, float("nan"), True, "fast"]) == 8.0  # only figures count
    assert slowest_uplink([None, 0.0]) is None
    # a member announcing a crawl counts for the median / 4, not less
    assert slowest_uplink([20.0, 20.0, 20.0, 0.001]) == 5.0


def test_the_sender_timeout_is_a_floor_raised_for_slow_uplinks():
    assert round_sender_timeout(5.0, PART, 4, None) == 5.0  # nobody announced: as configured
    assert round_sender_timeout(5.0, PART, 4, 100.0) == 5.0  # fast links: as configured
    slow = round_sender_timeout(5.0, PART, 4, 2.0)
    assert slow == pytest.approx(SAFETY * transfer_seconds(3 * PART, 2.0)) and slow > 15  # 3 chunks at once
    assert round_sender_timeout(5.0, PART, 8, 2.0) > slow  # more groupmates share the uplink
    assert round_sender_timeout(5.0, PART, 1, 0.1) == 5.0  # alone: nobody to wait for
    assert round_sender_timeout(5.0, PART, 4, 1e-30) == MAX_STRETCH * 5.0  # a crawl stretches it 10 × at most


def test_the_averaging_timeout_follows_the_round_volume_and_uplink():
    size = 2_000_000
    assert wire_bytes(size, NoCompression()) == 8_000_000
    assert wire_bytes(size, Float16Compression()) == 4_000_000
    assert wire_bytes(size, Uniform8BitQuantization()) == 2_000_000
    assert averaging_timeout_floor(30.0, 4e6, None) == 30.0
    assert averaging_timeout_floor(30.0, 4e6, 20.0) == 30.0  # 2 × 4 MB at 20 Mbit/s: 3.2 s, × 3 < 30
    assert averaging_timeout_floor(30.0, 8e6, 2.0) == pytest.approx(SAFETY * 64.0)  # 16 MB at 2 Mbit/s
    assert averaging_timeout_floor(30.0, 8e6, 1e-30) == MAX_STRETCH * 30.0


def test_the_reducer_timeout_allows_for_the_vector_over_the_slowest_uplink():
    assert round_reducer_timeout(10.0, 5.0, 4e6, None) == 10.0  # nobody announced: twice the sender timeout
    assert round_reducer_timeout(10.0, 12.0, 4e6, None) == 24.0  # a raised sender timeout raises it
    assert round_reducer_timeout(10.0, 5.0, 4e6, 20.0) == 10.0  # 4 MB at 20 Mbit/s: 1.6 s, × 3 < 10
    # 2 MB at 1 Mbit/s: a reducer's first answer can wait behind 16.8 s of parts
    assert round_reducer_timeout(10.0, 5.0, 2 * 2**20, 1.0) == pytest.approx(SAFETY * transfer_seconds(2 * 2**20, 1.0))
    assert round_reducer_timeout(4.0, 2.0, 4e9, 1.0) == MAX_STRETCH * 4.0  # a crawl stretches it 10 × at most
    assert round_reducer_timeout(4.0, 30.0, 4e9, 1.0) == 60.0  # never below twice the sender timeout


@pytest.mark.timeout(240)
def test_a_slow_uplink_gets_a_sender_timeout_it_can_meet(network):
    """Two members, one on a 1-Mbit/s uplink (announced), with a configured sender timeout of 2 s: a
    512-KiB chunk takes ~4.2 s there. The round's sender timeout follows the slow member's upload
    (12.6 s), and so does the wait for the slow reducer's answer, which leaves behind the slow member's
    own parts (~17 s: 40 s allowed, the 10 × cap of the configured 4 s). Both end with the mean; with
    the configured timeouts the fast member would drop the slow one (its chunks come too late) and keep
    its own numbers. (With 1 s configured, CI once saw the answer miss the 20-s cap.)"""
    fast = network.add_host("fast", up_mbit=50, down_mbit=50)
    slow = network.add_host("slow", up_mbit=1, down_mbit=50)
    size = 4 * PART // 4  # four parts of fp32 numbers: 2 MB
    # each node prints its result, then stays (its last results may still be on their way to the other)
    # until both have printed and the test closes their stdin; a node always prints within its 150-s
    # step timeout, or exits (an empty line here)
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen(fast.command([sys.executable, NODE, fast.address, "20", "1", str(size), "2"]), **pipes)
    second = None
    try:
        maddr = first.stdout.readline().strip()
        assert "/p2p/" in maddr, first.stderr.read()[-2000:] if first.poll() is not None else maddr
        second = subprocess.Popen(slow.command([sys.executable, NODE, slow.address, "1", "3", str(size), "2", maddr]),
                                  **pipes)
        results = {name: node.stdout.readline().strip() for name, node in (("fast", first), ("slow", second))}
        logs = {}
        for name, node in (("fast", first), ("slow", second)):
            _, logs[name] = node.communicate("", timeout=60)
            assert node.returncode == 0 and results[name], (name, results[name], logs[name][-3000:])
        print(f"after the round (min max): {results}")
        context = "\n".join(f"--- {name} (its all-reduce log, debug) ---\n{log[-4000:]}" for name, log in logs.items())
        for name, line in results.items():
            assert not line.startswith("failed"), (name, line, context)
            low, high = map(float, line.split())
            # the mean of 1 and 3
            assert low == pytest.approx(2.0) and high == pytest.approx(2.0), f"{results}\n{context}"
    finally:
        for node in (first, second):
            if node is not None and node.poll() is None:
                node.kill()
                node.wait()


class _Averager(ReducerShares, hivemind.averaging.DecentralizedAverager):
    pass


def test_a_round_with_a_slow_groupmate_allows_the_next_rounds_more_time():
    """Two real averagers on loopback, one announcing 0.1 Mbit/s: after their round (fast on loopback)
    both averagers' processes allow their later rounds the time 2 × 400 kB need at 0.1 Mbit/s, read from
    the main process (the round ran in the averagers' background processes)."""
    local = dict(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
    first = hivemind.DHT(**local)
    second = hivemind.DHT(**local, initial_peers=[str(a) for a in first.get_visible_maddrs()])
    size, averagers = 100_000, []
    try:
        for dht, mbps in ((first, 20.0), (second, 0.1)):
            averagers.append(_Averager([torch.zeros(size)], dht=dht, prefix="slow_groupmate", target_group_size=2,
                                       min_matchmaking_time=2.0, request_timeout=1.0, bandwidth=mbps,
                                       allreduce_timeout=30.0, start=True))
        assert [a._allreduce_timeout for a in averagers] == [30.0, 30.0]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda a: a.step(timeout=30), averagers))
        assert all(result is not None for result in results), "the averaging round failed"
        needed = SAFETY * transfer_seconds(2 * 4 * size, 0.1)  # 192 s: past the 30 s, within 10 × 30 s
        assert [a._allreduce_timeout for a in averagers] == [pytest.approx(needed)] * 2
        assert averagers[0].allow_round_bytes(8.0, 20.0) is None  # a floor never lowers it
        assert averagers[0]._allreduce_timeout == pytest.approx(needed)
    finally:
        for averager in averagers:
            averager.shutdown()
        first.shutdown()
        second.shutdown()
