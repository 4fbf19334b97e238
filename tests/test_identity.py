"""Identity files: persistent ones survive, ephemeral ones do not outlive their process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from dedloc.errors import UserInputError
from dedloc.swarm.identity import EPHEMERAL_PREFIX, Identity, remove_orphaned_ephemeral_identities

pytestmark = pytest.mark.timeout(60)


def test_a_killed_process_leaves_an_identity_that_the_next_one_removes(tmp_path, monkeypatch):
    """A peer killed with SIGKILL cannot discard its ephemeral key; the next peer on the machine does."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    script = ("import os, signal; from dedloc.swarm.identity import Identity; "
              "i = Identity.create_ephemeral(); print(i.path, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50,
                           env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert child.returncode == -9, child.stderr
    orphan = tmp_path / child.stdout.strip()
    assert orphan.is_file() and orphan.parent.name.startswith(EPHEMERAL_PREFIX)

    mine = Identity.create_ephemeral()  # a live process's directory (this one) must survive the sweep
    try:
        assert mine.path.is_relative_to(tmp_path) and mine.path.is_file()
        assert not orphan.exists() and not orphan.parent.exists()
        assert remove_orphaned_ephemeral_identities(tmp_path) == []
        assert mine.path.is_file()
    finally:
        mine.discard()
    assert not mine.path.parent.exists()


def test_other_directories_are_left_alone(tmp_path):
    unrelated = tmp_path / f"{EPHEMERAL_PREFIX}notapid-x"
    unrelated.mkdir()
    (unrelated / "identity.key").write_bytes(b"x")
    assert remove_orphaned_ephemeral_identities(tmp_path) == []
    assert unrelated.is_dir()


def test_persistent_identity_is_kept_and_reloaded(tmp_path):
    first = Identity.load_or_create(tmp_path / "me" / "identity.key")
    first.discard()
    again = Identity.load_or_create(tmp_path / "me" / "identity.key")
    assert again.peer_id == first.peer_id


def test_a_file_that_is_not_an_identity_is_refused(tmp_path):
    path = tmp_path / "identity.key"
    path.write_text("hello")
    with pytest.raises(UserInputError, match="not a dedloc identity file"):
        Identity.load(path)
