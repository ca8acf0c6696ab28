"""The Ego-Exo multitask network: a video backbone with action, ego, object and interaction heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from egoexo_jax.models.backbones import build_backbone
from egoexo_jax.models.heads import ClassificationHead, InteractionMapHead


def pool_pathways(pathways: list[jax.Array]) -> jax.Array:
  """Per-pathway feature maps (B, t, h, w, C_p) -> (B, sum C_p): average over (t, h, w), concatenate."""
  return jnp.concatenate([jnp.mean(p.astype(jnp.float32), axis=(1, 2, 3)) for p in pathways], axis=-1)


class Model(nn.Module):
  """Normalised clips (B, T, H, W, 3) -> dict of float32 outputs.

  'features': the backbone's feature maps averaged over (t, h, w), concatenated over pathways (B, C);
  per entry of `num_classes` ({head name: classes}, e.g. {'action': 400}; an int means {'action': n}, as
  configs before the vocabulary of issue 14 wrote it) that head's (B, classes) logits from dropout + linear
  on 'features', under its name, parameters '<name>_head';
  with use_ego_heads (Ego-Exo pre-training, Ego-Exo* fine-tuning), also, on the same pooled features,
  'ego_score': (B, 2) Ego-Score logits (first-person, third-person) ('ego_head', the parameter name of
  checkpoints) and 'object': (B, num_object_classes) Object-Score logits, and on pathway 0's grid
  'interaction': (B, t, h, w, 2) hand/object map logits.

  `backbone` names an architecture of models/backbones.py; `backbone_args` overrides its preset
  arguments (e.g. width and stage_blocks for a laptop-sized network).
  """

  num_classes: Mapping[str, int] | int
  num_object_classes: int = 1000
  backbone: str = "slow_r50"
  backbone_args: Mapping[str, Any] | None = None
  dropout_rate: float = 0.0  # the released Ego-Exo pre-training's MODEL.DROPOUT_RATE (configs/recipe_egoexo.py)
  interaction_channels: int = 512
  use_ego_heads: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, clips: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pathways = build_backbone(self.backbone, self.backbone_args, **dtypes)(clips, train=train)
    features = pool_pathways(pathways)

    def classify(num_outputs: int, name: str) -> jax.Array:
      head = ClassificationHead(num_outputs, self.dropout_rate, name=name, **dtypes)
      return head(features, train=train)

    heads = {"action": self.num_classes} if isinstance(self.num_classes, int) else self.num_classes
    outputs = {"features": features}
    for name, size in heads.items():
      if name in ("features", "ego_score", "object", "interaction"):
        raise ValueError(f"model.num_classes may not name a head '{name}' (an output of its own)")
      outputs[name] = classify(int(size), f"{name}_head")
    if self.use_ego_heads:
      outputs["ego_score"] = classify(2, "ego_head")
      outputs["object"] = classify(self.num_object_classes, "object_head")
      outputs["interaction"] = InteractionMapHead(self.interaction_channels, name="interaction_head",
                                                  **dtypes)(pathways[0])
    return outputs
