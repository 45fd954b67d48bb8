"""Reading a built zoo back: its pair (`load_pair`) or any one of its models (`load_model`)."""

from __future__ import annotations

import json
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from xcoder_jax import workdir as wd
from xcoder_jax.errors import MissingInputError


def _size_key(workdir: str, size: int | None) -> int | None:
    """None for the main size (models/{role}), else the size (models/h{size}/{role})."""
    report_path = wd.zoo_report_path(workdir)
    if size is not None and os.path.exists(report_path):
        with open(report_path) as f:
            if json.load(f).get("main_size") == size:
                return None
    return size


def model_path(workdir: str, role: str, size: int | None = None) -> str | None:
    """The directory of one zoo model (`role` one of `workdir.ARMS`), None if not built."""
    path = wd.model_dir(workdir, role, _size_key(workdir, size))
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def load_model(workdir: str, role: str, size: int | None = None):
    """One zoo model in eval mode; MissingInputError when it was not built."""
    path = model_path(workdir, role, size)
    if path is None:
        where = wd.model_dir(workdir, role, _size_key(workdir, size))
        raise MissingInputError(f"no zoo model at {where}: build the zoo first")
    return AutoModelForCausalLM.from_pretrained(path).eval()


def load_pair(workdir: str, size: int | None = None):
    """(base_model, distilled_model, tokenizer) of the zoo in `workdir`, via the Auto classes.

    `size` None (or the main size) gives the main pair at models/{base,distilled}.
    """
    base, distilled = (load_model(workdir, role, size) for role in wd.ROLES)
    return base, distilled, AutoTokenizer.from_pretrained(model_path(workdir, "base", size))
