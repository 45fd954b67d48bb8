"""Writing our export in the other formats: `convert_export` for one, `write_formats` for
the config's list (the pipeline's step after training)."""

from __future__ import annotations

import os

from xcoder_jax import export, stage
from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError
from xcoder_jax.formats import ckkissane, common, dictionary_learning, saelens
from xcoder_jax.formats.common import FormatError

NAMES = ("dictionary_learning", "ckkissane", "saelens")


def convert_export(export_dir: str, fmt: str, out_dir: str, config) -> dict:
    """Writes the export in `export_dir` as format `fmt` into `out_dir`; returns the sidecar.

    config: the run's config (BatchTopK's k, the training settings ckkissane's cfg.json
    records, the context size and data SAELens's records). FormatError when the format
    cannot hold this crosscoder.
    """
    if fmt not in NAMES:
        raise ConfigError(f"unknown crosscoder format {fmt!r} ({', '.join(NAMES)})")
    tensors, export_config = export.load_export(export_dir, "numpy")
    facts = common.sidecar(export_config, fmt)
    # Which export it was converted from, by content: a later step skips an unchanged one.
    facts["export_sha256"] = _export_sha(export_dir)
    if fmt == "saelens":
        raw = common.raw_view(tensors, export_config)
        saelens.write(out_dir, raw, facts, _saelens_run(config))
        return facts
    view = common.normalised_view(tensors, export_config)
    if fmt == "dictionary_learning":
        dictionary_learning.write(out_dir, view, facts, int(config.crosscoder.k))
    else:
        tc, cc = config.train, config.crosscoder
        train = {
            "seed": config.seed,
            "batch_size": tc.batch_size,
            "lr": tc.lr,
            "l1_coeff": cc.l1_coeff,
            "beta1": tc.beta1,
            "beta2": tc.beta2,
            "dec_init_norm": cc.dec_init_norm,
            "seq_len": config.data.max_tokens,
        }
        ckkissane.write(out_dir, view, facts, train)
    return facts


def _saelens_run(config) -> dict:
    """What SAELens's metadata records of the training data: sequence length and sources."""
    sources = [s.get("name") or s.get("path") or s.get("kind") for s in config.data.sources]
    return {
        "context_size": config.data.max_tokens,
        "dataset_path": ", ".join(str(x) for x in sources if x) or None,
    }


def _export_sha(export_dir: str) -> dict:
    return {
        n: stage.file_sha(os.path.join(export_dir, n))
        for n in (export.EXPORT_WEIGHTS, export.EXPORT_CONFIG)
    }


def write_formats(config, workdir: str) -> dict[str, str]:
    """Writes <workdir>/export/<format>/ for every format in `config.export.formats`.

    A format already written from the same export is left alone; one that cannot hold this
    crosscoder (ckkissane for BatchTopK) is skipped with its reason. Returns {format:
    "written" | "up to date" | "skipped: <reason>"}.
    """
    export_dir = wd.export_dir(workdir)
    out = {}
    for fmt in config.export.formats:
        directory = wd.format_dir(workdir, fmt)
        old = common.read_sidecar(directory)
        if old is not None and old.get("export_sha256") == stage.canonical(_export_sha(export_dir)):
            out[fmt] = "up to date"
            continue
        try:
            convert_export(export_dir, fmt, directory, config)
            out[fmt] = "written"
        except FormatError as e:
            out[fmt] = f"skipped: {e}"
    return out
