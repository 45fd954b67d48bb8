"""The Python API refuses misuse with one-line errors (a model in the other model's slot, a
model of neither, a slot or latent set that cannot be used), still works when used right, and
every atomic writer gives its file the mode a plain open() would."""

from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from xcoder_jax import export, fileio, site, steering
from xcoder_jax import workdir as wd
from xcoder_jax.activations import manifest as mf
from xcoder_jax.activations.models import weights_fingerprint
from xcoder_jax.errors import UsageError, XcoderError
from xcoder_jax.exported import ExportedCrosscoder

H, LAYER = 8, 1
SLOTS = "slots 0 (base) and 1 (distilled)"


def _export(directory, d: int, models: list[dict]) -> ExportedCrosscoder:
    rng = np.random.default_rng(0)
    weights = {
        "W_enc": rng.normal(size=(2, d, H)).astype(np.float32) * 0.3,
        "b_enc": np.zeros(H, np.float32),
        "W_dec": rng.normal(size=(H, 2, d)).astype(np.float32) * 0.3,
        "b_dec": np.zeros((2, d), np.float32),
    }
    meta = {"layer": LAYER, "d_model": d, "n_latents": H, "models": models}
    export.export(str(directory), weights, np.array([1.0, 2.0]), meta)
    return ExportedCrosscoder.load(str(directory))


@pytest.fixture(scope="module")
def pair(micro_pair):
    models = [AutoModelForCausalLM.from_pretrained(micro_pair[r]).eval() for r in wd.ROLES]
    tok = AutoTokenizer.from_pretrained(micro_pair["base"])
    ids = tok(["Question: Tom has 3 apples. Wait, let me check."], return_tensors="pt")
    return models, ids["input_ids"]


@pytest.fixture(scope="module")
def xcoder(micro_pair, tmp_path_factory):
    """An export recording the micro pair's models as the extraction does."""
    models = [
        {"role": r, "source": micro_pair[r], "revision": None}
        | {"weights": weights_fingerprint(micro_pair[r], None)}
        for r in wd.ROLES
    ]
    return _export(tmp_path_factory.mktemp("export"), 16, models)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _no_hooks(model):
    return all(not b._forward_pre_hooks for b in site.decoder_layers(model))


def _short(path):
    return weights_fingerprint(path, None)[:12]


# --- The model must be the one of its slot ---------------------------------------------------


def test_each_model_in_the_other_slot_is_refused(pair, xcoder):
    (base, distilled), _ = pair
    for model, slot, msg in [
        (distilled, 0, "this model is the export's distilled model (slot 1), not slot 0 (base); "
                       "pass model_index=1 if it is the model you mean to steer"),
        (base, 1, "this model is the export's base model (slot 0), not slot 1 (distilled); "
                  "pass model_index=0 if it is the model you mean to steer"),
    ]:  # fmt: skip
        with (
            pytest.raises(export.ExportError) as e,
            steering.steer(model, xcoder, [2], 0.5, model_index=slot),
        ):
            pass
        assert str(e.value) == msg and isinstance(e.value, XcoderError)
        assert _no_hooks(model)


