"""Models, looked up by module name: 'egoexo' -> egoexo_jax.models.egoexo.Model. Each objective names its
own (objectives/); stand-alone networks (the Object-Score teacher's 'resnet2d') name theirs in model_config.name."""

from __future__ import annotations

import importlib

import flax.linen as nn
import jax.numpy as jnp
import ml_collections


def build_model(model_config: ml_collections.ConfigDict, name: str | None = None) -> nn.Module:
  """`Model` of module `name` (default: `model_config.name`), built with the config's other fields as
  keyword arguments (a `name` field there is not one of them).

  `dtype` and `param_dtype` may be given as strings ('bfloat16', 'float32').
  """
  kwargs = model_config.to_dict()
  name = name or kwargs.get("name")
  kwargs.pop("name", None)
  if not name:
    raise ValueError("build_model needs a module name: pass it or set model_config.name")
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = jnp.dtype(kwargs[key])
  return importlib.import_module(f"{__name__}.{name}").Model(**kwargs)
