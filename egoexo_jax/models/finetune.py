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
from egoexo_jax.models.heads import ClassificationHead, InteractionMapHead, window_pool


class Model(nn.Module):
  """Normalised clips (B, T, H, W, 3) -> dict of float32 outputs.

  'features': pooled backbone features (B, C) (egoexo.pool_pathways); one logits array per entry of
  `num_classes`, keyed by its name: {'action': 157} (Charades-Ego, Kinetics) gives 'action' (B, 157),
  {'verb': 97, 'noun': 300} (EPIC-Kitchens-100) gives 'verb' (B, 97) and 'noun' (B, 300); with
  use_interaction_head, 'interaction' (B, t, h, w, 2) hand/object map logits on pathway 0's grid.

  Fully convolutional testing (PySlowFast's test mode at crop 256): called with train=False and
  `window_crop` (the training crop size), each head's logits are per position, (B, t', h', w', K), the
  heads applied at every position of `heads.window_pool`; the caller applies softmax / sigmoid and then
  averages over the positions (evaluate.make_forward), as ResNetBasicHead does in eval mode.

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
  def __call__(self, clips: jax.Array, *, train: bool, window_crop: int | None = None) -> dict[str, jax.Array]:
    if window_crop and train:
      raise ValueError("window_crop (fully convolutional testing) is for train=False only")
    if not self.num_classes:
      raise ValueError("model.num_classes is empty: name at least one head, e.g. {'action': 157}")
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pathways = build_backbone(self.backbone, self.backbone_args, **dtypes)(clips, train=train)
    features = pool_pathways(pathways)
    outputs = {"features": features}
    head_inputs = window_pool(pathways, clips.shape[2:4], window_crop) if window_crop else features
    for name, size in self.num_classes.items():
      if name in ("features", "interaction"):
        raise ValueError(f"model.num_classes may not name a head '{name}' (an output of its own)")
      outputs[name] = ClassificationHead(int(size), self.dropout_rate, name=f"{name}_head", **dtypes)(
          head_inputs, train=train)
    if self.use_interaction_head:
      outputs["interaction"] = InteractionMapHead(self.interaction_channels, name="interaction_head",
                                                  **dtypes)(pathways[0])
    return outputs
