"""hivemind's DHT process meets a command whose sender exited before it was read: one line, no traceback.

Runs in a child interpreter, whose stderr (where the DHT process logs) the test reads whole.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCENARIO = textwrap.dedent(
    """
    import multiprocessing, os, signal
    from dedloc.swarm.identity import Identity
    from dedloc.swarm.node import NetworkOptions, start_dht

    def send_a_command_and_exit(dht):
        dht.get("anything", return_future=True)  # the command carries this process's reply pipe
        os._exit(0)

    identity = Identity.create_ephemeral()
    dht = start_dht(identity, NetworkOptions())
    try:
        os.kill(dht.pid, signal.SIGSTOP)  # the command waits in the pipe until its sender is gone
        sender = multiprocessing.get_context("fork").Process(target=send_a_command_and_exit, args=(dht,))
        sender.start()
        sender.join(30)
        assert sender.exitcode == 0
        os.kill(dht.pid, signal.SIGCONT)
        assert dht.get("anything-else", latest=True) is None  # the DHT process read it and serves on
        print("served after the dead sender's command", flush=True)
    finally:
        os.kill(dht.pid, signal.SIGCONT)
        dht.shutdown()
        identity.discard()
    """
)


@pytest.mark.timeout(120)
def test_a_command_whose_sender_exited_costs_one_line_and_no_traceback():
    run = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, timeout=100)
    assert run.returncode == 0 and "served after the dead sender's command" in run.stdout, run.stderr[-3000:]
    assert "a command's sender exited before the command was read" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
