"""xcoder_jax: sparse crosscoders for diffing a base model and its distilled reasoning variant.

Data flows one way: HF models -> `activations` (store on disk) -> crosscoder training (JAX)
-> a portable export -> analysis, steering and geometry back in the HF models.

The entry points, each `(config, workdir)` with a config of configs/*.py:

    import xcoder_jax as xc
    xc.build_zoo(config, workdir)           # the embedded model pair (models/)
    xc.extract(config, workdir)             # the activation store (activations/)
    xc.train_and_evaluate(config, workdir)  # checkpoints/, export/
    xc.run_analysis(config, workdir)        # analysis/
    xc.run_steering(config, workdir)        # steering/
    xc.run_ablation(config, workdir)        # ablation/
    xc.run_geometry(config, workdir)        # geometry/
    xc.pipeline.run(config, workdir)        # all of them, in order
    xc.run_replication(config, workdir, seeds)

and the export in the HF models: `load_export`, `ExportedCrosscoder`, `steer`, `ablate`.
Names are imported on first use, so `import xcoder_jax` loads neither JAX nor torch.
"""

import importlib

from xcoder_jax.errors import ConfigError, MissingInputError, XcoderError

__version__ = "0.1.0"

# name -> module that defines it (a module itself when the name is the module's own).
_LAZY = {
    "build_zoo": "xcoder_jax.zoo",
    "extract": "xcoder_jax.activations",
    "train_and_evaluate": "xcoder_jax.train",
    "run_analysis": "xcoder_jax.analysis",
    "run_steering": "xcoder_jax.steering",
    "run_ablation": "xcoder_jax.ablation",
    "run_geometry": "xcoder_jax.geometry",
    "run_replication": "xcoder_jax.replicate",
    "pipeline": "xcoder_jax.pipeline",
    "load_export": "xcoder_jax.export",
    "ExportedCrosscoder": "xcoder_jax.exported",
    "steer": "xcoder_jax.steering",
    "ablate": "xcoder_jax.steering",
}

__all__ = [
    "ConfigError",
    "ExportedCrosscoder",
    "MissingInputError",
    "XcoderError",
    "ablate",
    "build_zoo",
    "extract",
    "load_export",
    "pipeline",
    "run_ablation",
    "run_analysis",
    "run_geometry",
    "run_replication",
    "run_steering",
    "steer",
    "train_and_evaluate",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
