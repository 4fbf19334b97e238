from __future__ import annotations

import math
import time

import pytest
from hivemind.dht.crypto import RSASignatureValidator

from dedloc import PROTOCOL_VERSION
from dedloc.config import default_run_config
from dedloc.errors import IncompatibleSwarmError
from dedloc.swarm.identity import Identity
from dedloc.swarm.node import NetworkOptions, start_dht
from dedloc.swarm.records import (
    MANIFEST_EXPIRATION,
    PeerMetrics,
    RunManifest,
    RunStatus,
    fetch_manifest,
    fetch_metrics,
    fetch_status,
    manifest_key,
    metrics_validator,
    owner_subkey,
    parse_manifest,
    publish_manifest,
    publish_metrics,
    publish_status,
    status_key,
)
from dedloc.task.tokenizer import train_tokenizer

TOKENIZER = train_tokenizer(["tiny corpus for a tokenizer"] * 20, vocab_size=100).to_str()


def manifest() -> RunManifest:
    return RunManifest.create(default_run_config(), TOKENIZER)


def chunks_of(m: RunManifest) -> dict:
    return dict(enumerate(m.tokenizer_chunks()))


def test_manifest_round_trip():
    original = manifest()
    parsed = parse_manifest(original.to_record(), chunks_of(original))
    assert parsed.config == original.config and parsed.tokenizer_json == TOKENIZER


def test_other_protocol_version_is_named():
    record = dict(manifest().to_record(), protocol=PROTOCOL_VERSION + 1)
    with pytest.raises(IncompatibleSwarmError, match=f"protocol version {PROTOCOL_VERSION + 1}.*speaks version {PROTOCOL_VERSION}"):
        parse_manifest(record, chunks_of(manifest()))


@pytest.mark.parametrize("field", ["config_sha256", "tokenizer_sha256"])
def test_hash_mismatch_is_refused(field):
    record = dict(manifest().to_record(), **{field: "0" * 64})
    with pytest.raises(IncompatibleSwarmError, match="does not match its published hash"):
        parse_manifest(record, chunks_of(manifest()))


def test_big_tokenizer_travels_in_small_chunks():
    big = train_tokenizer([f"word{i} and word{i * 7} make sentence {i}" for i in range(3000)], vocab_size=3000).to_str()
    m = RunManifest.create(default_run_config(), big)
    assert len(m.tokenizer_chunks()) > 3 and all(len(c) <= 2048 for c in m.tokenizer_chunks())
    assert parse_manifest(m.to_record(), chunks_of(m)).tokenizer_json == big


@pytest.mark.parametrize(
    "changes",
    [dict(loss=math.nan), dict(loss=-1.0), dict(samples=-5), dict(step=1.5), dict(volunteer="x" * 1000),
     dict(samples_per_second=math.inf)],
)
def test_metrics_schema_rejects_bad_values(changes):
    good = dict(peer_id="Qm", step=1, loss=2.0, mini_steps=3, samples_per_second=1.0, samples=10, time=time.time())
    PeerMetrics.parse_obj(good)
    with pytest.raises(Exception):
        PeerMetrics.parse_obj(dict(good, **changes))


@pytest.fixture
def nodes():
    started = []

    def start(identity, initial_peers=()):
        dht = start_dht(identity, NetworkOptions(), initial_peers=initial_peers,
                        validators=[RSASignatureValidator(identity.private_key), metrics_validator("dedloc-embedded")])
        started.append((dht, identity))
        return dht

    yield start
    for dht, identity in reversed(started):
        dht.shutdown()
        identity.discard()


@pytest.mark.timeout(120)
def test_records_travel_signed_between_nodes(nodes):
    coordinator_id, peer_id, forger_id = Identity.create_ephemeral(), Identity.create_ephemeral(), Identity.create_ephemeral()
    coordinator = nodes(coordinator_id)
    address = [str(m) for m in coordinator.get_visible_maddrs()]
    forger = nodes(forger_id, address)
    peer = nodes(peer_id, address)

    # a forged manifest under the coordinator's key, signed by someone else, is never taken for the run
    forged = RunManifest.create(default_run_config(run_id="forged"), TOKENIZER)
    assert publish_manifest(forger, forger_id.public_key, coordinator_id.peer_id, forged)
    assert fetch_manifest(peer, coordinator_id.peer_id) is None

    # the real one is found and verified (its size exceeds one pipe write: hivemind's large-command race)
    assert publish_manifest(coordinator, coordinator_id.public_key, coordinator_id.peer_id, manifest())
    fetched = fetch_manifest(peer, coordinator_id.peer_id)
    assert fetched is not None and fetched.config.run_id == "dedloc-embedded"

    # a record claiming the coordinator's key but signed by another key is rejected by the DHT itself
    assert not forger.store(manifest_key(coordinator_id.peer_id), subkey=owner_subkey(coordinator_id.public_key),
                            value=forged.to_record(), expiration_time=time.time() + 60)

    status = RunStatus("dedloc-embedded", fetched.config_sha256, fetched.tokenizer_sha256, stop_at=5, finished=False)
    assert publish_status(coordinator, coordinator_id.public_key, coordinator_id.peer_id, status)
    assert fetch_status(peer, coordinator_id.peer_id) == status
    final = RunStatus("dedloc-embedded", fetched.config_sha256, fetched.tokenizer_sha256, stop_at=5, finished=True,
                      final_step=5, checkpoint_step=5, final_sketch=(12.5, -0.25, 3.0))
    assert publish_status(coordinator, coordinator_id.public_key, coordinator_id.peer_id, final)
    assert fetch_status(peer, coordinator_id.peer_id) == final
    # a sketch that is not finite numbers makes the record malformed (ignored, not a crash)
    bad = dict(final.to_record(), final_sketch=[1.0, float("nan")])
    assert coordinator.store(status_key(coordinator_id.peer_id), subkey=owner_subkey(coordinator_id.public_key),
                             value=bad, expiration_time=time.time() + 10 * MANIFEST_EXPIRATION)
    assert fetch_status(peer, coordinator_id.peer_id) is None

    # metrics: a peer's own record is accepted; one that claims another peer's id is dropped
    honest = PeerMetrics(peer_id=peer_id.peer_id.to_base58(), step=1, loss=3.0, mini_steps=2,
                         samples_per_second=5.0, samples=16, time=time.time())
    liar = PeerMetrics(peer_id=peer_id.peer_id.to_base58(), step=9, loss=0.1, mini_steps=2,
                       samples_per_second=500.0, samples=99999, time=time.time())
    publish_metrics(peer, "dedloc-embedded", peer_id.public_key, honest).result(10)
    publish_metrics(forger, "dedloc-embedded", forger_id.public_key, liar).result(10)
    metrics, dropped = fetch_metrics(coordinator, "dedloc-embedded")
    assert set(metrics) == {peer_id.peer_id.to_base58()} and metrics[peer_id.peer_id.to_base58()].step == 1
    assert dropped == [forger_id.peer_id.to_base58()]
