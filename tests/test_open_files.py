"""The daemons raise their open-files soft limit (swarm nodes hold a socket per peer they talk to)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

_PROBE = (
    "import json, resource; from dedloc.lifecycle import raise_open_files_limit; "
    "before = resource.getrlimit(resource.RLIMIT_NOFILE); after = raise_open_files_limit({wanted}); "
    "print(json.dumps([before, list(after), resource.getrlimit(resource.RLIMIT_NOFILE)]))"
)


def _probe(soft: int, hard: int, wanted: int = 65536):
    """Run the limit raise in a child whose limits start at (soft, hard); its (before, returned, after)."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(wanted=wanted)], capture_output=True, text=True, timeout=30,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_soft_limit_rises_to_the_hard_limit_at_most():
    _, hard_here = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = 4096 if hard_here == resource.RLIM_INFINITY or hard_here >= 4096 else hard_here
    before, returned, after = _probe(256, hard)
    assert before == [256, hard]
    assert after == [hard, hard] and returned == after  # 65536 wanted, capped at the hard limit


def test_the_soft_limit_rises_only_as_far_as_wanted_and_never_falls():
    _, hard_here = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard_here != resource.RLIM_INFINITY and hard_here < 4096:
        pytest.skip(f"this machine's hard limit on open files is {hard_here}, below what the test needs (4096)")
    assert _probe(256, 4096, wanted=1000)[2] == [1000, 4096]
    assert _probe(2048, 4096, wanted=1000)[2] == [2048, 4096]  # already above what is wanted: left alone
