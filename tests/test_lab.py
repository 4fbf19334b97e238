"""The swarm laboratory's network: hosts as network namespaces on shaped links that can be cut, removed
even when their creator dies. (Daemons crashing and restarting on it: ``test_faults.py``.) Needs root
(``ip netns``); elsewhere these tests are skipped with the reason."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dedloc.lab.network import NAMESPACE_PREFIX, LabUnavailable, Network

PROBE = str(Path(__file__).with_name("tcp_probe.py"))


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
