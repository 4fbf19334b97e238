"""The command line's contract: one clear message and the right exit code for bad input, never a hang."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dedloc.cli import build_parser

pytestmark = pytest.mark.timeout(120)

PEER = "QmTgbGgCzEpnNPfoxYVq8oDUPKP3ZTDTZUUHER1vJwWN9i"


def dedloc(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dedloc", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    "toml, fragments",
    [
        ('run_id = "r"\n[training\n', ["malformed TOML"]),
        ('run_id = "r"\n[training]\nbatch = 4\n', ["unknown key 'batch' in [training]"]),
        ('run_id = "r"\n[training]\ntarget_batch_size = 0\n', ["target_batch_size", "greater than 0"]),
        ('run_id = "r"\n[optimizer]\nlr = "fast"\n', ["key 'lr' in [optimizer]"]),
        ('run_id = "r"\n[data]\nsource = "/nonexistent/corpus.txt"\n', ["data source not found: /nonexistent/corpus.txt"]),
    ],
)
def test_coordinator_rejects_bad_config(tmp_path, toml, fragments):
    config = tmp_path / "run.toml"
    config.write_text(toml)
    result = dedloc("coordinator", "--config", str(config), "--workdir", str(tmp_path / "state"))
    assert_clean_error(result, 2, *fragments)


def test_missing_config_file(tmp_path):
    assert_clean_error(dedloc("coordinator", "--config", str(tmp_path / "absent.toml")), 2, "config file not found")


@pytest.mark.parametrize(
    "address, fragment",
    [("localhost:31337", "starts with '/'"), ("/ip4/127.0.0.1/tcp/31337", "lacks the peer id"),
     (f"/ip4/300.1.1.1/tcp/1/p2p/{PEER}", "malformed address")],
)
def test_peer_rejects_malformed_address(address, fragment):
    assert_clean_error(dedloc("peer", "--join", address), 2, fragment)


def test_flags_are_validated():
    assert_clean_error(dedloc("swarm", "--peers", "0"), 2, "expected a positive integer")
    assert_clean_error(dedloc("peer", "--join", f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", "--micro-batch", "-3"), 2)
    assert_clean_error(dedloc("peer"), 2, "one of the arguments --join --join-file is required")
    assert_clean_error(dedloc("peer", "--join", f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", "--volunteer", "x" * 65), 2, "--volunteer")
    assert_clean_error(dedloc("status", "--join", f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", "--timeout", "0"), 2, "positive")
    assert_clean_error(dedloc("coordinator", "--dashboard-port", "70000"), 2, "0..65535")
    join = ("peer", "--join", f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}")
    assert_clean_error(dedloc(*join, "--announce", "203.0.113.7"), 2, "--announce", "HOST:PORT")
    assert_clean_error(dedloc(*join, "--auxiliary", "--client-mode"), 2, "--auxiliary", "--client-mode")
    assert_clean_error(dedloc(*join, "--upload-mbps", "0"), 2, "positive")
    assert_clean_error(dedloc(*join, "--upload-mbps", "1e39"), 2, "between 0.1 and 100000")
    assert_clean_error(dedloc(*join, "--cache-dir", "/proc/no-such-dir"), 2, "--cache-dir", "not writable")


def test_unreachable_swarm_exits_3_quickly():
    started = time.monotonic()
    result = dedloc("peer", "--join", f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}", timeout=60)
    assert_clean_error(result, 3, "cannot reach the swarm")
    assert time.monotonic() - started < 30


def test_unwritable_join_file_and_bad_join_file(tmp_path):
    bad = tmp_path / "join.json"
    bad.write_text("{}")
    assert_clean_error(dedloc("peer", "--join-file", str(bad)), 2, "is not a join file")


def test_parser_accepts_the_readme_commands():
    parser = build_parser()
    parser.parse_args(["swarm"])
    parser.parse_args(["coordinator", "--config", "run.toml"])
    parser.parse_args(["peer", "--join", f"/ip4/1.2.3.4/tcp/5/p2p/{PEER}", f"/ip4/1.2.3.5/tcp/5/p2p/{PEER}"])
    parser.parse_args(["swarm", "--peers", "3", "--dashboard-host", "0.0.0.0", "--dashboard-port", "8080"])
    parser.parse_args(["coordinator", "--no-dashboard"])
    parser.parse_args(["status", "--join", f"/ip4/1.2.3.4/tcp/5/p2p/{PEER}", "--json"])
