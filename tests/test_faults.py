"""Fault scenarios on the swarm lab: volunteers' machines die, pause or lose their link while the
swarm trains across separate hosts (network namespaces, 20 Mbit/s uplinks). Each waits on a cue the
daemons log — not on a clock — before injecting its fault. Without root (or with
``DEDLOC_LAB_NETWORK=loopback``) the same scenarios run on loopback processes, unshaped; the partition
scenario then skips with the reason."""

from __future__ import annotations

import math
import os
import re
import sqlite3
import time
from typing import Optional

import psutil
import pytest

from dedloc.checkpoint import MANIFEST, PREFIX, TMP_PREFIX, latest_valid_checkpoint, load_checkpoint
from dedloc.lab.network import LabUnavailable, LoopbackNetwork, Network
from dedloc.lab.swarm import TINY_MODEL, LabSwarm
from dedloc.swarm.records import ONLINE_WINDOW
from helpers import read_history, small_run_config, wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(480)]

AVERAGING_TIMEOUT = 15.0
PARTITION = 60.0


_NAMESPACES: Optional[str] = None  # why namespaces cannot be made here ("" when they can), found once


def _namespaces_unavailable() -> str:
    global _NAMESPACES
    if _NAMESPACES is None:
        try:
            Network().close()
            _NAMESPACES = ""
        except LabUnavailable as e:
            _NAMESPACES = str(e)
    return _NAMESPACES


@pytest.fixture(params=["namespaces", "loopback"])
def lab(request, tmp_path):
    """Starts a lab swarm on separate hosts (network namespaces), or — only where namespaces cannot be
    made, or with ``DEDLOC_LAB_NETWORK=loopback`` — on loopback processes, where scenarios that cut a
    link skip. Each scenario thus runs once, and a skip says why."""
    forced_loopback = os.environ.get("DEDLOC_LAB_NETWORK") == "loopback"
    reason = "DEDLOC_LAB_NETWORK=loopback" if forced_loopback else _namespaces_unavailable()
    if request.param == "namespaces":
        if reason:
            pytest.skip(f"network namespaces are not available here ({reason}); the scenario runs on loopback")
        network = Network()
    else:
        if not reason:
            pytest.skip("network namespaces are available: the scenario runs on them (loopback is the fallback)")
        network = LoopbackNetwork()
    swarm = None
    try:
        def start(peers: int, total_steps: int, coordinator_env: Optional[dict] = None,
                  peer_env: Optional[dict[str, dict]] = None, small_model: bool = True,
                  checkpoint_every: int = 2) -> LabSwarm:
            nonlocal swarm
            config = small_run_config(
                tmp_path / "run.toml",
                training={"total_steps": total_steps, "min_peers": peers},
                averaging={"averaging_timeout": AVERAGING_TIMEOUT},
                checkpoint={"every_steps": checkpoint_every},
                # the scenarios test how the swarm weathers faults, not what it learns (and CI time)
                **(TINY_MODEL if small_model else {}),
            )
            # allowlisted, as a public run would be: every peer holds an invite and every averaging RPC
            # checks its caller (docs/security.md). DEDLOC_LAB_ALLOWLIST=0 runs them open. The
            # allowlist's own end-to-end test is in test_access.py
            allowlisted = os.environ.get("DEDLOC_LAB_ALLOWLIST", "1") != "0"
            swarm = LabSwarm(network, tmp_path / "lab", config, allowlist=allowlisted)
            swarm.start_coordinator(up_mbit=20, down_mbit=50, env=coordinator_env)
            for index in range(1, peers + 1):
                name = f"peer-{index}"
                swarm.start_peer(name, up_mbit=20, down_mbit=50, env=(peer_env or {}).get(name))
            return swarm

        yield start
    finally:
        if swarm is not None:
            swarm.close()
        network.close()


def _nodes(swarm: LabSwarm):
    return [swarm.coordinator.child, *(p.child for p in swarm.peers.values())]


def _rounds(node) -> int:
    return node.log_text().count("averaging gradients (round")


def _last_step(swarm: LabSwarm) -> int:
    history = read_history(swarm.coordinator_dir)
    return history[-1]["step"] if history else 0


