"""Output heads. Each returns float32 whatever the compute dtype.

Global average pooling is done once, by the caller (egoexo.Model), which shares the pooled features
between the action, ego and object heads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from egoexo_jax.models.resnet3d import conv_kernel_init


class ClassificationHead(nn.Module):
  """Pooled features (B, C) -> float32 logits (B, num_outputs): dropout, then a linear layer.

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
