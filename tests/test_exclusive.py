"""Dedicated latents (`crosscoder.exclusive`): the masked rows are exact zeros through
training (every loss kind and path), Adam, checkpoints and the export; without them the step
is the one it was; the analysis reports structural exclusives apart from learned ones."""

from __future__ import annotations

import copy
import functools
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from tests.conftest import CORPUS, make_tokenizer, synthetic_store, train_config
from xcoder_jax import checkpoint as ckpt
from xcoder_jax import config_check, export, formats, sharding, train
from xcoder_jax import exclusive as excl
from xcoder_jax import train_step as ts
from xcoder_jax import workdir as wd
from xcoder_jax.analysis import scaling
from xcoder_jax.analysis.report import render_html
from xcoder_jax.analysis.summary import analyze
from xcoder_jax.config_rules import RULES
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.formats import common
from xcoder_jax.stage_inputs import load_inputs

H, D, B = 64, 8, 32
FRACTIONS = (0.125, 0.25)  # 8 base-only latents [40, 48), 16 distilled-only [48, 64)
BASE_ONLY, DISTILLED_ONLY = slice(40, 48), slice(48, 64)
CASES = [
    ("l1", "auto"),
    ("batchtopk", "dense"),
    ("batchtopk", "sparse"),
    ("matryoshka", "dense"),
    ("matryoshka", "sparse"),
]


def _config(kind="l1", path="auto", fractions=FRACTIONS):
    c = train_config()
    c.crosscoder.loss, c.crosscoder.k, c.crosscoder.n_latents = kind, 4, H
    c.crosscoder.topk_path = path
    c.crosscoder.dead_window_tokens = B  # latents die within the run: AuxK runs too
    c.crosscoder.exclusive = fractions
    return c


def _batches(steps: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(steps, B, 2, D)).astype(np.float32)


@functools.cache
def _run(kind: str, path: str, steps: int = 3):
    """(hp, first state, state after `steps` jitted steps, max AuxK term over the steps)."""
    hp = ts.HParams.from_config(_config(kind, path), D, [1.0, 1.0])
    step = jax.jit(functools.partial(ts.train_step, hp=hp))
    first = state = ts.init_state(hp)
    aux = 0.0
    for x in _batches(steps):
        state, metrics = step(state, x, np.ones(B, np.float32))
        aux = max(aux, float(metrics["aux_loss"]))
    return hp, jax.device_get(first), jax.device_get(state), aux


def _masked(tree, h: int = H, n=(8, 16)) -> np.ndarray:
    """The entries of a params-like tree (W_enc [2, d, h], W_dec [h, 2, d]) that the
    dedicated latents may not use, concatenated."""
    r = excl.ranges(h, n)
    (b0, b1), (d0, d1) = r["base_only"], r["distilled_only"]
    enc, dec = np.asarray(tree["W_enc"][...]), np.asarray(tree["W_dec"][...])
    parts = [enc[1, :, b0:b1], enc[0, :, d0:d1], dec[b0:b1, 1], dec[d0:d1, 0]]
    return np.concatenate([p.ravel() for p in parts])


def _free(tree, h: int = H, n=(8, 16)) -> dict[str, np.ndarray]:
    """The entries they may use: the shared latents' and each dedicated side's own slot."""
    r = excl.ranges(h, n)
    (b0, b1), (d0, d1) = r["base_only"], r["distilled_only"]
    dec = np.asarray(tree["W_dec"][...])
    return {"shared": dec[:b0], "base_only": dec[b0:b1, 0], "distilled_only": dec[d0:d1, 1]}


