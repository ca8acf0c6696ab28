"""egoexo_jax: egocentric video models trained from third-person video, in JAX/Flax."""


def load_pretrained(path, **kwargs):
  """(model, variables) of an export folder (python -m egoexo_jax.export); see egoexo_jax.pretrained."""
  from egoexo_jax import pretrained  # pylint: disable=g-import-not-at-top  (keeps `import egoexo_jax` light)
  return pretrained.load_pretrained(path, **kwargs)
