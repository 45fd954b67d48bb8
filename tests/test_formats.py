"""Other crosscoder formats: round trips, their encoders re-implemented from their
documented math on the converted files, import checks, and analysis on an import."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import random_weights, synthetic_store, train_config
from xcoder_jax import export, formats
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.formats import common

D, H = 32, 48
# Slots of the export under test: distilled first, so every conversion must reorder them.
ROLES = ["distilled", "base"]
SCALES = [0.5, 2.0]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats_store")
    synthetic_store(str(root / "activations"), n_rows=1024, d=D, shard_rows=256)
    return str(root / "activations")


def _rows(store_dir) -> np.ndarray:
    """[256, 2, D] raw rows of the store, base then distilled (the store's roles)."""
    store = ActivationStore(store_dir)
    return store.rows(np.arange(0, 1024, 4)).astype(np.float32)


def _make_export(directory, store_dir, kind: str) -> dict:
    """A random crosscoder (normalised units) exported with SCALES and ROLES; for BatchTopK
    one threshold on weighted f, put in a gap of the store rows' weighted activations so
    float rounding cannot move a row across it."""
    w = random_weights(D, H)
    if kind == "batchtopk":
        norms = np.linalg.norm(w["W_dec"], axis=-1).sum(-1)
        x = _rows(store_dir)[:, ::-1] * np.float32(SCALES)[None, :, None]  # slot order
        f = np.maximum(np.einsum("bmd,mdh->bh", x, w["W_enc"]) + w["b_enc"], 0)
        v = np.sort((f * norms)[f > 0])
        mid = len(v) // 2
        gap = mid + np.argmax(np.diff(v[mid : mid + 200]))
        theta = (v[gap] + v[gap + 1]) / 2
        w["threshold"] = (theta / norms).astype(np.float32)
    models = [{"role": r, "source": f"/models/{r}", "weights": f"sha-{r}"} for r in ROLES]
    meta = {"models": models, "layer": 1, "d_model": D, "n_models": 2, "n_latents": H}
    export.export(directory, w, np.float32(SCALES), {**meta, "loss": kind, "tokens_trained": 9})
    return w


@pytest.fixture(scope="module", params=["l1", "batchtopk"])
def exported(request, tmp_path_factory, store_dir):
    directory = str(tmp_path_factory.mktemp(f"export_{request.param}"))
    _make_export(directory, store_dir, request.param)
    return request.param, directory


def _convert(exported, fmt, tmp_path):
    kind, directory = exported
    if kind == "batchtopk" and fmt == "ckkissane":
        with pytest.raises(formats.FormatError, match="plain ReLU"):
            formats.convert_export(directory, fmt, str(tmp_path / fmt), train_config())
        pytest.skip("ckkissane holds no BatchTopK crosscoder (checked above)")
    out = str(tmp_path / fmt)
    formats.convert_export(directory, fmt, out, train_config())
    return out


def _ours(directory, x_base_first):
    """Our encoder on rows given base first: (f [b, h], x_hat [b, 2, d] base first)."""
    cc = ExportedCrosscoder.load(directory)
    x = torch.from_numpy(x_base_first[:, [1, 0]].copy())  # the export's slot order
    f = cc.encode_t(x.clone()).T
    return f.numpy(), cc.reconstruct(x).numpy()[:, [1, 0]]


def _theirs_dictionary_learning(out, x):
    """dictionary_learning's CrossCoder / BatchTopKCrossCoder encode + decode (threshold
    mode), written from their documented math, on the converted file."""
    sd = {k: v.double() for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    x = torch.from_numpy(x).double()
    g = sd["activation_global_scale"][None, :, None]
    xn = (x - sd["activation_mean"]) * g
    f = torch.relu(torch.einsum("bld,ldf->bf", xn, sd["encoder.weight"]) + sd["encoder.bias"])
    if "threshold" in sd:
        code_norm = sd["decoder.weight"].norm(dim=2).sum(dim=0)
        f = f * (f * code_norm > sd["threshold"])
    x_hat = torch.einsum("bf,lfd->bld", f, sd["decoder.weight"]) + sd["decoder.bias"]
    return f.numpy(), (x_hat / (g + 1e-8) + sd["activation_mean"]).numpy()


def _theirs_ckkissane(out, x):
    """ckkissane's CrossCoder.encode / decode on activations scaled by the factors beside it."""
    sd = {k: v.double() for k, v in torch.load(os.path.join(out, "cc_weights.pt")).items()}
    with open(os.path.join(out, formats.SIDECAR)) as fh:
        s = torch.tensor(json.load(fh)["scales"], dtype=torch.float64)[None, :, None]
    xn = torch.from_numpy(x).double() * s
    f = torch.relu(torch.einsum("bmd,mdh->bh", xn, sd["W_enc"]) + sd["b_enc"])
    x_hat = torch.einsum("bh,hmd->bmd", f, sd["W_dec"]) + sd["b_dec"]
    return f.numpy(), (x_hat / s).numpy()


def _theirs_saelens(out, x):
    """SAELens's JumpReLUSAE.encode / decode (6.x) on the concatenated rows, from cfg.json."""
    sd = {k: v.double() for k, v in load_file(os.path.join(out, "sae_weights.safetensors")).items()}
    with open(os.path.join(out, "cfg.json")) as fh:
        cfg = json.load(fh)
    x_cat = torch.from_numpy(x).double().reshape(len(x), -1)  # base first, then distilled
    pre = (x_cat - sd["b_dec"] * cfg["apply_b_dec_to_input"]) @ sd["W_enc"] + sd["b_enc"]
    f = torch.relu(pre) * (pre > sd["threshold"])
    x_hat = f @ sd["W_dec"] + sd["b_dec"]
    return f.numpy(), x_hat.reshape(x.shape).numpy()


THEIRS = {
    "dictionary_learning": _theirs_dictionary_learning,
    "ckkissane": _theirs_ckkissane,
    "saelens": _theirs_saelens,
}


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_their_math_on_the_converted_file_equals_our_encoder(exported, fmt, store_dir, tmp_path):
    out = _convert(exported, fmt, tmp_path)
    x = _rows(store_dir)
    f_ours, xh_ours = _ours(exported[1], x)
    f_theirs, xh_theirs = THEIRS[fmt](out, x)
    active = f_ours > 0
    assert 0.02 < active.mean() < 0.98  # the comparison covers both sides of the ReLU
    np.testing.assert_array_equal(f_theirs > 0, active)
    # f is O(1); x_hat is O(raw norm / sqrt(d)); float32 sums over 2 * 32 terms.
    np.testing.assert_allclose(f_theirs, f_ours, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xh_theirs, xh_ours, rtol=1e-5, atol=1e-4)


def test_dictionary_learning_files_hold_what_their_strict_load_expects(exported, tmp_path):
    kind, _ = exported
    out = _convert(exported, "dictionary_learning", tmp_path)
    sd = load_file(os.path.join(out, "model.safetensors"))
    expected = {
        "encoder.weight": (2, D, H), "encoder.bias": (H,), "decoder.weight": (2, H, D),
        "decoder.bias": (2, D), "code_normalization_id": (), "target_rms": (),
        "activation_mean": (2, D), "activation_std": (2, D), "activation_global_scale": (2,),
    }  # fmt: skip
    if kind == "batchtopk":
        expected.update(k=(), threshold=())
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert int(sd["code_normalization_id"]) == 1  # CodeNormalization.CROSSCODER
    # activation_std consistent with the global scale their constructor derives from it.
    g = sd["target_rms"] / sd["activation_std"].double().pow(2).sum(-1).sqrt()
    np.testing.assert_allclose(g.numpy(), [SCALES[1], SCALES[0]], rtol=1e-6)  # base first
    with open(os.path.join(out, "config.json")) as fh:
        config = json.load(fh)
    cls = "BatchTopKCrossCoder" if kind == "batchtopk" else "CrossCoder"
    assert config["dict_class"] == cls
    assert (config["activation_dim"], config["dict_size"], config["num_layers"]) == (D, H, 2)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_round_trip_gives_the_same_tensors(exported, fmt, store_dir, tmp_path):
    out = _convert(exported, fmt, tmp_path)
    workdir = str(tmp_path / "imported")
    os.makedirs(workdir)
    os.symlink(store_dir, wd.activations_dir(workdir))
    formats.import_crosscoder(out, fmt, workdir)
    a, ca = export.load_export(exported[1])
    b, cb = export.load_export(wd.export_dir(workdir))
    assert export.role_order(cb) == ["base", "distilled"]  # the store's order
    assert sorted(a) == sorted(b)
    for role in ("base", "distilled"):
        i, j = export.role_order(ca).index(role), export.role_order(cb).index(role)
        np.testing.assert_allclose(b["W_enc"][j], a["W_enc"][i], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b["W_dec"][:, j], a["W_dec"][:, i], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b["b_dec"][j], a["b_dec"][i], rtol=1e-6, atol=1e-7)
        assert cb["scales"][j] == pytest.approx(ca["scales"][i], rel=1e-7)
    np.testing.assert_array_equal(b["b_enc"], a["b_enc"])
    if "threshold" in a:
        np.testing.assert_allclose(b["threshold"], a["threshold"], rtol=1e-5)
    assert (cb["layer"], cb["loss"], cb["imported"]["format"]) == (1, ca["loss"], fmt)


def test_saelens_files_hold_what_its_load_from_disk_reads(exported, tmp_path):
    kind, directory = exported
    out = _convert(exported, "saelens", tmp_path)
    sd = load_file(os.path.join(out, "sae_weights.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {
        "W_enc": (2 * D, H), "b_enc": (H,), "W_dec": (H, 2 * D), "b_dec": (2 * D,),
        "threshold": (H,),
    }  # fmt: skip
    assert {v.dtype for v in sd.values()} == {torch.float32}
    with open(os.path.join(out, "cfg.json")) as fh:
        cfg = json.load(fh)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", 2 * D, H)
    assert (cfg["dtype"], cfg["device"], cfg["apply_b_dec_to_input"]) == ("float32", "cpu", False)
    assert (cfg["normalize_activations"], cfg["reshape_activations"]) == ("none", "none")
    meta = cfg["metadata"]
    assert meta["hook_name"] == cfg["hook_name"] == "blocks.1.hook_resid_pre"
    assert meta["sae_lens_version"].startswith("6.") and cfg["hook_layer"] == 1
    assert meta["model_name"] == "/models/base" and meta["context_size"] == 256
    assert "concatenation" in meta["crosscoder"]["lost"]
    assert [x["role"] for x in meta["crosscoder"]["models"]] == ["base", "distilled"]
    # Raw units, base first: the base model's rows are the first D inputs.
    tensors, config = export.load_export(directory)
    b = export.role_order(config).index("base")
    np.testing.assert_array_equal(sd["W_enc"][:D].numpy(), tensors["W_enc"][b])
    np.testing.assert_array_equal(sd["b_dec"][:D].numpy(), tensors["b_dec"][b])
    if kind == "l1":
        assert not sd["threshold"].any()  # threshold 0: a ReLU


def test_saelens_threshold_keeps_the_same_code_in_float32():
    from xcoder_jax.formats import saelens

    rng = np.random.default_rng(0)
    t = np.abs(rng.normal(0, 1, 500)).astype(np.float32)
    t[:3] = [0.0, np.float32(1e-45), 1.0]
    pre = np.concatenate([t, np.nextafter(t, np.float32(-1)), np.nextafter(t, np.float32(2))])
    pre = np.concatenate([pre, -pre, rng.normal(0, 1, 1500).astype(np.float32)])
    tt = np.tile(t, len(pre) // len(t))
    ours = np.maximum(pre, 0) * (np.maximum(pre, 0) >= tt)
    stored = saelens._threshold_out(tt)
    theirs = np.maximum(pre, 0) * (pre > stored)
    np.testing.assert_array_equal(theirs, ours)  # ties at pre == t included
    # Read back exactly, but for the smallest float32 (stored as 0: the same code, a ReLU).
    back = saelens._threshold_in(stored)
    np.testing.assert_array_equal(back[tt != t[1]], tt[tt != t[1]])
    assert not back[tt == t[1]].any()


def _foreign_sae(out, arch="jumprelu", **cfg):
    """A SAELens SAE trained elsewhere: raw units, b_dec subtracted from its input, no sidecar."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    sd = {
        "W_enc": rng.normal(0, 0.3, (2 * D, H)), "b_enc": rng.normal(0, 0.2, H),
        "W_dec": rng.normal(0, 0.2, (H, 2 * D)), "b_dec": rng.normal(0, 0.5, 2 * D),
        "threshold": np.abs(rng.normal(0, 0.3, H)),
    }  # fmt: skip
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    os.makedirs(out, exist_ok=True)
    save_file(sd, os.path.join(out, "sae_weights.safetensors"))
    meta = {"hook_name": "blocks.1.hook_resid_pre", "sae_lens_version": "6.18.0"}
    c = {"architecture": arch, "d_in": 2 * D, "d_sae": H, "dtype": "float32", "device": "cpu"}
    c.update(apply_b_dec_to_input=True, normalize_activations="none", metadata=meta)
    with open(os.path.join(out, "cfg.json"), "w") as fh:
        json.dump({**c, **cfg}, fh)


def test_saelens_sae_trained_elsewhere_imports_with_its_math(store_dir, tmp_path):
    out = str(tmp_path / "sae")
    _foreign_sae(out)
    x = _rows(store_dir)
    f_theirs, xh_theirs = _theirs_saelens(out, x)
    raw = {}
    for scales in ("file", "store"):
        workdir = str(tmp_path / scales)
        os.makedirs(workdir)
        os.symlink(store_dir, wd.activations_dir(workdir))
        cfg = formats.import_crosscoder(out, "saelens", workdir, scales=scales)
        assert (cfg["layer"], cfg["loss"], cfg["imported"]["scales_from"]) == (
            1,
            "batchtopk",
            scales,
        )
        cc = ExportedCrosscoder.load(wd.export_dir(workdir))  # the store's order: base first
        f_ours = cc.encode_t(torch.from_numpy(x)).T.numpy()
        active = f_ours > 0
        assert 0.02 < active.mean() < 0.98
        np.testing.assert_array_equal(f_theirs > 0, active)
        np.testing.assert_allclose(f_theirs, f_ours, rtol=1e-5, atol=1e-5)
        xh_ours = cc.reconstruct(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(xh_theirs, xh_ours, rtol=1e-5, atol=1e-4)
        raw[scales] = export.load_export(wd.export_dir(workdir))
    # Raw-unit weights whatever the scales: those only set the units of decoder norms.
    np.testing.assert_allclose(raw["store"][0]["W_dec"], raw["file"][0]["W_dec"], rtol=1e-6)
    assert raw["file"][1]["scales"] == [1.0, 1.0]
    np.testing.assert_allclose(raw["store"][1]["scales"], ActivationStore(store_dir).scales)
    for arch, extra, match in [
        ("topk", {}, "architecture 'topk'"),
        ("jumprelu", {"normalize_activations": "layer_norm"}, "normalize_activations"),
    ]:
        _foreign_sae(out, arch, **extra)
        with pytest.raises(formats.FormatError, match=match):
            formats.import_crosscoder(out, "saelens", str(tmp_path / "file"), overwrite=True)


def test_import_names_each_mismatch(exported, store_dir, tmp_path):
    out = _convert(exported, "dictionary_learning", tmp_path)
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    os.symlink(store_dir, wd.activations_dir(workdir))
    side = common.read_sidecar(out)
    common.write_sidecar(out, {**side, "layer": 7, "d_model": 99})
    with pytest.raises(formats.FormatError) as e:
        formats.import_crosscoder(out, "dictionary_learning", workdir)
    assert "layer: crosscoder trained at block 7, store at 1" in str(e.value)
    assert "d_model: the crosscoder states 99, its weights 32" in str(e.value)
    # A crosscoder without a normaliser or sidecar does not say how it was scaled.
    sd = load_file(os.path.join(out, "model.safetensors"))
    sd["activation_mean"] = torch.full_like(sd["activation_mean"], float("nan"))
    from safetensors.torch import save_file

    save_file(sd, os.path.join(out, "model.safetensors"))
    os.remove(os.path.join(out, formats.SIDECAR))
    with pytest.raises(formats.FormatError, match="missing normalisation"):
        formats.import_crosscoder(out, "dictionary_learning", workdir)
    cfg = formats.import_crosscoder(out, "dictionary_learning", workdir, scales="store")
    np.testing.assert_allclose(cfg["scales"], ActivationStore(store_dir).scales, rtol=1e-7)
    with pytest.raises(formats.FormatError, match="already holds an export"):
        formats.import_crosscoder(out, "dictionary_learning", workdir, scales="raw")


def _assert_close(a, b, path="categories"):
    """Equal structure and values; floats (NRNs, shares, intervals) to 1e-5 absolute."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and sorted(a) == sorted(b), path
        for k in b:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), path
    else:
        assert a == b, path


# --- Analysis of an imported crosscoder --------------------------------------------------------


def test_analysis_of_the_imported_crosscoder_reproduces_the_original(micro_pair, tmp_path):
    from tests.conftest import micro_config
    from xcoder_jax.activations import extract
    from xcoder_jax.analysis import run_analysis
    from xcoder_jax.train import train_and_evaluate

    c = micro_config(micro_pair)
    c.crosscoder.d_model, c.crosscoder.n_latents = 16, 64
    c.train.steps, c.train.batch_size, c.train.lr = 40, 64, 1e-2
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 20
    c.analysis.splice_docs = 0
    c.analysis.base_only_max, c.analysis.distilled_only_min = 0.45, 0.55  # both sides occur
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    extract(c, ours)
    train_and_evaluate(c, ours)
    original = run_analysis(c, ours, progress=False)
    out = str(tmp_path / "dl")
    formats.convert_export(wd.export_dir(ours), "dictionary_learning", out, c)
    os.makedirs(theirs)
    os.symlink(os.path.abspath(wd.activations_dir(ours)), wd.activations_dir(theirs))
    formats.import_crosscoder(out, "dictionary_learning", theirs)
    imported = run_analysis(c, theirs, progress=False)

    def lines(workdir):
        with open(os.path.join(wd.stage_dir(workdir, "analysis"), "latents.jsonl")) as f:
            return [json.loads(line) for line in f]

    a, b = lines(ours), lines(theirs)
    assert len(a) == len(b) == 64
    classes = [x["class"] for x in a]
    assert len(set(classes)) > 1  # the bands split the latents: classes can differ
    assert [x["class"] for x in b] == classes
    assert [x["categories"] for x in b] == [x["categories"] for x in a]
    # Stored to 5 decimals after a float32 round trip: one unit of the last place.
    np.testing.assert_allclose([x["nrn"] for x in b], [x["nrn"] for x in a], rtol=0, atol=2e-5)
    dnd = np.array([x["dec_norm_diff"] for x in a])
    np.testing.assert_allclose([x["dec_norm_diff"] for x in b], dnd, rtol=0, atol=2e-5)
    for key in ("n_base_only", "n_shared", "n_distilled_only"):
        assert imported[key] == original[key]
    assert imported["mean_nrn"] == pytest.approx(original["mean_nrn"], abs=1e-5)
    _assert_close(imported["categories"], original["categories"])
    # The two conventions point opposite ways: the most distilled latent by NRN is the
    # least base by dec_norm_diff.
    nrn = np.array([x["nrn"] for x in a])
    assert np.argmax(nrn) == np.argmin(dnd) and np.argmin(nrn) == np.argmax(dnd)
