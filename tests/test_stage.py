"""The stage runner: skip-if-done on content, one atomic commit with the results last."""

from __future__ import annotations

import json
import os

import pytest

from xcoder_jax import stage


def _write(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)

    return write


def test_commit_then_done_returns_the_results(tmp_path):
    fp = {"format": 1, "sizes": (32, 64)}  # a tuple reads back as a list
    results = {"fingerprint": fp, "value": 0.5}
    out = stage.commit(str(tmp_path), "results.json", results, {"a.txt": _write("hello")})
    assert out == {"fingerprint": {"format": 1, "sizes": [32, 64]}, "value": 0.5}
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "results.json"]  # no temporary left
    assert stage.done(str(tmp_path), "results.json", fp, ["a.txt"]) == out
    assert stage.done(str(tmp_path), "results.json", {**fp, "format": 2}, ["a.txt"]) is None


def test_done_needs_every_output(tmp_path):
    fp = {"format": 1}
    stage.commit(str(tmp_path), "results.json", {"fingerprint": fp}, {"a.png": _write("x")})
    os.remove(tmp_path / "a.png")
    assert stage.done(str(tmp_path), "results.json", fp, ["a.png"]) is None


def test_nan_results_write_nothing(tmp_path):
    with pytest.raises(ValueError):
        stage.commit(str(tmp_path), "results.json", {"x": float("nan")}, {"a.txt": _write("y")})
    assert not os.path.exists(tmp_path / "a.txt") and not os.path.exists(tmp_path / "results.json")


def test_a_failing_output_leaves_no_results_and_no_temporary(tmp_path):
    def fail(path):
        with open(path, "w") as f:
            f.write("partial")
        raise RuntimeError("draw failed")

    with pytest.raises(RuntimeError):
        stage.commit(str(tmp_path), "results.json", {"fingerprint": {}}, {"b.png": fail})
    assert os.listdir(tmp_path) == []


def test_writers_get_a_temporary_path_with_the_output_extension(tmp_path):
    seen = []
    stage.commit(
        str(tmp_path), "r.json", {}, {"fig.png": lambda p: seen.append(p) or _write("")(p)}
    )
    assert seen[0].endswith(".png") and seen[0] != str(tmp_path / "fig.png")
    assert json.loads((tmp_path / "r.json").read_text()) == {}


def test_digest_depends_on_content_only():
    assert stage.digest({"a": 1, "b": [1, 2]}) == stage.digest({"b": [1, 2], "a": 1})
    assert stage.digest({"a": 1}) != stage.digest({"a": 2})


def test_an_interrupted_rerun_never_leaves_old_results_beside_new_outputs(tmp_path):
    """A commit under fingerprint A, then a run under B that dies after replacing one output:
    asking again with A must not find A's results beside B's output."""
    d = str(tmp_path)
    a, b = {"run": "A"}, {"run": "B"}
    stage.commit(d, "r.json", {"fingerprint": a}, {"1.txt": _write("A"), "2.txt": _write("A")})
    assert stage.done(d, "r.json", b, ["1.txt", "2.txt"]) is None  # B is about to run

    def die(path):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        stage.commit(d, "r.json", {"fingerprint": b}, {"1.txt": _write("B"), "2.txt": die})
    assert (tmp_path / "1.txt").read_text() == "B"
    assert stage.done(d, "r.json", a, ["1.txt", "2.txt"]) is None


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        stage.commit(str(tmp_path), "r.json", {}, {"x.png": lambda p: None})
    assert os.listdir(tmp_path) == []
