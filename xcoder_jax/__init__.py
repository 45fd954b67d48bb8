"""xcoder_jax: sparse crosscoders for diffing a base model and its distilled reasoning variant.

Data flows one way: HF models -> `activations` (store on disk) -> crosscoder training (JAX)
-> a portable export -> analysis, steering and geometry back in the HF models.
"""

__version__ = "0.1.0"
