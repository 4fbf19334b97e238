"""A peer leaves cleanly on Ctrl-C / SIGTERM, and at once on a second Ctrl-C, leaving nothing behind."""

from __future__ import annotations

import signal

import pytest

from helpers import join_addresses, small_run_config, wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(240)]


def _start(tmp_path, procs, peers: int):
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 1000, "min_peers": peers})
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(tmp_path / "coordinator"))
    join = join_addresses(tmp_path / "coordinator", coordinator)
    started = [procs.dedloc("peer", "--join", *join, name=f"peer-{i}") for i in range(1, peers + 1)]
    for peer in started:  # synchronise on the swarm's first global step, not on time
        wait_for(lambda: "step=1 " in peer.log_path.read_text(), 150, f"{peer.name}'s first step",
                 watch=[coordinator, *started])
    return coordinator, started


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_graceful_stop(tmp_path, procs, sig):
    coordinator, (peer,) = _start(tmp_path, procs, peers=1)
    peer.signal_group(sig) if sig == signal.SIGINT else peer.popen.send_signal(sig)  # Ctrl-C hits the group
    wait_for(lambda: peer.poll() is not None, 60, "the peer to stop")
    assert peer.poll() == 130
    log = peer.log_path.read_text()
    assert "Traceback" not in log and "stopped at step" in log
    wait_for(lambda: not peer.group_alive(), 15, "the peer's helpers and p2pd to exit")
    assert coordinator.poll() is None, "the coordinator must keep running"


def test_second_interrupt_exits_at_once(tmp_path, procs):
    coordinator, (peer,) = _start(tmp_path, procs, peers=1)
    peer.signal_group(signal.SIGINT)
    wait_for(lambda: "press Ctrl-C again" in peer.log_path.read_text(), 30, "the first interrupt to register")
    peer.signal_group(signal.SIGINT)
    wait_for(lambda: peer.poll() is not None, 15, "the peer to exit")
    # 130 from the handler; or, when the graceful stop had already finished and Python was tearing down
    # (its signal handlers back to the default), death by SIGINT — which a shell reports as 130 too
    assert peer.poll() in (130, -signal.SIGINT), peer.log_tail(20)
    wait_for(lambda: not peer.group_alive(), 15, "no process of the peer to remain")
