"""SlowFast (Feichtenhofer et al., ICCV 2019), built as PySlowFast's `SlowFast` model, channels-last.

The input is the Fast pathway's clip (B, T, H, W, 3); the Slow pathway takes T / alpha of its frames,
chosen as PySlowFast's data loader chooses them (`slow_frame_indices`). Both pathways are the
bottleneck ResNet of models/resnet3d.py; the Fast one has 1/beta_inv of the width:

    pathway  stem       conv_a temporal kernels res2..res5   res5 out
    slow     1 x 7 x 7  1, 1, 3, 3                            (B, T / alpha, H/32, W/32, 32 * width)
    fast     5 x 7 x 7  3, 3, 3, 3                            (B, T, H/32, W/32, 32 * width / beta_inv)

(PySlowFast `_TEMPORAL_KERNEL_BASIS['slowfast']`.) After the stem and after res2, res3 and res4 a lateral
connection fuses Fast into Slow: conv (fusion_kernel, 1, 1) with temporal stride alpha to
fusion_channel_ratio x the Fast width, BN, ReLU, concatenated to the Slow features along channels.
PySlowFast's pool1 for SlowFast is (1, 1, 1) in both pathways, i.e. none.

Presets: SLOWFAST_R50 is PySlowFast's SLOWFAST_8x8_R50 (alpha 4, beta_inv 8, fusion kernel 7) and
SLOWFAST_R101 its SLOWFAST_8x8_R101_101_101 (fusion kernel 5). "8x8" means a Slow clip of 8 frames at
stride 8, i.e. a Fast clip of 32 frames at stride 2 (config data.clip_length=32, data.frame_stride=2).

Submodules: 'slow_stem' / 'fast_stem' (resnet3d.Stem), 'slow_res{2..5}_block{i}' /
'fast_res{2..5}_block{i}' (resnet3d.Bottleneck), and 'fuse_stem', 'fuse_res2', 'fuse_res3',
'fuse_res4' ('conv', 'bn'): PySlowFast's s1.pathway{0,1}_stem, s{k}.pathway{0,1}_res{i}, s{k}_fuse.

Parameters with a 400-way action head (`egoexo.Model(num_classes=400, use_ego_heads=False)`), measured in
tests/resnet3d_test.py: slowfast_r50 34,566,488 (PyTorchVideo model zoo: 34.57M), slowfast_r101
62,826,968 (62.83M).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from egoexo_jax.models.resnet3d import R50_BLOCKS, R101_BLOCKS, Conv3D, Stem, batch_norm, res_stage

SLOWFAST_R50 = dict(stage_blocks=R50_BLOCKS, fusion_kernel=7)
SLOWFAST_R101 = dict(stage_blocks=R101_BLOCKS, fusion_kernel=5)


def slow_frame_indices(num_frames: int, alpha: int) -> np.ndarray:
  """Indices of the Slow pathway's frames among `num_frames` Fast frames, as PySlowFast picks them.

  PySlowFast (`pack_pathway_output`) takes torch.linspace(0, T - 1, T // alpha).long(): evenly spaced
  float32 positions, truncated toward zero. This computes them the way torch's CPU kernel does
  (float32 step; the first half counted up from 0, the second half down from T - 1), so the
  truncation lands on the same frames. For T = 32, alpha = 4: 0, 4, 8, 13, 17, 22, 26, 31.
  """
  steps = num_frames // alpha
  if steps == 1:
    return np.zeros(1, np.int64)
  start, end = np.float32(0), np.float32(num_frames - 1)
  step = np.float32((end - start) / np.float32(steps - 1))
  positions = [start + step * np.float32(i) if i < steps // 2 else end - step * np.float32(steps - 1 - i)
               for i in range(steps)]
  return np.array(positions, np.float32).astype(np.int64)


class FastToSlowFusion(nn.Module):
  """Lateral connection: slow (B, t, h, w, Cs), fast (B, alpha * t, h, w, Cf) -> (B, t, h, w, Cs + ratio * Cf).

  conv (kernel, 1, 1) with temporal stride alpha and padding kernel // 2, BN, ReLU, then concatenated
  after the Slow channels (PySlowFast's FuseFastToSlow: 'conv' = conv_f2s, 'bn' = bn).
  """

  alpha: int
  kernel: int
  channel_ratio: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, slow: jax.Array, fast: jax.Array, *, train: bool) -> jax.Array:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    fused = Conv3D(self.channel_ratio * fast.shape[-1], (self.kernel, 1, 1), (self.alpha, 1, 1), name="conv",
                   **dtypes)(fast)
    fused = nn.relu(batch_norm(train=train, name="bn", **dtypes)(fused))
    if fused.shape[:4] != slow.shape[:4]:
      raise ValueError(f"fused Fast features {fused.shape} do not match the Slow features {slow.shape} "
                       f"(alpha {self.alpha}, fusion kernel {self.kernel})")
    return jnp.concatenate([slow, fused], axis=-1)


class SlowFast(nn.Module):
  """Fast clips (B, T, H, W, 3), T a multiple of alpha -> [slow res5 (B, T/alpha, H/32, W/32, 32 * width),
  fast res5 (B, T, H/32, W/32, 32 * width / beta_inv)].

  `ResNet3D`'s stage rule per pathway (res{k} has stage_blocks[k - 2] blocks of inner width
  w * 2**(k - 2), w = width for Slow and width / beta_inv for Fast); see the module docstring.
  """

  stage_blocks: Sequence[int]
  width: int = 64
  alpha: int = 4
  beta_inv: int = 8
  fusion_kernel: int = 7
  fusion_channel_ratio: int = 2
  slow_temporal_kernels: Sequence[int | Sequence[int]] = (1, 1, 3, 3)
  fast_temporal_kernels: Sequence[int | Sequence[int]] = (3, 3, 3, 3)
  slow_stem_temporal_kernel: int = 1
  fast_stem_temporal_kernel: int = 5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, clips: jax.Array, *, train: bool) -> list[jax.Array]:
    num_frames = clips.shape[1]
    if num_frames % self.alpha:
      raise ValueError(f"SlowFast needs a clip length that is a multiple of alpha = {self.alpha}, got {num_frames}")
    if self.width % self.beta_inv:
      raise ValueError(f"width {self.width} is not divisible by beta_inv {self.beta_inv}")
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    fast_width = self.width // self.beta_inv

    def fuse(slow, fast, name):
      return FastToSlowFusion(self.alpha, self.fusion_kernel, self.fusion_channel_ratio, name=name,
                              **dtypes)(slow, fast, train=train)

    slow = clips[:, slow_frame_indices(num_frames, self.alpha)]
    slow = Stem(self.width, self.slow_stem_temporal_kernel, name="slow_stem", **dtypes)(slow, train=train)
    fast = Stem(fast_width, self.fast_stem_temporal_kernel, name="fast_stem", **dtypes)(clips, train=train)
    slow = fuse(slow, fast, "fuse_stem")
    for stage in range(4):
      stage_args = dict(stage=stage + 2, num_blocks=self.stage_blocks[stage], train=train, **dtypes)
      slow = res_stage(slow, inner_width=self.width * 2**stage, temporal_kernels=self.slow_temporal_kernels[stage],
                       prefix="slow_", **stage_args)
      fast = res_stage(fast, inner_width=fast_width * 2**stage, temporal_kernels=self.fast_temporal_kernels[stage],
                       prefix="fast_", **stage_args)
      if stage < 3:
        slow = fuse(slow, fast, f"fuse_res{stage + 2}")
    return [slow, fast]
