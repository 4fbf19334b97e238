"""Who may take part in a run with an allowlist: access tokens and every check made on them.

The coordinator is the authority. A volunteer's peer proves its invite to the coordinator (over an
authenticated libp2p connection, so the coordinator knows the peer's identity key) and receives an
**access token**: hivemind's ``AccessToken`` holding the volunteer's name, the peer's identity public
key and an expiry time, signed by the coordinator's identity key. Everyone knows that key: its hash
is the coordinator's peer id in the join address.

The token is checked in three places:

- **DHT requests and responses** carry it and are signed by the holder's identity key (hivemind's
  authorizer mechanism, :class:`SwarmAuthorizer`): a node without a token can neither read nor write.
- **Averaging RPCs** (join a group, send a part, download the state): the caller's libp2p peer id is
  authenticated by the connection, and the callee looks up that peer's token in the DHT, where each
  member publishes its own under a subkey only it can write (:class:`Admission`, :class:`AdmittedPeersOnly`).
- **Groups**: a round whose group holds a peer without a valid token is not run.

A token is bound to one identity key, so a replayed token is useless to anyone else, and a forged or
altered one fails the signature check. The coordinator revokes a volunteer by name: it stops renewing
their tokens and publishes the revoked names, which every averager checks before each RPC it serves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from dataclasses import dataclass
from functools import partial
from typing import AsyncIterator, Optional, Sequence

import hivemind
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from dedloc.errors import SwarmUnreachableError, UserInputError
from dedloc.swarm.identity import Identity, peer_id_of_public_key
from dedloc.swarm.records import owner_of_subkey, owner_subkey

logger = logging.getLogger(__name__)

ACCESS_HANDLER = "dedloc.AccessRequest"
"""Name of the coordinator's libp2p handler that turns an invite into an access token."""
DEFAULT_TOKEN_LIFETIME = 1800.0
CLOCK_TOLERANCE = 30.0
"""Seconds a member's clock may differ from the coordinator's. hivemind refuses signed DHT requests
more than 60 s off; a clock beyond this tolerance is reported to its owner when the token is issued."""
MAX_TOKEN_BYTES = 2048
MAX_NAME_LENGTH = 64
MEMBERS_REFRESH = 10.0
"""An averager re-reads the published tokens and revoked names at least this often while serving RPCs."""
ALLOWLIST_HINT = "not on the allowlist of this run"


# ---------------------------------------------------------------------------------------------
# Tokens


def mint_token(authority: RSAPrivateKey, name: str, holder: RSAPublicKey, expires_at: float) -> AccessToken:
    """A token for ``holder`` (an identity public key) naming volunteer ``name``, signed by ``authority``."""
    token = AccessToken(username=name, public_key=holder.to_bytes(), expiration_time=repr(float(expires_at)))
    token.signature = authority.sign(token.SerializeToString())
    return token


def token_expiry(token: AccessToken) -> float:
    """The token's expiry (DHT time, seconds); ``-inf`` when unreadable."""
    try:
        return float(token.expiration_time)
    except ValueError:
        return float("-inf")


def token_holder(token: AccessToken) -> Optional[PeerID]:
    """Peer id of the identity key the token was issued to; None when the key is unreadable."""
    try:
        return peer_id_of_public_key(RSAPublicKey.from_bytes(token.public_key))
    except Exception:
        return None


def token_problem(token: AccessToken, authority: RSAPublicKey, now: Optional[float] = None,
                  revoked: frozenset[str] = frozenset()) -> Optional[str]:
    """Why ``token`` does not admit its holder now (None: it does): missing, forged or altered, expired,
    or its volunteer revoked."""
    if not token.signature or not token.public_key:
        return "no access token"
    unsigned = AccessToken()
    unsigned.CopyFrom(token)
    unsigned.signature = b""
    if not authority.verify(unsigned.SerializeToString(), token.signature):
        return "an access token not signed by this run's coordinator"
    if not 0 < len(token.username) <= MAX_NAME_LENGTH:
        return "an access token without a volunteer name"
    now = get_dht_time() if now is None else now
    if token_expiry(token) <= now:
        return f"an access token that expired {now - token_expiry(token):.0f} s ago"
    if token.username in revoked:
        return f"the access of volunteer {token.username!r}, which the organiser revoked"
    return None


def token_bytes(token: AccessToken) -> bytes:
    return token.SerializeToString()


def parse_token(data: object) -> Optional[AccessToken]:
    """A token from bytes received over the network (size-limited protobuf, never unpickled); None if malformed."""
    if not isinstance(data, bytes) or len(data) > MAX_TOKEN_BYTES:
        return None
    try:
        return AccessToken.FromString(data)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Asking the coordinator for a token


