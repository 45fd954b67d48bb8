"""What importing a module loads, each checked in a fresh interpreter.

The export is read without JAX: the torch end (`exported`, steering), the export's own
module and the stage runner load neither JAX nor Orbax, and the base layer of file writes
loads nothing outside the standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JAX_SIDE = {"jax", "jaxlib", "orbax", "flax"}


def loaded_by(statement: str) -> set[str]:
    """The top-level packages in sys.modules after running `statement` in a new process."""
    code = (
        "import json, sys\n"
        f"{statement}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "module",
    [
        "xcoder_jax.export",
        "xcoder_jax.exported",
        "xcoder_jax.stage",
        "xcoder_jax.steering.hooks",
        "xcoder_jax.steering",
        "xcoder_jax.nrn",
    ],
)
def test_reading_the_export_loads_neither_jax_nor_orbax(module):
    assert not JAX_SIDE & loaded_by(f"import {module}")


def test_the_public_load_export_is_the_export_modules_and_needs_no_jax():
    statement = (
        "import xcoder_jax, xcoder_jax.export as e\nassert xcoder_jax.load_export is e.load_export"
    )
    assert not JAX_SIDE & loaded_by(statement)


def test_the_base_layer_needs_only_the_standard_library():
    loaded = loaded_by("import xcoder_jax.fileio")
    assert not {"numpy", "torch", "safetensors", "ml_dtypes"} & loaded, loaded
