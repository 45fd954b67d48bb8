"""The main job end to end on a micro zoo: every stage runs, outputs agree, reruns skip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.conftest import micro_pipeline_config, strict_loads
from xcoder_jax import pipeline
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.zoo.training import depth


def _end_to_end_config():
    return micro_pipeline_config()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    config = _end_to_end_config()
    summary = pipeline.run(config, workdir)
    return config, workdir, summary


def test_every_stage_ran_and_outputs_agree(run):
    config, workdir, summary = run
    assert list(summary) == [name for name, _ in pipeline.STAGES]
    store = ActivationStore(wd.activations_dir(workdir))
    tok = AutoTokenizer.from_pretrained(wd.model_dir(workdir, "base"))
    with open(os.path.join(wd.zoo_data_dir(workdir), "extract.jsonl")) as f:
        docs = [json.loads(line)["text"] for line in f]
    lengths = [min(len(tok(t)["input_ids"]), config.data.max_tokens) for t in docs]
    assert store.n_rows == sum(n - 1 for n in lengths if n >= 2)
    main_depth = depth(config.zoo, config.zoo.main_size)
    assert store.layer == main_depth // 2 and store.d_model == config.zoo.main_size
    exported = json.load(open(os.path.join(wd.export_dir(workdir), "config.json")))
    assert exported["tokens_trained"] == 30 * 64
    train_rows = store.n_rows - store.shards[-1]["rows"]
    assert 0 < exported["distinct_tokens_trained"] <= min(train_rows, 30 * 64)
    assert all(np.isfinite(exported["eval"]["fve"]))


def test_rerun_skips_complete_stages(run):
    config, workdir, _ = run
    watched = [
        os.path.join(wd.activations_dir(workdir), "manifest.json"),
        os.path.join(wd.export_dir(workdir), "crosscoder.safetensors"),
        wd.zoo_report_path(workdir),
    ]
    before = [os.path.getmtime(p) for p in watched]
    pipeline.run(config, workdir)
    assert [os.path.getmtime(p) for p in watched] == before


def test_the_summary_fits_one_screen_and_a_rerun_says_skipped(run):
    config, workdir, summary = run
    first = pipeline.summary_lines(workdir, summary)
    assert len(first) <= 12 and max(map(len, first)) <= 120, first
    assert list(summary) == [name for name, _ in pipeline.STAGES]
    assert not any(line.startswith("skipped (done)") for line in summary.values())
    again = pipeline.run(config, workdir)
    assert list(again) == list(summary)  # the same stages in the same order
    for name, line in again.items():
        assert line.startswith("skipped"), (name, line)
        if name != "report" and not summary[name].startswith("skipped"):
            # the same headline, read back from disk: same figures, same order
            fresh = summary[name]
            kept = line.removeprefix("skipped (done); ").removesuffix(" ...")
            assert fresh.startswith(kept), (fresh, line)
    rerun = pipeline.summary_lines(workdir, again)
    assert len(rerun) <= 12 and max(map(len, rerun)) <= 120, rerun


def test_every_file_the_pipeline_writes_has_one_mode(run):
    """The mode a plain open() gives under the umask: weights included (their writers create
    them 0600), whichever stage or library wrote them."""
    import stat

    from xcoder_jax import fileio

    _, workdir, _ = run
    modes = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            modes.setdefault(stat.S_IMODE(os.stat(path).st_mode), []).append(path)
    assert set(modes) == {fileio.file_mode()}, {oct(m): p[:3] for m, p in modes.items()}


def test_a_second_pipeline_on_the_same_workdir_is_refused(run):
    config, workdir, _ = run
    with pipeline.workdir_lock(workdir):
        with pytest.raises(pipeline.PipelineError, match=f"pid {os.getpid()}.*running on"):
            pipeline.run(config, workdir)
    pipeline.run(config, workdir)  # released: runs (and skips every complete stage)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(pipeline.PipelineError, match="cannot write to workdir"):
        pipeline.run(_end_to_end_config(), str(blocker / "run"))


def test_full_disk_names_the_stage(tmp_path, monkeypatch):
    import errno

    def full(config, workdir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "STAGES", [("extract", full)])
    with pytest.raises(pipeline.PipelineError, match="stage extract: the disk holding .* is full"):
        pipeline.run(_end_to_end_config(), str(tmp_path))


def test_the_python_example_runs(run, capsys):
    """docs/formats.md's "Using the export from Python" block, run as written here."""
    import re

    _, workdir, _ = run
    root = os.path.dirname(os.path.dirname(__file__))
    page = open(os.path.join(root, "docs", "formats.md")).read()
    section = page.split("## Using the export from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'workdir = "runs/tiny"' in code
    namespace = {}
    exec(code.replace('workdir = "runs/tiny"', f"workdir = {workdir!r}"), namespace)
    assert namespace["tensors"]["W_dec"].shape == (64, 2, 32)
    assert namespace["out"].shape[1] > namespace["ids"].shape[1]
    layer = namespace["config"]["layer"]
    assert not namespace["model"].model.layers[layer]._forward_pre_hooks  # hook removed
    assert "block 1 trained on" in capsys.readouterr().out


def test_every_json_file_the_pipeline_writes_is_strict(run):
    """No NaN or Infinity anywhere: a statistic that cannot be computed is null."""
    _, workdir, _ = run

    checked = 0
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".json"):
                with open(path) as f:
                    strict_loads(f.read())
                checked += 1
            elif name.endswith(".jsonl"):
                with open(path) as f:
                    for line in f:
                        strict_loads(line)
                checked += 1
    stages = ("analysis", "steering", "ablation", "geometry", "export")
    assert checked >= 10 and all(
        os.path.exists(os.path.join(workdir, s, n))
        for s, n in zip(stages, ["summary.json", *["results.json"] * 3, "config.json"])
    )