@dataclass(frozen=True)
class AccessGrant:
    """What the coordinator answered: a token (None for an open run), its own public key, and — when it
    was asked to dial back (:mod:`dedloc.swarm.reachability`) — the addresses at which it reached this
    node (None: not asked, or it could not tell)."""

    token: Optional[AccessToken]
    authority: RSAPublicKey
    reachable: Optional[tuple[str, ...]] = None


class AccessRefused(UserInputError):
    """The coordinator refused this peer (not on the allowlist, revoked, clock off): exit code 2."""


def access_request(identity: Identity, invite: Optional[str], dial_back: Optional[dict] = None) -> bytes:
    """The request to the desk; ``dial_back``: also ask it to connect back (``DialBackListener.request()``)."""
    fields = dict(invite=invite, public_key=identity.public_key.to_bytes(), time=get_dht_time())
    if dial_back is not None:
        fields["dial_back"] = dial_back
    return MSGPackSerializer.dumps(fields)


def _reachable(value: object) -> Optional[tuple[str, ...]]:
    """The desk's ``reachable`` answer: None unless a list of at most 16 ``/ip4|ip6/IP/tcp/PORT`` addresses."""
    if not isinstance(value, list) or len(value) > 16:
        return None
    for item in value:
        found = re.fullmatch(r"/(ip4|ip6)/([0-9a-fA-F.:]{2,45})/tcp/(\d{1,5})", item) if isinstance(item, str) else None
        try:
            if found is None or not 0 < int(found.group(3)) < 65536:
                return None
            ipaddress.ip_address(found.group(2))
        except ValueError:
            return None
    return tuple(value)


def clock_skew_message(skew: float) -> str:
    """What a volunteer whose clock is ``skew`` seconds off the coordinator's (positive: ahead) is told."""
    direction = "ahead of" if skew > 0 else "behind"
    return (f"your clock is {abs(skew):.0f} s {direction} the coordinator's (more than the {CLOCK_TOLERANCE:.0f} s "
            "the swarm tolerates): set it right (enable time synchronisation, e.g. NTP) and start again")


def read_access_answer(data: bytes, coordinator_id: PeerID) -> AccessGrant:
    """Check the desk's answer; :class:`AccessRefused` with its message when it refused."""
    malformed = SwarmUnreachableError("the coordinator sent a malformed answer to the access request")
    try:
        answer = MSGPackSerializer.loads(data) if len(data) < 16384 else None
        authority = RSAPublicKey.from_bytes(answer["authority"])
        their_time = answer["time"]
        message = str(answer.get("message", ""))[:500]
    except Exception:
        raise malformed from None
    if not isinstance(their_time, (int, float)) or not math.isfinite(their_time):
        raise malformed
    if peer_id_of_public_key(authority) != coordinator_id:
        raise SwarmUnreachableError("the access desk that answered is not the coordinator of the join address")
    skew = get_dht_time() - float(their_time)
    if abs(skew) > CLOCK_TOLERANCE:
        raise AccessRefused(clock_skew_message(skew))
    reachable = _reachable(answer.get("reachable"))
    if answer.get("error") == "open":
        return AccessGrant(None, authority, reachable)
    if "error" in answer:
        raise AccessRefused(f"the coordinator {message or 'refused this peer'}" if answer.get("error") == "refused"
                            else message or "the coordinator refused this peer")
    token = parse_token(answer.get("token"))
    problem = "no token" if token is None else token_problem(token, authority)
    if problem is not None:
        raise SwarmUnreachableError(f"the coordinator issued an unusable access token ({problem})")
    return AccessGrant(token, authority, reachable)


def request_access(identity: Identity, join_maddrs: list[str], coordinator_id: PeerID, invite: Optional[str],
                   timeout: float = 30.0, dial_back: Optional[dict] = None) -> AccessGrant:
    """Ask the coordinator for a token before joining (a libp2p node of this identity that only dials
    out, for the length of the request). :class:`SwarmUnreachableError` when the coordinator does not
    answer, :class:`AccessRefused` when it refuses."""

    async def ask() -> bytes:
        p2p = await P2P.create(
            initial_peers=join_maddrs, identity_path=str(identity.path), check_if_identity_free=False,
            no_listen=True, nat_port_map=False, auto_nat=False, use_relay=False, startup_timeout=timeout,
        )
        try:
            response = await asyncio.wait_for(
                p2p.call_protobuf_handler(coordinator_id, ACCESS_HANDLER, ExpertRequest(metadata=access_request(identity, invite, dial_back)),
                                          ExpertResponse),
                timeout,
            )
            return response.metadata
        finally:
            try:
                await asyncio.wait_for(p2p.shutdown(), 5.0)
            except Exception as e:  # its p2pd is this process's child: it goes with the process at the latest
                logger.debug(f"the access request's libp2p node did not shut down cleanly: {e!r}")

    try:
        # bounded as a whole: starting the node, the request, and its shutdown
        data = asyncio.run(asyncio.wait_for(ask(), 2 * timeout + 10.0))
    except Exception as e:
        text = f"{type(e).__name__}: {e}".strip().splitlines()[-1]
        raise SwarmUnreachableError(
            f"cannot ask the coordinator at {', '.join(join_maddrs)} for access ({text}); check the address"
        ) from None
    return read_access_answer(data, coordinator_id)


