"""The disk budget of an extraction: the paper's figures, the refusal before any shard,
and extract.max_rows."""

from __future__ import annotations

import os

import pytest

from tests.conftest import micro_config
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore, budget, extract
from xcoder_jax.activations.exclude import Exclusion


def test_paper_figures():
    # 400M tokens x 2 models x d_model x 2 B (bfloat16), decimal TB.
    acts = lambda d: 400_000_000 * 2 * d * budget.value_bytes("bfloat16")
    assert acts(1536) == 2_457_600_000_000 and budget.human(acts(1536)) == "2.46 TB"
    assert acts(5120) == 8_192_000_000_000 and budget.human(acts(5120)) == "8.19 TB"
    assert budget.row_bytes(2, 1536, "bfloat16") == 2 * 1536 * 2 + 12


def test_cap_rows_truncates_the_last_document():
    import numpy as np

    docs = [(0, np.arange(5)), (1, np.arange(7)), (2, np.arange(4))]  # 4 + 6 + 3 rows
    first = Exclusion(first=1).keep
    capped = list(budget.cap_rows(docs, 7, first))
    assert [(d, len(ids)) for d, ids in capped] == [(0, 5), (1, 4)]  # 4 + 3 rows
    assert list(budget.cap_rows(docs, -1, first)) == docs
    # An excluded token is not a row: token 2 is left out, so document 1 needs 5 ids for
    # its 3 rows (positions 1, 3, 4).
    no_twos = Exclusion(first=1, token_ids=(2,)).keep
    capped = list(budget.cap_rows(docs, 6, no_twos))
    assert [(d, len(ids)) for d, ids in capped] == [(0, 5), (1, 5)]  # 3 + 3 rows


def test_too_small_disk_stops_before_any_shard(micro_pair, tmp_path, monkeypatch, capsys):
    c = micro_config(micro_pair)
    workdir = str(tmp_path / "w")
    monkeypatch.setattr(budget, "free_bytes", lambda path: 10_000)
    with pytest.raises(budget.DiskBudgetError) as e:
        extract(c, workdir)
    msg = str(e.value)
    per_row = budget.row_bytes(2, 16, "bfloat16")  # 76 B
    assert "10.00 kB free" in msg and f"x {per_row} B per row" in msg
    assert f"--config.extract.max_rows={10_000 // per_row}" in msg
    assert "2.46 TB" in msg and "8.19 TB" in msg
    out = capsys.readouterr().out
    assert "store budget:" in out and "d_model 16" in out
    adir = wd.activations_dir(workdir)
    written = [f for _, _, fs in os.walk(adir) for f in fs] if os.path.exists(adir) else []
    assert written == []


def test_max_rows_caps_the_store(micro_pair, tmp_path, capsys):
    c = micro_config(micro_pair)
    c.extract.max_rows = 100
    workdir = str(tmp_path / "w")
    manifest = extract(c, workdir)
    assert manifest["n_rows"] == 100 == ActivationStore(wd.activations_dir(workdir)).n_rows
    assert "store budget: 100 rows x 2 models x d_model 16 x 2 B" in capsys.readouterr().out
