"""One parameterised bottleneck ResNet-3D family, built as PySlowFast builds its single-pathway networks.

Channels-last: clips are (B, T, H, W, C). Space is reduced 32x (stem conv /2, stem max-pool /2,
res3..res5 /2 each); time is kept, except for I3D's temporal max-pool /2 after res2.

The presets below differ only in where the temporal kernels are (`ResNet3D` fields in brackets):

    SLOW_R50 / SLOW_R101  PySlowFast 'slow': stem 1x7x7, conv_a 1x1x1 in res2/res3 and 3x1x1 in
                          res4/res5 [temporal_kernels]. "8x8" (8 frames, stride 8) and "4x16"
                          (4 frames, stride 16) are the same network fed different clips: only the
                          config's data.clip_length / data.frame_stride differ, weights are shared.
    I3D_R50               PySlowFast 'i3d' basis: stem 5x7x7 [stem_temporal_kernel]; conv_a 3x1x1 in
                          every res2 block, alternating 3,1,3,... in res3/res4 and 1,3,1 in res5 (a
                          sequence in temporal_kernels is cycled over the stage's blocks); temporal
                          max-pool (2, 1, 1) after res2 [res2_temporal_pool], so T out = T / 2.
    R3D_50                3x3x3 convs: every block's middle conv is 3x3x3 [conv_b_temporal_kernel],
                          stem 3x7x7; 1x1x1 convs stay 1x1x1. Time is not strided (Tran et al. and
                          Hara et al. stride it), so the heads get the same t as the Slow network.
    TSM_R50               TSM (Lin et al.): torchvision's 2-D ResNet-50 run over B*T frames, with a
                          temporal shift of 1/8 + 1/8 of the channels at the start of every block's
                          residual branch [temporal_shift] ("residual shift").

BatchNorm has no `axis_name`: under `jax.jit` with the batch sharded over a mesh, the mean over the
batch axis is already the global-batch statistic, so an 8-device sharded step equals the 1-device one.
Running statistics live in the 'batch_stats' collection.

Submodules: 'stem' ('conv', 'bn'), then 'res{2..5}_block{i}' with 'conv_a'/'bn_a' (kt x 1 x 1),
'conv_b'/'bn_b' (kb x 3 x 3, carries the spatial stride), 'conv_c'/'bn_c' (1 x 1 x 1) and, on the first
block of a stage, 'shortcut_conv'/'shortcut_bn'. Each maps to one PySlowFast module for weight import
(models/import_weights.py); SlowFast (models/slowfast.py) builds its two pathways from the same parts.

Parameters with a 400-way action head (`egoexo.Model(num_classes=400, use_ego_heads=False)`), measured
in tests/resnet3d_test.py against the published counts (PyTorchVideo model zoo; TSM paper, Table 1):

    slow_r50   32,454,096   published 32.45M        i3d_r50   28,043,472   published 28.04M
    slow_r101  60,359,120   (none published)        r3d_50    46,980,944   (none found for this layout)
    tsm_r50    24,327,632   published 24.3M (= torchvision ResNet-50 with a 400-way fc)
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
R50_BLOCKS = (3, 4, 6, 3)
R101_BLOCKS = (3, 4, 23, 3)

SLOW_R50 = dict(stage_blocks=R50_BLOCKS, temporal_kernels=(1, 1, 3, 3), stem_temporal_kernel=1)
SLOW_R101 = dict(SLOW_R50, stage_blocks=R101_BLOCKS)
I3D_R50 = dict(stage_blocks=R50_BLOCKS, temporal_kernels=(3, (3, 1), (3, 1), (1, 3)), stem_temporal_kernel=5,
               res2_temporal_pool=2)
R3D_50 = dict(stage_blocks=R50_BLOCKS, temporal_kernels=(1, 1, 1, 1), conv_b_temporal_kernel=3,
              stem_temporal_kernel=3)
TSM_R50 = dict(stage_blocks=R50_BLOCKS, temporal_kernels=(1, 1, 1, 1), stem_temporal_kernel=1, temporal_shift=True)


class Conv3D(nn.Module):
  """Bias-free conv over (B, T, H, W, C), padded by k // 2 on each side (PyTorch padding), PySlowFast init.

  Its parameter is 'kernel' of shape (kt, kh, kw, C_in, features), as nn.Conv's. Two kinds of kernel
  run as 2-D convs, the same maths:
  - kt = 1, no temporal stride (all but nine convs of Slow-only R50): over B*T frames. XLA:CPU's 3-D
    convolutions of such kernels, their gradients above all, are several times slower than its 2-D ones.
  - kh = kw = 1, no spatial stride (the nine temporal conv_a of Slow-only R50, SlowFast's lateral
    fusion): over a (T, H*W) image per clip. XLA:GPU lays 3-D convolutions out channels-first (NCDHW),
    so each such conv, forward and both gradients, paid cuDNN's and XLA's layout transposes around it:
    on an H100, Slow-only R50's step spent 30 of its 111 ms in those transposes.
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
    if self.kernel_size[1:] == (1, 1) and self.strides[1:] == (1, 1):
      batch, time, height, width, channels = x.shape
      y = jax.lax.conv_general_dilated(x.reshape(batch, time, height * width, channels), kernel[:, 0],
                                       (self.strides[0], 1), [padding[0], (0, 0)],
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return y.reshape(batch, y.shape[1], height, width, y.shape[-1])
    return jax.lax.conv_general_dilated(x, kernel, self.strides, padding,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def batch_norm(*, train: bool, name: str, dtype: Any, param_dtype: Any, zero_scale: bool = False) -> nn.BatchNorm:
  """PyTorch-default BatchNorm (momentum 0.1 there = 0.9 here); `zero_scale` starts gamma at 0."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      dtype=dtype, param_dtype=param_dtype, name=name)


def temporal_shift(x: jax.Array, fold_div: int = 8) -> jax.Array:
  """TSM's shift of (B, T, H, W, C), same shape out, zeros past either end of the clip.

  Channels [0, C/fold_div) of frame t take frame t+1's values (shifted back in time, "left" in TSM's
  code), channels [C/fold_div, 2C/fold_div) take frame t-1's (shifted forward), the rest stay.
  """
  fold = x.shape[-1] // fold_div
  pad = jnp.zeros_like(x[:, :1, ..., :fold])
  from_next = jnp.concatenate([x[:, 1:, ..., :fold], pad], axis=1)
  from_previous = jnp.concatenate([pad, x[:, :-1, ..., fold:2 * fold]], axis=1)
  return jnp.concatenate([from_next, from_previous, x[..., 2 * fold:]], axis=-1)


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

  relu(bn_c(conv_c(relu(bn_b(conv_b(relu(bn_a(conv_a(shift(x)))))))) + shortcut(x)); conv_a is
  (temporal_kernel, 1, 1), conv_b (conv_b_temporal_kernel, 3, 3), and shift is `temporal_shift` when
  `temporal_shift` is set (TSM), else identity. bn_c's gamma starts at 0 (PySlowFast ZERO_INIT_FINAL_BN),
  so at init the block is relu(shortcut(x)). The shortcut is a projection (1x1x1 conv with the
  stride, BN) when the width or the resolution changes, else identity.
  """

  inner_width: int
  out_width: int
  temporal_kernel: int = 1
  spatial_stride: int = 1
  conv_b_temporal_kernel: int = 1
  temporal_shift: bool = False
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
    y = temporal_shift(x) if self.temporal_shift else x
    y = Conv3D(self.inner_width, (self.temporal_kernel, 1, 1), (1, 1, 1), name="conv_a", **dtypes)(y)
    y = nn.relu(batch_norm(train=train, name="bn_a", **dtypes)(y))
    y = Conv3D(self.inner_width, (self.conv_b_temporal_kernel, 3, 3), stride, name="conv_b", **dtypes)(y)
    y = nn.relu(batch_norm(train=train, name="bn_b", **dtypes)(y))
    y = Conv3D(self.out_width, (1, 1, 1), (1, 1, 1), name="conv_c", **dtypes)(y)
    y = batch_norm(train=train, name="bn_c", zero_scale=True, **dtypes)(y)
    return nn.relu(y + shortcut)


def block_temporal_kernels(stage_kernels: int | Sequence[int], num_blocks: int) -> list[int]:
  """conv_a temporal kernel of each block of a stage: an int for all blocks, or a sequence cycled over them.

  (3, 1) over 4 blocks gives [3, 1, 3, 1], as PySlowFast repeats `_TEMPORAL_KERNEL_BASIS` entries.
  """
  if isinstance(stage_kernels, int):
    return [stage_kernels] * num_blocks
  return [stage_kernels[i % len(stage_kernels)] for i in range(num_blocks)]


def res_stage(x: jax.Array, *, stage: int, num_blocks: int, inner_width: int,
              temporal_kernels: int | Sequence[int], train: bool, prefix: str = "", **block_args) -> jax.Array:
  """Stage res{stage} (2..5), blocks '{prefix}res{stage}_block{i}': (B, T, H, W, C) -> (B, T, H/s, W/s, 4 * inner).

  Call it inside a compact `__call__`: the blocks become submodules of the calling module. The first
  block carries the stage's spatial stride (STAGE_SPATIAL_STRIDES) and its projection shortcut.
  """
  spatial_stride = STAGE_SPATIAL_STRIDES[stage - 2]
  for block, kernel in enumerate(block_temporal_kernels(temporal_kernels, num_blocks)):
    x = Bottleneck(inner_width, 4 * inner_width, kernel, spatial_stride if block == 0 else 1,
                   name=f"{prefix}res{stage}_block{block}", **block_args)(x, train=train)
  return x


class ResNet3D(nn.Module):
  """Bottleneck ResNet-3D: clips (B, T, H, W, 3) -> [res5 features (B, T / p, H/32, W/32, 32 * width)].

  Stage k in res2..res5 has stage_blocks[k] blocks of inner width width * 2**k, out width 4x that, and
  conv_a temporal kernels temporal_kernels[k]; p = res2_temporal_pool (a (p, 1, 1) max-pool after res2,
  1 = none). Use `ResNet3D(**SLOW_R50)` for Slow-only R50; the module docstring lists the presets.
  """

  stage_blocks: Sequence[int]
  width: int = 64
  temporal_kernels: Sequence[int | Sequence[int]] = (1, 1, 3, 3)
  stem_temporal_kernel: int = 1
  conv_b_temporal_kernel: int = 1
  res2_temporal_pool: int = 1
  temporal_shift: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    if len(self.stage_blocks) != 4 or len(self.temporal_kernels) != 4:
      raise ValueError(f"stage_blocks and temporal_kernels need 4 entries (res2..res5), got "
                       f"{tuple(self.stage_blocks)} and {tuple(self.temporal_kernels)}")
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Stem(self.width, self.stem_temporal_kernel, name="stem", **dtypes)(x, train=train)
    for stage, (num_blocks, kernels) in enumerate(zip(self.stage_blocks, self.temporal_kernels)):
      x = res_stage(x, stage=stage + 2, num_blocks=num_blocks, inner_width=self.width * 2**stage,
                    temporal_kernels=kernels, train=train, conv_b_temporal_kernel=self.conv_b_temporal_kernel,
                    temporal_shift=self.temporal_shift, **dtypes)
      if stage == 0 and self.res2_temporal_pool > 1:
        pool = self.res2_temporal_pool
        x = nn.max_pool(x, window_shape=(pool, 1, 1), strides=(pool, 1, 1), padding="VALID")
    return [x]  # one pathway (see models/backbones.py)