def ask_the_desk(identity: Identity, join_maddrs: list[str], coordinator_id: PeerID, invite: Optional[str],
                 timeout: float = 30.0, dial_back: Optional[dict] = None) -> Optional[AccessGrant]:
    """What a node asks before joining: a token for its invite or identity, or the news that the run is
    open (and, with ``dial_back``, whether the coordinator can connect back to it). :class:`AccessRefused`
    when it may not join. Without an invite, a desk that cannot be reached (within a third of
    ``timeout``) gives None: the node joins as for an open run, through whichever join address answers —
    a run with an allowlist then refuses it at the DHT."""
    try:
        return request_access(identity, join_maddrs, coordinator_id, invite, timeout=timeout if invite else timeout / 3,
                              dial_back=dial_back)
    except SwarmUnreachableError as e:
        if invite is not None:
            raise
        logger.debug(f"the coordinator's access desk did not answer ({e}); joining as for an open run")
        return None


# ---------------------------------------------------------------------------------------------
# DHT: hivemind's authorizer mechanism


class SwarmAuthorizer(TokenAuthorizerBase):
    """Signs this node's DHT requests and responses with its access token and checks everyone else's.

    A member holds the token the coordinator issued (:meth:`install` a renewed one); the coordinator
    itself is given ``mint_lifetime`` and issues its own. Must be created after the identity is bound
    to the process (:meth:`Identity.bind_to_process`): requests are signed with that key, which is the
    key the token names. It lives in the DHT's process (forked with it), which is where it is used.
    """

    def __init__(self, authority: RSAPublicKey, token: Optional[AccessToken] = None,
                 mint_lifetime: Optional[float] = None, local_private_key: Optional[RSAPrivateKey] = None):
        super().__init__(local_private_key)
        if (token is None) == (mint_lifetime is None):
            raise ValueError("give either a token or, for the coordinator, mint_lifetime")
        self.authority = authority
        self._installed = token
        self._mint_lifetime = mint_lifetime
        self.revoked: frozenset[str] = frozenset()
        self._refusals: dict[str, float] = {}

    def install(self, token: AccessToken) -> None:
        """Use ``token`` from now on (a renewal)."""
        self._installed = token

    async def get_token(self) -> AccessToken:
        if self._mint_lifetime is not None:
            return mint_token(self._local_private_key, "coordinator", self.local_public_key,
                              get_dht_time() + self._mint_lifetime)
        return self._installed

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return token_problem(access_token, self.authority, revoked=self.revoked) is None

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        if self._mint_lifetime is not None:
            return token_expiry(access_token) - get_dht_time() < self._mint_lifetime / 2
        return access_token is not self._installed

    async def validate_request(self, request) -> bool:
        valid = await super().validate_request(request)
        if not valid:
            self._log_refusal(request.auth.client_access_token)
        return valid

    def _log_refusal(self, token: AccessToken) -> None:
        """One line per refused client (by identity key) per minute: an intruder retrying does not flood the log."""
        problem = token_problem(token, self.authority, revoked=self.revoked)
        holder = token_holder(token) if token.public_key else None
        who = f"peer {holder.to_base58()}" if holder else "a peer"
        key = f"{who}: {problem}"
        if time.monotonic() - self._refusals.get(key, -1e9) < 60.0:
            return
        self._refusals[key] = time.monotonic()
        if problem is None:
            problem = "a request that is replayed, signed by another key, or sent with a clock over 60 s off"
        logger.warning(f"refused a DHT request from {who} with {problem} ({ALLOWLIST_HINT})")


async def _install_token(dht: hivemind.DHT, node, data: bytes) -> bool:
    """Runs inside the DHT process: hand a renewed token to its authorizer."""
    token = parse_token(data)
    authorizer = node.protocol.authorizer
    if token is None or not isinstance(authorizer, SwarmAuthorizer):
        return False
    authorizer.install(token)
    return True


