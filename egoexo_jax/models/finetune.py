"""Fine-tuning network: a video backbone with one linear head per label set, and optionally the
Ego-Exo interaction-map head (Ego-Exo* fine-tuning)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from egoexo_jax.models.backbones import build_backbone
from egoexo_jax.models.egoexo import pool_pathways
from egoexo_jax.models.heads import ClassificationHead, InteractionMapHead


class Model(nn.Module):
  """Normalised clips (B, T, H, W, 3) -> dict of float32 outputs.

  'features': pooled backbone features (B, C) (egoexo.pool_pathways); one logits array per entry of
  `num_classes`, keyed by its name: {'action': 157} (Charades-Ego, Kinetics) gives 'action' (B, 157),
  {'verb': 97, 'noun': 300} (EPIC-Kitchens-100) gives 'verb' (B, 97) and 'noun' (B, 300); with
  use_interaction_head, 'interaction' (B, t, h, w, 2) hand/object map logits on pathway 0's grid.

  Parameter names: 'backbone' (as egoexo.Model, so `init_from` carries a pre-trained backbone over),
  '<name>_head' per head, 'interaction_head' (egoexo.Model's name, so it can be carried over too).
  """

  num_classes: Mapping[str, int]
  backbone: str = "slow_r50"
  backbone_args: Mapping[str, Any] | None = None
  dropout_rate: float = 0.5
  use_interaction_head: bool = False
  interaction_channels: int = 512
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, clips: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    if not self.num_classes:
      raise ValueError("model.num_classes is empty: name at least one head, e.g. {'action': 157}")
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pathways = build_backbone(self.backbone, self.backbone_args, **dtypes)(clips, train=train)
    features = pool_pathways(pathways)
    outputs = {"features": features}
    for name, size in self.num_classes.items():
      if name in ("features", "interaction"):
        raise ValueError(f"model.num_classes may not name a head '{name}' (an output of its own)")
      outputs[name] = ClassificationHead(int(size), self.dropout_rate, name=f"{name}_head", **dtypes)(
          features, train=train)
    if self.use_interaction_head:
      outputs["interaction"] = InteractionMapHead(self.interaction_channels, name="interaction_head",
                                                  **dtypes)(pathways[0])
    return outputs
