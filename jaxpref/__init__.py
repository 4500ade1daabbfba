"""jaxpref: reward models for LLM alignment in JAX/Flax."""

__version__ = "0.1.0"
