"""xcoder_jax: crosscoder model-diffing of a base model and its distilled reasoning variant."""

from setuptools import find_packages, setup

setup(
    name="xcoder_jax",
    version="0.1.0",
    description="Sparse crosscoders in JAX/Flax for diffing base and distilled reasoning models.",
    packages=find_packages(include=["xcoder_jax", "xcoder_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.89",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "numpy>=2",  # np.bitwise_count
        "scipy>=1.11",  # t quantiles for confidence intervals
        "ml_dtypes>=0.5",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        # Pinned: this exact version installs a CPU build here; a looser spec pulls CUDA wheels.
        "torch==2.13.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "cuda12": ["jax[cuda12]"],
        "datasets": ["datasets>=2.19"],
        "test": ["pytest>=8", "ruff>=0.6"],
    },
)