def test_a_peer_crashes_during_gradient_averaging_and_restarts_cleanly(lab):
    """A peer's main process is SIGKILLed while it averages gradients (its DHT process and p2pd stay
    behind, as after a crash): the others finish or abandon that round and take the next global step
    within 2 × the averaging timeout. Restarted, it stops what its previous incarnation left behind,
    rejoins, and the run ends with exit 0 everywhere: nobody wedges."""
    swarm = lab(peers=3, total_steps=10)
    wait_for(lambda: _last_step(swarm) >= 2, 300, "2 global steps", watch=_nodes(swarm))

    # the victim: the first peer to begin a gradient-averaging round from now on (a peer busy
    # downloading the state begins none)
    rounds = {name: _rounds(peer) for name, peer in swarm.peers.items()}
    victim = wait_for(lambda: next((peer for name, peer in swarm.peers.items() if _rounds(peer) > rounds[name]), None),
                      120, "a peer to begin averaging gradients", watch=_nodes(swarm))
    survivors = [peer for peer in swarm.peers.values() if peer is not victim]
    helpers = [p.pid for p in psutil.Process(victim.pid).children(recursive=True)]
    step_at_kill, killed_at = _last_step(swarm), time.monotonic()
    victim.crash()
    assert helpers and any(psutil.pid_exists(pid) for pid in helpers), "a crash leaves the DHT process and p2pd behind"

    wait_for(lambda: _last_step(swarm) > step_at_kill + 1, 2 * AVERAGING_TIMEOUT + 30,
             "the survivors' next global step", watch=[swarm.coordinator.child, *(s.child for s in survivors)])
    recovery = time.monotonic() - killed_at
    print(f"recovered {recovery:.1f} s after the kill (step {step_at_kill} → {_last_step(swarm)})")
    # the round in flight is finished or abandoned, and the step after it taken, within 2 × the timeout
    assert recovery <= 2 * AVERAGING_TIMEOUT, recovery

    victim.restart()
    wait_for(lambda: "left" in victim.log_text() and "stopped" in victim.log_text(), 60,
             "the restarted peer to stop its leftovers", watch=[victim.child])
    assert not [pid for pid in helpers if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    for node in [swarm.coordinator, *survivors, victim]:  # nobody wedges: the run ends at its last step
        wait_for(lambda: node.poll() is not None, 300, f"{node.name} to finish", watch=[node.child])
        assert node.poll() == 0, node.child.log_tail(30)
    assert _last_step(swarm) == 10
    assert "the run is finished at step 10" in victim.log_text()
    print(f"crashed {victim.name}")


def test_a_paused_peer_rejoins(lab):
    """A peer frozen (SIGSTOP, as a laptop lid closing) for twice the averaging timeout: the others keep
    stepping without it; resumed, it catches up and finishes the run with them. At the end peer-1's
    parameters are knocked 1e-3 apart (fault point ``final-state-astray``, as after a final round
    that split): it notices against the final checkpoint's sketch and downloads the checkpoint's state."""
    swarm = lab(peers=3, total_steps=14, peer_env={"peer-1": {"DEDLOC_FAULTS": "final-state-astray"}})
    sleeper, others = swarm.peers["peer-3"], [swarm.peers["peer-1"], swarm.peers["peer-2"]]
    wait_for(lambda: _last_step(swarm) >= 2, 300, "2 global steps", watch=_nodes(swarm))

    step_at_pause = _last_step(swarm)
    seen = {o.name: len(o.log_text()) for o in others}
    sleeper.pause()
    paused_at = time.monotonic()
    wait_for(lambda: _last_step(swarm) >= step_at_pause + 2, 4 * AVERAGING_TIMEOUT,
             "two global steps without the paused peer", watch=[swarm.coordinator.child, *(o.child for o in others)])
    first_steps = time.monotonic() - paused_at
    # once its records are older than the online window, the frozen peer is counted neither by the
    # coordinator nor by hivemind's progress tracker on the others (so its samples are not expected)
    wait_for(lambda: any(r["peers"] == 2 for r in read_history(swarm.coordinator_dir) if r["step"] > step_at_pause),
             ONLINE_WINDOW + 60, "a global step that the coordinator counts without the paused peer",
             watch=[swarm.coordinator.child, *(o.child for o in others)])
    uncounted = time.monotonic() - paused_at
    wait_for(lambda: any(" peers=2 " in o.log_text()[seen[o.name]:] for o in others), 60, "a step hivemind counts without it",
             watch=[swarm.coordinator.child, *(o.child for o in others)])
    remaining = 2 * AVERAGING_TIMEOUT - (time.monotonic() - paused_at)
    if remaining > 0:
        swarm.coordinator.child.wait(remaining)  # keep it frozen for 2 × the averaging timeout at least
    sleeper.resume()
    print(f"paused {time.monotonic() - paused_at:.1f} s; the others took 2 steps in {first_steps:.1f} s "
          f"(step {step_at_pause} → {_last_step(swarm)}); not counted after {uncounted:.1f} s")

    for node in [swarm.coordinator, *others, sleeper]:
        wait_for(lambda: node.poll() is not None, 300, f"{node.name} to finish", watch=[node.child])
        assert node.poll() == 0, node.child.log_tail(30)
    assert _last_step(swarm) == 14
    # it trained on after waking up (hivemind may log a failed round or download on the way: it retries)
    assert "the run is finished at step 14" in sleeper.log_text()
    astray = others[0].log_text()
    apart = re.search(r"parameters ended (\S+) \(relative\) apart from the final checkpoint's", astray)
    assert apart and 3e-4 < float(apart[1]) < 1e-2, apart
    fixed = re.search(r"final checkpoint's state downloaded in \S+ s: now (\S+) apart", astray)
    assert fixed and float(fixed[1]) <= 1e-6, fixed


def test_a_peer_late_for_its_round_takes_the_swarms_state_at_once(lab):
    """A peer whose first gradient round comes due after the others already stepped past it (fault
    point ``pause-before-gradient-round``: it stops right there, and is let go once the others are two
    steps on) reads the others' progress before it looks for a group: it downloads the swarm's state
    instead of waiting out the matchmaking for a group at a step nobody is at and then stepping on its
    own gradients; it contributes again and finishes the run with the others."""
    swarm = lab(peers=3, total_steps=10, peer_env={"peer-3": {"DEDLOC_FAULTS": "pause-before-gradient-round"}})
    late, others = swarm.peers["peer-3"], [swarm.peers["peer-1"], swarm.peers["peer-2"]]
    wait_for(lambda: "fault injected: pause-before-gradient-round" in late.log_text(), 300,
             "peer-3 to stop before its first gradient round", watch=_nodes(swarm))
    stopped_at = _last_step(swarm)
    wait_for(lambda: _last_step(swarm) >= stopped_at + 2, 6 * AVERAGING_TIMEOUT,
             "two global steps without the stopped peer", watch=[swarm.coordinator.child, *(o.child for o in others)])
    late.resume()
    for node in [swarm.coordinator, *others, late]:
        wait_for(lambda: node.poll() is not None, 300, f"{node.name} to finish", watch=[node.child])
        assert node.poll() == 0, node.child.log_tail(30)
    log = late.log_text()
    resumed = log.index("fault injected: pause-before-gradient-round")
    assert "most of the others already stepped to step" in log[resumed:], _swarm_lines(log)
    assert "own gradients only" not in log[resumed:], _swarm_lines(log)
    contributed = [line["contributed"] for line in _step_lines(late) if line["at"] > resumed]
    assert contributed and contributed[-1] > 0, _swarm_lines(log)  # it brought samples to later steps
    assert "the run is finished at step 10" in log


def _step_lines(node) -> list[dict]:
    """The peer's step lines: step, contributed samples, parameter fingerprint, and where in the log."""
    text = node.log_text()
    return [dict(step=int(m[1]), contributed=int(m[2]), params=float(m[3]), at=m.start())
            for m in re.finditer(r"step=(\d+) loss=\S+ samples/s=\S+ peers=\d+ contributed=(\d+) params=(\S+)", text)]


def _ended_with(node) -> Optional[float]:
    """The parameter fingerprint the peer ended the run with (after any final-checkpoint download)."""
    found = re.search(r"the run is finished at step \d+; .* this peer ends with params=(\S+)\.", node.log_text())
    return None if found is None else float(found[1])


def _step_table(swarm) -> str:
    """Each peer's step lines side by side (contributed samples, parameter fingerprint): a failure's context."""
    lines = {name: {line["step"]: line for line in _step_lines(node)} for name, node in sorted(swarm.peers.items())}
    steps = sorted({step for by_step in lines.values() for step in by_step})
    rows = ["step  " + "  ".join(f"{name:>24}" for name in lines)]
    for step in steps:
        cells = [by_step.get(step) for by_step in lines.values()]
        rows.append(f"{step:4d}  " + "  ".join(
            f"{cell['contributed']:6d} {cell['params']:17.6f}" if cell else " " * 24 for cell in cells))
    return "\n".join(rows)


def _swarm_lines(log: str) -> str:
    """The lines of a peer's log about its rounds, downloads and steps (a failure's context)."""
    keep = ("dedloc.swarm", "step=", "WARN", "ERROR")
    return "\n".join(line for line in log.splitlines() if any(key in line for key in keep))[-6000:]


def test_a_cut_off_peer_resynchronises(lab):
    """One peer's link is cut for 60 s, then restored: it stops training when it notices, the others go
    on; back, it sees it is behind, downloads the swarm's state, drops what it had accumulated before
    the outage, and holds the others' parameters from its first step on."""
    # the embedded default model: with the small one a step is mostly matchmaking, and a download that
    # ends while the others are in a round (which the peer now sits out, docs/reliability.md) is the
    # rule rather than the exception. The others take ~12 steps during the outage; catching up takes the cut-off
    # peer 3 more (download, a round sat out, a round received), so it trains for a few steps before the end
    # (the outage is cut short when the others get too close to the end, below)
    total_steps = 20
    # checkpoints every 5 steps (the default is 10): each one is a state download from a peer, and with
    # the default model on a 20 Mbit/s uplink the donor's own round then took 9 s instead of ~3 s once,
    # putting it a phase behind while peer-3 caught up (docs/reliability.md, open defects)
    swarm = lab(peers=3, total_steps=total_steps, small_model=False, checkpoint_every=5)
    if isinstance(swarm.network, LoopbackNetwork):
        pytest.skip("cutting a link needs network namespaces (root); loopback processes cannot be cut off")
    cut_off, others = swarm.peers["peer-3"], [swarm.peers["peer-1"], swarm.peers["peer-2"]]
    wait_for(lambda: _last_step(swarm) >= 2, 300, "2 global steps", watch=_nodes(swarm))

    step_at_cut = _last_step(swarm)
    cut_off.cut()
    cut_at = time.monotonic()
    wait_for(lambda: "lost touch with the swarm" in cut_off.log_text(), 30, "peer-3 to notice the outage",
             watch=_nodes(swarm))
    noticed = time.monotonic() - cut_at
    # the outage lasts 60 s, or until the others are 12 steps from the end: back, the cut-off peer
    # spends a download and 3-4 steps (a round sat out, a state round received, a round whose group
    # formed before its first micro-batch) before it contributes, and when its view of the swarm was a
    # step old, a gradient round that finds nobody at its step (~15 s, then it catches up again; locally
    # 7 steps from getting back to contributing). A fast CI run once took the others from step 2 to 14
    # in 60 s, and the run ended before it contributed; 9 steps left were once 8 steps with 0 samples
    resync_steps = 12
    deadline = cut_at + PARTITION
    while time.monotonic() < deadline and _last_step(swarm) < total_steps - resync_steps:
        if swarm.coordinator.child.wait(min(1.0, max(0.0, deadline - time.monotonic()))) is not None:
            break  # the coordinator ended: the checks below say why
    step_at_restore = _last_step(swarm)
    cut_off.restore()
    print(f"noticed after {noticed:.1f} s; the others went from step {step_at_cut} to {step_at_restore} meanwhile")
    assert step_at_restore >= step_at_cut + 2, "the others stalled while peer-3 was cut off"

    for node in [swarm.coordinator, *others, cut_off]:
        wait_for(lambda: node.poll() is not None, 300, f"{node.name} to finish", watch=[node.child])
        assert node.poll() == 0, node.child.log_tail(30)
    assert _last_step(swarm) == total_steps

    _assert_back_in_phase(swarm, cut_off, others, total_steps)


def _assert_back_in_phase(swarm, cut_off, others, total_steps: int) -> None:
    """The partition scenario's checks on the logs of a finished run (a separate function, so that the
    logs of a failed run can be checked again): back, the cut-off peer noticed it was behind,
    downloaded, and held the others' parameters at each step it contributed to."""
    log = cut_off.log_text()
    back = log.index("back in touch with the swarm")
    behind = re.search(r"this peer is at step (\d+), the swarm at step (\d+): downloading its state", log)
    if behind is not None:
        assert int(behind[2]) > int(behind[1]), "peer-3 did not notice it was behind"
        downloaded = re.search(r"state downloaded in \S+ s: now at step (\d+), (\d+) samples accumulated", log[behind.end():])
        assert downloaded and int(downloaded[2]) == 0, downloaded
        # a state of the swarm's step, or an older one that the peer then moves past by taking the swarm's
        # step (the optimizer's path for a download the swarm outran). In CI the donor at the swarm's step
        # could not be dialled yet right after the link came back, and the next donor served step 11 of 12
        outran = re.search(r"the swarm stepped during the download \(state of step (\d+), swarm at step (\d+)\)",
                           log[behind.end() + downloaded.end():])
        assert int(downloaded[1]) >= int(behind[2]) or (outran and int(outran[2]) >= int(behind[2])), \
            f"{downloaded[0]} (the swarm at step {behind[2]}), and the peer did not take the swarm's step"
        # no gradient averaging round began between getting back in touch and the download: nothing from
        # before the outage reached the swarm, and the first round after it holds fresh samples only
        assert "averaging gradients (round" not in log[back:behind.end() + downloaded.end()]
    else:
        # the optimizer found the swarm ahead as the link went and began the download itself, inside the
        # step under way (the trainer never paused: CI, 2026-11-29, the outage cut short at step 8); the
        # download outlived the outage and ended with the optimizer's own line. No round began between
        # losing touch and that line
        lost = log.index("lost touch with the swarm")
        behind = re.compile(r"the state of step \d+ arrived while the swarm averages|the swarm stepped during the download"
                            ).search(log, lost)
        assert behind, "peer-3 did not notice it was behind"
        assert "averaging gradients (round" not in log[lost:behind.start()]

    # from then on it stepped in phase with the others, on fresh gradients: once it contributes, every
    # step of its holds their parameters at that step (the swarm's compression and rounds left half-done
    # leave differences of a few 1e-4, once 1.1e-3 in CI: checked at 3e-3; a peer one phase behind is ~1e-2 off). A round can still fail
    # under load (matchmaking on 2 cores: once, its last round found no group while the other two
    # averaged); it then steps alone on its fresh gradients, once, and the final round makes it level
    assert log[behind.end():].count("stepping with this peer's own gradients only") <= 1
    solo_at = log.find("stepping with this peer's own gradients only", behind.end())
    after = [line for line in _step_lines(cut_off) if line["at"] > behind.end()]
    assert after and after[-1]["contributed"] > after[0]["contributed"], \
        f"peer-3 did not train after getting back:\n{_step_table(swarm)}\n{_swarm_lines(log[back:])}"
    theirs: dict[int, list[float]] = {}
    for other in others:
        for line in _step_lines(other):
            theirs.setdefault(line["step"], []).append(line["params"])
    contributing = [line for line in after if line["contributed"] > after[0]["contributed"]][:-1]  # the last: after the final round
    # it may contribute only to the last step: a peer that sits a round out after its download waits
    # for a state average to make it level, and when state rounds keep forming by time with members a
    # step apart it waits on (locally once: 7 steps with 0 samples, first samples for step 20; open
    # defect "State rounds a step apart", docs/reliability.md); then no step is checked below but the
    # final one.
    # A solo step leaves it one own-gradient update apart until a state average or the final round, and
    # so does a state round that held members at different steps (they form by time, not by step; seen
    # in most runs on 2 cores): the steps from the first of either on are held to the final check below
    apart_at = log.find("members at another step", behind.end())
    held_from = min((at for at in (solo_at, apart_at) if at >= 0), default=-1)
    in_phase = [line for line in contributing if held_from < 0 or line["at"] < held_from]
    assert in_phase or held_from >= 0 or not contributing, contributing
    # the others are the reference only at a step where they agree with each other: a state round among
    # them can hold members at different steps too, and one of them can step alone (CI, 56dbe31: at
    # step 15 they were 1.4e-2 apart, one after a state round that mixed its step 14 with the other's
    # step 13, the other after a step alone; the cut-off peer, 1.0e-2 and 4.4e-3 from them, held the
    # first one's parameters to 6.5e-4 at the steps around it). Such a step is held to the final check
    checked = [line for line in in_phase
               if max(theirs[line["step"]]) - min(theirs[line["step"]]) <= 3e-3 * abs(max(theirs[line["step"]]))]
    print(f"steps checked against the others: {[line['step'] for line in checked]}; "
          f"the others apart at {[line['step'] for line in in_phase if line not in checked]}")
    for line in checked:
        assert any(math.isclose(line["params"], params, rel_tol=3e-3) for params in theirs[line["step"]]), \
            f"{line} against {theirs[line['step']]}\n{_step_table(swarm)}\n{_swarm_lines(cut_off.log_text()[back:])}"
    final = [_step_lines(node)[-1] for node in [*others, cut_off]]
    assert {line["step"] for line in final} == {total_steps}
    # they end with the same parameters: the final state-averaging round makes them level, and a peer
    # that round left apart (a split or half-done round; CI once: 2e-3 between the step lines) takes
    # the final checkpoint's state afterwards (lossless state averaging: identical to 1e-7)
    ended = {node.name: _ended_with(node) for node in [*others, cut_off]}
    assert all(params is not None for params in ended.values()), ended
    assert max(ended.values()) - min(ended.values()) <= 1e-7 * abs(max(ended.values())), \
        f"{ended}\n{_step_table(swarm)}\n" + "\n".join(
            f"--- {node.name}\n{_swarm_lines(node.log_text())[-3000:]}" for node in [*others, cut_off])


def test_a_late_joiner_catches_up_and_a_peer_vanishes_in_the_final_round(lab):
    """A peer that joins a running swarm downloads its state, holds the others' parameters after its
    first averaged steps, and its samples count toward the target batch. At the end, peer-2 freezes
    while it averages the others' parts in the final state-averaging round (fault point
    ``final-state-round``): whoever averaged with it notices the round was left half-done (hivemind
    reports it as a success) and averages once more, or, when its round failed outright, downloads
    the state the others ended with; the survivors finish with identical parameters."""
    swarm = lab(peers=2, total_steps=12, peer_env={"peer-2": {"DEDLOC_FAULTS": "final-state-round"}})
    # the joiner's interpreter starts now and stops itself before it joins (fault point
    # ``pause-before-join``): its start-up time (~13 s here, a third of the run) does not decide where
    # it joins. Resumed at step 3, it joins with 9 steps to go
    joiner = swarm.start_peer("peer-3", up_mbit=20, down_mbit=50, env={"DEDLOC_FAULTS": "pause-before-join"})
    wait_for(lambda: "fault injected: pause-before-join" in joiner.log_text(), 120, "peer-3 to stop before joining",
             watch=_nodes(swarm))
    wait_for(lambda: _last_step(swarm) >= 3, 300, "3 global steps", watch=_nodes(swarm))
    joiner.resume()
    steady, vanishing = swarm.peers["peer-1"], swarm.peers["peer-2"]
    # the fault point fires inside peer-2's final state round, so only when that round finds a group: a
    # peer-2 a step late at the end (CI, 2026-11-29: its last gradient round found no group, it stepped
    # alone) finds nobody there and takes the state the others ended with, as any such peer does
    def froze() -> bool:
        return "fault injected: final-state-round" in vanishing.log_text()

    wait_for(lambda: froze() or vanishing.poll() is not None, 300,
             "peer-2 to freeze inside the final round (or to finish without one)", watch=_nodes(swarm))
    for node in [swarm.coordinator, steady, joiner]:
        wait_for(lambda: node.poll() is not None, 240, f"{node.name} to finish", watch=[node.child])
        assert node.poll() == 0, node.child.log_tail(30)
    vanished = froze()
    if vanished:
        vanishing.power_off()
    else:
        assert vanishing.poll() == 0, vanishing.child.log_tail(30)
        late = vanishing.log_text()
        assert "the final state-averaging round found no other peer" in late and "final state downloaded" in late, \
            vanishing.child.log_tail(30)
        print("peer-2's final state round found no group: the fault point did not fire; it took the final state")

    log = joiner.log_text()
    behind = re.search(r"the swarm is at step (\d+): downloading its state", log)
    assert behind and int(behind[1]) >= 3, "the late joiner did not download the swarm's state"
    downloaded = re.search(r"state downloaded in \S+ s: now at step (\d+), (\d+) samples accumulated", log)
    assert downloaded and int(downloaded[1]) >= int(behind[1]) and int(downloaded[2]) == 0, downloaded
    # when the swarm stepped during the download, the joiner takes the swarm's step and sits out the round
    # under way; it accumulates nothing until a state-averaging round (every step here, its own state
    # weighing nothing) has brought it level with the others. So it contributes from a step or two after
    # its first round (one more when a state round found no group), and from that step on it holds the
    # others' parameters. A step line shows the parameters before that step's state average applies
    first_round = log.find("averaging gradients (round 1,", downloaded.end())
    assert first_round > 0, "the late joiner never took part in an averaging round"
    joined = [line for line in _step_lines(joiner) if line["at"] > first_round]
    theirs = {}
    for other in (steady, vanishing):
        for line in _step_lines(other):
            theirs.setdefault(line["step"], []).append(line["params"])
    optimizer_lines = "\n".join(line for line in log[downloaded.start():].splitlines() if "optimizer" in line)
    evidence = f"joiner: {joined}\nothers: {theirs}\njoiner's optimizer:\n{optimizer_lines[-3000:]}"
    contributing = [line for line in joined if line["contributed"] > 0]
    # it sits out the round under way, once more when the swarm outran its download (seen in CI: the
    # state of step 5 arrived at step 6, and the swarm was at step 8 when it took it), then receives a state average
    assert contributing and contributing[0]["step"] <= joined[0]["step"] + 5, evidence

    # state rounds form by time, not by step (docs/reliability.md, "State rounds a step apart"): a
    # joiner whose state round held the others' next step (it logs "… holds 1 of 2 members at another
    # step") holds the others' parameters of a neighbouring step until the state rounds bring the step
    # counts together (CI, 2026-11-29, when gradient rounds still formed by time: its step-9 line 1.0e-3
    # from a peer's step 10, 1.2e-2 from their step 9), as the partition scenario allows after such a round
    mixed = "members at another step" in log[downloaded.end():]
    reach = 1 if mixed else 0

    def level(line, tolerance):
        return any(math.isclose(line["params"], params, rel_tol=tolerance)
                   for step in range(line["step"] - reach, line["step"] + reach + 1) for params in theirs.get(step, []))

    # a state average made it level before it contributed: a step line from its first round up to its
    # first contributing step holds the others' parameters (measured 1.4e-4 … 1.3e-3 apart; the
    # originals 1e-6 apart; a joiner that never caught up is ~1e-1 apart)
    assert any(level(line, 3e-3) for line in joined if line["at"] <= contributing[0]["at"]), evidence
    # level, not identical, while it contributes: its Adam moments miss the gradient of the round it sat
    # out, and its step count is one short, so its steps differ from the others' until the next state
    # average pulls them together (docs/reliability.md, open defects): measured up to 5.6e-3 apart
    for line in contributing[:2]:
        assert level(line, 1e-2), evidence
    # a round can fail on the loaded machine (once in CI: its last gradient round, begun as the others
    # finished theirs); it then steps alone once, and the final round or download makes it level
    assert log.count("stepping with this peer's own gradients only") <= 1, evidence

    # the coordinator counted it: it reported samples for global steps, and steps saw three peers
    contributions = {row["peer_id"]: row["samples"] for row in _peer_rows(swarm)}
    assert len(contributions) == 3 and min(contributions.values()) > 0, contributions
    assert any(record["peers"] == 3 for record in read_history(swarm.coordinator_dir))

    # the final round: whoever was in peer-2's group noticed the round left half-done and averaged
    # again; a survivor whose final round found no group took the others' final state instead
    logs = {node.name: node.log_text() for node in (steady, joiner)}
    noticed = ("a state-averaging round was left half-done", "final state downloaded")
    assert not vanished or any(mark in log for log in logs.values() for mark in noticed), logs
    assert not any("final state-averaging rounds were left half-done" in log for log in logs.values())
    final = [_step_lines(node)[-1] for node in [steady, joiner, *([] if vanished else [vanishing])]]
    assert {line["step"] for line in final} == {12}
    # no compression on state averaging: equal up to float rounding (hivemind adds the averaged delta)
    assert all(math.isclose(final[0]["params"], line["params"], rel_tol=1e-7) for line in final), final
    assert latest_valid_checkpoint(swarm.coordinator_dir / "checkpoints").step == 12


def _peer_rows(swarm: LabSwarm) -> list[dict]:
    with sqlite3.connect(swarm.coordinator_dir / "history.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT peer_id, samples FROM peers")]


