"""The negative-control pair: the zoo's main base with the same base distilled on the no-loop
teacher (`zoo.control_teacher`), studied like the main pair in its own workdir.

Its distilled model learned at most one reflection per trace, in one fixed order, so nothing in
it can loop: steering its self-reflection set is predicted NOT to lengthen traces or add rounds
as the loop pair's does (`family`: the loop pair's effect minus this pair's). Both pairs share
the base, the extraction documents, the held-out prompts and every setting of the run; their
distilled models differ in the teacher whose traces they learned (and so in where their own
held-out loss plateaued).

    config_for(config, workdir)  # the run's config, pointed at this pair; its stages write
                                 # into workdir.control_pair_dir(workdir)
"""

from __future__ import annotations

import copy
import os

from xcoder_jax import workdir as wd

STAGES = ("extract", "train", "analyze", "steer")  # what the family reads needs no more


def applies(config) -> bool:
    """A run of the zoo that builds a trained no-loop arm."""
    zoo = "zoo" in (config.models.base, config.models.distilled)
    zc = config.zoo
    return zoo and bool(zc.control_teacher) and not zc.get("random_pair", False)


def config_for(config, workdir: str):
    """`config` with the pair set to the zoo's main base and no-loop distilled models (local
    directories), the zoo's extraction documents and held-out prompts, no extra export
    formats, and only the steered sets the family compares across pairs. Paths are absolute,
    so the sub-run's fingerprints name the files it read."""
    c = copy.deepcopy(config)
    root = os.path.abspath(workdir)
    c.models.base = wd.model_dir(root, "base")
    c.models.distilled = wd.model_dir(root, "no_loop")
    data = wd.zoo_data_dir(root)
    for source in c.data.sources:
        if source.kind == "zoo":
            source.kind, source.path = "jsonl", os.path.join(data, "extract.jsonl")
    if not c.steering.prompts:
        c.steering.prompts = os.path.join(data, "heldout.jsonl")
    c.export.formats = ()
    # Only the sets the family compares across the two pairs (`family`, "steering_no_loop").
    from xcoder_jax.family import FAMILY

    specs = {f.minus[1][1] for f in FAMILY if f.minus and f.minus[0] == "steering_no_loop"}
    c.steering.latents = tuple(s for s in config.steering.latents if s in specs) or tuple(
        config.steering.latents
    )
    return c
