"""Video backbones by architecture name, for `config.model.backbone`.

Every backbone maps normalised clips (B, T, H, W, 3) to a list of feature maps, one per pathway,
each (B, t, h, w, C): Slow-only, I3D, R3D and TSM have one pathway, SlowFast two (slow, fast). The
heads attach to that list the same way whatever the architecture (pool each pathway and
concatenate; spatial heads read pathway 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from egoexo_jax.models import resnet3d, slowfast, transformer

# name -> (module class, its keyword arguments). Overrides from the config replace single entries.
BACKBONES: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "slow_r50": (resnet3d.ResNet3D, resnet3d.SLOW_R50),
    "slow_r101": (resnet3d.ResNet3D, resnet3d.SLOW_R101),
    "slowfast_r50": (slowfast.SlowFast, slowfast.SLOWFAST_R50),
    "slowfast_r101": (slowfast.SlowFast, slowfast.SLOWFAST_R101),
    "i3d_r50": (resnet3d.ResNet3D, resnet3d.I3D_R50),
    "r3d_50": (resnet3d.ResNet3D, resnet3d.R3D_50),
    "tsm_r50": (resnet3d.ResNet3D, resnet3d.TSM_R50),
    "vit_b16": (transformer.VideoViT, transformer.VIT_B16),
}


def backbone_arguments(arch: str, overrides: Mapping[str, Any] | None = None) -> tuple[type[nn.Module], dict]:
  """(module class, its arguments): the preset of `arch` (a key of BACKBONES) updated by `overrides`."""
  if arch not in BACKBONES:
    raise ValueError(f"unknown backbone '{arch}' (config model.backbone); known: {sorted(BACKBONES)}")
  module, preset = BACKBONES[arch]
  overrides = dict(overrides or {})
  unknown = set(overrides) - set(module.__dataclass_fields__)
  if unknown:
    raise ValueError(f"backbone '{arch}' ({module.__name__}) has no arguments {sorted(unknown)} "
                     "(config model.backbone_args)")
  return module, {**preset, **overrides}


def build_backbone(arch: str, overrides: Mapping[str, Any] | None = None, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32, name: str | None = "backbone") -> nn.Module:
  """The backbone `arch` with its preset arguments updated by `overrides`."""
  module, arguments = backbone_arguments(arch, overrides)
  return module(**arguments, dtype=dtype, param_dtype=param_dtype, name=name)
