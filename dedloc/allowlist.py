"""The organiser's allowlist: the volunteers admitted to a run, as a TOML file the coordinator reads.

```toml
[[volunteer]]
name = "alice"
invite_sha256 = "3b0c…"      # the invite itself went to alice; only its hash is kept here
revoked = false

[[volunteer]]
name = "bob"
peer_ids = ["QmYy…"]         # admitted by identity instead of (or as well as) an invite
```

An invite is a random secret made by ``dedloc allowlist add``; a volunteer may use it on several
machines (each gets its own access token, all under the volunteer's name). Revoking a volunteer
(``dedloc allowlist revoke``, or ``revoked = true`` by hand) ends the access of all their machines.
The file is rewritten atomically and readable by its owner only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
import tomllib
from pathlib import Path
from typing import Optional

import pydantic

from dedloc.errors import UserInputError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
INVITE_PREFIX = "dedloc-invite-"


class Volunteer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    name: str = pydantic.Field(pattern=NAME_PATTERN)
    invite_sha256: Optional[str] = pydantic.Field(None, pattern=r"^[0-9a-f]{64}$")
    peer_ids: tuple[str, ...] = pydantic.Field((), max_length=64)
    revoked: bool = False

    @pydantic.field_validator("peer_ids")
    @classmethod
    def _base58_ids(cls, ids: tuple[str, ...]) -> tuple[str, ...]:
        for peer_id in ids:
            if not re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{32,64}", peer_id):
                raise ValueError(f"{peer_id!r} is not a peer id (base58, as printed by `dedloc peer`)")
        return ids

    @pydantic.model_validator(mode="after")
    def _admits_somehow(self) -> "Volunteer":
        if self.invite_sha256 is None and not self.peer_ids:
            raise ValueError(f"volunteer {self.name!r} has neither an invite_sha256 nor peer_ids")
        return self


class Allowlist(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    volunteer: tuple[Volunteer, ...] = ()

    @pydantic.model_validator(mode="after")
    def _unique_names(self) -> "Allowlist":
        names = [v.name for v in self.volunteer]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"volunteer names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def admit(self, invite: Optional[str], peer_id: str) -> Optional[Volunteer]:
        """The volunteer that ``invite`` or ``peer_id`` belongs to (revoked ones included); None if neither is listed."""
        digest = invite_digest(invite) if invite else None
        for volunteer in self.volunteer:
            if digest and volunteer.invite_sha256 and hmac.compare_digest(digest, volunteer.invite_sha256):
                return volunteer
            if peer_id in volunteer.peer_ids:
                return volunteer
        return None

    @property
    def revoked_names(self) -> list[str]:
        return sorted(v.name for v in self.volunteer if v.revoked)


def invite_digest(invite: str) -> str:
    return hashlib.sha256(invite.strip().encode()).hexdigest()


def load_allowlist(path: Path) -> Allowlist:
    """Read and check the allowlist; :class:`UserInputError` naming the file and the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserInputError(f"cannot read the allowlist {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserInputError(f"the allowlist {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"the allowlist {path} is not valid TOML: {e}") from None
    try:
        return Allowlist.model_validate(data)
    except pydantic.ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'file'}: {error['msg']}" for error in e.errors()
        )
        raise UserInputError(f"the allowlist {path} is malformed: {problems}") from None


def _render(allowlist: Allowlist) -> str:
    lines = ["# dedloc allowlist: the volunteers admitted to this run (see `dedloc allowlist --help`)", ""]
    for v in allowlist.volunteer:
        lines.append("[[volunteer]]")
        lines.append(f'name = "{v.name}"')
        if v.invite_sha256:
            lines.append(f'invite_sha256 = "{v.invite_sha256}"')
        if v.peer_ids:
            lines.append("peer_ids = [" + ", ".join(f'"{p}"' for p in v.peer_ids) + "]")
        lines.append(f"revoked = {'true' if v.revoked else 'false'}")
        lines.append("")
    return "\n".join(lines)


def _write(path: Path, allowlist: Allowlist) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_render(allowlist))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_volunteer(path: Path, name: str, peer_id: Optional[str] = None) -> Optional[str]:
    """Add ``name`` to the allowlist at ``path`` (created if missing), with a new invite, or admitted by
    ``peer_id`` when given; returns the invite (shown once: only its hash is stored), None for a peer id."""
    path = Path(path)
    current = load_allowlist(path) if path.exists() else Allowlist()
    if any(v.name == name for v in current.volunteer):
        raise UserInputError(f"{name!r} is already on the allowlist {path}; revoke them first or pick another name")
    invite = None if peer_id else INVITE_PREFIX + secrets.token_urlsafe(24)
    try:
        volunteer = Volunteer(
            name=name, invite_sha256=invite_digest(invite) if invite else None, peer_ids=(peer_id,) if peer_id else ()
        )
    except pydantic.ValidationError as e:
        raise UserInputError(f"cannot add {name!r}: {e.errors()[0]['msg']} (names: letters, digits, _ . @ -, up to 64)") from None
    _write(path, Allowlist(volunteer=(*current.volunteer, volunteer)))
    return invite


def revoke_volunteer(path: Path, name: str) -> None:
    """Mark ``name`` revoked in the allowlist at ``path``."""
    current = load_allowlist(path)
    if not any(v.name == name for v in current.volunteer):
        raise UserInputError(f"{name!r} is not on the allowlist {path}")
    volunteers = tuple(v.model_copy(update={"revoked": True}) if v.name == name else v for v in current.volunteer)
    _write(Path(path), Allowlist(volunteer=volunteers))
