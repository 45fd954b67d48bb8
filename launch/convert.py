r"""Converts a crosscoder between our export and other formats.

    # our export -> export/<format>/ (dictionary_learning, ckkissane)
    python launch/convert.py --config=configs/tiny.py --workdir=runs/tiny \
        --to=dictionary_learning,ckkissane
    # a crosscoder trained elsewhere -> <workdir>/export/, checked against the workdir's store
    python launch/convert.py --config=configs/tiny.py --workdir=runs/other \
        --from_format=dictionary_learning --path=/data/their_crosscoder [--scales=store]

After an import, launch/analyze.py, steer.py and ablate.py run on the imported crosscoder.
"""

from absl import flags
from ml_collections import config_flags

from xcoder_jax import formats, launch_util
from xcoder_jax import workdir as wd

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_TO = flags.DEFINE_list("to", [], "Formats to write the workdir's export in.")
_FROM = flags.DEFINE_enum("from_format", None, sorted(formats.FORMATS), "Format to import.")
_PATH = flags.DEFINE_string("path", None, "Directory of the crosscoder to import.")
_SCALES = flags.DEFINE_enum(
    "scales",
    "file",
    formats.SCALE_SOURCES,
    "Where the imported crosscoder's per-model normalisation comes from.",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export on import.")


def main(argv):
    del argv
    if _FROM.value:
        if not _PATH.value:
            raise flags.ValidationError("--from_format needs --path")
        cfg = formats.import_crosscoder(
            _PATH.value, _FROM.value, _WORKDIR.value, _SCALES.value, _OVERWRITE.value
        )
        print(f"imported {cfg['n_latents']} latents at block {cfg['layer']} into export/")
    for fmt in _TO.value:
        out = wd.format_dir(_WORKDIR.value, fmt)
        formats.convert_export(wd.export_dir(_WORKDIR.value), fmt, out, _CONFIG.value)
        print(f"wrote {out}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
