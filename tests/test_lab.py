"""The swarm laboratory: hosts as network namespaces on shaped links, and dedloc daemons on them that
crash, restart and rejoin. Needs root (``ip netns``); elsewhere these tests are skipped with the reason."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dedloc.lab.network import NAMESPACE_PREFIX, LabUnavailable, Network
from dedloc.lab.swarm import LabSwarm
from helpers import read_history, small_run_config, wait_for

PROBE = str(Path(__file__).with_name("tcp_probe.py"))


@pytest.fixture
def network():
    try:
        net = Network()
    except LabUnavailable as e:
        pytest.skip(f"network namespaces are not available here: {e}")
    try:
        yield net
    finally:
        net.close()


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _throughput(src, dst, seconds: float = 3.0) -> float:
    server = subprocess.Popen(dst.command([sys.executable, PROBE, "serve", dst.address]), stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        subprocess.run(src.command([sys.executable, PROBE, "send", dst.address, port, str(seconds)]), check=True, timeout=30)
        return float(server.stdout.readline())
    finally:
        server.kill()
        server.wait()


@pytest.mark.timeout(120)
def test_hosts_have_shaped_links_that_can_be_cut(network):
    a = network.add_host("a", up_mbit=20, down_mbit=50)
    b = network.add_host("b")
    assert a.address != b.address and a.address.startswith("10.213.")
    up, down = _throughput(a, b), _throughput(b, a)
    assert 15 <= up <= 21, up  # tbf: at most the rate, a little less for the headers
    assert 40 <= down <= 51, down

    network.cut(a)
    server = subprocess.Popen(b.command([sys.executable, PROBE, "serve", b.address]), stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        blocked = subprocess.run(a.command([sys.executable, PROBE, "send", b.address, port, "1"]), capture_output=True,
                                 text=True, timeout=30)
        assert blocked.returncode != 0 and ("timed out" in blocked.stderr or "No route to host" in blocked.stderr)
    finally:
        server.kill()
        server.wait()
    network.restore(a)
    assert _throughput(a, b, seconds=1.0) > 5


@pytest.mark.timeout(120)
def test_everything_is_removed_even_after_the_creator_is_killed(tmp_path):
    script = "from dedloc.lab.network import Network; import time; n = Network(); n.add_host('x'); print('up', flush=True); time.sleep(600)"
    creator = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = creator.stdout.readline()
        if line.strip() != "up":
            pytest.skip("network namespaces are not available here (the creator could not make one)")
        assert f"{NAMESPACE_PREFIX}{creator.pid}-x" in _namespaces()
    finally:
        creator.send_signal(signal.SIGKILL)
        creator.wait()
    try:
        with Network():  # a new lab removes what a dead one left behind
            pass
    except LabUnavailable as e:
        pytest.skip(str(e))
    assert f"{NAMESPACE_PREFIX}{creator.pid}-" not in _namespaces()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"dl{creator.pid}" not in links


@pytest.mark.swarm
@pytest.mark.timeout(420)
def test_a_crashed_peer_restarts_cleanly_on_its_own_host(network, tmp_path):
    """A coordinator and two peers on separate hosts with 20 Mbit/s uplinks train; one peer crashes
    (main process only: its DHT process and p2pd stay behind), restarts, kills its leftovers and
    rejoins; the run ends with every process gone."""
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 14})
    swarm = LabSwarm(network, tmp_path / "lab", config)
    try:
        swarm.start_coordinator(up_mbit=20, down_mbit=50)
        peer_1 = swarm.start_peer("peer-1", up_mbit=20, down_mbit=50)
        peer_2 = swarm.start_peer("peer-2", up_mbit=20, down_mbit=50)
        everyone = [swarm.coordinator.child, peer_1.child, peer_2.child]
        wait_for(lambda: len(read_history(swarm.coordinator_dir)) >= 3, 240, "3 global steps across hosts", watch=everyone)

        helpers = [p.pid for p in psutil.Process(peer_2.pid).children(recursive=True)]
        assert helpers, "the peer runs a DHT process and p2pd"
        peer_2.crash()
        assert any(psutil.pid_exists(pid) for pid in helpers), "a crash leaves the helpers behind"
        crashed_at = len(read_history(swarm.coordinator_dir))
        peer_2.restart()
        wait_for(lambda: "left" in peer_2.log_text() and "stopped" in peer_2.log_text(), 60,
                 "the restarted peer to stop its leftovers", watch=[peer_2.child])
        assert not [pid for pid in helpers if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]

        for node in (swarm.coordinator, peer_1, peer_2):
            wait_for(lambda: node.poll() is not None, 300, f"{node.name} to finish",
                     watch=[swarm.coordinator.child, peer_1.child, peer_2.child])
            assert node.poll() == 0, node.child.log_tail(30)
        history = read_history(swarm.coordinator_dir)
        assert history[-1]["step"] == 14 and len(history) > crashed_at
        joined = json.loads((swarm.coordinator_dir / "coordinator.json").read_text())["join"][0]
        assert joined.startswith(f"/ip4/{swarm.coordinator.host.address}/")
    finally:
        swarm.close()
