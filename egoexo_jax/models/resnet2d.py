"""Image ResNet (bottleneck, v1.5) laid out as torchvision's, for ImageNet teachers such as Object-Score.

Images are channels-last: (B, H, W, 3) -> logits (B, num_classes). The network is torchvision's
`resnet50` / `resnet101` / `resnet152` ("v1.5": the stride of a downsampling block is on its 3x3 conv,
not on its first 1x1 conv), with PyTorch's symmetric padding (7x7 conv pad 3, 3x3 convs and the 3x3
max-pool pad 1), so torchvision ImageNet weights give torchvision's logits (`convert_torchvision_resnet`).

Submodules mirror torchvision's module names one-to-one ('.' becomes '_' inside a block):

    torchvision                       here
    conv1, bn1                        conv1, bn1
    layer{s}.{b}.conv{1,2,3}          layer{s}_{b}/conv{1,2,3}
    layer{s}.{b}.bn{1,2,3}            layer{s}_{b}/bn{1,2,3}
    layer{s}.{b}.downsample.0 / .1    layer{s}_{b}/downsample_conv / downsample_bn
    fc                                fc

BatchNorm: epsilon 1e-5, momentum 0.9 (PyTorch's 0.1), running statistics in 'batch_stats'. The
module is meant for inference (`train=False`, the default); `train=True` uses batch statistics and
needs `mutable=['batch_stats']`, as any Flax BatchNorm.

Initialisation follows torchvision's: convs kaiming-normal (fan_out, gain sqrt(2)), BN gamma 1 and
beta 0, fc kernel uniform(+-1/sqrt(fan_in)) (PyTorch's nn.Linear). One difference: the fc bias starts
at 0 (PyTorch draws it uniformly). Random weights are for tests only; a teacher needs imported weights.

    Model(**RESNET50)   25,557,032 parameters, as torchvision's resnet50
    Model(**RESNET152)  60,192,808 parameters, as torchvision's resnet152
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RESNET50 = dict(stage_blocks=(3, 4, 6, 3))
RESNET101 = dict(stage_blocks=(3, 4, 23, 3))
RESNET152 = dict(stage_blocks=(3, 8, 36, 3))

# Spatial stride of the first block of layer1..layer4.
STAGE_STRIDES = (1, 2, 2, 2)
EXPANSION = 4  # bottleneck out width / inner width

# torchvision: nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"), a plain (untruncated) normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch nn.Linear's default kernel init: kaiming_uniform(a=sqrt(5)) = uniform(+-1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv(features: int, kernel: int, stride: int, *, name: str, dtype: Any, param_dtype: Any) -> nn.Conv:
  """Bias-free conv with PyTorch padding (kernel // 2 on each side): 'SAME' would pad (0, 1) at stride 2."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_kernel_init, dtype=dtype, param_dtype=param_dtype, name=name)


def _batch_norm(*, train: bool, name: str, dtype: Any, param_dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck: relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + downsample(x)).

  conv1 1x1 to `inner_width`, conv2 3x3 with the stride, conv3 1x1 to 4 * inner_width. `downsample`
  (1x1 conv with the stride, BN) is present when the width or the resolution changes, else identity.
  """

  inner_width: int
  stride: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out_width = EXPANSION * self.inner_width
    shortcut = x
    if x.shape[-1] != out_width or self.stride != 1:
      shortcut = _conv(out_width, 1, self.stride, name="downsample_conv", **dtypes)(x)
      shortcut = _batch_norm(train=train, name="downsample_bn", **dtypes)(shortcut)
    y = _conv(self.inner_width, 1, 1, name="conv1", **dtypes)(x)
    y = nn.relu(_batch_norm(train=train, name="bn1", **dtypes)(y))
    y = _conv(self.inner_width, 3, self.stride, name="conv2", **dtypes)(y)
    y = nn.relu(_batch_norm(train=train, name="bn2", **dtypes)(y))
    y = _conv(out_width, 1, 1, name="conv3", **dtypes)(y)
    y = _batch_norm(train=train, name="bn3", **dtypes)(y)
    return nn.relu(y + shortcut)


class ResNet2D(nn.Module):
  """Bottleneck image ResNet: (B, H, W, 3) normalised images -> (B, num_classes) logits.

  layer{s} (s = 1..4) has stage_blocks[s - 1] blocks of inner width width * 2**(s - 1) and out width 4x
  that. Logits come out in `dtype`; cast them to float32 before averaging.
  """

  stage_blocks: Sequence[int] = RESNET50["stage_blocks"]
  width: int = 64
  num_classes: int = 1000
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if len(self.stage_blocks) != len(STAGE_STRIDES):
      raise ValueError(f"stage_blocks must have {len(STAGE_STRIDES)} entries, got {tuple(self.stage_blocks)}")
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(self.width, 7, 2, name="conv1", **dtypes)(x)
    x = nn.relu(_batch_norm(train=train, name="bn1", **dtypes)(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (num_blocks, stride) in enumerate(zip(self.stage_blocks, STAGE_STRIDES)):
      for block in range(num_blocks):
        x = Bottleneck(self.width * 2**stage, stride if block == 0 else 1, name=f"layer{stage + 1}_{block}",
                       **dtypes)(x, train=train)
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)  # adaptive average pool to 1x1, then flatten
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="fc")(x)


Model = ResNet2D  # build_model looks up `Model` by module name ('resnet2d')


# --------------------------------------------------------------------------- torchvision weight import


class WeightImportError(ValueError):
  """A state dict that does not fit the network; the message names the keys and shapes at fault."""


def load_torch_state_dict(path: str, container_keys: Sequence[str] = ("state_dict", "model")) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint into {name: NumPy array}, floating-point tensors as float32.

  Accepts a raw state dict (what torchvision publishes) or a training checkpoint holding one under the
  first of `container_keys` it has (torchvision-style training scripts: 'state_dict' or 'model';
  PySlowFast and Ego-Exo: 'model_state'). A 'module.' prefix on every key (nn.DataParallel) is removed.
  Loaded with `weights_only=True`: tensors and plain containers only, no code from the file is run.
  """
  import torch  # pylint: disable=g-import-not-at-top  (only weight import needs torch)

  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # torch raises many kinds for corrupt or non-torch files
    raise WeightImportError(f"{path}: cannot read a PyTorch checkpoint ({type(e).__name__}: {e})") from e
  state_dict = checkpoint
  if isinstance(checkpoint, Mapping):
    for key in container_keys:
      if isinstance(checkpoint.get(key), Mapping):
        state_dict = checkpoint[key]
        break
  if not isinstance(state_dict, Mapping) or not state_dict:
    under = " / ".join(f"'{key}'" for key in container_keys)
    raise WeightImportError(f"{path}: expected a state dict {{name: tensor}} (or one under {under}), found "
                            f"{type(state_dict).__name__}")
  if all(key.startswith("module.") for key in state_dict):
    state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
  arrays = {}
  for key, value in state_dict.items():
    if not isinstance(value, torch.Tensor):
      raise WeightImportError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
    arrays[key] = value.detach().to(torch.float32).numpy() if value.is_floating_point() else value.numpy()
  return arrays


def _torchvision_layout(stage_blocks: Sequence[int], width: int, num_classes: int):
  """Yields (torch key, torch shape, flax collection, flax path) for every tensor of the network."""

  def conv(torch_name, flax_path, out_c, in_c, k):
    yield f"{torch_name}.weight", (out_c, in_c, k, k), "params", (*flax_path, "kernel")

  def bn(torch_name, flax_path, c):
    for torch_leaf, collection, flax_leaf in (("weight", "params", "scale"), ("bias", "params", "bias"),
                                              ("running_mean", "batch_stats", "mean"),
                                              ("running_var", "batch_stats", "var")):
      yield f"{torch_name}.{torch_leaf}", (c,), collection, (*flax_path, flax_leaf)

  yield from conv("conv1", ("conv1",), width, 3, 7)
  yield from bn("bn1", ("bn1",), width)
  in_c = width
  for stage, (num_blocks, stride) in enumerate(zip(stage_blocks, STAGE_STRIDES)):
    inner = width * 2**stage
    out_c = EXPANSION * inner
    for block in range(num_blocks):
      t, f = f"layer{stage + 1}.{block}", f"layer{stage + 1}_{block}"
      yield from conv(f"{t}.conv1", (f, "conv1"), inner, in_c, 1)
      yield from bn(f"{t}.bn1", (f, "bn1"), inner)
      yield from conv(f"{t}.conv2", (f, "conv2"), inner, inner, 3)
      yield from bn(f"{t}.bn2", (f, "bn2"), inner)
      yield from conv(f"{t}.conv3", (f, "conv3"), out_c, inner, 1)
      yield from bn(f"{t}.bn3", (f, "bn3"), out_c)
      if block == 0 and (in_c != out_c or stride != 1):
        yield from conv(f"{t}.downsample.0", (f, "downsample_conv"), out_c, in_c, 1)
        yield from bn(f"{t}.downsample.1", (f, "downsample_bn"), out_c)
      in_c = out_c
  yield "fc.weight", (num_classes, in_c), "params", ("fc", "kernel")
  yield "fc.bias", (num_classes,), "params", ("fc", "bias")


def infer_torchvision_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """stage_blocks, width and num_classes of a torchvision ResNet state dict, read from its keys and shapes.

  Only a guess for building the network: `convert_torchvision_resnet` then checks every key and shape.
  """
  stage_blocks = []
  for stage in range(1, len(STAGE_STRIDES) + 1):
    blocks = {key.split(".")[1] for key in state_dict if key.startswith(f"layer{stage}.")}
    stage_blocks.append(max((int(b) for b in blocks if b.isdigit()), default=-1) + 1)
  present = [key for key in ("conv1.weight", "fc.weight") if key in state_dict]
  if len(present) < 2 or not all(stage_blocks):
    raise WeightImportError(
        f"not a torchvision ResNet state dict: it has {'' if 'conv1.weight' in present else 'no conv1.weight, '}"
        f"{'' if 'fc.weight' in present else 'no fc.weight, '}blocks per layer1..layer4 {stage_blocks} "
        f"(first keys: {_list_keys(list(state_dict), 4)})")
  return dict(stage_blocks=tuple(stage_blocks), width=int(np.shape(state_dict["conv1.weight"])[0]),
              num_classes=int(np.shape(state_dict["fc.weight"])[0]))


def _list_keys(keys: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(f"'{k}'" for k in keys[:limit])
  return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_torchvision_resnet(state_dict: Mapping[str, Any], stage_blocks: Sequence[int], *, width: int = 64,
                               num_classes: int = 1000, dtype: Any = np.float32) -> dict[str, dict]:
  """torchvision ResNet state dict -> {'params': ..., 'batch_stats': ...} for `ResNet2D(stage_blocks, ...)`.

  Conv weights (O, I, H, W) become kernels (H, W, I, O); BN weight/bias/running_mean/running_var become
  scale/bias (params) and mean/var (batch_stats); fc.weight (O, I) becomes the Dense kernel (I, O).
  `num_batches_tracked` entries are ignored. Values may be NumPy arrays or CPU torch tensors.

  Every expected key must be present with its expected shape and no other key may be present; otherwise
  `WeightImportError` names the missing and unexpected keys (e.g. a ResNet-50 file given for
  ResNet-152) or the mismatched shapes (e.g. a 1000-way file for a 10-way network).
  """
  given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  layout = list(_torchvision_layout(tuple(stage_blocks), width, num_classes))
  expected = {key for key, *_ in layout}
  missing = [key for key, *_ in layout if key not in given]
  unexpected = [key for key in given if key not in expected]
  network = f"ResNet2D(stage_blocks={tuple(stage_blocks)}, width={width}, num_classes={num_classes})"
  if missing or unexpected:
    problems = []
    if missing:
      problems.append(f"{len(missing)} missing keys: {_list_keys(missing)}")
    if unexpected:
      problems.append(f"{len(unexpected)} unexpected keys: {_list_keys(unexpected)}")
    raise WeightImportError(f"the state dict does not fit {network}: {'; '.join(problems)}. Is it a torchvision "
                            f"ResNet of the same depth (stage_blocks (3,4,6,3) = ResNet-50, (3,8,36,3) = ResNet-152)?")
  mismatched = [f"'{key}' is {tuple(np.shape(given[key]))}, expected {shape}"
                for key, shape, *_ in layout if tuple(np.shape(given[key])) != shape]
  if mismatched:
    raise WeightImportError(f"the state dict does not fit {network}: {len(mismatched)} shape mismatches: "
                            + "; ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else ""))

  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for key, _, collection, path in layout:
    value = np.asarray(given[key], dtype)
    if path[-1] == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)  # (I, O) / (H, W, I, O)
    node = variables[collection]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return variables
