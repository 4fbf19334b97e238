"""--pause-when-busy: reading nvidia-smi's process list, and the watcher's pause/resume with a quiet
period (driven by a scripted probe and clock: the CUDA-only path is covered on CPU machines)."""

from __future__ import annotations

import threading

import pytest

from dedloc.lifecycle import PauseSwitch
from dedloc.task.gpu_busy import BusyGpuWatcher, parse_compute_apps

pytestmark = pytest.mark.timeout(30)

UUID = "GPU-1b2c3d4e-0000-1111-2222-333344445555"
OTHER = "GPU-99999999-0000-1111-2222-333344445555"


def test_parse_compute_apps_keeps_other_programs_on_this_gpu():
    text = "\n".join([
        f"{UUID}, 4242, 6144",      # a game on this GPU
        f"{UUID}, 100, 900",        # this peer itself
        f"{OTHER}, 5151, 8000",     # another GPU
        f"{UUID}, 6262, [N/A]",     # memory not reported (no parse)
        "gpu_uuid, pid, used_gpu_memory [MiB]",
    ])
    assert parse_compute_apps(text, UUID.lower(), own_pids={100}) == [(4242, 6144)]
    assert parse_compute_apps("", UUID, own_pids=set()) == []


class _Script:
    """A probe that answers from a list, and a clock the test moves."""

    def __init__(self, answers):
        self.answers, self.now = list(answers), 0.0

    def probe(self):
        return self.answers.pop(0)

    def clock(self):
        return self.now


def test_watcher_pauses_on_a_heavy_process_and_resumes_after_the_quiet_period():
    script = _Script([[(7, 100)], [(7, 2048)], [(7, 2048)], [], [], [(8, 4096)], []])
    switch = PauseSwitch()
    watcher = BusyGpuWatcher(script.probe, switch.busy, min_memory_mib=512, quiet_s=30, clock=script.clock)
    watcher.check()
    assert not switch.is_paused()  # 100 MiB: a compositor, not a heavy user
    script.now = 5
    watcher.check()
    assert switch.is_paused() and "GPU" in switch.reason()
    script.now = 10
    watcher.check()  # still there
    script.now = 20
    watcher.check()  # gone 10 s ago (last seen at 10): too soon
    assert switch.is_paused()
    script.now = 41
    watcher.check()  # free for 31 s
    assert not switch.is_paused()
    script.now = 50
    watcher.check()
    assert switch.is_paused()
    script.now = 60
    watcher.check()
    assert switch.is_paused()


def test_watcher_without_nvidia_smi_never_pauses_and_a_signal_pause_is_separate():
    switch = PauseSwitch()
    watcher = BusyGpuWatcher(lambda: None, switch.busy)
    watcher.check()
    watcher.check()
    assert not switch.is_paused()
    switch.paused.set()  # SIGUSR1
    assert switch.is_paused() and "SIGUSR1" in switch.reason()
    assert isinstance(switch.busy, threading.Event)
