"""The activation store: round trip against HF, sharded extraction, resume, reader, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import CORPUS, micro_config
from xcoder_jax import activations as acts
from xcoder_jax import fileio, headlines
from xcoder_jax import workdir as wd
from xcoder_jax.activations import manifest as mf
from xcoder_jax.activations import writer as writer_mod
from xcoder_jax.errors import ConfigError

# bfloat16 keeps 8 significant bits: rounding to it moves a value by at most 2^-8 of its
# magnitude (half a unit in the last place), so 2^-7 leaves room for one more rounding.
BF16_RTOL = 2.0**-7


def assert_bf16_close(actual, desired, err_msg=""):
    """Values that went through bfloat16 (and possibly float32 kernels that add in another
    order) against a reference: relative to each value, plus 1e-4 of the array's largest
    magnitude for values near zero, where float32 rounding of the terms dominates."""
    desired = np.asarray(desired, np.float32)
    atol = 1e-4 * float(np.abs(desired).max())
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), desired, rtol=BF16_RTOL, atol=atol, err_msg=err_msg
    )


def _rows_by_key(store: acts.ActivationStore) -> dict:
    """{(doc, pos): (row [n_models, d], token)} over the whole store."""
    out = {}
    for k, a in store.iter_shards():
        idx, tok = store.shard_index(k), store.shard_tokens(k)
        for row, (doc, pos), t in zip(np.asarray(a, np.float32), idx, tok):
            out[(int(doc), int(pos))] = (row, int(t))
    return out


@pytest.fixture(scope="module")
def single(micro_pair, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("single"))
    config = micro_config(micro_pair)
    acts.extract(config, workdir)
    return config, workdir, acts.ActivationStore(wd.activations_dir(workdir))


def test_round_trip_matches_hf_hidden_states(micro_pair, single):
    config, _, store = single
    tok = AutoTokenizer.from_pretrained(micro_pair["base"])
    rows = _rows_by_key(store)
    n_expected = 0
    for m, role in enumerate(("base", "distilled")):
        model = AutoModelForCausalLM.from_pretrained(micro_pair[role]).eval()
        layer = model.config.num_hidden_layers // 2
        assert store.layer == layer
        for doc, text in enumerate(CORPUS[:6]):
            ids = tok(text)["input_ids"]
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
            got = np.stack([rows[(doc, p)][0][m] for p in range(1, len(ids))])
            # The store ran the document padded in a batch and rounded it to bfloat16.
            assert_bf16_close(got, hs[1:].numpy(), err_msg=f"{role} doc {doc}")
            assert [rows[(doc, p)][1] for p in range(1, len(ids))] == ids[1:]
    n_expected = sum(len(tok(t)["input_ids"]) - 1 for t in CORPUS)
    assert store.n_rows == n_expected == len(rows)
    assert store.manifest["n_docs"] == len(CORPUS)
    assert (0, 0) not in rows  # position 0 dropped


def test_excluded_positions_and_tokens_are_not_stored(micro_pair, single, tmp_path):
    _, _, full = single
    tok = AutoTokenizer.from_pretrained(micro_pair["base"])
    # "n" is position 3 of every document ("Qu", "es", "tio", "n", ...): the first stored
    # row of a document is then at a later position.
    marks = [tok.encode(t, add_special_tokens=False) for t in ("?", "n")]
    assert all(len(m) == 1 for m in marks) and tok(CORPUS[0])["input_ids"][3] == marks[1][0]
    marks = [m[0] for m in marks]
    config = micro_config(
        micro_pair, exclude_first=3, exclude_special=True, exclude_tokens=("?", "n")
    )
    config.data.max_docs = 10  # whole batches of 5, as in the full store: the same GEMMs
    acts.extract(config, str(tmp_path))
    store = acts.ActivationStore(wd.activations_dir(str(tmp_path)))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")  # the micro tokenizer's only special
    names = {eos: "<|endoftext|>", marks[0]: "?", marks[1]: "n"}
    assert store.manifest["exclude"] == {
        "first": 3, "token_ids": sorted(names), "tokens": [names[i] for i in sorted(names)]
    }  # fmt: skip
    assert store.manifest["first_position"] == 3
    assert store.manifest["n_docs"] == 10
    # Exactly the rows of the full store at positions >= 3 whose token is not excluded, with
    # the same values: an exclusion removes rows, it changes none.
    rows, want = _rows_by_key(store), _rows_by_key(full)
    keep = {k for k, (_, t) in want.items() if k[0] < 10 and k[1] >= 3 and t not in marks}
    assert set(rows) == keep and store.n_rows == len(keep)
    assert sum(t == marks[0] for k, (_, t) in want.items() if k[0] < 10) >= 10  # it excluded
    for key in keep:
        np.testing.assert_array_equal(rows[key][0], want[key][0])
    # A name that is not one token fails before anything is written.
    config.extract.exclude_tokens = ("How many",)
    with pytest.raises(ConfigError, match="'How many' is not one token"):
        acts.extract(config, str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other" / "activations")


def test_statistics_describe_the_rows(single):
    _, _, store = single
    # Float64 references (the store sums in float64 and keeps float32 results): the
    # remaining differences are float32 rounding, scaled to each array.
    every = np.concatenate([np.asarray(a, np.float64) for _, a in store.iter_shards()])
    mean = every.mean(0)
    np.testing.assert_allclose(store.mean, mean, rtol=1e-5, atol=1e-6 * np.abs(every).max())
    norms = np.linalg.norm(every, axis=-1).mean(0)
    np.testing.assert_allclose(store.scales, np.sqrt(store.d_model) / norms, rtol=1e-5)
    var = np.square(every - mean).sum(-1).mean(0)
    # E||x||^2 - ||mean||^2 cancels: its float32 products lose relative precision by
    # E||x||^2 / var.
    np.testing.assert_allclose(store.total_variance, var, rtol=1e-4)
    # What predicts dead latents at init: ||mean|| / rms deviation, also in the summary line.
    ratio = np.linalg.norm(mean, axis=-1) / np.sqrt(var)
    got = [n["mean_to_spread"] for n in store.manifest["norm"]]
    np.testing.assert_allclose(got, ratio, rtol=1e-4)
    assert headlines.extract(store.manifest).endswith(
        "; ||mean|| / rms deviation " + " / ".join(f"{r:.2f}" for r in got)
    )


def test_sharded_extraction_merged_equals_single(micro_pair, single, tmp_path):
    config, _, store = single
    workdir = str(tmp_path)
    for k in range(3):
        acts.extract(config, workdir, shard_index=k, num_shards=3)
    merged_manifest = acts.merge(config, workdir, 3)
    merged = acts.ActivationStore(wd.activations_dir(workdir))
    assert merged.n_rows == store.n_rows
    a, b = _rows_by_key(store), _rows_by_key(merged)
    assert a.keys() == b.keys()
    # Each part batches other documents together (other padding and GEMM shapes), so a
    # value may round to the neighbouring bfloat16 number on some CPUs.
    keys = sorted(a)
    assert_bf16_close(np.stack([b[k][0] for k in keys]), np.stack([a[k][0] for k in keys]))
    assert [a[k][1] for k in keys] == [b[k][1] for k in keys]
    np.testing.assert_allclose(merged.scales, store.scales, rtol=1e-5)
    np.testing.assert_allclose(
        merged.mean, store.mean, rtol=1e-4, atol=1e-4 * np.abs(store.mean).max()
    )
    assert merged_manifest["n_docs"] == store.manifest["n_docs"]


def test_manifest_reads_shards_from_the_log_once(tmp_path):
    d = str(tmp_path)
    shard = lambda k: {"id": k, "rows": 10 + k}
    header = {"format_version": mf.FORMAT_VERSION, "complete": False}
    # An unfinished store written before the log existed: its header lists the shards.
    fileio.atomic_write_json(os.path.join(d, mf.MANIFEST), {**header, "shards": [shard(0)]})
    assert mf.read_manifest(d)["shards"] == [shard(0)]
    # Once a log exists it holds every shard (a resume copies the header's into it first),
    # so a header that still lists some is not counted twice.
    mf.write_shard_log(d, [shard(0)])
    mf.append_shard_record(d, shard(1))
    m = mf.read_manifest(d)
    assert m["shards"] == [shard(0), shard(1)] and m["n_rows"] == 21
    # A complete manifest is the whole truth; a log left behind by a crash is ignored.
    fileio.atomic_write_json(
        os.path.join(d, mf.MANIFEST), {**header, "complete": True, "shards": [shard(0)]}
    )
    assert mf.read_manifest(d)["shards"] == [shard(0)]


def test_interrupted_extraction_resumes_without_duplicates(
    micro_pair, single, tmp_path, monkeypatch
):
    config, _, store = single
    workdir = str(tmp_path)
    real = writer_mod.StoreWriter._write_shard
    calls = {"n": 0}

    def crash_on_third(self, *rows):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *rows)

    monkeypatch.setattr(writer_mod.StoreWriter, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        acts.extract(config, workdir)
    directory = wd.activations_dir(workdir)
    partial = mf.read_manifest(directory)
    assert not partial["complete"] and len(partial["shards"]) == 2
    assert partial["n_rows"] == sum(s["rows"] for s in partial["shards"])
    # Shards are recorded by appending to the log; the manifest itself is not rewritten.
    with open(os.path.join(directory, mf.MANIFEST)) as f:
        assert json.load(f)["shards"] == []
    # A crash in the middle of an append leaves a torn last line: it is not a shard.
    with open(os.path.join(directory, mf.SHARD_LOG), "a") as f:
        f.write('{"id": 2, "rows"')
    assert len(mf.read_manifest(directory)["shards"]) == 2
    monkeypatch.setattr(writer_mod.StoreWriter, "_write_shard", real)
    acts.extract(config, workdir)
    assert not os.path.exists(os.path.join(directory, mf.SHARD_LOG))
    resumed = acts.ActivationStore(wd.activations_dir(workdir))
    a, b = _rows_by_key(store), _rows_by_key(resumed)
    assert resumed.n_rows == store.n_rows and a.keys() == b.keys()
    # Bit for bit: the resume recomputes the interrupted document batch whole, so every row
    # comes from the same computation as in the uninterrupted run on this machine.
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
    # A complete store with the same settings is left alone.
    mtime = os.path.getmtime(os.path.join(wd.activations_dir(workdir), mf.MANIFEST))
    acts.extract(config, workdir)
    assert os.path.getmtime(os.path.join(wd.activations_dir(workdir), mf.MANIFEST)) == mtime


def test_batch_stream_covers_each_row_once_per_epoch_and_resumes(single):
    _, _, store = single
    n, batch = store.n_rows, 32
    with acts.BatchStream(store, batch, seed=3, group_shards=2) as stream:
        ids = np.concatenate([next(stream)[1] for _ in range(n // batch)])
    assert len(np.unique(ids)) == len(ids) == (n // batch) * batch
    # Rows match their ids; a stream resumed at a position continues identically.
    with acts.BatchStream(store, batch, seed=3, group_shards=2) as stream:
        batches = [next(stream) for _ in range(n // batch + 3)]  # crosses an epoch boundary
    with acts.BatchStream(store, batch, seed=3, group_shards=2, start=5 * batch) as resumed:
        for x, i in batches[5:]:
            y, j = next(resumed)
            np.testing.assert_array_equal(i, j)
            np.testing.assert_array_equal(x, y)
    x, i = batches[0]
    np.testing.assert_array_equal(x, store.rows(i))
    assert x.shape == (batch, store.n_models, store.d_model) and x.dtype == np.float32


def test_batch_stream_normalises_by_store_scale(single):
    _, _, store = single
    with acts.BatchStream(store, 16, seed=0, normalise=True) as stream:
        x, i = next(stream)
    np.testing.assert_allclose(x, store.rows(i) * store.scales[None, :, None], rtol=1e-6)


def test_store_json_is_strict(tmp_path):
    path = str(tmp_path / "m.json")
    fileio.atomic_write_json(path, {"scale": 1.5})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            fileio.atomic_write_json(path, {"scale": bad})
        with pytest.raises(ValueError):
            mf.append_shard_record(str(tmp_path), {"id": 0, "x": bad})
    # The file written before is untouched, no temporary file is left, no log line added.
    assert json.load(open(path)) == {"scale": 1.5}
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_statistics_refuse_a_store_without_a_scale():
    sums = mf.shard_sums(np.full((4, 2, 3), np.nan, np.float32))
    with pytest.raises(mf.StoreError, match="no finite rows"):
        mf.norm_stats(sums, 3)
    zeros = np.zeros((4, 2, 3), np.float32)
    zeros[:, 0] = 1.0
    with pytest.raises(mf.StoreError, match=r"model\(s\) \[1\] are all zero"):
        mf.norm_stats(mf.shard_sums(zeros), 3)
    stats, mean = mf.norm_stats(mf.shard_sums(np.ones((4, 2, 3), np.float32)), 3)
    np.testing.assert_allclose([s["scale"] for s in stats], [1.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(mean, np.ones((2, 3)))


# --- Bad input: a clear one-line error and nothing half-written --------------------------


def _assert_nothing_written(workdir):
    assert not os.path.exists(wd.activations_dir(workdir))


def test_tokenizer_mismatch(micro_pair, tmp_path):
    config = micro_config(micro_pair)
    config.models.distilled = micro_pair["other"]
    with pytest.raises(acts.PairError, match="tokenizers differ"):
        acts.extract(config, str(tmp_path))
    _assert_nothing_written(str(tmp_path))


def test_layer_out_of_range(micro_pair, tmp_path):
    config = micro_config(micro_pair, layer=7)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        acts.extract(config, str(tmp_path))
    _assert_nothing_written(str(tmp_path))


def test_missing_model_path(micro_pair, tmp_path):
    config = micro_config(micro_pair)
    config.models.base = str(tmp_path / "nowhere")
    with pytest.raises(acts.PairError, match="cannot load the tokenizer"):
        acts.extract(config, str(tmp_path))
    _assert_nothing_written(str(tmp_path))


def test_empty_corpus(micro_pair, tmp_path):
    config = micro_config(micro_pair)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config.data.sources[0].path = str(empty)
    with pytest.raises(ValueError, match="no documents"):
        acts.extract(config, str(tmp_path))
    _assert_nothing_written(str(tmp_path))


@pytest.fixture
def store_copy(single, tmp_path):
    import shutil

    _, workdir, _ = single
    dst = str(tmp_path / "store")
    shutil.copytree(wd.activations_dir(workdir), dst)
    return dst


def test_corrupted_shard_fails_checksum(store_copy):
    path = os.path.join(store_copy, mf.acts_name(1, 0))
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    store = acts.ActivationStore(store_copy)
    with pytest.raises(acts.StoreError, match="checksum mismatch"):
        store.shard_acts(0)


def test_truncated_shard(store_copy):
    path = os.path.join(store_copy, mf.acts_name(0, 1))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(acts.StoreError, match="checksum mismatch"):
        acts.ActivationStore(store_copy).shard_acts(1)
    with pytest.raises(acts.StoreError, match="truncated"):
        acts.ActivationStore(store_copy, verify=False).shard_acts(1)


def test_manifest_of_another_format_version(store_copy):
    path = os.path.join(store_copy, mf.MANIFEST)
    manifest = json.load(open(path))
    manifest["format_version"] = 99
    json.dump(manifest, open(path, "w"))
    with pytest.raises(acts.StoreError, match="format version 99"):
        acts.ActivationStore(store_copy)


@pytest.mark.parametrize("part", [slice(0, 8), slice(8, 32), slice(16, 32)])
def test_batch_stream_part_reads_its_positions_of_the_same_batches(single, part):
    # A process of a multi-host run reads only some positions of each batch; the batches
    # themselves (their ids, in order) do not change, across shard groups and epochs.
    _, _, store = single
    n_batches = store.n_rows // 32 + 3
    with acts.BatchStream(store, 32, seed=3, group_shards=2, start=7 * 32) as stream:
        whole = [next(stream) for _ in range(n_batches)]
    with acts.BatchStream(store, 32, seed=3, group_shards=2, start=7 * 32, part=part) as stream:
        for x, ids in whole:
            y, j = next(stream)
            np.testing.assert_array_equal(j, ids)
            assert y.shape == (part.stop - part.start, store.n_models, store.d_model)
            np.testing.assert_array_equal(y, x[part])
