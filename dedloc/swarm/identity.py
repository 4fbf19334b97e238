"""A node's identity: one RSA key that is its libp2p peer id *and* the signer of its DHT records.

hivemind signs protected DHT records with a per-process key unless told otherwise; dedloc binds that
key to the identity file, so the coordinator's signed run config verifies against the peer id in its
join address, and a volunteer's records stay theirs across restarts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from dedloc.errors import UserInputError


EPHEMERAL_PREFIX = "dedloc-identity-"


def remove_orphaned_ephemeral_identities(root: str | Path | None = None) -> list[Path]:
    """Remove the ephemeral identity directories under ``root`` (the temporary directory) whose
    creating process no longer runs; returns those removed. Only this user's directories are touched."""
    removed = []
    for directory in Path(root or tempfile.gettempdir()).glob(f"{EPHEMERAL_PREFIX}*-*"):
        pid = directory.name[len(EPHEMERAL_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or directory.is_symlink() or directory.stat().st_uid != os.getuid():
                continue
            if _process_exists(int(pid)):
                continue
            for entry in directory.iterdir():
                entry.chmod(0o600)
                entry.unlink()
            directory.rmdir()
            removed.append(directory)
        except OSError:
            continue  # another process is removing it too, or it is not ours after all
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@dataclass(frozen=True)
class Identity:
    """A loaded identity. ``path`` is the file p2pd reads; keep it until the node shuts down."""

    path: Path
    private_key: RSAPrivateKey
    peer_id: PeerID
    ephemeral: bool = False

    @classmethod
    def load_or_create(cls, path: str | Path) -> "Identity":
        """Load the identity at ``path``, creating it (and its directory) on first use."""
        path = Path(path).expanduser()
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                P2P.generate_identity(str(path))
            except OSError as e:
                raise UserInputError(f"cannot create identity file {path}: {e.strerror or e}") from None
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path, ephemeral: bool = False) -> "Identity":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserInputError(f"cannot read identity file {path}: {e.strerror or e}") from None
        try:
            message = crypto_pb2.PrivateKey.FromString(data)
            if message.key_type != crypto_pb2.KeyType.RSA:
                raise ValueError("not an RSA key")
            key = serialization.load_der_private_key(message.data, password=None)
            peer_id = PeerID.from_identity(data)
        except Exception:
            raise UserInputError(
                f"{path} is not a dedloc identity file (expected a libp2p RSA private key); "
                "move it away and a new identity will be created"
            ) from None
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        private_key._private_key = key
        return cls(path=path, private_key=private_key, peer_id=peer_id, ephemeral=ephemeral)

    @classmethod
    def create_ephemeral(cls) -> "Identity":
        """A fresh identity for one process, kept in a private temporary directory (see :meth:`discard`).

        The directory's name carries the process id; directories left by processes that died without
        discarding theirs (a killed peer) are removed first.
        """
        remove_orphaned_ephemeral_identities()
        directory = tempfile.mkdtemp(prefix=f"{EPHEMERAL_PREFIX}{os.getpid()}-")
        path = Path(directory) / "identity.key"
        P2P.generate_identity(str(path))
        return cls.load(path, ephemeral=True)

    def discard(self) -> None:
        """Remove an ephemeral identity's file; a persistent identity is left alone."""
        if self.ephemeral:
            try:
                os.chmod(self.path, 0o600)
                self.path.unlink()
                self.path.parent.rmdir()
            except OSError:
                pass

    def bind_to_process(self) -> None:
        """Make this key the process-wide signing key of hivemind's DHT records.

        Must run before any DHT, ProgressTracker or validator is created in this process.
        """
        RSAPrivateKey._process_wide_key = self.private_key

    @property
    def public_key(self) -> RSAPublicKey:
        return self.private_key.get_public_key()


def peer_id_of_public_key(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer id that belongs to an RSA public key (as carried in signed DHT records).

    Same derivation as ``PeerID.from_identity``: sha2-256 multihash of the protobuf-encoded DER key.
    """
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))
