"""What peers and the coordinator publish in the DHT: key names, record schemas, publish/fetch helpers.

Every record here is *protected*: its subkey carries the owner's RSA public key, hivemind's
``RSASignatureValidator`` signs it on store and every node verifies the signature on store and on read,
so only the owner can write it. On top of that:

- the **run manifest** (run config + tokenizer) and the **run status** are owned by the coordinator;
  a reader accepts them only when the owner key hashes to the coordinator's peer id from the join address;
- **peer metrics** (one record per peer under the run's key) follow :class:`PeerMetrics`, enforced by a
  ``SchemaValidator`` on every node and parsed again by the reader, which drops what does not fit.

Manifest and status carry ``protocol`` = :data:`dedloc.PROTOCOL_VERSION`; readers check it first, so a
version mismatch is reported as such rather than as a malformed record. Nothing read here is unpickled:
values are msgpack (hivemind's serializer) and the config travels as JSON text.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

import hivemind
import pydantic
import pydantic.v1 as pydantic_v1
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPublicKey

from dedloc import PROTOCOL_VERSION
from dedloc.config import RunConfig, parse_run_config
from dedloc.errors import IncompatibleSwarmError
from dedloc.swarm.identity import peer_id_of_public_key
from dedloc.task.tokenizer import tokenizer_sha256

logger = logging.getLogger(__name__)

MAX_TOKENIZER_BYTES = 8 * 1024 * 1024
TOKENIZER_CHUNK = 2048
MANIFEST_EXPIRATION = 3600.0
METRICS_EXPIRATION = 120.0
METRICS_HEARTBEAT = 8.0
"""A training peer republishes its metrics at least this often, from a thread of its own."""
ONLINE_WINDOW = 25.0
"""A peer whose newest metrics record is older than this is not counted: it left, or it is frozen
(a suspended laptop, a paused process), so it must not count while it cannot contribute."""


def swarm_prefix(run_id: str, config_sha256: str, tokenizer_sha256: str) -> str:
    return f"{run_id}-{config_sha256[:10]}-{tokenizer_sha256[:10]}-v{PROTOCOL_VERSION}"  # hivemind forbids "."


def coordinator_prefix(coordinator_id: PeerID) -> str:
    return f"dedloc_{coordinator_id.to_base58()}"


def manifest_key(coordinator_id: PeerID) -> str:
    return f"{coordinator_prefix(coordinator_id)}_manifest"


def tokenizer_key(coordinator_id: PeerID) -> str:
    return f"{coordinator_prefix(coordinator_id)}_tokenizer"


def status_key(coordinator_id: PeerID) -> str:
    return f"{coordinator_prefix(coordinator_id)}_status"


def summary_key(coordinator_id: PeerID) -> str:
    return f"{coordinator_prefix(coordinator_id)}_summary"


def metrics_key(prefix: str) -> str:
    return f"{prefix}_metrics"


def owner_subkey(public_key: RSAPublicKey) -> bytes:
    """The subkey that makes a record writable only by ``public_key``'s owner."""
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public_key.to_bytes())


def owner_of_subkey(subkey: Any) -> Optional[PeerID]:
    """Peer id of the key embedded in a protected subkey, or None if it holds none."""
    if not isinstance(subkey, bytes):
        return None
    found = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
    if len(found) != 1:
        return None
    try:
        return peer_id_of_public_key(RSAPublicKey.from_bytes(found[0]))
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Run manifest: the run config and tokenizer, published by the coordinator


@dataclass(frozen=True)
class RunManifest:
    """The run as the coordinator published it. ``config_sha256`` and ``tokenizer_sha256`` identify it.

    In the DHT it is one small record (config, hashes, protocol) plus the zlib-compressed tokenizer in
    signed chunks of at most :data:`TOKENIZER_CHUNK` bytes: every command a process sends its DHT
    stays under the 4 kB that a pipe writes atomically (see :func:`dedloc.swarm.node.start_dht`).
    """

    config: RunConfig
    tokenizer_json: str
    config_sha256: str
    tokenizer_sha256: str
    published_at: float

    @classmethod
    def create(cls, config: RunConfig, tokenizer_json: str) -> "RunManifest":
        return cls(config, tokenizer_json, config.sha256(), tokenizer_sha256(tokenizer_json), time.time())

    @property
    def swarm_prefix(self) -> str:
        """Prefix of every DHT key and averaging group of this run: run id, config and tokenizer hashes
        and protocol version. Peers that differ in any of them never average together."""
        return swarm_prefix(self.config.run_id, self.config_sha256, self.tokenizer_sha256)

    def tokenizer_chunks(self) -> list[bytes]:
        packed = zlib.compress(self.tokenizer_json.encode(), 9)
        return [packed[i : i + TOKENIZER_CHUNK] for i in range(0, len(packed), TOKENIZER_CHUNK)]

    def to_record(self) -> dict:
        return dict(
            protocol=PROTOCOL_VERSION,
            run_id=self.config.run_id,
            config=json.dumps(self.config.to_json_dict(), sort_keys=True),
            config_sha256=self.config_sha256,
            tokenizer_sha256=self.tokenizer_sha256,
            tokenizer_chunks=len(self.tokenizer_chunks()),
            published_at=self.published_at,
        )


