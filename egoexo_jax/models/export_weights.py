"""Our variables out to PySlowFast: `.pyth` files with PySlowFast's key names and tensor layouts.

The inverse of models/import_weights.py (its docstring tables the names). Backbones: Slow-only
(slow_r50, slow_r101), SlowFast (slowfast_r50, slowfast_r101) and I3D (i3d_r50), which PySlowFast builds
as MODEL.ARCH 'slow', 'slowfast' and 'i3d'. Heads: the action head ('head.projection'; with Ego-Exo's
heads, MultiTaskHead's 'head.projections.0'), Ego-Exo's ego and object heads ('head.projections.1',
'.2') and interaction head ('handobjhead.*'). Per tensor: conv kernel (kt, kh, kw, I, O) -> weight
(O, I, kt, kh, kw); dense kernel (I, O) -> weight (O, I); BN scale, bias -> weight, bias; batch_stats
mean, var -> running_mean, running_var; plus PyTorch's `num_batches_tracked` (0) per BatchNorm, so
`model.load_state_dict(checkpoint['model_state'])` loads strictly. Tensors are float32 whatever the
variables' dtype.

The file is what PySlowFast's `checkpoint.save_checkpoint` writes, less the optimiser:
{'model_state': state dict, 'epoch': ..., 'cfg': a PySlowFast YAML fragment (MODEL, RESNET, SLOWFAST,
DATA) describing the network and its input}. A network thinner or shallower than R50/R101 (a `:small`
run) keeps PySlowFast's names and layouts, but PySlowFast's builder has no depth for it (RESNET.DEPTH
is then null and the cfg says so).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from egoexo_jax import atomic_files
from egoexo_jax.models import backbones, import_weights, resnet3d
from egoexo_jax.models.resnet2d import WeightImportError

# Our backbone name -> PySlowFast's MODEL.ARCH, MODEL.MODEL_NAME.
PYSLOWFAST_ARCH = {"slow_r50": ("slow", "ResNet"), "slow_r101": ("slow", "ResNet"),
                   "slowfast_r50": ("slowfast", "SlowFast"), "slowfast_r101": ("slowfast", "SlowFast"),
                   "i3d_r50": ("i3d", "ResNet")}
_DEPTHS = {tuple(resnet3d.R50_BLOCKS): 50, tuple(resnet3d.R101_BLOCKS): 101}
_EGOEXO_HEADS = ("ego_head", "object_head", "interaction_head")


def _torch_tensor_layout(value: np.ndarray) -> np.ndarray:
  """Our layout -> PyTorch's: conv (kt, kh, kw, I, O) -> (O, I, kt, kh, kw), dense (I, O) -> (O, I)."""
  if value.ndim == 5:
    return value.transpose(4, 3, 0, 1, 2)
  return value.T if value.ndim == 2 else value


