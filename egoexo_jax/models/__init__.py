"""Models, looked up by module name: model_config.name 'egoexo' -> egoexo_jax.models.egoexo.Model."""

from __future__ import annotations

import importlib

import flax.linen as nn
import jax.numpy as jnp
import ml_collections


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """`Model` of module `model_config.name`, built with the config's other fields as keyword arguments.

  `dtype` and `param_dtype` may be given as strings ('bfloat16', 'float32').
  """
  kwargs = model_config.to_dict()
  name = kwargs.pop("name")
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = jnp.dtype(kwargs[key])
  return importlib.import_module(f"{__name__}.{name}").Model(**kwargs)