def test_the_right_slot_steers_by_the_models_own_row(pair, xcoder):
    (base, distilled), ids = pair
    for m, model in enumerate((base, distilled)):
        clean = _logits(model, ids)
        row = xcoder.W_dec[2, m]
        expected = 0.5 * xcoder.mean_norms[m] * row / row.norm()
        with steering.steer(model, xcoder, [2], 0.5, model_index=m) as vector:
            steered = _logits(model, ids)
        torch.testing.assert_close(vector, expected, rtol=1e-6, atol=1e-7)
        with steering.add_at_site(model, LAYER, expected):  # the same push, by hand
            torch.testing.assert_close(steered, _logits(model, ids), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(steered, clean) and _no_hooks(model)


def test_a_model_of_neither_slot_is_refused_unless_asked_for(micro_pair, pair, xcoder):
    (base, _), ids = pair
    other = AutoModelForCausalLM.from_pretrained(micro_pair["other"]).eval()
    msg = (
        f"the model matches neither model of the export (it is weights sha256 "
        f"{_short(micro_pair['other'])}; the export was trained on slot 0 (base) weights sha256 "
        f"{_short(micro_pair['base'])}, slot 1 (distilled) weights sha256 "
        f"{_short(micro_pair['distilled'])}); pass check_model=False to use another model on "
        "purpose"
    )
    with (
        pytest.raises(export.ExportError) as e,
        steering.steer(other, xcoder, [2], 0.5, model_index=0),
    ):
        pass
    assert str(e.value) == msg and _no_hooks(other)
    # A model built in memory has no files to compare.
    cfg = Qwen2Config(**{k: v for k, v in base.config.to_dict().items() if k != "_name_or_path"})
    cfg.name_or_path = ""
    fresh = Qwen2ForCausalLM(cfg).eval()
    with (
        pytest.raises(export.ExportError) as e,
        steering.steer(fresh, xcoder, [2], 0.5, model_index=0),
    ):
        pass
    assert str(e.value).startswith(
        "the model matches neither model of the export (it was not loaded from a model "
        "directory or hub id, so it cannot be compared with the models the export records; "
    )
    # The opt-out: the export's direction for slot 0, added to the other model.
    clean = _logits(other, ids)
    with steering.steer(other, xcoder, [2], 0.5, model_index=0, check_model=False) as vector:
        steered = _logits(other, ids)
    torch.testing.assert_close(vector, xcoder.steering_vector([2], 0, 0.5))
    assert not torch.allclose(steered, clean)
    assert torch.equal(_logits(other, ids), clean) and _no_hooks(other)


def test_ablate_needs_the_pair_in_slot_order(pair, xcoder):
    (base, distilled), ids = pair
    with pytest.raises(export.ExportError) as e:
        with steering.ablate([distilled, base], 1, xcoder, [0], input_ids=ids):
            pass
    assert str(e.value) == (
        "models[0] is the export's distilled model (slot 1), not slot 0 (base); pass the models "
        "in slot order (base, distilled)"
    )
    with pytest.raises(UsageError) as e, steering.ablate([base], 0, xcoder, [0], input_ids=ids):
        pass
    assert str(e.value) == f"ablate needs the export's 2 models in slot order ({SLOTS}), got 1"
    assert _no_hooks(base) and _no_hooks(distilled)
    # In order: the delta is f(x) W_dec[S, target] at the pair's own block-L inputs.
    x = steering.site_inputs([base, distilled], LAYER, ids)
    with steering.ablate([base, distilled], 1, xcoder, [0, 3], input_ids=ids) as delta:
        pass
    expected = xcoder.latent_acts(x, [0, 3]) @ xcoder.W_dec[[0, 3], 1]
    assert expected.abs().max() > 0
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    # The opt-out lets the swapped pair through (its f is then the caller's business).
    with steering.ablate([distilled, base], 1, xcoder, [0], input_ids=ids, check_model=False):
        pass


def test_exports_without_recorded_models_are_not_checked(pair, tmp_path):
    (_, distilled), ids = pair
    xc = _export(tmp_path, 16, [{"role": "base"}, {"role": "distilled"}])
    assert xc.model_fingerprints() is None
    with steering.steer(distilled, xc, [2], 0.5, model_index=0) as vector:
        pass
    torch.testing.assert_close(vector, xc.steering_vector([2], 0, 0.5))


def test_models_read_from_the_hub_are_recognised_by_their_id(tmp_path):
    models = [
        {"role": "base", "source": "org/base", "revision": None, "weights": "org/base@default"},
        {"role": "distilled", "source": "org/r1", "revision": "v2", "weights": "org/r1@v2"},
    ]
    xc = _export(tmp_path, 16, models)
    hub_model = SimpleNamespace(name_or_path="org/r1")
    xc.check_identity(hub_model, 1)
    with pytest.raises(export.ExportError) as e:
        xc.check_identity(hub_model, 0)
    assert str(e.value) == "this model is the export's distilled model (slot 1), not slot 0 (base)"
    with pytest.raises(export.ExportError, match=r"neither model of the export \(it is org/r2; "):
        xc.check_identity(SimpleNamespace(name_or_path="org/r2"), 1)


# --- Slots and latent sets -------------------------------------------------------------------


def test_a_slot_the_export_does_not_have(pair, xcoder):
    (base, distilled), ids = pair
    x = torch.zeros(3, 2, 16)
    for bad in (2, -1):
        calls = [
            lambda i: steering.steer(base, xcoder, [0], 1.0, model_index=i).__enter__(),
            lambda i: steering.ablate([base, distilled], i, xcoder, [0], input_ids=ids).__enter__(),
            lambda i: xcoder.steering_vector([0], i, 1.0),
            lambda i: xcoder.ablation_delta(x, [0], i),
        ]
        for call in calls:
            with pytest.raises(UsageError) as e:
                call(bad)
            assert str(e.value) == f"model_index {bad} is out of range: the export has {SLOTS}"
            assert isinstance(e.value, ValueError)
    with pytest.raises(UsageError) as e:
        xcoder.steering_vector([0], "base", 1.0)
    assert str(e.value) == f"model_index must be a slot number, got 'base': the export has {SLOTS}"
    assert _no_hooks(base) and _no_hooks(distilled)
    # A NumPy integer is a slot number.
    torch.testing.assert_close(
        xcoder.steering_vector([0], np.int64(1), 1.0), xcoder.steering_vector([0], 1, 1.0)
    )


def test_an_empty_latent_set_is_refused(pair, xcoder):
    (base, distilled), ids = pair
    msg = "no latents given: pass at least one latent id"
    with pytest.raises(UsageError) as e, steering.steer(base, xcoder, [], 1.0, model_index=0):
        pass
    assert str(e.value) == msg and _no_hooks(base)
    with pytest.raises(UsageError) as e:
        xcoder.steering_vector([], 1, 1.0)
    assert str(e.value) == msg
    with pytest.raises(UsageError, match="latents must be a list of latent ids, got 3"):
        xcoder.steering_vector(3, 1, 1.0)
    with (
        pytest.raises(UsageError) as e,
        steering.ablate([base, distilled], 1, xcoder, [], input_ids=ids),
    ):
        pass
    assert str(e.value) == msg and _no_hooks(distilled)


# --- File modes ------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_every_atomic_writer_gives_the_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert fileio.current_umask() == umask
        want = 0o666 & ~umask
        tensors = {"a": np.ones(3, np.float32)}
        # A temporary file a crashed run left behind, with another mode, does not keep it.
        stale = tmp_path / f"b.bin.tmp{os.getpid()}"
        stale.write_bytes(b"old")
        stale.chmod(0o600)
        fileio.atomic_write_path(str(tmp_path / "a.safetensors"), lambda p: save_file(tensors, p))
        fileio.atomic_write_bytes(str(tmp_path / "b.bin"), lambda f: f.write(b"xyz"))
        fileio.atomic_write_json(str(tmp_path / "c.json"), {"x": 1})
        mf.save_array(str(tmp_path / "d.npy"), np.arange(4))
        mf.write_shard_log(str(tmp_path), [{"rows": 1}])
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        export_dir = tmp_path / "export"
        _export(export_dir, 4, [])
        written = [*tmp_path.iterdir(), *export_dir.iterdir()]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written if p.is_file()}
        assert modes == {
            "a.safetensors": want,
            "b.bin": want,
            "c.json": want,
            "d.npy": want,
            mf.SHARD_LOG: want,
            "plain.txt": want,
            export.EXPORT_WEIGHTS: want,
            export.EXPORT_CONFIG: want,
        }
        assert (tmp_path / "b.bin").read_bytes() == b"xyz"
        assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}
    finally:
        os.umask(old)


def test_the_umask_is_read_without_proc_too(monkeypatch):
    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(fileio, "open", no_proc, raising=False)
        assert fileio.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(old)
