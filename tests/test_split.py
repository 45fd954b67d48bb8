"""The held-out split as training recorded it, read back by the later stages."""

from __future__ import annotations

import pytest

from xcoder_jax import split
from xcoder_jax.errors import ConfigError


class _Store:
    """The part of `ActivationStore` the split reads: its shards, and `split`."""

    def __init__(self, n_shards: int):
        self.shards = [{} for _ in range(n_shards)]

    def split(self, n_heldout: int):
        n = len(self.shards)
        return list(range(n - n_heldout)), list(range(n - n_heldout, n))


def _config(eval_shards=1, group_shards=4):
    from configs import tiny

    c = tiny.get_config()
    c.train.eval_shards, c.train.group_shards = eval_shards, group_shards
    return c


def test_record_names_the_split():
    assert split.record(_config(2, 3), [6, 7]) == {
        "eval_shards": 2,
        "heldout_shards": [6, 7],
        "group_shards": 3,
    }


def test_the_recorded_shards_are_returned_for_a_matching_config():
    store = _Store(8)
    export_config = {"split": split.record(_config(1), [7])}
    assert split.heldout_from_export(export_config, store, _config(1)) == [7]
    # group_shards only orders the training rows: another value holds out the same shards.
    assert split.heldout_from_export(export_config, store, _config(1, group_shards=2)) == [7]


def test_another_eval_shards_is_refused_in_one_line():
    export_config = {"split": split.record(_config(1), [7])}
    want = (
        r"^the export was trained with train.eval_shards = 1 \(held-out shards \[7\]\); this "
        r"config says 2: analysing with another split would measure held-out figures on "
        r"trained rows$"
    )
    with pytest.raises(ConfigError, match=want):
        split.heldout_from_export(export_config, _Store(8), _config(2))


def test_exports_without_a_split_fall_back_to_the_store():
    assert split.heldout_from_export({"loss": "l1"}, _Store(8), _config(2)) == [6, 7]


def test_recorded_shards_the_store_lacks_are_refused():
    export_config = {"split": split.record(_config(1), [7])}
    with pytest.raises(ConfigError, match=r"held-out shards \[7\] are not in the store \(4 "):
        split.heldout_from_export(export_config, _Store(4), _config(1))
