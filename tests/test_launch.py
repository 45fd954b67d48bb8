"""The project's error classes share one base, and keep the built-in class they had."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from xcoder_jax import errors

ROOT = Path(__file__).resolve().parents[1]


# --- Error classes -------------------------------------------------------------------------


def _error_classes():
    from xcoder_jax import checkpoint, pipeline, replicate, train
    from xcoder_jax.activations import manifest, models
    from xcoder_jax.analysis import splice
    from xcoder_jax.geometry import relations
    from xcoder_jax.steering import ablation, common

    return [
        (manifest.StoreError, ValueError),
        (models.PairError, ValueError),
        (train.TrainingError, RuntimeError),
        (checkpoint.ExportError, ValueError),
        (splice.SpliceError, ValueError),
        (ablation.AblationError, ValueError),
        (common.TooFewLatents, ValueError),
        (relations.RelationError, ValueError),
        (pipeline.PipelineError, RuntimeError),
        (replicate.ReplicationError, RuntimeError),
        (errors.ConfigError, ValueError),
        (errors.MissingInputError, FileNotFoundError),
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
