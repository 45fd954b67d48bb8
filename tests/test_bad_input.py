"""Bad input a first-time user gives: each one is a single `error:` line with exit status 1,
raised before any work, and leaves no partial output behind.

Config values and overrides are checked in subprocesses of the launch scripts (the way a user
meets them); a damaged export and damaged store rows are checked on a small trained workdir.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import synthetic_store, train_config
from tests.test_launch import assert_one_error_line, run_script
from xcoder_jax import config_check, export, inputs, train
from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError, MissingInputError

TINY = "--config=configs/tiny.py"


def _files(directory) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(r, f), directory)
        for r, _, fs in os.walk(directory)
        for f in fs
    )


# --- Config overrides and values: one line, nothing written --------------------------------

OVERRIDES = {
    "--config.train.stepz=5": (
        "error: --config.train.stepz: train has no field 'stepz' (did you mean 'steps'?)"
    ),
    "--config.trian.steps=5": (
        "error: --config.trian.steps: the config has no section 'trian' (did you mean 'train'?)"
    ),
    "--config.train.steps=abc": (
        "error: --config.train.steps=abc: train.steps takes a value of type int "
        "(its default is 1500)"
    ),
    "--config.train.steps=0": "error: train.steps = 0: must be an integer >= 1",
    "--config.crosscoder.n_latents=0": "error: crosscoder.n_latents = 0: must be an integer >= 1",
    "--config.train.batch_size=-1": "error: train.batch_size = -1: must be an integer >= 1",
    "--config.models.base=/nonexistent": ("error: models.base = '/nonexistent': no such directory"),
}


@pytest.mark.parametrize("override", sorted(OVERRIDES))
def test_a_bad_override_is_one_line_and_writes_nothing(override, tmp_path):
    workdir = tmp_path / "run"
    synthetic_store(str(workdir / "activations"), n_rows=1024, d=32, shard_rows=256)
    before = _files(workdir)
    proc = run_script("train", TINY, f"--workdir={workdir}", override)
    line = assert_one_error_line(proc, OVERRIDES[override].removeprefix("error: "))
    assert line == OVERRIDES[override]
    assert _files(workdir) == before  # no checkpoint, no metrics, no export


def test_a_hub_id_offline_fails_at_once(tmp_path, monkeypatch):
    """Not a local directory, not in the hub cache, the hub unreachable: no retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    proc = run_script("analyze", TINY, f"--workdir={tmp_path}", "--config.models.base=org/model")
    line = assert_one_error_line(proc, "models.base = 'org/model'")
    assert line == (
        "error: models.base = 'org/model': not a local directory nor in the local hub cache, "
        "and the hub cannot be reached (HF_HUB_OFFLINE is set); download it where the hub is "
        "reachable and pass its path"
    )