def test_counts_layout_and_mask():
    hp = ts.HParams.from_config(_config(), D, [1.0, 1.0])
    assert hp.exclusive == (8, 16)
    assert excl.ranges(H, hp.exclusive) == {"base_only": (40, 48), "distilled_only": (48, 64)}
    model = Crosscoder(2, D, H, rngs=nnx.Rngs(0), exclusive=hp.exclusive)
    expected = np.ones((H, 2), np.float32)
    expected[BASE_ONLY, 1] = expected[DISTILLED_ONLY, 0] = 0.0
    np.testing.assert_array_equal(np.asarray(model.model_mask()), expected)
    norms = np.asarray(model.decoder_norms())
    assert (norms[expected == 0] == 0.0).all() and (norms[expected == 1] > 0).all()
    with pytest.raises(ValueError, match="2 models"):
        Crosscoder(3, D, H, rngs=nnx.Rngs(0), exclusive=(1, 1))
    with pytest.raises(ValueError, match="do not fit"):
        Crosscoder(2, D, 4, rngs=nnx.Rngs(0), exclusive=(3, 2))


@pytest.mark.parametrize("kind, path", CASES)
def test_masked_entries_stay_exactly_zero_and_the_rest_trains(kind, path):
    hp, first, state, aux = _run(kind, path)
    if kind != "l1":
        assert hp.loss.sparse == (path == "sparse")
        assert aux > 0  # AuxK ran: its gradient is masked too
    # Structural zeros: exact, at init, after the steps, and in both Adam moments.
    assert (_masked(first["params"]) == 0.0).all()
    assert (_masked(state["params"]) == 0.0).all()
    adam = state["opt_state"][1][0]
    for moment in (adam.mu, adam.nu):
        assert (_masked(moment) == 0.0).all()
    # Everything else trains (finite: a zero row's norm has no gradient to give), the shared
    # latents and each dedicated latent's own slot.
    assert int(state["first_bad_step"]) == -1
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state))
    before, after = _free(first["params"]), _free(state["params"])
    for part in before:
        assert (before[part] != after[part]).any(), part
    assert (adam.nu["W_enc"][...] != 0).any()


def test_without_exclusives_the_step_is_the_one_without_the_mask(monkeypatch):
    """exclusive = (0, 0): the same init as a Crosscoder built without the argument, and the
    same step, bit for bit, as a crosscoder that reads its weights unmasked."""
    hp = ts.HParams.from_config(_config("l1", "auto", (0.0, 0.0)), D, [1.0, 1.0])
    assert hp.exclusive == (0, 0)

    class Unmasked(Crosscoder):
        def enc_weight(self):
            return self.W_enc[...]

        def dec_weight(self):
            return self.W_dec[...]

    def unmasked_model(hp, seed):
        dtype = ts.COMPUTE_DTYPES[hp.dtype]
        init = hp.dec_init_norm
        return Unmasked(
            2, hp.d_model, hp.n_latents, rngs=nnx.Rngs(seed), dec_init_norm=init, dtype=dtype
        )

    plain = Crosscoder(2, D, H, rngs=nnx.Rngs(hp.seed), dec_init_norm=hp.dec_init_norm)
    x, w = _batches(1), np.ones(B, np.float32)
    runs = []
    for model_fn in (ts._model, unmasked_model):
        monkeypatch.setattr(ts, "_model", model_fn)
        ts.graphdef.cache_clear()
        try:
            state = ts.init_state(hp)
            step = jax.jit(functools.partial(ts.train_step, hp=hp))
            for xb in x:
                state, _ = step(state, xb, w)
            runs.append((ts.init_state(hp), jax.device_get(state)))
        finally:
            ts.graphdef.cache_clear()
    (init_a, a), (_, b) = runs
    _, plain_params, _ = nnx.split(plain, nnx.Param, ...)
    bits = lambda t: [np.asarray(v).tobytes() for v in jax.tree.leaves(t)]
    assert bits(init_a["params"]) == bits(plain_params)
    assert bits(a) == bits(b)