def test_the_coordinator_dies_mid_checkpoint_then_every_peer_dies(lab):
    """The coordinator's machine dies while it writes a checkpoint: the peers keep stepping (the DHT
    lives on in them); on disk the half-written checkpoint is recognisably incomplete and everything
    else loads; restarted, the coordinator keeps its address and resumes tracking. Then every peer
    dies: restarted, they continue from the coordinator's newest checkpoint, not from scratch."""
    swarm = lab(peers=2, total_steps=16, coordinator_env={"DEDLOC_FAULTS": "checkpoint-before-manifest"})
    peers = list(swarm.peers.values())
    wait_for(lambda: "fault injected: checkpoint-before-manifest" in swarm.coordinator.log_text(), 300,
             "the coordinator to be inside a checkpoint write", watch=_nodes(swarm))
    join = swarm.join_info()["join"]
    swarm.coordinator.power_off()

    reached = {p.name: _step_lines(p)[-1]["step"] if _step_lines(p) else 0 for p in peers}
    wait_for(lambda: all(_step_lines(p) and _step_lines(p)[-1]["step"] >= reached[p.name] + 2 for p in peers), 120,
             "two global steps without the coordinator", watch=[p.child for p in peers])
    root = swarm.coordinator_dir / "checkpoints"
    leftovers = [path for path in root.iterdir() if path.name.startswith(TMP_PREFIX)]
    assert leftovers and not any((path / MANIFEST).exists() for path in leftovers), leftovers  # incomplete, and says so
    for path in root.iterdir():
        if path.name.startswith(PREFIX):
            load_checkpoint(path)  # every checkpoint that looks complete is complete

    env = {k: v for k, v in swarm.coordinator.env.items() if k != "DEDLOC_FAULTS"}
    swarm.coordinator.restart(env=env)
    assert swarm.join_info()["join"] == join  # same identity and address
    wait_for(lambda: latest_valid_checkpoint(root) is not None and latest_valid_checkpoint(root).step >= 6, 240,
             "a checkpoint from the restarted coordinator", watch=_nodes(swarm))
    for peer in peers:
        peer.power_off()
    saved = latest_valid_checkpoint(root).step
    for peer in peers:
        peer.restart()
    for node in [swarm.coordinator, *peers]:
        wait_for(lambda: node.poll() is not None, 300, f"{node.name} to finish", watch=[node.child])
        assert node.poll() == 0, node.child.log_tail(30)

    steps = [record["step"] for record in read_history(swarm.coordinator_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 16, steps
    assert latest_valid_checkpoint(root).step == 16, sorted(path.name for path in root.iterdir())
    # the half-written one is gone
    assert not any(path.name.startswith(TMP_PREFIX) for path in root.iterdir()), sorted(p.name for p in root.iterdir())
    # back from the checkpoint (or from a peer already back), not from step 0. Once (locally, 2026-11-29)
    # a restarted peer's first download took the other restarted peer's fresh state of step 0; it then
    # saw the swarm ahead and downloaded its state: a download at or past the checkpoint's step counts
    for peer in peers:
        resumed = [int(step) for step in re.findall(r"state downloaded in \S+ s: now at step (\d+)", peer.log_text())]
        assert resumed and max(resumed) >= saved, peer.log_text()[-2000:]

