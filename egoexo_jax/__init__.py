"""egoexo_jax: egocentric video models trained from third-person video, in JAX/Flax."""
