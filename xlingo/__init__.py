"""xlingo: cross-lingual language-model training in JAX/Flax, TPU first, CPU friendly."""

__version__ = "0.1.0"
