"""Output heads. Each returns float32 whatever the compute dtype.

Global average pooling is done once, by the caller (egoexo.Model), which shares the pooled features
between the action, ego and object heads. `window_pool` is the fully convolutional test pooling of
PySlowFast's ResNetBasicHead (models/finetune.py applies the heads after it at test time).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from egoexo_jax.models.resnet3d import conv_kernel_init


def window_pool(pathways: list[jax.Array], input_size: tuple[int, int], train_crop: int) -> jax.Array:
  """Per-pathway feature maps (B, t, h, w, C_p) of clips of `input_size` (H, W) -> float32 (B, t', h', w', sum C_p).

  PySlowFast's ResNetBasicHead / MultiTaskHead built for training clips pools with a fixed window and
  stride 1 (`nn.AvgPool3d(pool_size, stride=1)`, pool_size = [NUM_FRAMES // ..., CROP_SIZE // 32,
  CROP_SIZE // 32], CROP_SIZE the 224 training crop): the window is the feature grid of a training clip.
  Here the window is (t, floor(h * train_crop / H), floor(w * train_crop / W)), capped at the grid, so a
  256 test crop on a 224 window gives 2 x 2 positions on an 8 x 8 res5 grid, and a clip of the training
  size gives one position (= global average pooling). Pathways are concatenated per position; their
  position grids must agree (SlowFast's do: same spatial size, full temporal window).
  """
  pooled = []
  for x in pathways:
    _, t, h, w, _ = x.shape
    window = (t, max(1, min(h, h * train_crop // input_size[0])), max(1, min(w, w * train_crop // input_size[1])))
    pooled.append(nn.avg_pool(x.astype(jnp.float32), window, strides=(1, 1, 1), padding="VALID"))
  grids = {p.shape[1:4] for p in pooled}
  if len(grids) != 1:
    raise ValueError(f"fully convolutional testing: the pathways give different position grids {sorted(grids)}")
  return jnp.concatenate(pooled, axis=-1)


class ClassificationHead(nn.Module):
  """Pooled features (B, ..., C) -> float32 logits (B, ..., num_outputs): dropout, then a linear layer
  (on the last axis, so on (B, t', h', w', C) window-pooled features it is PySlowFast's projection
  applied at every position).

  As PySlowFast's ResNetBasicHead: dropout 0.5, weights normal(std 0.01), bias 0. With train=True and
  dropout_rate > 0 it needs a 'dropout' rng.
  """

  num_outputs: int
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    x = nn.Dense(self.num_outputs, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(x)
    return x.astype(jnp.float32)


class InteractionMapHead(nn.Module):
  """Ego-Exo interaction map: features (B, t, h, w, C) -> float32 logits (B, t, h, w, 2), (hand, object).

  Conv (1, 3, 3) to hidden_width, ReLU, conv (1, 1, 1) to 2 channels; both with bias (no BN follows).
  The output conv starts near 0 (normal std 0.01), so the maps start at probability 0.5.
  """

  hidden_width: int = 512
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(self.hidden_width, (1, 3, 3), padding="SAME", kernel_init=conv_kernel_init, name="conv",
                **dtypes)(features)
    x = nn.Conv(2, (1, 1, 1), kernel_init=nn.initializers.normal(0.01), name="logits", **dtypes)(nn.relu(x))
    return x.astype(jnp.float32)
