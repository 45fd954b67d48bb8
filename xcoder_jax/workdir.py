"""The workdir layout: the one place that names every path a stage reads or writes.

A workdir holds the embedded model pair (when the zoo is used), the activation store,
checkpoints, the portable export and the outputs of every analysis stage. Stages never
build paths by hand; they ask this module.
"""

from __future__ import annotations

import os

from xcoder_jax.errors import ConfigError

ROLES = ("base", "distilled")  # the pair a crosscoder is trained on
# Every model the zoo builds per size: the pair, the sham-distilled base (same steps on the
# replay and concise solutions, no traces) and the base distilled on the no-loop teacher (the
# negative-control pair's distilled model; main size only).
ARMS = (*ROLES, "sham", "no_loop")


def models_dir(workdir: str) -> str:
    return os.path.join(workdir, "models")


def model_dir(workdir: str, role: str, size: int | None = None) -> str:
    """Where the zoo saves one of its models (`role` one of `ARMS`).

    The main size (size None) lives in `models/{role}`; other sizes of the zoo, used by the
    geometry study, live in `models/h{size}/{role}`.
    """
    if role not in ARMS:
        raise ConfigError(f"unknown model role {role!r}; expected one of {ARMS}")
    if size is None:
        return os.path.join(models_dir(workdir), role)
    return os.path.join(models_dir(workdir), f"h{size}", role)


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(models_dir(workdir), "tokenizer")


def zoo_data_dir(workdir: str) -> str:
    """The zoo's corpus files (JSONL), written next to the models that learned from them."""
    return os.path.join(models_dir(workdir), "data")


def zoo_report_path(workdir: str) -> str:
    return os.path.join(models_dir(workdir), "zoo.json")


def activations_dir(workdir: str) -> str:
    return os.path.join(workdir, "activations")


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def export_dir(workdir: str) -> str:
    return os.path.join(workdir, "export")


def format_dir(workdir: str, fmt: str) -> str:
    """The export written in another crosscoder format (`xcoder_jax.formats`)."""
    return os.path.join(export_dir(workdir), fmt)


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, "metrics.jsonl")


def control_pair_dir(workdir: str) -> str:
    """The negative-control pair's own workdir (`control_pair`): its store, crosscoder,
    analysis and steering, beside the main pair's."""
    return os.path.join(workdir, "no_loop")


def stage_dir(workdir: str, stage: str) -> str:
    """`analysis/`, `steering/`, `ablation/` or `geometry/`."""
    return os.path.join(workdir, stage)


def study_report_path(workdir: str) -> str:
    """report.html: the whole study on one page (`study_report`), linking each stage's
    figures and the feature browser relative to the workdir."""
    return os.path.join(workdir, "report.html")
