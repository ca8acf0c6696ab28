"""The Ego-Exo multitask network: a Slow-only ResNet-3D with action, ego, object and interaction heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from egoexo_jax.models.heads import ClassificationHead, InteractionMapHead
from egoexo_jax.models.resnet3d import ResNet3D


class Model(nn.Module):
  """Normalised clips (B, T, H, W, 3) -> dict of float32 outputs.

  'features': res5 features averaged over (T, H, W), (B, 32 * width);
  'action': (B, num_classes) logits from dropout + linear on 'features';
  with use_ego_heads (Ego-Exo pre-training, Ego-Exo* fine-tuning), also, on the same pooled features,
  'ego': (B, 2) Ego-Score logits (ego, exo) and 'object': (B, num_object_classes) Object-Score logits,
  and on the res5 grid 'interaction': (B, T, H/32, W/32, 2) hand/object map logits.
  """

  num_classes: int
  num_object_classes: int = 1000
  stage_blocks: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  temporal_kernels: Sequence[int] = (1, 1, 3, 3)
  dropout_rate: float = 0.5
  interaction_channels: int = 512
  use_ego_heads: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, clips: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    backbone = ResNet3D(stage_blocks=self.stage_blocks, width=self.width, temporal_kernels=self.temporal_kernels,
                        name="backbone", **dtypes)
    res5 = backbone(clips, train=train)
    features = jnp.mean(res5.astype(jnp.float32), axis=(1, 2, 3))

    def classify(num_outputs: int, name: str) -> jax.Array:
      head = ClassificationHead(num_outputs, self.dropout_rate, name=name, **dtypes)
      return head(features, train=train)

    outputs = {"features": features, "action": classify(self.num_classes, "action_head")}
    if self.use_ego_heads:
      outputs["ego"] = classify(2, "ego_head")
      outputs["object"] = classify(self.num_object_classes, "object_head")
      outputs["interaction"] = InteractionMapHead(self.interaction_channels, name="interaction_head",
                                                  **dtypes)(res5)
    return outputs
