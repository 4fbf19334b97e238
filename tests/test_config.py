from __future__ import annotations

import pytest

from dedloc.config import default_run_config, load_run_config
from dedloc.errors import UserInputError


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_embedded_default_is_valid_and_round_trips(tmp_path):
    config = default_run_config()
    assert config.run_id == "dedloc-embedded"
    again = load_run_config(write(tmp_path, config.to_toml()))
    assert again == config and again.sha256() == config.sha256()


def test_minimal_config_takes_defaults(tmp_path):
    config = load_run_config(write(tmp_path, 'run_id = "r1"\n'))
    assert config.training.target_batch_size == 64 and config.data.source == "embedded"


def test_hash_changes_with_any_field():
    config = default_run_config()
    assert config.sha256() != config.with_overrides(optimizer={"lr": 1e-4}).sha256()


@pytest.mark.parametrize(
    "text, expected",
    [
        ('run_id = "r"\n[training]\ntarget_batch = 5\n', "unknown key 'target_batch' in [training]"),
        ('run_id = "r"\nbogus = 1\n', "unknown key 'bogus'"),
        ('run_id = "r"\n[training]\ntarget_batch_size = 0\n', "key 'target_batch_size' in [training]"),
        ('run_id = "r"\n[training]\ntarget_batch_size = -4\n', "greater than 0"),
        ('run_id = "r"\n[training]\ntarget_batch_size = "many"\n', "key 'target_batch_size' in [training]"),
        ('run_id = "r"\n[optimizer]\nlr = nan\n', "key 'lr' in [optimizer]"),
        ('run_id = "r"\n[model]\nhidden_size = 130\nnum_attention_heads = 4\n', "multiple of num_attention_heads"),
        ('run_id = "r"\n[data]\nseq_length = 512\n', "exceeds model.max_position_embeddings"),
        ('run_id = "r"\n[training]\nmicro_batch_size = 128\ntarget_batch_size = 64\n', "exceeds"),
        ('run_id = "has space"\n', "key 'run_id'"),
        ("[training]\n", "missing required key 'run_id'"),
        ('run_id = "r"\n[training\n', "malformed TOML"),
        ('run_id = "r"\n[averaging]\ngrad_compression = "zip"\n', "key 'grad_compression' in [averaging]"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as error:
        load_run_config(path)
    message = str(error.value)
    assert expected in message
    assert str(path) in message


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="config file not found"):
        load_run_config(tmp_path / "nope.toml")