def test_an_unwritable_workdir_is_refused_before_any_work(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system
        workdir = "/sys/kernel"
        if not os.path.isdir(workdir) or os.access(workdir, os.W_OK) and _writable(workdir):
            pytest.skip("no read-only directory to test with")
    else:
        workdir = str(tmp_path / "ro")
        os.makedirs(workdir)
        os.chmod(workdir, 0o555)
    for script in ("analyze", "steer"):
        proc = run_script(script, TINY, f"--workdir={workdir}")
        line = assert_one_error_line(proc, f"cannot write in the workdir {workdir}")
        assert line.endswith("; choose a writable --workdir")


def _writable(directory: str) -> bool:
    try:
        with open(os.path.join(directory, ".probe"), "w"):
            pass
    except OSError:
        return False
    os.remove(os.path.join(directory, ".probe"))
    return True


# --- The validation pass itself ------------------------------------------------------------


def test_every_project_config_is_valid():
    from configs import paper, tiny

    for config in (
        tiny.get_config(),
        tiny.get_config("runlocal"),
        tiny.get_config("batchtopk"),
        tiny.get_config("matryoshka,runlocal"),
        paper.get_config("1.5b"),
        paper.get_config("14b,batchtopk,runlocal"),
        paper.get_config("7b,dryrun"),
    ):
        assert config_check.problems(config) == []


def test_every_problem_is_named_with_its_range():
    from configs import tiny

    c = tiny.get_config()
    c.train.lr, c.train.beta2, c.crosscoder.loss = 0.0, 1.0, "topk"
    c.ablation.fracs, c.steering.models, c.data.max_docs = (0.5, 1.5), ("teacher",), 0
    found = config_check.problems(c)
    assert found == [
        "data.max_docs = 0: must be an integer >= 1, or -1 (all)",
        "crosscoder.loss = 'topk': must be one of 'l1', 'batchtopk', 'matryoshka'",
        "train.lr = 0.0: must be a number in (0, inf]",
        "train.beta2 = 1.0: must be a number in [0, 1)",
        "steering.models = ('teacher',): must be a list of one of 'base', 'distilled'",
        "ablation.fracs = (0.5, 1.5): must be a list of a number in (0, 1]",
    ]
    with pytest.raises(ConfigError) as err:
        config_check.check(c)
    assert "\n" not in str(err.value) and str(err.value).count("; ") == len(found) - 1


def test_fields_that_must_agree():
    from configs import tiny

    c = tiny.get_config("batchtopk")
    c.crosscoder.k = 2000  # more than the 1024 latents
    assert config_check.problems(c) == [
        "crosscoder.k = 2000: must be <= crosscoder.n_latents (1024)"
    ]
    c = tiny.get_config()
    c.analysis.base_only_max, c.ablation.headline_frac = 0.95, 0.3
    c.steering.alphas = (-0.4, 0.4)
    assert config_check.problems(c) == [
        "analysis.base_only_max = 0.95: must be below analysis.distilled_only_min (0.9)",
        "ablation.headline_frac = 0.3: must be one of ablation.fracs (0.5, 0.2, 0.1)",
        "steering.alphas: must include 0 (the clean model each alpha is paired with)",
    ]
    c = tiny.get_config()
    c.zoo.main_size = 7  # the zoo's own structural check, run in the same pass
    assert config_check.problems(c) == ["zoo.main_size=7 is not one of zoo.sizes=(32, 48, 64, 96)"]
    c.models.base = c.models.distilled = "/models/x"  # a real pair does not build the zoo
    assert config_check.problems(c) == []


def test_missing_files_are_named(tmp_path):
    from configs import tiny

    c = tiny.get_config()
    model = tmp_path / "not_a_model"
    model.mkdir()
    c.models.base, c.models.distilled = str(model), str(tmp_path / "absent")
    c.data.sources[0].kind, c.data.sources[0].path = "jsonl", str(tmp_path / "*.jsonl")
    c.steering.prompts = str(tmp_path / "prompts.jsonl")
    c.geometry.relation_files = (str(tmp_path / "antonyms.json"),)
    assert inputs.problems(c) == [
        f"models.base = '{model}': the directory holds no config.json (not a saved model)",
        f"models.distilled = '{tmp_path / 'absent'}': no such directory",
        f"data.sources[0].path: no data files match '{tmp_path / '*.jsonl'}'",
        f"steering.prompts = '{tmp_path / 'prompts.jsonl'}': no such file",
        f"geometry.relation_files = '{tmp_path / 'antonyms.json'}': no such file",
    ]
    with pytest.raises(MissingInputError):
        inputs.check(c)


# --- A damaged export, damaged store rows ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained"))
    synthetic_store(wd.activations_dir(workdir), n_rows=2048, shard_rows=512)
    train.train_and_evaluate(train_config(steps=20), workdir)
    return workdir


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_export_is_named_and_a_rerun_repairs_it(trained, tmp_path, damage):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    weights = os.path.join(wd.export_dir(workdir), export.EXPORT_WEIGHTS)
    original = open(weights, "rb").read()
    if damage == "truncate":  # as `truncate -s 50%`
        os.truncate(weights, len(original) // 2)
    else:  # one byte of tensor data: the header still reads
        data = bytearray(original)
        data[-5] ^= 0xFF
        open(weights, "wb").write(bytes(data))
    with pytest.raises(export.ExportError) as err:
        export.load_export(wd.export_dir(workdir))
    why = "does not match its recorded sha256"
    assert str(err.value) == (
        f"the export at {wd.export_dir(workdir)} is damaged ({export.EXPORT_WEIGHTS} {why}): "
        "rerun training (launch/train.py or launch/pipeline.py) to write it again from the "
        "last checkpoint"
    )
    # The stage after training meets it in one line, before computing anything.
    proc = run_script("analyze", TINY, f"--workdir={workdir}", "--config.crosscoder.d_model=32")
    assert_one_error_line(proc, f"the export at {wd.export_dir(workdir)} is damaged")
    # Training counts a damaged export as not done and writes it again, bit for bit.
    train.train_and_evaluate(train_config(steps=20), workdir)
    assert open(weights, "rb").read() == original
    export.load_export(wd.export_dir(workdir))


def test_an_export_written_elsewhere_is_checked_for_completeness(trained, tmp_path):
    """Without a recorded hash (exports made by other tools), a truncated file still fails."""
    directory = str(tmp_path / "export")
    shutil.copytree(wd.export_dir(trained), directory)
    cpath = os.path.join(directory, export.EXPORT_CONFIG)
    config = json.load(open(cpath))
    del config[export.WEIGHTS_SHA256]
    json.dump(config, open(cpath, "w"))
    tensors, _ = export.load_export(directory)  # intact: reads
    assert tensors["W_dec"].shape == (train_config().crosscoder.n_latents, 2, 32)
    weights = os.path.join(directory, export.EXPORT_WEIGHTS)
    size = os.path.getsize(weights)
    os.truncate(weights, size - 10)
    with pytest.raises(export.ExportError, match=rf"holds {size - 10} bytes, its header {size}"):
        export.load_export(directory)


def test_nonfinite_rows_are_caught_without_verifying_the_store(tmp_path):
    """Rows damaged after the store was written (its manifest counted none), read with
    verify_store off: `nonfinite_rows="error"` still stops at the first such batch."""
    workdir = str(tmp_path / "nan")
    directory = wd.activations_dir(workdir)
    synthetic_store(directory, nan_rows=[5, 700])
    path = os.path.join(directory, "manifest.json")
    manifest = json.load(open(path))
    manifest["nonfinite_rows"] = 0
    json.dump(manifest, open(path, "w"))
    with pytest.raises(train.TrainingError, match="rows of the store hold NaN/inf"):
        train.train_and_evaluate(train_config(steps=60, verify_store=False), workdir)
    assert not os.path.exists(wd.export_dir(workdir))


def test_a_nonfinite_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    """No "checkpoint (step None)": the message says that none was saved yet."""
    from xcoder_jax import sharding

    workdir = str(tmp_path / "early")
    synthetic_store(wd.activations_dir(workdir), n_rows=2048, shard_rows=512)
    real = sharding.ShardedStep.to_device

    def overflowing(self, batch, weights, *rest):  # finite rows whose squares overflow
        return real(self, batch * np.float32(1e30), weights, *rest)

    monkeypatch.setattr(sharding.ShardedStep, "to_device", overflowing)
    with pytest.raises(train.TrainingError) as err:
        train.train_and_evaluate(train_config(checkpoint_every=5, log_every=5), workdir)
    assert str(err.value) == (
        "non-finite loss at step 1; training stopped: no checkpoint was saved before it"
    )
    assert not os.path.exists(wd.export_dir(workdir))
