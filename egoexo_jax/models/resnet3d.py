"""ResNet-3D with bottleneck blocks, built as PySlowFast builds Slow-only networks (SLOW_8x8_R50).

Channels-last: clips are (B, T, H, W, C). No temporal striding anywhere, so T in = T out; space is
reduced 32x (stem conv /2, stem max-pool /2, res3..res5 /2 each).

BatchNorm has no `axis_name`: under `jax.jit` with the batch sharded over a mesh, the mean over the
batch axis is already the global-batch statistic, so an 8-device sharded step equals the 1-device one.
Running statistics live in the 'batch_stats' collection.

Submodules: 'stem' ('conv', 'bn'), then 'res{2..5}_block{i}' with 'conv_a'/'bn_a' (kt x 1 x 1),
'conv_b'/'bn_b' (1 x 3 x 3, carries the spatial stride), 'conv_c'/'bn_c' (1 x 1 x 1) and, on the first
block of a stage, 'shortcut_conv'/'shortcut_bn'. Each maps to one PySlowFast module for weight import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PySlowFast's c2_msra_fill: kaiming normal, fan_out, gain sqrt(2) (plain normal, not truncated).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Spatial stride of the first block of res2..res5.
STAGE_SPATIAL_STRIDES = (1, 2, 2, 2)

SLOW_R50 = dict(stage_blocks=(3, 4, 6, 3), width=64, temporal_kernels=(1, 1, 3, 3), stem_temporal_kernel=1)
SLOW_R101 = dict(SLOW_R50, stage_blocks=(3, 4, 23, 3))


class Conv3D(nn.Module):
  """Bias-free conv over (B, T, H, W, C), padded by k // 2 on each side (PyTorch padding), PySlowFast init.

  Its parameter is 'kernel' of shape (kt, kh, kw, C_in, features), as nn.Conv's. A kernel with kt = 1
  and no temporal stride (all but four convs of Slow-only R50) runs as a 2-D conv over B*T frames:
  the same maths, and XLA:CPU's 3-D convolutions of such kernels, their gradients above all, are
  several times slower than its 2-D ones.
  """

  features: int
  kernel_size: tuple[int, int, int]
  strides: tuple[int, int, int] = (1, 1, 1)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", conv_kernel_init, (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = [(k // 2, k // 2) for k in self.kernel_size]
    if self.kernel_size[0] == 1 and self.strides[0] == 1:
      batch, time = x.shape[:2]
      y = jax.lax.conv_general_dilated(x.reshape(batch * time, *x.shape[2:]), kernel[0], self.strides[1:],
                                       padding[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return y.reshape(batch, time, *y.shape[1:])
    return jax.lax.conv_general_dilated(x, kernel, self.strides, padding,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def batch_norm(*, train: bool, name: str, dtype: Any, param_dtype: Any, zero_scale: bool = False) -> nn.BatchNorm:
  """PyTorch-default BatchNorm (momentum 0.1 there = 0.9 here); `zero_scale` starts gamma at 0."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      dtype=dtype, param_dtype=param_dtype, name=name)


class Stem(nn.Module):
  """(B, T, H, W, 3) -> (B, T, H/4, W/4, width): conv (kt, 7, 7) /2, BN, ReLU, max-pool (1, 3, 3) /2."""

  width: int = 64
  temporal_kernel: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Conv3D(self.width, (self.temporal_kernel, 7, 7), (1, 2, 2), name="conv", **dtypes)(x)
    x = nn.relu(batch_norm(train=train, name="bn", **dtypes)(x))
    batch, time = x.shape[:2]  # max-pool (1, 3, 3) as a 2-D pool over B*T frames, like the convs
    x = nn.max_pool(x.reshape(batch * time, *x.shape[2:]), window_shape=(3, 3), strides=(2, 2),
                    padding=((1, 1), (1, 1)))
    return x.reshape(batch, time, *x.shape[1:])


class Bottleneck(nn.Module):
  """(B, T, H, W, C) -> (B, T, H/s, W/s, out_width), s = spatial_stride.

  relu(bn_c(conv_c(relu(bn_b(conv_b(relu(bn_a(conv_a(x))))))) + shortcut(x)); bn_c's gamma starts at
  0 (PySlowFast ZERO_INIT_FINAL_BN), so at init the block is relu(shortcut(x)). The shortcut is a
  projection (1x1x1 conv with the stride, BN) when the width or the resolution changes, else identity.
  """

  inner_width: int
  out_width: int
  temporal_kernel: int = 1
  spatial_stride: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    stride = (1, self.spatial_stride, self.spatial_stride)
    shortcut = x
    if x.shape[-1] != self.out_width or self.spatial_stride != 1:
      shortcut = Conv3D(self.out_width, (1, 1, 1), stride, name="shortcut_conv", **dtypes)(x)
      shortcut = batch_norm(train=train, name="shortcut_bn", **dtypes)(shortcut)
    y = Conv3D(self.inner_width, (self.temporal_kernel, 1, 1), (1, 1, 1), name="conv_a", **dtypes)(x)
    y = nn.relu(batch_norm(train=train, name="bn_a", **dtypes)(y))
    y = Conv3D(self.inner_width, (1, 3, 3), stride, name="conv_b", **dtypes)(y)
    y = nn.relu(batch_norm(train=train, name="bn_b", **dtypes)(y))
    y = Conv3D(self.out_width, (1, 1, 1), (1, 1, 1), name="conv_c", **dtypes)(y)
    y = batch_norm(train=train, name="bn_c", zero_scale=True, **dtypes)(y)
    return nn.relu(y + shortcut)


class ResNet3D(nn.Module):
  """Bottleneck ResNet-3D: clips (B, T, H, W, 3) -> [res5 features (B, T, H/32, W/32, 32 * width)].

  Stage k in res2..res5 has stage_blocks[k] blocks of inner width width * 2**k, out width 4x that, and
  conv_a temporal kernel temporal_kernels[k]. Use `ResNet3D(**SLOW_R50)` for Slow-only R50 8x8.
  """

  stage_blocks: Sequence[int]
  width: int = 64
  temporal_kernels: Sequence[int] = (1, 1, 3, 3)
  stem_temporal_kernel: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Stem(self.width, self.stem_temporal_kernel, name="stem", **dtypes)(x, train=train)
    stages = zip(self.stage_blocks, self.temporal_kernels, STAGE_SPATIAL_STRIDES, strict=True)
    for stage, (num_blocks, temporal_kernel, spatial_stride) in enumerate(stages):
      inner_width = self.width * 2**stage
      for block in range(num_blocks):
        x = Bottleneck(inner_width, 4 * inner_width, temporal_kernel, spatial_stride if block == 0 else 1,
                       name=f"res{stage + 2}_block{block}", **dtypes)(x, train=train)
    return [x]  # one pathway (see models/backbones.py)