class _ManifestRecord(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid")
    protocol: int
    run_id: str = pydantic.Field(max_length=64)
    config: str = pydantic.Field(max_length=16384)
    config_sha256: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")
    tokenizer_sha256: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")
    tokenizer_chunks: int = pydantic.Field(ge=1, le=MAX_TOKENIZER_BYTES // TOKENIZER_CHUNK)
    published_at: float


def check_protocol(record: Any, what: str) -> None:
    """Raise :class:`IncompatibleSwarmError` when a record speaks another protocol version."""
    version = record.get("protocol") if isinstance(record, dict) else None
    if version != PROTOCOL_VERSION:
        raise IncompatibleSwarmError(
            f"the swarm's {what} uses dedloc protocol version {version!r}; this dedloc speaks version "
            f"{PROTOCOL_VERSION}: install the dedloc release the run's organiser names"
        )


def _inflate(packed: bytes) -> str:
    inflater = zlib.decompressobj()
    data = inflater.decompress(packed, MAX_TOKENIZER_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"the tokenizer is larger than {MAX_TOKENIZER_BYTES} bytes")
    return data.decode()


@dataclass(frozen=True)
class ManifestHeader:
    """The run a manifest announces, without its tokenizer: enough to find the swarm's records."""

    config: RunConfig
    config_sha256: str
    tokenizer_sha256: str
    tokenizer_chunks: int
    published_at: float

    @property
    def swarm_prefix(self) -> str:
        return swarm_prefix(self.config.run_id, self.config_sha256, self.tokenizer_sha256)


def parse_manifest_header(record: Any) -> ManifestHeader:
    """Validate a manifest record (not its tokenizer); raises :class:`IncompatibleSwarmError` when the
    protocol differs or the config does not match its published hash."""
    check_protocol(record, "run manifest")
    try:
        parsed = _ManifestRecord.model_validate(record)
        config_data = json.loads(parsed.config)
    except (pydantic.ValidationError, ValueError) as e:
        raise IncompatibleSwarmError(f"the coordinator's run manifest is malformed: {e}") from None
    config = parse_run_config(config_data, origin="the coordinator's run config")
    if config.sha256() != parsed.config_sha256:
        raise IncompatibleSwarmError(
            "the coordinator's run config does not match its published hash "
            f"({config.sha256()[:12]} != {parsed.config_sha256[:12]}): refusing to train on it"
        )
    return ManifestHeader(config, parsed.config_sha256, parsed.tokenizer_sha256, parsed.tokenizer_chunks, parsed.published_at)


def parse_manifest(record: Any, tokenizer_chunks: Optional[dict[int, bytes]] = None) -> RunManifest:
    """Validate a manifest record and its tokenizer chunks; raises :class:`IncompatibleSwarmError`
    when the protocol differs or the config or tokenizer does not match its published hash."""
    parsed = parse_manifest_header(record)
    config = parsed.config
    chunks = tokenizer_chunks or {}
    if sorted(chunks) != list(range(parsed.tokenizer_chunks)):
        raise _IncompleteManifest(f"{len(chunks)} of {parsed.tokenizer_chunks} tokenizer chunks found")
    try:
        tokenizer_json = _inflate(b"".join(chunks[i] for i in range(parsed.tokenizer_chunks)))
    except (zlib.error, UnicodeDecodeError, ValueError) as e:
        raise IncompatibleSwarmError(f"the coordinator's tokenizer is malformed: {e}") from None
    if tokenizer_sha256(tokenizer_json) != parsed.tokenizer_sha256:
        raise IncompatibleSwarmError(
            "the coordinator's tokenizer does not match its published hash "
            f"({tokenizer_sha256(tokenizer_json)[:12]} != {parsed.tokenizer_sha256[:12]}): refusing to train with it"
        )
    return RunManifest(config, tokenizer_json, parsed.config_sha256, parsed.tokenizer_sha256, parsed.published_at)


class _IncompleteManifest(Exception):
    """Not all of the manifest has reached this node yet (try again)."""


def _chunk_subkey(public_key: RSAPublicKey, digest: str, index: int) -> bytes:
    return owner_subkey(public_key) + f"#{digest[:16]}#{index}".encode()


def _store(dht: hivemind.DHT, key: str, subkey: bytes, value: Any, expiration: float, timeout: float) -> bool:
    try:
        return bool(
            dht.store(key, subkey=subkey, value=value, expiration_time=get_dht_time() + expiration, return_future=True)
            .result(timeout)
        )
    except (TimeoutError, concurrent.futures.TimeoutError):
        logger.debug(f"storing {key} timed out")
        return False


def publish_manifest(
    dht: hivemind.DHT, public_key: RSAPublicKey, coordinator_id: PeerID, manifest: RunManifest, timeout: float = 10.0
) -> bool:
    """Store the tokenizer chunks, then the manifest record; True if every store succeeded."""
    ok = True
    for index, chunk in enumerate(manifest.tokenizer_chunks()):
        subkey = _chunk_subkey(public_key, manifest.tokenizer_sha256, index)
        ok &= _store(dht, tokenizer_key(coordinator_id), subkey, chunk, MANIFEST_EXPIRATION, timeout)
    ok &= _store(dht, manifest_key(coordinator_id), owner_subkey(public_key), manifest.to_record(), MANIFEST_EXPIRATION, timeout)
    return ok


def _get(dht: hivemind.DHT, key: str, timeout: float):
    try:
        return dht.get(key, latest=True, return_future=True).result(timeout)
    except (TimeoutError, concurrent.futures.TimeoutError):
        logger.debug(f"reading {key} timed out")
        return None


def _owned_items(dht: hivemind.DHT, key: str, owner: PeerID, timeout: float) -> list[tuple[bytes, Any]]:
    """(subkey, value) pairs stored under ``key`` by ``owner`` (signatures already verified by the DHT)."""
    found = _get(dht, key, timeout)
    if found is None or not isinstance(found.value, dict):
        return []
    return [
        (subkey, item.value)
        for subkey, item in found.value.items()
        if item.value is not None and owner_of_subkey(subkey) == owner
    ]


def fetch_manifest_header(dht: hivemind.DHT, coordinator_id: PeerID, timeout: float = 10.0) -> Optional[ManifestHeader]:
    """The coordinator's manifest without the tokenizer (None if not found yet); raises
    :class:`IncompatibleSwarmError` if it is unusable."""
    records = _owned_items(dht, manifest_key(coordinator_id), coordinator_id, timeout)
    return parse_manifest_header(records[0][1]) if records else None


def fetch_manifest(dht: hivemind.DHT, coordinator_id: PeerID, timeout: float = 10.0) -> Optional[RunManifest]:
    """The coordinator's manifest if all of it can be found now (None otherwise); raises
    :class:`IncompatibleSwarmError` if it is unusable."""
    records = _owned_items(dht, manifest_key(coordinator_id), coordinator_id, timeout)
    if not records:
        return None
    record = records[0][1]
    digest = record.get("tokenizer_sha256", "") if isinstance(record, dict) else ""
    chunks: dict[int, bytes] = {}
    for subkey, value in _owned_items(dht, tokenizer_key(coordinator_id), coordinator_id, timeout):
        prefix, _, index = subkey.rpartition(b"#")
        if prefix.endswith(f"#{str(digest)[:16]}".encode()) and index.isdigit() and isinstance(value, bytes):
            chunks[int(index)] = value
    try:
        return parse_manifest(record, chunks)
    except _IncompleteManifest as e:
        logger.debug(f"the run manifest is not complete yet: {e}")
        return None


# ---------------------------------------------------------------------------------------------
# Run status: the coordinator's word on where the run stands


@dataclass(frozen=True)
class RunStatus:
    """The coordinator's word on the run: which config and tokenizer it runs (a peer running others
    must leave), ``stop_at`` — the global step at which peers stop contributing (None: the run's total
    steps), ``finished`` — the final checkpoint is written and peers may leave — the newest
    checkpoint's step, and ``final_sketch``: :func:`~dedloc.task.model.parameter_sketch` of the final
    checkpoint's parameters, which the coordinator then serves to peers that ended apart from it."""

    run_id: str
    config_sha256: str
    tokenizer_sha256: str
    stop_at: Optional[int]
    finished: bool
    final_step: Optional[int] = None
    checkpoint_step: Optional[int] = None
    final_sketch: Optional[tuple[float, ...]] = None

    def to_record(self) -> dict:
        return dict(
            protocol=PROTOCOL_VERSION,
            run_id=self.run_id,
            config_sha256=self.config_sha256,
            tokenizer_sha256=self.tokenizer_sha256,
            stop_at=self.stop_at,
            finished=self.finished,
            final_step=self.final_step,
            checkpoint_step=self.checkpoint_step,
            final_sketch=None if self.final_sketch is None else [float(x) for x in self.final_sketch],
        )


class _StatusRecord(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid")
    protocol: int
    run_id: str = pydantic.Field(max_length=64)
    config_sha256: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")
    tokenizer_sha256: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")
    stop_at: Optional[int] = pydantic.Field(None, ge=0)
    finished: bool
    final_step: Optional[int] = pydantic.Field(None, ge=0)
    checkpoint_step: Optional[int] = pydantic.Field(None, ge=0)
    final_sketch: Optional[list[pydantic.FiniteFloat]] = pydantic.Field(None, min_length=2, max_length=16)


def publish_status(
    dht: hivemind.DHT, public_key: RSAPublicKey, coordinator_id: PeerID, status: RunStatus, timeout: float = 10.0
) -> bool:
    return _store(dht, status_key(coordinator_id), owner_subkey(public_key), status.to_record(), MANIFEST_EXPIRATION, timeout)


def _fetch_coordinator_record(dht: hivemind.DHT, key: str, coordinator_id: PeerID, model, what: str, timeout: float):
    """The coordinator's record under ``key`` validated as ``model`` (a pydantic model); None when there
    is none or it is malformed (logged); :class:`IncompatibleSwarmError` for another protocol version."""
    records = _owned_items(dht, key, coordinator_id, timeout)
    if not records:
        return None
    value = records[0][1]
    check_protocol(value, what)
    try:
        return model.model_validate(value)
    except pydantic.ValidationError as e:
        logger.warning(f"ignoring a malformed {what} record: {e}")
        return None


def fetch_status(dht: hivemind.DHT, coordinator_id: PeerID, timeout: float = 10.0) -> Optional[RunStatus]:
    parsed = _fetch_coordinator_record(dht, status_key(coordinator_id), coordinator_id, _StatusRecord, "run status", timeout)
    if parsed is None:
        return None
    fields = parsed.model_dump(exclude={"protocol"})
    if fields["final_sketch"] is not None:
        fields["final_sketch"] = tuple(fields["final_sketch"])
    return RunStatus(**fields)


# ---------------------------------------------------------------------------------------------
# Run summary: the coordinator's figures for `dedloc status` (what its dashboard shows, in brief)

MAX_SUMMARY_CONTRIBUTORS = 10
SUMMARY_EXPIRATION = 300.0


class Contributor(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid", frozen=True)
    name: str = pydantic.Field(max_length=64)
    """The volunteer's name, or the short peer id of a peer that gave none."""
    samples: int = pydantic.Field(ge=0)


class RunSummary(pydantic.BaseModel):
    """Where the run stands as the coordinator sees it; refreshed every few seconds.

    ``loss`` is the training loss peers reported for ``step``; ``heldout_loss`` the coordinator's own
    evaluation of its newest evaluated checkpoint (``heldout_step``); ``top`` the leading contributors
    over the whole run (at most :data:`MAX_SUMMARY_CONTRIBUTORS`, so the record stays small).
    """

    model_config = pydantic.ConfigDict(strict=True, extra="forbid", frozen=True)
    protocol: int = PROTOCOL_VERSION
    run_id: str = pydantic.Field(max_length=64)
    step: int = pydantic.Field(ge=0)
    stop_at: int = pydantic.Field(ge=0)
    loss: Optional[float] = pydantic.Field(None, ge=0, allow_inf_nan=False)
    heldout_loss: Optional[float] = pydantic.Field(None, ge=0, allow_inf_nan=False)
    heldout_step: Optional[int] = pydantic.Field(None, ge=0)
    samples_per_second: float = pydantic.Field(ge=0, allow_inf_nan=False)
    peers: int = pydantic.Field(ge=0)
    samples: int = pydantic.Field(ge=0)
    checkpoint_step: Optional[int] = pydantic.Field(None, ge=0)
    finished: bool = False
    updated_at: float
    top: list[Contributor] = pydantic.Field([], max_length=MAX_SUMMARY_CONTRIBUTORS)


def publish_summary(
    dht: hivemind.DHT, public_key: RSAPublicKey, coordinator_id: PeerID, summary: RunSummary, timeout: float = 10.0
) -> bool:
    return _store(
        dht, summary_key(coordinator_id), owner_subkey(public_key), summary.model_dump(mode="json"), SUMMARY_EXPIRATION, timeout
    )


def fetch_summary(dht: hivemind.DHT, coordinator_id: PeerID, timeout: float = 10.0) -> Optional[RunSummary]:
    """The coordinator's newest summary, or None when there is none (or it is malformed: logged)."""
    return _fetch_coordinator_record(dht, summary_key(coordinator_id), coordinator_id, RunSummary, "run summary", timeout)


# ---------------------------------------------------------------------------------------------
# Peer metrics: one record per peer, refreshed after every global step


class PeerMetrics(pydantic_v1.BaseModel):
    """What a peer reports about itself. Optional fields may be absent (older or minimal peers).

    ``step`` is the global step the peer has reached; ``loss`` is its mean training loss over the
    micro-batches it computed toward that step (None before its first step); ``samples`` is what it
    has contributed in total since it started.
    """

    peer_id: pydantic_v1.constr(strict=True, max_length=64)
    step: pydantic_v1.conint(strict=True, ge=0)
    loss: Optional[pydantic_v1.confloat(strict=True, ge=0.0, le=1e4)] = None
    mini_steps: pydantic_v1.conint(strict=True, ge=0) = 0
    samples_per_second: pydantic_v1.confloat(strict=True, ge=0.0, le=1e9)
    samples: pydantic_v1.conint(strict=True, ge=0)
    time: pydantic_v1.StrictFloat
    volunteer: Optional[pydantic_v1.constr(strict=True, max_length=64)] = None
    device: Optional[pydantic_v1.constr(strict=True, max_length=64)] = None
    client_mode: Optional[pydantic_v1.StrictBool] = None

    @pydantic_v1.validator("loss", "samples_per_second", "time")
    def _finite(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class MetricsSchema(pydantic_v1.BaseModel):
    metrics: Dict[BytesWithPublicKey, Optional[PeerMetrics]]


def metrics_validator(prefix: str) -> SchemaValidator:
    return SchemaValidator(MetricsSchema, prefix=prefix)


def publish_metrics(dht: hivemind.DHT, prefix: str, public_key: RSAPublicKey, metrics: Optional[PeerMetrics]):
    """Store this peer's metrics (None: withdraw them) without waiting — a slow store never stalls
    training; returns the future."""
    return dht.store(
        metrics_key(prefix),
        subkey=owner_subkey(public_key),
        value=None if metrics is None else metrics.dict(),
        expiration_time=get_dht_time() + METRICS_EXPIRATION,
        return_future=True,
    )


def fetch_metrics(dht: hivemind.DHT, prefix: str, timeout: float = 10.0) -> tuple[dict[str, PeerMetrics], list[str]]:
    """Live metrics by peer id, plus the ids (or subkeys) of records that were dropped as malformed.

    A record counts only if its ``peer_id`` is the peer id of the key that signed it.
    """
    found = _get(dht, metrics_key(prefix), timeout)
    metrics: dict[str, PeerMetrics] = {}
    dropped: list[str] = []
    if found is None or not isinstance(found.value, dict):
        return metrics, dropped
    for subkey, item in found.value.items():
        if item.value is None:
            continue  # a peer that said goodbye
        owner = owner_of_subkey(subkey)
        try:
            record = PeerMetrics.parse_obj(item.value)
        except (pydantic_v1.ValidationError, TypeError) as e:
            dropped.append(owner.to_base58() if owner else repr(subkey)[:32])
            logger.debug(f"dropping malformed metrics from {owner}: {e}")
            continue
        if owner is None or record.peer_id != owner.to_base58():
            dropped.append(owner.to_base58() if owner else record.peer_id)  # who published it
            continue
        metrics[record.peer_id] = record
    return metrics, dropped


def describe_mismatch(manifest: RunManifest, status: RunStatus) -> Optional[str]:
    """What differs between the run a peer trains and the run the coordinator now announces, if anything."""
    differences = []
    if status.config_sha256 != manifest.config_sha256:
        differences.append(f"run config {manifest.config_sha256[:12]} → {status.config_sha256[:12]}")
    if status.tokenizer_sha256 != manifest.tokenizer_sha256:
        differences.append(f"tokenizer {manifest.tokenizer_sha256[:12]} → {status.tokenizer_sha256[:12]}")
    if status.run_id != manifest.config.run_id:
        differences.append(f"run id {manifest.config.run_id} → {status.run_id}")
    return ", ".join(differences) or None
