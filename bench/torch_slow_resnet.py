"""PyTorch reference of egoexo_jax's Slow-only ResNet-3D with its action head, laid out as PySlowFast.

The same network as the backbone + action head of egoexo_jax.models.egoexo.Model (Slow-only R50 8x8 with
the defaults), in torch.nn with PySlowFast's NCTHW layout. bench/train_step.py uses it as the speed peer;
module names follow the Flax tree (stem_conv <-> backbone/stem/conv, blocks.res3_block0.conv_b <->
backbone/res3_block0/conv_b, head <-> action_head/linear) so it can serve as a parity reference too.

  model = SlowResNet(stage_blocks=(3, 4, 6, 3), width=64, temporal_kernels=(1, 1, 3, 3), num_classes=400)
  logits = model(clips)  # clips: normalised float (B, 3, T, H, W) -> (B, num_classes)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGE_SPATIAL_STRIDES = (1, 2, 2, 2)  # res2..res5, on the first block of each stage


def resolved_arguments(module, preset: dict) -> dict:
  """A Flax backbone's full arguments: `preset` (from backbones.backbone_arguments) over the module's field
  defaults, so that stage_blocks, width and temporal_kernels are there even where the preset omits them."""
  defaults = {name: field.default for name, field in module.__dataclass_fields__.items()
              if isinstance(field.default, (int, float, tuple, str, bool))}
  return {**defaults, **preset}


def conv3d(in_width: int, out_width: int, kernel: tuple[int, int, int],
           stride: tuple[int, int, int] = (1, 1, 1)) -> nn.Conv3d:
  """Bias-free conv padded by k // 2 per dim; PySlowFast's c2_msra_fill init (kaiming normal, fan_out)."""
  conv = nn.Conv3d(in_width, out_width, kernel, stride, padding=tuple(k // 2 for k in kernel), bias=False)
  nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
  return conv


class Bottleneck(nn.Module):
  """relu(bn_c(conv_c(relu(bn_b(conv_b(relu(bn_a(conv_a(x)))))))) + shortcut(x)), bn_c's gamma starting at 0."""

  def __init__(self, in_width: int, inner_width: int, out_width: int, temporal_kernel: int, spatial_stride: int):
    super().__init__()
    stride = (1, spatial_stride, spatial_stride)
    self.shortcut_conv = self.shortcut_bn = None
    if in_width != out_width or spatial_stride != 1:  # projection shortcut
      self.shortcut_conv = conv3d(in_width, out_width, (1, 1, 1), stride)
      self.shortcut_bn = nn.BatchNorm3d(out_width)
    self.conv_a, self.bn_a = conv3d(in_width, inner_width, (temporal_kernel, 1, 1)), nn.BatchNorm3d(inner_width)
    self.conv_b, self.bn_b = conv3d(inner_width, inner_width, (1, 3, 3), stride), nn.BatchNorm3d(inner_width)
    self.conv_c, self.bn_c = conv3d(inner_width, out_width, (1, 1, 1)), nn.BatchNorm3d(out_width)
    nn.init.zeros_(self.bn_c.weight)  # PySlowFast ZERO_INIT_FINAL_BN

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
    y = F.relu(self.bn_a(self.conv_a(x)))
    y = F.relu(self.bn_b(self.conv_b(y)))
    y = self.bn_c(self.conv_c(y))
    return F.relu(y + shortcut)


class SlowResNet(nn.Module):
  """Clips (B, 3, T, H, W) -> action logits (B, num_classes); no temporal striding, space reduced 32x.

  Stem: conv (1, 7, 7) /2, BN, ReLU, max-pool (1, 3, 3) /2. Stage k of res2..res5: stage_blocks[k]
  bottlenecks of inner width width * 2**k, out width 4x that, conv_a temporal kernel temporal_kernels[k].
  Head: global average pool, dropout, linear (normal std 0.01, bias 0), as PySlowFast's ResNetBasicHead.
  BatchNorm keeps PyTorch's defaults (momentum 0.1, eps 1e-5), which the Flax model copies.
  """

  def __init__(self, stage_blocks=(3, 4, 6, 3), width: int = 64, temporal_kernels=(1, 1, 3, 3),
               num_classes: int = 400, dropout_rate: float = 0.5):
    super().__init__()
    self.stem_conv, self.stem_bn = conv3d(3, width, (1, 7, 7), (1, 2, 2)), nn.BatchNorm3d(width)
    self.stem_pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
    self.blocks = nn.ModuleDict()
    in_width = width
    stages = zip(stage_blocks, temporal_kernels, STAGE_SPATIAL_STRIDES, strict=True)
    for stage, (num_blocks, temporal_kernel, spatial_stride) in enumerate(stages):
      inner_width = width * 2**stage
      for block in range(num_blocks):
        self.blocks[f"res{stage + 2}_block{block}"] = Bottleneck(
            in_width, inner_width, 4 * inner_width, temporal_kernel, spatial_stride if block == 0 else 1)
        in_width = 4 * inner_width
    self.dropout = nn.Dropout(dropout_rate)
    self.head = nn.Linear(in_width, num_classes)
    nn.init.normal_(self.head.weight, std=0.01)
    nn.init.zeros_(self.head.bias)

  def forward(self, clips: torch.Tensor) -> torch.Tensor:
    x = self.stem_pool(F.relu(self.stem_bn(self.stem_conv(clips))))
    for block in self.blocks.values():
      x = block(x)
    features = x.float().mean(dim=(2, 3, 4))  # pooled in float32, as the Flax model does
    return self.head(self.dropout(features))


def make_train_step(forward, optimizer: torch.optim.Optimizer, clips: torch.Tensor, labels: torch.Tensor, *,
                    mean: float, std: float, autocast: bool):
  """The peer's training step on resident uint8 clips (B, 3, T, H, W) as a closure: normalise with `mean`
  and `std` (0-1 scale), forward under bf16 autocast when `autocast`, cross-entropy in float32, backward,
  optimizer step; on CUDA it waits for the device before returning."""

  def step():
    x = (clips.float() / 255.0 - mean) / std
    with torch.autocast(clips.device.type, dtype=torch.bfloat16, enabled=autocast):
      logits = forward(x)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if clips.device.type == "cuda":
      torch.cuda.synchronize()

  return step


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  print(__doc__.strip() + "\n\nA module, not a benchmark: bench/train_step.py and bench/backbones.py import it "
        "as their PyTorch peer.", file=sys.stdout if "--help" in sys.argv or "-h" in sys.argv else sys.stderr)