def to_pyslowfast(variables: Mapping[str, Any], backbone: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """{'params', 'batch_stats'} of `egoexo.Model` / `finetune.Model` (or of a bare 'backbone' subtree tree)
  -> (PySlowFast state dict of float32 arrays (num_batches_tracked int64), subtrees left out).

  Subtrees without a PySlowFast counterpart (fine-tuning heads other than 'action_head', SUM-L's
  projections, ...) are left out and listed; the backbone must map whole.
  """
  if backbone not in PYSLOWFAST_ARCH:
    raise WeightImportError(f"backbone '{backbone}' has no PySlowFast counterpart; PySlowFast export covers "
                            f"{sorted(PYSLOWFAST_ARCH)}")
  params = variables["params"]
  if "backbone" not in params:
    raise WeightImportError(f"the variables have no 'backbone' subtree (they have {sorted(params)})")
  action_key = "head.projections.0" if any(h in params for h in _EGOEXO_HEADS) else "head.projection"
  state_dict, left_out = {}, set()
  for collection in ("params", "batch_stats"):
    for key_path, value in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      path = tuple(k.key for k in key_path)
      key = import_weights.pyslowfast_key(collection, path, action_key)
      if key is None:
        if path[0] == "backbone":
          raise WeightImportError(f"{collection}/{'/'.join(path)} has no PySlowFast name")
        left_out.add(path[0])
        continue
      state_dict[key] = np.ascontiguousarray(_torch_tensor_layout(np.asarray(value, np.float32)))
  for key in [k for k in state_dict if k.endswith(".running_mean")]:
    state_dict[key[:-len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
  return state_dict, sorted(left_out)


def pyslowfast_cfg(model_config: Mapping[str, Any], data_config: Mapping[str, Any], num_classes: int | None) -> str:
  """A PySlowFast YAML fragment naming the network and its input (MODEL, RESNET, SLOWFAST, DATA)."""
  backbone = model_config["backbone"]
  arch, model_name = PYSLOWFAST_ARCH[backbone]
  module, arguments = backbones.backbone_arguments(backbone, model_config.get("backbone_args"))
  defaults = {name: field.default for name, field in module.__dataclass_fields__.items()
              if not isinstance(field.default, dataclasses._MISSING_TYPE)}  # pylint: disable=protected-access
  arguments = {**defaults, **arguments}
  depth = _DEPTHS.get(tuple(arguments["stage_blocks"]))
  lines = ["MODEL:", f"  ARCH: {arch}", f"  MODEL_NAME: {model_name}"]
  if num_classes is not None:
    lines.append(f"  NUM_CLASSES: {num_classes}")
  lines += ["RESNET:", f"  DEPTH: {depth if depth else 'null  # stage_blocks ' + str(list(arguments['stage_blocks']))}",
            f"  WIDTH_PER_GROUP: {arguments['width']}", "  NUM_GROUPS: 1", "  TRANS_FUNC: bottleneck_transform"]
  if arch == "slowfast":
    lines += ["SLOWFAST:", f"  ALPHA: {arguments['alpha']}", f"  BETA_INV: {arguments['beta_inv']}",
              f"  FUSION_CONV_CHANNEL_RATIO: {arguments['fusion_channel_ratio']}",
              f"  FUSION_KERNEL_SZ: {arguments['fusion_kernel']}"]
  if data_config:
    from egoexo_jax.input import transforms  # pylint: disable=g-import-not-at-top
    lines += ["DATA:", f"  NUM_FRAMES: {data_config.get('clip_length')}",
              f"  SAMPLING_RATE: {data_config.get('frame_stride')}",
              f"  TRAIN_CROP_SIZE: {data_config.get('crop_size')}",
              f"  MEAN: [{transforms.MEAN}, {transforms.MEAN}, {transforms.MEAN}]",
              f"  STD: [{transforms.STD}, {transforms.STD}, {transforms.STD}]"]
  return "\n".join(lines) + "\n"


def save_pyth(state_dict: Mapping[str, np.ndarray], path: str, *, cfg: str = "", epoch: int = 0) -> None:
  """Writes {'model_state': torch tensors, 'epoch', 'cfg'} with torch.save, whole or not at all."""
  import torch  # pylint: disable=g-import-not-at-top

  checkpoint = {"model_state": {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()},
                "epoch": int(epoch), "cfg": cfg}
  temporary = atomic_files.temporary_name(path)
  try:
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def export_pyth(variables: Mapping[str, Any], model_config: Mapping[str, Any], path: str, *,
                data_config: Mapping[str, Any] | None = None, epoch: int = 0) -> dict[str, Any]:
  """to_pyslowfast + save_pyth; returns {'path', 'keys', 'left_out', 'arch'} for the model card."""
  backbone = model_config["backbone"]
  state_dict, left_out = to_pyslowfast(variables, backbone)
  head = state_dict.get("head.projection.weight", state_dict.get("head.projections.0.weight"))
  cfg = pyslowfast_cfg(model_config, data_config or {}, None if head is None else int(head.shape[0]))
  save_pyth(state_dict, path, cfg=cfg, epoch=epoch)
  return {"path": os.path.basename(path), "keys": len(state_dict), "left_out": left_out,
          "arch": PYSLOWFAST_ARCH[backbone][0]}

