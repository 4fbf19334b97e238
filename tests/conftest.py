"""Shared fixtures: every test that starts processes goes through ``procs`` so they are reaped;
``network`` is a swarm lab of network namespaces (skipped with the reason where none can be made)."""

from __future__ import annotations

import os
import sys
from typing import Sequence
from pathlib import Path

import pytest

from dedloc.lab.network import LabUnavailable, Network
from dedloc.lifecycle import ChildProcess, stop_all

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def child_env(threads: int = 1) -> dict:
    return dict(
        os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"
    )


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


class Processes:
    """Starts ``dedloc`` subcommands as real processes, each in its own process group."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.children: list[ChildProcess] = []

    def dedloc(self, *args: str, name: str | None = None, threads: int = 1, faults: Sequence[str] = ()) -> ChildProcess:
        """Start ``dedloc ARGS…``; ``name`` (default: the subcommand) names its log file; ``faults``: its
        fault points (``DEDLOC_FAULTS``, see :mod:`dedloc.faults`)."""
        name = name or args[0]
        env = child_env(threads)
        if faults:
            env["DEDLOC_FAULTS"] = ",".join(faults)
        child = ChildProcess(name, [sys.executable, "-m", "dedloc", *args], self.logdir / f"{name}.log", env=env)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        stop_all(list(reversed(self.children)), grace=15)


@pytest.fixture
def procs(tmp_path, request):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    processes = Processes(logdir)
    yield processes
    processes.stop_all()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for child in processes.children:
            print(f"----- {child.name} (exit {child.poll()}) -----\n{child.log_tail(40)}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
