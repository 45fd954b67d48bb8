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
