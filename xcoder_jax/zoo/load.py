"""Reading a built zoo back (`load_pair`): its base and distilled models and tokenizer."""

from __future__ import annotations

import json
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from xcoder_jax import workdir as wd
from xcoder_jax.errors import MissingInputError


def load_pair(workdir: str, size: int | None = None):
    """(base_model, distilled_model, tokenizer) of the zoo in `workdir`, via the Auto classes.

    `size` None (or the main size) gives the main pair at models/{base,distilled}.
    """
    main = wd.model_dir(workdir, "base")
    report_path = wd.zoo_report_path(workdir)
    if size is not None and os.path.exists(report_path):
        with open(report_path) as f:
            if json.load(f).get("main_size") == size:
                size = None
    dirs = {role: wd.model_dir(workdir, role, size) for role in wd.ROLES}
    if not all(os.path.isdir(d) for d in dirs.values()):
        raise MissingInputError(f"no zoo pair at {dirs['base']} (main pair: {main})")
    base = AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    distilled = AutoModelForCausalLM.from_pretrained(dirs["distilled"]).eval()
    return base, distilled, AutoTokenizer.from_pretrained(dirs["base"])