async def _set_revoked(dht: hivemind.DHT, node, names: Sequence[str]) -> None:
    """Runs inside the DHT process: the revoked volunteers' tokens stop being accepted."""
    authorizer = node.protocol.authorizer
    if isinstance(authorizer, SwarmAuthorizer):
        authorizer.revoked = frozenset(names)


def install_token(dht: hivemind.DHT, token: AccessToken, timeout: float = 10.0) -> bool:
    """Give the running DHT node a renewed token."""
    return bool(dht.run_coroutine(partial(_install_token, data=token_bytes(token)), return_future=True).result(timeout))


def set_revoked(dht: hivemind.DHT, names: Sequence[str], timeout: float = 10.0) -> None:
    """Tell the running DHT node which volunteers are revoked."""
    dht.run_coroutine(partial(_set_revoked, names=list(names)), return_future=True).result(timeout)


# ---------------------------------------------------------------------------------------------
# Averaging: who may call this averager, and who may be in its groups


def members_key(coordinator_id: PeerID) -> str:
    return f"dedloc_{coordinator_id.to_base58()}_members"


def revoked_key(coordinator_id: PeerID) -> str:
    return f"dedloc_{coordinator_id.to_base58()}_revoked"


REVOKED_EXPIRATION = 3600.0
MAX_REVOKED = 4096


def publish_revoked(dht: hivemind.DHT, public_key: RSAPublicKey, coordinator_id: PeerID, names: Sequence[str],
                    timeout: float = 10.0) -> bool:
    """The coordinator's list of revoked volunteers, which every averager checks (a subkey only it can write)."""
    try:
        return bool(dht.store(revoked_key(coordinator_id), subkey=owner_subkey(public_key), value=list(names)[:MAX_REVOKED],
                              expiration_time=get_dht_time() + REVOKED_EXPIRATION, return_future=True).result(timeout))
    except Exception as e:
        logger.debug(f"cannot publish the revoked volunteers: {e!r}")
        return False


def _names_by(items: dict, coordinator_id: Optional[PeerID]) -> Optional[frozenset[str]]:
    for subkey, item in items.items():
        owner = owner_of_subkey(subkey)
        if owner is not None and (coordinator_id is None or owner == coordinator_id) and isinstance(item.value, list):
            return frozenset(name for name in item.value[:MAX_REVOKED] if isinstance(name, str))
    return None


def fetch_revoked(dht: hivemind.DHT, coordinator_id: PeerID, timeout: float = 10.0) -> Optional[frozenset[str]]:
    """The volunteers the coordinator revoked, as published; None when it cannot be read."""
    try:
        found = dht.get(revoked_key(coordinator_id), latest=True, return_future=True).result(timeout)
    except Exception as e:
        logger.debug(f"cannot read the revoked volunteers: {e!r}")
        return None
    if found is None or not isinstance(found.value, dict):
        return None
    return _names_by(found.value, coordinator_id)


@dataclass
class _Member:
    name: str
    expires_at: float