# --- Training end to end: checkpoint, export, analysis ---------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A centred run on a small synthetic store with dedicated latents: 16 base-only
    [80, 96) and 32 distilled-only [96, 128) of 128 (every step logged: one compilation)."""
    w = str(tmp_path_factory.mktemp("exclusive_run"))
    synthetic_store(wd.activations_dir(w), n_rows=1024, shard_rows=256)
    c = train_config(steps=4, log_every=1, eval_every=4, checkpoint_every=2)
    c.crosscoder.center = True  # the export folds the mean into the biases
    c.crosscoder.exclusive = FRACTIONS
    train.train_and_evaluate(c, w)
    return c, w


def test_checkpoint_and_export_hold_the_zeros(trained):
    c, w = trained
    n = (16, 32)
    ranges = {"base_only": [80, 96], "distilled_only": [96, 128]}
    with open(os.path.join(wd.export_dir(w), export.EXPORT_CONFIG)) as f:
        config = json.load(f)
    assert config["exclusive"] == ranges
    tensors = load_file(os.path.join(wd.export_dir(w), export.EXPORT_WEIGHTS))
    assert (_masked(tensors, 128, n) == 0.0).all()
    assert all((v != 0).any() for v in _free(tensors, 128, n).values())
    xc = ExportedCrosscoder.load(wd.export_dir(w))
    assert xc.exclusive == {k: tuple(v) for k, v in ranges.items()}
    module, _ = export.load_export(wd.export_dir(w), "jax")
    assert module.exclusive == n
    # The last checkpoint, restored as training restores it.
    hp = ts.HParams.from_config(c, 32, [1.0, 1.0], np.zeros((2, 32)))
    mngr = ckpt.manager(w, c.train.checkpoint_every, c.train.keep_checkpoints)
    abstract = sharding.ShardedStep(hp, sharding.make_mesh(1, 1, 64, 128)).abstract_state()
    store_rows = 1024
    state, _, _ = ckpt.restore(mngr, mngr.latest_step(), abstract, store_rows)
    mngr.close()
    assert int(state["step"]) == 4
    state = jax.device_get(state)
    assert (_masked(state["params"], 128, n) == 0.0).all()
    adam = state["opt_state"][1][0]
    for moment in (adam.mu, adam.nu):
        assert (_masked(moment, 128, n) == 0.0).all()


def test_conversions_carry_the_ranges(trained, tmp_path):
    """Every other format keeps the ranges in its sidecar, and an import records them again."""
    c, w = trained
    ranges = {"base_only": [80, 96], "distilled_only": [96, 128]}
    for fmt in sorted(formats.FORMATS):
        out = str(tmp_path / fmt)
        facts = formats.convert_export(wd.export_dir(w), fmt, out, c)
        assert facts["exclusive"] == ranges == common.read_sidecar(out)["exclusive"]
        workdir = str(tmp_path / f"imported_{fmt}")
        os.makedirs(workdir)
        os.symlink(wd.activations_dir(w), wd.activations_dir(workdir))
        assert formats.import_crosscoder(out, fmt, workdir)["exclusive"] == ranges
        xc = ExportedCrosscoder.load(wd.export_dir(workdir))
        assert xc.exclusive == {k: tuple(v) for k, v in ranges.items()}
        tensors, _ = export.load_export(wd.export_dir(workdir))
        assert (_masked(tensors, 128, (16, 32)) == 0.0).all()


def test_export_ranges_must_be_the_documented_layout():
    good = {"base_only": [40, 48], "distilled_only": [48, 64]}
    expected = {"base_only": (40, 48), "distilled_only": (48, 64)}
    assert excl.from_export({"n_latents": H, "exclusive": good}) == expected
    assert excl.from_export({"exclusive": good}) == expected  # n_latents: the last range's end
    assert excl.export_counts({"exclusive": good}, H) == (8, 16)
    one_side = {"base_only": [60, 60], "distilled_only": [60, 64]}  # as `record` writes it
    assert excl.export_counts({"exclusive": one_side}, H) == (0, 4)
    bad = [
        ({"base_only": [40, 48], "distilled_only": [48, 64]}, 128, "of the export's 128"),
        ({"base_only": [56, 64], "distilled_only": [40, 56]}, H, "base-only then distilled-only"),
        ({"base_only": [30, 40], "distilled_only": [48, 64]}, H, r"\(38, 48\)"),
        ({"base_only": [0, 40], "distilled_only": [40, 70]}, H, r"\(40, 30\) do not fit"),
        ({"base_only": [40, 48]}, H, "must map"),
        ({"base_only": [40], "distilled_only": [48, 64]}, H, "must map"),
    ]  # fmt: skip
    for found, h, match in bad:
        with pytest.raises(export.ExportError, match=match):
            excl.from_export({"exclusive": found}, h)
    tensors = {"W_enc": np.zeros((2, 4, 6)), "b_enc": np.zeros(6),
               "W_dec": np.zeros((6, 2, 4)), "b_dec": np.zeros((2, 4))}  # fmt: skip
    with pytest.raises(export.ExportError, match="last latents"):
        ExportedCrosscoder(tensors, {"exclusive": {"base_only": [2, 3], "distilled_only": [3, 5]}})


def test_export_without_exclusives_records_none(tmp_path):
    assert excl.record(64, (0, 0)) == {}
    assert excl.from_export({}) is None and excl.export_counts({}) == (0, 0)
    xc = ExportedCrosscoder({"W_enc": np.zeros((2, 4, 6)), "b_enc": np.zeros(6),
                             "W_dec": np.zeros((6, 2, 4)), "b_dec": np.zeros((2, 4))})  # fmt: skip
    assert xc.exclusive is None
    assert excl.structural_classes(6, None).tolist() == [1] * 6


def test_analysis_marks_structural_apart_from_learned(trained, tmp_path):
    c, w = trained
    ac = copy.deepcopy(c.analysis)
    ac.scaling_min_rows = 1  # a short run: few held-out firing rows per latent
    inputs = load_inputs(c, w)
    path = str(tmp_path / "latents.jsonl")
    result = analyze(inputs.store, inputs.xcoder, ac, heldout=inputs.heldout,
                     tokenizer=make_tokenizer(CORPUS), latents_path=path,
                     progress=False)  # fmt: skip
    s = result.summary
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    side = ["base_only"] * 16 + ["distilled_only"] * 32
    assert [ln["structural"] for ln in lines] == [None] * 80 + side
    ex = s["exclusive"]
    assert ex["structural"] == {"base_only": 16, "distilled_only": 32}
    for k in ("base_only", "distilled_only"):
        free = [ln for ln in lines if ln["structural"] is None]
        assert ex["learned"][k] == sum(ln["class"] == k for ln in free)
        held = [ln for ln in lines if ln["structural"] == k]
        assert ex["structural_alive"][k] == sum(ln["class"] != "dead" for ln in held)
        # One decoder row is exactly 0: NRN 0 or 1, the band of its side.
        assert {ln["nrn"] for ln in held} == {0.0 if k == "base_only" else 1.0}
        assert s[f"n_{k}"] >= ex["structural_alive"][k]  # existing counts: every latent
    # Latent scaling runs on both kinds, each side split into structural and learned.
    ls = s["latent_scaling"]
    for k in ("base_only", "distilled_only"):
        st, le = ls[k]["structural"], ls[k]["learned"]
        assert st["n_latents"] == ex["structural"][k] and st["n_selected"] == st["n_latents"]
        assert st["n_latents"] + le["n_latents"] == ls[k]["n_latents"]
        assert st["n_fitted"] > 0
    fitted = {ln["id"]: ln["scaling"] for ln in lines if ln["scaling"] is not None}
    assert all(sc["structural"] == (i >= 80) for i, sc in fitted.items())
    page = render_html({**s, "splice": {"skipped": "test"}}, result.kept, {})
    assert "structural base-only / distilled-only</td><td>16 / 32" in page
    assert "learned base-only / distilled-only" in page


def test_scaling_budget_is_split_between_structural_and_learned():
    # Base side: two structural (NRN 0) and two learned; distilled side: one of each.
    nrn = np.array([0.0, 0.0, 0.05, 0.02, 1.0, 0.97, 0.5])
    structural = np.array([1, 1, 0, 0, 1, 0, 0], bool)
    bands = np.array([0, 0, 0, 0, 2, 2, 1])
    ids, owner = scaling.select_latents(nrn, bands, 4, base=0, distilled=1, structural=structural)
    assert ids.tolist() == [0, 3, 4, 5] and owner.tolist() == [0, 0, 1, 1]
    # Without dedicated latents, the selection of before.
    for mask in (None, np.zeros(7, bool)):
        got = scaling.select_latents(nrn, bands, 3, base=0, distilled=1, structural=mask)
        assert got[0].tolist() == [0, 4, 5]


@pytest.mark.parametrize(
    "value",
    [(0.6, 0.5), (-0.1, 0.0), (1.0, 0.0), (0.1,), (0.1, 0.1, 0.1), (True, False), "ab",
     (0.1, float("nan"))],
)  # fmt: skip
def test_config_rule_refuses_bad_fractions(value):
    rule = RULES["crosscoder.exclusive"]
    assert not rule.ok(value)
    assert rule.accepted == "a pair (base-only, distilled-only) of numbers in [0, 1) summing to < 1"


def test_config_accepts_fractions_and_needs_two_models():
    rule = RULES["crosscoder.exclusive"]
    assert rule.ok((0.0, 0.0)) and rule.ok((0.25, 0.5)) and rule.ok([0, 0.1])
    c = _config()
    assert config_check._relations(c) == []
    c.crosscoder.n_models = 3  # refused on its own; the relation says why for exclusive too
    assert any("need crosscoder.n_models = 2" in p for p in config_check._relations(c))
    c.crosscoder.exclusive = (0.0, 0.0)
    assert config_check._relations(c) == []


def test_config_refuses_counts_that_round_away_or_leave_nothing_shared():
    c = _config(fractions=(0.005, 0.25))  # 0.005 * 64 = 0.32: no base-only latent
    assert config_check.problems(c) == [
        "crosscoder.exclusive = (0.005, 0.25): the base_only share 0.005 of crosscoder.n_latents "
        "(64) rounds to 0 latents (a share of 1/64 or more makes at least 1)"
    ]
    c = _config(fractions=(0.5, 0.495))  # 32 + 32 of 64, though the shares sum to < 1
    assert config_check.problems(c) == [
        "crosscoder.exclusive = (0.5, 0.495): 32 base-only + 32 distilled-only of "
        "crosscoder.n_latents (64) leave no shared latent (at least 1 must remain)"
    ]
    assert config_check.problems(_config(fractions=(0.0, 1 / 64))) == []


def test_config_refuses_an_anneal_as_long_as_the_run():
    c = _config("batchtopk")
    c.crosscoder.k_anneal_steps = c.train.steps  # k would never reach crosscoder.k
    assert config_check.problems(c) == [
        f"crosscoder.k_anneal_steps = {c.train.steps}: must be < train.steps "
        f"({c.train.steps}) so that k reaches crosscoder.k (0: no annealing)"
    ]
    c.crosscoder.k_anneal_steps = c.train.steps - 1
    assert config_check.problems(c) == []
    c.crosscoder.loss, c.crosscoder.k_anneal_steps = "l1", c.train.steps  # l1 has no k
    assert config_check.problems(c) == []


def test_project_configs_have_none():
    from configs import pair, paper, tiny

    for c in (tiny.get_config(), paper.get_config("1.5b"), pair.get_config("")):
        assert tuple(c.crosscoder.exclusive) == (0.0, 0.0)
