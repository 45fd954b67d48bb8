"""A stage's parameters: declared fields read once, undeclared ones refused, `how` fields
outside the fingerprint."""

from __future__ import annotations

import pytest

from xcoder_jax import params
from xcoder_jax.errors import ConfigError

STEER = params.Declared(
    "steering",
    what=("seed", "steering.alphas", "steering.latents", "data.sources"),
    how=("steering.batch_size",),
)


def _config():
    from configs import tiny

    return tiny.get_config()


def test_declared_fields_read_and_frozen():
    p = STEER.read(_config())
    assert p.steering.alphas == (-0.4, 0.0, 0.4) and p.seed == 0
    assert p.steering.batch_size == 100
    assert p.data.sources[0]["kind"] == "zoo"
    with pytest.raises(TypeError):
        p.data.sources[0]["kind"] = "jsonl"  # frozen all the way down
    with pytest.raises(AttributeError, match="reads steering.temperature without declaring"):
        _ = p.steering.temperature
    with pytest.raises(AttributeError, match="declares no field of section 'ablation'"):
        _ = p.ablation


def test_the_fingerprint_holds_what_not_how():
    c = _config()
    base = STEER.read(c).fingerprint()
    assert sorted(base) == ["data.sources", "seed", "steering.alphas", "steering.latents"]
    assert base["steering.alphas"] == [-0.4, 0.0, 0.4]  # JSON-ready
    c.steering.batch_size = 7  # how: the same fingerprint
    c.steering.temperature = 0.1  # not read: the same fingerprint
    assert STEER.read(c).fingerprint() == base
    c.steering.alphas = (0.0, 0.2)  # what: another fingerprint
    assert STEER.read(c).fingerprint() != base


def test_a_missing_field_is_a_config_error_and_declarations_are_checked():
    c = _config()
    del c.steering["alphas"]
    with pytest.raises(ConfigError, match=r"^the config has no steering.alphas \(the steering"):
        STEER.read(c)
    with pytest.raises(ValueError, match="both what and how"):
        params.Declared("x", what=("a.b",), how=("a.b",))


def test_unread_lists_the_fields_no_stage_reads():
    c = _config()
    unread = params.unread([STEER], c)
    assert "steering.temperature" in unread and "steering.alphas" not in unread
    assert "seed" not in unread and "train.steps" in unread
