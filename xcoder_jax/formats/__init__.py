"""Our export in other crosscoder formats, and their crosscoders as our export.

    write_formats(config, workdir)                 # export/<format>/ for config.export.formats
    convert_export(export_dir, fmt, out_dir, config)
    import_crosscoder(path, fmt, workdir, scales="file")   # -> <workdir>/export/

Formats: "dictionary_learning" (`save_pretrained` directory of CrossCoder /
BatchTopKCrossCoder), "ckkissane" (cc_weights.pt + cfg.json) and "saelens" (one JumpReLU
SAE over the concatenated activations: sae_weights.safetensors + cfg.json). See their
modules for the files and units.
"""

from __future__ import annotations

from xcoder_jax.formats import ckkissane, dictionary_learning, saelens
from xcoder_jax.formats.common import SIDECAR, FormatError, normalised_view
from xcoder_jax.formats.exporting import convert_export, write_formats
from xcoder_jax.formats.importing import SCALE_SOURCES, import_crosscoder

FORMATS = {
    "dictionary_learning": dictionary_learning,
    "ckkissane": ckkissane,
    "saelens": saelens,
}

__all__ = [
    "FORMATS",
    "SCALE_SOURCES",
    "SIDECAR",
    "FormatError",
    "convert_export",
    "import_crosscoder",
    "normalised_view",
    "write_formats",
]