class Admission:
    """The averagers' view of the run's members: the tokens members published in the DHT (each under a
    subkey only its holder can write) and the coordinator's list of revoked volunteers.

    Bound process-wide (:meth:`bind_to_process`) before the averagers start: their processes are forked
    and serve RPCs there, reading the DHT through the node they were given.
    """

    _process_wide: Optional["Admission"] = None

    def __init__(self, authority: RSAPublicKey, coordinator_id: PeerID):
        self.authority = authority
        self.coordinator_id = coordinator_id
        self._members: dict[PeerID, _Member] = {}
        self._revoked: frozenset[str] = frozenset()
        self._read_at = -1e9
        self._refusals: set[PeerID] = set()
        self._lock: Optional[asyncio.Lock] = None
        self._refresh: Optional[asyncio.Task] = None

    def bind_to_process(self) -> None:
        Admission._process_wide = self

    @classmethod
    def process_wide(cls) -> Optional["Admission"]:
        return cls._process_wide

    async def problem(self, dht: hivemind.DHT, peer_id: PeerID) -> Optional[str]:
        """Why ``peer_id`` may not take part in averaging now (None: it may).

        A member known from the last read is answered from it at once: these checks run inside
        averaging RPCs, whose callers give up after the sender timeout, so the periodic re-read
        (every ``MEMBERS_REFRESH`` s, for revocations) runs in the background. Only a peer that is
        not a member, or whose token has expired, since the last read waits for a fresh read (at
        most one a second): a newcomer has just published its token, a member just refreshed it.
        """
        if peer_id == self.coordinator_id:
            return None
        member = self._members.get(peer_id)
        if member is None or member.expires_at <= get_dht_time():
            if time.monotonic() - self._read_at > 1.0:
                await self._read(dht)
                member = self._members.get(peer_id)
        elif time.monotonic() - self._read_at > MEMBERS_REFRESH and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._read(dht))
        if member is None:
            return "no access token"
        if member.expires_at <= get_dht_time():
            return "an expired access token"
        if member.name in self._revoked:
            return f"the access of volunteer {member.name!r}, which the organiser revoked"
        return None

    async def _read(self, dht: hivemind.DHT) -> None:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._read_at <= 1.0:
                return  # another RPC just read them
            try:
                found = await dht.get(members_key(self.coordinator_id), latest=True, return_future=True)
                revoked = await dht.get(revoked_key(self.coordinator_id), latest=True, return_future=True)
            except Exception as e:
                logger.debug(f"cannot read the run's members: {e!r}")
                return
            members: dict[PeerID, _Member] = {}
            for subkey, item in (found.value.items() if found is not None and isinstance(found.value, dict) else ()):
                token = parse_token(item.value)
                if token is None or token_problem(token, self.authority) is not None:
                    continue
                holder = token_holder(token)
                if holder is None or holder != owner_of_subkey(subkey):
                    continue  # published by someone else than its holder: a replay
                members[holder] = _Member(token.username, token_expiry(token))
            names = frozenset()
            if revoked is not None and isinstance(revoked.value, dict):
                names = _names_by(revoked.value, self.coordinator_id) or frozenset()
            self._members, self._revoked, self._read_at = members, names, time.monotonic()

    def note_refusal(self, peer_id: PeerID, what: str, problem: str) -> None:
        """Log a refused peer once."""
        if peer_id not in self._refusals:
            self._refusals.add(peer_id)
            logger.warning(f"refused {what} from peer {peer_id.to_base58()} with {problem} ({ALLOWLIST_HINT})")


class NotAdmitted(PermissionError):
    """Raised in an averaging RPC handler: the caller sees this message."""


REFUSED_DRAIN_SECONDS = 2.0
REFUSED_DRAIN_MESSAGES = 64


async def drain_stream(stream: AsyncIterator, seconds: float, limit: int) -> None:
    """Read and drop up to ``limit`` messages of ``stream`` within ``seconds`` (errors ignored)."""
    async def read() -> None:
        count = 0
        async for _ in stream:
            count += 1
            if count >= limit:
                return

    try:
        await asyncio.wait_for(read(), seconds)
    except Exception:  # a timeout, or the caller's stream failing: the refusal is sent either way
        pass


class AdmittedPeersOnly:
    """Averager mixin: with an :class:`Admission` bound to the process, every averaging RPC from a peer
    without a valid access token is refused, and a round whose group holds such a peer is not run."""

    def __init__(self, *args, **kwargs):
        self.admission = Admission.process_wide()
        super().__init__(*args, **kwargs)

    async def _check_caller(self, context, what: str) -> None:
        if self.admission is None:
            return
        problem = await self.admission.problem(self.dht, context.remote_id)
        if problem is not None:
            self.admission.note_refusal(context.remote_id, what, problem)
            raise NotAdmitted(f"refused: this peer has {problem}; it is {ALLOWLIST_HINT}")

    # hivemind registers rpc_* methods by their annotations
    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        await self._check_caller(context, "a request to join an averaging group")
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        try:
            await self._check_caller(context, "an averaging part")
        except NotAdmitted:
            # a caller still writing its parts would see its stream broken (BrokenPipeError), not the
            # reason: take what it sends first (bounded), then answer with the refusal
            await drain_stream(stream, REFUSED_DRAIN_SECONDS, REFUSED_DRAIN_MESSAGES)
            raise
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        await self._check_caller(context, "a state download")
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        if self.admission is not None:
            for peer_id in group_info.peer_ids:
                if peer_id != self.peer_id:
                    problem = await self.admission.problem(self.dht, peer_id)
                    if problem is not None:
                        self.admission.note_refusal(peer_id, "a place in an averaging group", problem)
                        # a round of several all-reduces (PowerSGD's) registers each under its own id
                        registered = self._running_groups.get(group_info.group_id if group_id is None else group_id)
                        if registered is not None:
                            registered.cancel()  # the members' parts already on their way are refused
                        raise NotAdmitted(f"the group holds peer {peer_id.to_base58()} with {problem}")
        return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
