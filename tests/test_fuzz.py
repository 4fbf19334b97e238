"""Fuzzing what comes from users and from the network: whatever the input, the config loader, the
allowlist loader, the DHT record parsers and validators, and the access desk either accept it or
refuse it with dedloc's own error — never another exception (a crash of a coordinator or a peer)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dedloc.allowlist import load_allowlist
from dedloc.coordinator.admission import AccessDesk
from dedloc.errors import DedlocError, UserInputError
from dedloc.config import load_run_config
from dedloc.swarm.access import parse_token, read_access_answer
from dedloc.swarm.identity import peer_id_of_public_key
from dedloc.swarm.records import metrics_key, metrics_validator, owner_subkey, parse_manifest_header

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# what msgpack can carry: the shapes a malicious DHT record can take
records = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)
TOML_PIECES = st.sampled_from([
    "[training]\n", "[optimizer]\n", "[averaging]\n", "[model]\n", "[data]\n", "[[volunteer]]\n", "run_id = 'r'\n",
    "total_steps = 5\n", "target_batch_size = -1\n", "lr = nan\n", "lr = 'fast'\n", "aggregation = 'median'\n",
    "name = 'a'\n", "revoked = 3\n", "peer_ids = [1]\n", "x = [\n", "= 1\n", "\x00", "inf = inf\n", "seq_length = 1e400\n",
])


def _write(text: str) -> Path:
    handle = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8")
    with handle:
        handle.write(text)
    return Path(handle.name)


@pytest.mark.parametrize("loader", [load_run_config, load_allowlist], ids=["run-config", "allowlist"])
@FUZZ
@given(pieces=st.lists(TOML_PIECES | st.text(max_size=30), max_size=12))
def test_a_toml_loader_accepts_or_explains(loader, pieces):
    path = _write("".join(pieces))
    try:
        loader(path)
    except UserInputError:
        pass
    finally:
        path.unlink()


@FUZZ
@given(records)
def test_a_manifest_record_is_parsed_or_refused(record):
    try:
        parse_manifest_header(record)
    except DedlocError:
        pass


KEY = RSAPrivateKey()


@FUZZ
@given(records)
def test_the_metrics_validator_never_crashes_a_node(value):
    validator = metrics_validator("run")
    record = DHTRecord(key=metrics_key("run").encode(), subkey=MSGPackSerializer.dumps(owner_subkey(KEY.get_public_key())),
                       value=MSGPackSerializer.dumps(value), expiration_time=get_dht_time() + 60)
    assert validator.validate(record) in (True, False)
    assert RSASignatureValidator(KEY).validate(record) in (True, False)


@FUZZ
@given(st.binary(max_size=3000))
def test_network_tokens_and_desk_answers_are_parsed_or_refused(data):
    parse_token(data)
    try:
        read_access_answer(data, peer_id_of_public_key(KEY.get_public_key()))
    except DedlocError:
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["invite", "public_key", "time", "other"]), records, max_size=4))
def test_the_access_desk_answers_any_request(request):
    answer = AccessDesk(_ALLOWLIST, "run", 600).answer(request, peer_id_of_public_key(KEY.get_public_key()))
    assert "error" in answer and "token" not in answer


_ALLOWLIST = _write("[[volunteer]]\nname = 'alice'\ninvite_sha256 = '" + "0" * 64 + "'\n")
