"""grpo_jax: pure-JAX GRPO and the DeepSeek-R1 recipe."""

__version__ = "0.1.0"
