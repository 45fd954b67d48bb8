"""The edges: launch scripts report known errors as one line, the error classes share one base,
the package's public names resolve without loading JAX or torch, bench commands are right.

The launch scripts run in subprocesses into errors raised before any heavy work (an empty
workdir, a bad config value), so none of them builds the zoo or trains.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import xcoder_jax
from xcoder_jax import errors, launch_util

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "launch").glob("*.py"))

# One absl log line (Python or C++ absl): "W0101 12:00:00.123456  1234 file.py:12] message".
# Python warnings are turned off in the child (PYTHONWARNINGS=ignore), so every other
# non-empty stderr line is the script's own output.
LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(PYTHONWARNINGS="ignore", OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / f"{script}.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, expected: str) -> str:
    """Exit status 1; stderr's only line that is not an absl log line is `error: ...`
    (containing `expected`), and it is stderr's last non-empty line."""
    assert proc.returncode == 1, proc.stderr
    own = [line for line in proc.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(own) == 1, proc.stderr
    assert own[0].startswith("error: ") and expected in own[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == own[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    return own[0]


# --- Every launch script: a known error is one line ---------------------------------------

# script -> (extra flags, what the error line says); each error is raised before heavy work.
EARLY_ERRORS = {
    "train": ((), "no activation store at"),
    "analyze": ((), "no activation store at"),
    "steer": ((), "no activation store at"),
    "ablate": ((), "no activation store at"),
    "geometry": ((), "no zoo in"),
    "extract": ((), "build the zoo first"),
    "convert": (("--to=ckkissane",), "export file missing"),
    "build_zoo": (("--config.zoo.main_size=7",), "zoo.main_size=7 is not one of zoo.sizes"),
    "pipeline": (("--config.zoo.main_size=7",), "zoo.main_size=7 is not one of zoo.sizes"),
    "replicate": (("--config.zoo.main_size=7",), "zoo.main_size=7 is not one of zoo.sizes"),
    "variants": ((), "--store is required"),
}


def test_every_launch_script_is_covered():
    assert sorted(EARLY_ERRORS) == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_reports_known_error_as_one_line(script, tmp_path):
    extra, expected = EARLY_ERRORS[script]
    workdir = tmp_path / "run"
    workdir.mkdir()
    proc = run_script(script, "--config=configs/tiny.py", f"--workdir={workdir}", *extra)
    assert_one_error_line(proc, expected)


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_runs_through_run_main(script):
    """Every script hands its main to launch_util.run_main (which owns --traceback)."""
    source = (ROOT / "launch" / f"{script}.py").read_text()
    assert "launch_util.run_main(main)" in source
    assert "app.run(" not in source


def test_traceback_flag_shows_the_traceback(tmp_path):
    proc = run_script("train", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--traceback")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("xcoder_jax.activations.manifest.StoreError: no activation store at")
    assert not any(line.startswith("error: ") for line in proc.stderr.splitlines())


def test_unknown_loss_is_one_line_before_any_training(tmp_path):
    from tests.conftest import synthetic_store

    synthetic_store(str(tmp_path / "activations"), n_rows=1024, d=32, shard_rows=256)
    proc = run_script(
        "train",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path}",
        "--config.crosscoder.d_model=32",
        "--config.crosscoder.loss=nope",
    )
    line = assert_one_error_line(proc, "crosscoder.loss = 'nope'")
    kinds = ", ".join(f"'{k}'" for k in ("l1", "batchtopk", "matryoshka"))
    assert line == f"error: crosscoder.loss = 'nope': must be one of {kinds}"
    assert sorted(os.listdir(tmp_path)) == ["activations"]  # no checkpoint, no metrics


def test_bad_config_argument_is_one_line(tmp_path):
    """Raised while absl parses --config (ml_collections wraps it); reported the same way."""
    proc = run_script("train", "--config=configs/paper.py:13b", f"--workdir={tmp_path}")
    line = assert_one_error_line(proc, "configs/paper.py needs one of 1.5b, 7b, 14b")
    assert line.endswith("got '13b'")


def test_missing_config_file_is_one_line(tmp_path):
    proc = run_script("train", "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert_one_error_line(proc, "--config: cannot read the config file 'configs/nope.py'")


def test_other_flag_errors_keep_absl_report(tmp_path):
    proc = run_script("train", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--bogus")
    assert proc.returncode == 1
    assert "FATAL Flags parsing error: Unknown command line flag 'bogus'" in proc.stderr
    assert "error: " not in proc.stderr.replace("parsing error: ", "")


# --- The helper, in-process ---------------------------------------------------------------


def test_one_line_joins_a_multiline_message():
    e = errors.ConfigError("first line\n  second line\n\n")
    assert launch_util.one_line(e) == "error: first line second line"
    assert launch_util.one_line(errors.XcoderError()) == "error: XcoderError"


@pytest.mark.parametrize(
    "argv, on",
    [
        ([], False),
        (["--traceback"], True),
        (["--traceback", "--notraceback"], False),
        (["--traceback=false"], False),
        (["--traceback=true"], True),
        (["--", "--traceback"], False),
    ],
)
def test_traceback_requested(argv, on):
    assert launch_util._traceback_requested(["prog", *argv]) is on


def test_known_cause_finds_the_innermost_project_error():
    try:
        try:
            raise errors.ConfigError("inner")
        except ValueError as e:
            raise ValueError("wrapped") from e
    except ValueError as outer:
        assert str(launch_util._known_cause(outer)) == "inner"
    assert launch_util._known_cause(RuntimeError("bug")) is None


# --- Error classes -------------------------------------------------------------------------


def _error_classes():
    from xcoder_jax import ablation, export, pipeline, replicate, selection, train
    from xcoder_jax.activations import manifest, models
    from xcoder_jax.activations.budget import DiskBudgetError
    from xcoder_jax.analysis import splice
    from xcoder_jax.formats import FormatError
    from xcoder_jax.geometry import relations

    return [
        (manifest.StoreError, ValueError),
        (models.PairError, ValueError),
        (train.TrainingError, RuntimeError),
        (export.ExportError, ValueError),
        (splice.SpliceError, ValueError),
        (ablation.AblationError, ValueError),
        (selection.TooFewLatents, ValueError),
        (relations.RelationError, ValueError),
        (pipeline.PipelineError, RuntimeError),
        (replicate.ReplicationError, RuntimeError),
        (replicate.StaleResultError, RuntimeError),
        (errors.ConfigError, ValueError),
        (errors.UsageError, ValueError),
        (errors.MissingInputError, FileNotFoundError),
        (FormatError, ValueError),
        (DiskBudgetError, OSError),
    ]


def test_error_classes_keep_their_base_and_share_one():
    """Each is an XcoderError and still the built-in class `except` clauses catch it as."""
    for cls, base in _error_classes():
        assert issubclass(cls, errors.XcoderError) and issubclass(cls, base), cls
    with pytest.raises(FileNotFoundError):
        raise errors.MissingInputError("no zoo")
    assert errors.MissingInputError("no zoo").errno is None  # not mistaken for a disk error


def test_every_error_class_of_the_library_is_a_project_error():
    """Any `class ...Error` defined in xcoder_jax derives from XcoderError."""
    defined = set()
    for path in (ROOT / "xcoder_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and re.search(r"Error$|^TooFew", node.name):
                defined.add(node.name)
    checked = {cls.__name__ for cls, _ in _error_classes()} | {"XcoderError"}
    assert defined == checked


# --- The package's public names ------------------------------------------------------------


@pytest.mark.parametrize("name", xcoder_jax.__all__)
def test_public_name_resolves(name):
    assert getattr(xcoder_jax, name) is not None
    assert name in dir(xcoder_jax)


def test_public_names_are_the_entry_points():
    from xcoder_jax import pipeline, steering, train

    assert xcoder_jax.train_and_evaluate is train.train_and_evaluate
    assert xcoder_jax.run_steering is steering.run_steering
    assert xcoder_jax.pipeline is pipeline
    with pytest.raises(AttributeError):
        xcoder_jax.no_such_name  # noqa: B018


def test_import_loads_neither_jax_nor_torch():
    code = "import sys, xcoder_jax; print(sorted({m.split('.')[0] for m in sys.modules}))"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    loaded = ast.literal_eval(out.stdout.strip())
    assert not {"jax", "torch", "numpy", "absl", "ml_collections"} & set(loaded), loaded


# --- bench/ --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("[!_]*.py")), ids=lambda p: p.stem)
def test_bench_docstring_commands_run_the_module(path):
    """Each command in a bench docstring is `python -m bench.<that file>` (run from the repo
    root, which makes `configs` and `tests` importable); `python bench/x.py` would not be."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    commands = [line.split("#")[0].split() for line in doc.splitlines() if "python" in line]
    commands = [c for c in commands if c and c[0] == "python"]
    assert commands, doc
    for c in commands:
        assert c[1:3] == ["-m", f"bench.{path.stem}"], c
    assert importlib.util.find_spec(f"bench.{path.stem}") is not None