def test_a_moved_workdir_skips_every_stage(run, tmp_path):
    """Fingerprints identify content, not where the workdir lives: a copy elsewhere, named
    with a different spelling, reruns nothing of the main pair. (The no-loop pair's config
    names the zoo's models by absolute path, so its outputs are not portable: the copy leaves
    them out and the run redoes them.)"""
    import shutil

    config, workdir, _ = run
    moved = tmp_path / "elsewhere"
    ignore = shutil.ignore_patterns(pipeline.LOCK_FILE, os.path.basename(wd.control_pair_dir("")))
    shutil.copytree(workdir, moved, ignore=ignore)
    outputs = [
        os.path.join(wd.activations_dir(str(moved)), "manifest.json"),
        os.path.join(wd.export_dir(str(moved)), "crosscoder.safetensors"),
        *(os.path.join(str(moved), s, f) for s, f in (("analysis", "summary.json"),
          ("steering", "results.json"), ("ablation", "results.json"),
          ("geometry", "results.json"))),
    ]  # fmt: skip
    before = [os.path.getmtime(p) for p in outputs]
    pipeline.run(config, os.path.join(str(tmp_path), ".", "elsewhere"))  # another spelling
    assert [os.path.getmtime(p) for p in outputs] == before


def _analysis_fingerprint(config, workdir):
    from xcoder_jax.analysis import run as analysis_run

    return analysis_run.fingerprint(config, workdir, ActivationStore(wd.activations_dir(workdir)))


def _steering_fingerprint(config, workdir):
    from xcoder_jax.steering import sweep

    return sweep.fingerprint(config, workdir)


def _ablation_fingerprint(config, workdir):
    from xcoder_jax.ablation import experiment

    return experiment.fingerprint(config, workdir)


# stage: (its fingerprint, a field it reads, one that changes only how, one it never reads)
FINGERPRINTS = {
    "analyze": (
        _analysis_fingerprint,
        ("analysis.firing_share", 0.2),
        ("analysis.batch_rows", 7),
        ("steering.alphas", (0.0, 0.1)),
    ),
    "steer": (
        _steering_fingerprint,
        ("steering.temperature", 0.5),
        ("steering.batch_size", 3),
        ("ablation.n_random", 3),
    ),
    "ablate": (
        _ablation_fingerprint,
        ("selection.max_controls", 50),
        ("ablation.batch_size", 3),
        ("analysis.top_latents", 3),
    ),
}


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_a_stage_reruns_for_the_fields_it_reads_only(run, name):
    """A field the stage reads changes its fingerprint (so `stage.done` reruns it); a field
    that changes only how it computes, or one it never reads, does not. The stages read the
    config only through their declared fields (`params`), so no read field can be missing."""
    config, workdir, _ = run
    fingerprint, what, how, unread = FINGERPRINTS[name]
    stored = {
        "analyze": "analysis/summary.json",
        "steer": "steering/results.json",
        "ablate": "ablation/results.json",
    }[name]
    with open(os.path.join(workdir, stored)) as f:
        on_disk = json.load(f)["fingerprint"]
    assert fingerprint(config, workdir) == on_disk  # the finished stage would be skipped
    for (path, value), same in ((what, False), (how, True), (unread, True)):
        c = config.copy_and_resolve_references()
        section, field = path.split(".")
        c[section][field] = value
        assert (fingerprint(c, workdir) == on_disk) is same, path
