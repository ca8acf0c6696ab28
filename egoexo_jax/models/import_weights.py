"""Pretrained weights for `egoexo.Model`: PySlowFast and Caffe2 checkpoints, inflated torchvision ResNets.

One module over 400 lines on purpose: the key mappings of three source formats (PySlowFast .pyth, Caffe2 .pkl,
torchvision), which share their checks.

    python -m egoexo_jax.models.import_weights --input=SLOWFAST_8x8_R50.pkl --format=caffe2 \\
        --backbone=slowfast_r50 --num_classes=400 --output_dir=/models/slowfast_r50_k400

writes the Orbax checkpoint `<output>/state`, a dict {'params': ..., 'batch_stats': ...} shaped as
`egoexo.Model(backbone=...)`'s variables, so that `checkpointing.load_backbone(<output>, ...)` and the
trainer's `--config.init_from=<output>` start from it. The folder is written under a temporary sibling
name and renamed when complete.

Formats (`--format`):
  pyslowfast   a `.pyth` file as PySlowFast (and Ego-Exo) save it: torch.save'd {'model_state': state
               dict, ...}; a bare state dict is accepted too.
  caffe2       a `.pkl` of the PySlowFast model zoo: a pickle {'blobs': {name: array}}, blob names such
               as 'res2_0_branch2a_w' or 'res_conv1_bn_rm', renamed to PySlowFast's (`caffe2_to_pyslowfast`).
  torchvision  an ImageNet ResNet state dict (`resnet50-*.pth`, `resnet152-*.pth`), inflated into a
               single-pathway backbone (`inflate_torchvision`); for ResNet-152 pass
               --backbone_args='{"stage_blocks": [3, 8, 36, 3]}' (and train with the same backbone_args).

PySlowFast names <-> ours (models/resnet3d.py, models/slowfast.py, models/heads.py), p = pathway:

    s1.pathway{p}_stem.{conv,bn}               backbone/{stem | slow_stem | fast_stem}/{conv,bn}
    s{k}.pathway{p}_res{i}.branch2.{a,b,c}     backbone/{|slow_|fast_}res{k}_block{i}/conv_{a,b,c}
    s{k}.pathway{p}_res{i}.branch2.{a,b,c}_bn  .../bn_{a,b,c}
    s{k}.pathway{p}_res{i}.branch1{,_bn}       .../shortcut_{conv,bn}
    s{k}_fuse.{conv_f2s,bn}                    backbone/fuse_{stem (k = 1) | res{k}}/{conv,bn}
    head.projection  or  head.projections.0    action_head/linear     (PySlowFast / Ego-Exo MultiTaskHead)
    head.projections.1, head.projections.2     ego_head/linear (2-way), object_head/linear (Ego-Exo)
    handobjhead.pathway0_conv_fcn0             interaction_head/conv  (Ego-Exo HandObjHead[Single])
    handobjhead.score_projection               interaction_head/logits

and per tensor: conv weight (O, I, kt, kh, kw) -> kernel (kt, kh, kw, I, O); linear weight (O, I) ->
kernel (I, O); BN weight, bias -> params scale, bias; running_mean, running_var -> batch_stats mean, var.
Heads are imported when the checkpoint has them (the action head's class count must then equal
--num_classes, if given); a fine-tuning run keeps only the backbone (`load_backbone`).

Released fine-tuned checkpoints (Ego-Exo's Charades-Ego / EPIC-Kitchens models) name the head after
cfg.TASK: `head{TASK}` (video_model_builder.py / multi_models.py: `self.head_name = "head{}".format(cfg.TASK)`),
so `headcharades-ego.projection` (ResNetBasicHead, one head), `headepic100.projections.{0,1}` and
`headepic.projections.{0,1}` (MultiTaskHead over NUM_CLASSES_LIST = [verbs, nouns]), plus `handobjhead.*`
for Ego-Exo* (HandObjHeadSingle on the slow pathway). With --config=<a fine-tuning config> they import
into that config's `finetune.Model` (`convert_pyslowfast_finetune`): projection i -> the i-th head of
data.label_layout ('<name>_head/linear'), and `python -m egoexo_jax.evaluate --checkpoint=<output>`
evaluates the result without training.

Every tensor of the backbone (and of each imported head) must be in the file with its shape, and every
tensor of the file must be used; otherwise `WeightImportError` names the keys and shapes at fault.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from egoexo_jax import atomic_files, checkpointing
from egoexo_jax.models import backbones, egoexo, resnet3d
from egoexo_jax.models.resnet2d import WeightImportError, load_torch_state_dict

FORMATS = ("pyslowfast", "caffe2", "torchvision")

_BLOCK_PARTS = {"conv_a": "branch2.a", "bn_a": "branch2.a_bn", "conv_b": "branch2.b", "bn_b": "branch2.b_bn",
                "conv_c": "branch2.c", "bn_c": "branch2.c_bn", "shortcut_conv": "branch1", "shortcut_bn": "branch1_bn"}
_TORCHVISION_BLOCK_PARTS = {"conv_a": "conv1", "bn_a": "bn1", "conv_b": "conv2", "bn_b": "bn2", "conv_c": "conv3",
                            "bn_c": "bn3", "shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
           ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_BLOCK = re.compile(r"(slow_|fast_)?res(\d)_block(\d+)")
_EGOEXO_HEADS = {("ego_head", "linear"): "head.projections.1", ("object_head", "linear"): "head.projections.2",
                 ("interaction_head", "conv"): "handobjhead.pathway0_conv_fcn0",
                 ("interaction_head", "logits"): "handobjhead.score_projection"}


# --------------------------------------------------------------------------- reading files


def load_pyslowfast_checkpoint(path: str) -> dict[str, np.ndarray]:
  """A PySlowFast `.pyth` file -> {PySlowFast name: NumPy array}, floating-point tensors as float32.

  Takes the checkpoint's 'model_state' (as PySlowFast and Ego-Exo save it), or the file itself when it
  is a bare state dict (`resnet2d.load_torch_state_dict`: 'module.' prefixes removed, no code run).
  """
  return load_torch_state_dict(path, container_keys=("model_state",))


def caffe2_to_pyslowfast(blob: str) -> str:
  """A Caffe2 blob name of the PySlowFast model zoo -> the PySlowFast state-dict key it loads into.

  't_' marks the Fast pathway (pathway1); 'res{k}_{i}_branch2{a,b,c}' is block i of stage k;
  '{t_pool1 | t_res{k}_{i}_branch2c_bn}_subsample' is the lateral conv after the stem or stage k;
  'pred' the classifier. Suffixes: _w weight, _b bias, bn_s scale, bn_b shift, bn_rm running mean,
  bn_riv running variance. Names it does not know come back unchanged.
  """
  name = blob
  fusion = re.fullmatch(r"t_(pool1|res(\d)_\d+_branch2c_bn)_subsample_(bn_)?(.*)", name)
  if fusion:
    stage = fusion.group(2) or "1"
    name = f"s{stage}_fuse.{'bn' if fusion.group(3) else 'conv_f2s'}.{fusion.group(4)}"
  elif match := re.fullmatch(r"(t_)?res(\d)_(\d+)_branch(1|2[abc])_(.*)", name):
    pathway, stage, block, branch, rest = match.groups()
    part = "branch1_" if branch == "1" else f"branch2.{branch[1]}_"
    name = f"s{stage}.pathway{1 if pathway else 0}_res{block}.{part}{rest}"
  elif match := re.fullmatch(r"(t_)?(res_conv1_bn|conv1)_(.*)", name):
    pathway, part, rest = match.groups()
    name = f"s1.pathway{1 if pathway else 0}_stem.{'bn' if part == 'res_conv1_bn' else 'conv'}.{rest}"
  elif match := re.fullmatch(r"pred_(.*)", name):
    name = f"head.projection.{match.group(1)}"
  for suffix, leaf in (("bn[._]s", "bn.weight"), ("bn[._]b", "bn.bias"), ("bn[._]rm", "bn.running_mean"),
                       ("bn[._]riv", "bn.running_var"), ("[._]w", ".weight"), ("[._]b", ".bias")):
    name, replaced = re.subn(f"{suffix}$", leaf, name)
    if replaced:
      break
  return name


def load_caffe2_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """A Caffe2 `.pkl` -> ({PySlowFast name: float32 array}, {PySlowFast name: Caffe2 blob name}).

  Optimizer state (blobs named *_momentum, 'lr', 'model_iter') is skipped. Unpickling runs code
  from the file: read only files you trust (the PySlowFast model zoo's are plain NumPy pickles).
  """
  with open(path, "rb") as f:
    try:
      checkpoint = pickle.load(f, encoding="latin1")
    except Exception as e:  # pickle raises many kinds for non-pickle files
      raise WeightImportError(f"{path}: cannot read a Caffe2 pickle ({type(e).__name__}: {e})") from e
  blobs = checkpoint.get("blobs") if isinstance(checkpoint, Mapping) else None
  if not isinstance(blobs, Mapping):
    keys = list(checkpoint)[:5] if isinstance(checkpoint, Mapping) else []
    raise WeightImportError(f"{path}: expected a pickle {{'blobs': {{name: array}}}}, found "
                            f"{type(checkpoint).__name__} (keys {keys})")
  arrays, sources = {}, {}
  for blob, value in blobs.items():
    if blob.endswith("_momentum") or blob in ("lr", "model_iter"):
      continue
    key = caffe2_to_pyslowfast(blob)
    if key in sources:
      raise WeightImportError(f"{path}: blobs '{sources[key]}' and '{blob}' both map to '{key}'")
    arrays[key], sources[key] = np.asarray(value, np.float32), blob
  return arrays, sources


# --------------------------------------------------------------------------- names


def pyslowfast_key(collection: str, path: Sequence[str], action_head: str = "head.projection") -> str | None:
  """The PySlowFast state-dict key of our variable `collection/path` (e.g. 'params', ('backbone',
  'res2_block0', 'conv_a', 'kernel')), or None if PySlowFast has no such tensor. `action_head` is
  'head.projection' (PySlowFast's ResNetBasicHead) or 'head.projections.0' (Ego-Exo's MultiTaskHead)."""
  *modules, leaf = path
  leaf = _LEAVES.get((collection, leaf))
  if leaf is None:
    return None
  if modules[0] == "backbone":
    name, *parts = modules[1:]
    if name in ("stem", "slow_stem", "fast_stem"):
      module = f"s1.pathway{int(name == 'fast_stem')}_stem.{parts[0]}"
    elif match := re.fullmatch(r"fuse_(stem|res(\d))", name):
      module = f"s{match.group(2) or 1}_fuse.{'conv_f2s' if parts[0] == 'conv' else 'bn'}"
    elif match := _BLOCK.fullmatch(name):
      pathway, stage, block = match.groups()
      module = f"s{stage}.pathway{int(pathway == 'fast_')}_res{block}.{_BLOCK_PARTS[parts[0]]}"
    else:
      return None
  elif tuple(modules) == ("action_head", "linear"):
    module = action_head
  elif tuple(modules) in _EGOEXO_HEADS:
    module = _EGOEXO_HEADS[tuple(modules)]
  else:
    return None
  return f"{module}.{leaf}"


def torchvision_key(collection: str, path: Sequence[str]) -> str | None:
  """The torchvision ResNet key of our backbone variable `collection/path` ('backbone', ...), or None."""
  *modules, leaf = path
  leaf = _LEAVES.get((collection, leaf))
  if leaf is None or modules[0] != "backbone":
    return None
  name, *parts = modules[1:]
  if name == "stem":
    return f"{'conv1' if parts[0] == 'conv' else 'bn1'}.{leaf}"
  match = _BLOCK.fullmatch(name)
  if not match or match.group(1):
    return None
  _, stage, block = match.groups()
  return f"layer{int(stage) - 1}.{block}.{_TORCHVISION_BLOCK_PARTS[parts[0]]}.{leaf}"


# --------------------------------------------------------------------------- conversion


def _abstract_variables(model: egoexo.Model) -> dict:
  """Shapes of `model`'s variables, traced on a small clip (no arithmetic)."""
  _, arguments = backbones.backbone_arguments(model.backbone, model.backbone_args)
  frames = 2 * arguments.get("alpha", 4)  # a multiple of SlowFast's alpha, even for I3D's pool
  clips = jax.ShapeDtypeStruct((1, frames, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), clips)


def _fill(state_dict: Mapping[str, Any], abstract: Mapping, subtrees: Sequence[str],
          key_of: Callable[[str, tuple[str, ...]], str | None],
          convert: Callable[[np.ndarray, tuple[int, ...]], np.ndarray],
          torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]], *, network: str,
          ignored: Callable[[str], bool] = lambda key: False,
          source_names: Mapping[str, str] | None = None) -> dict[str, dict]:
  """{'params', 'batch_stats'} for the `subtrees` of `abstract`, each leaf `convert(state_dict[key_of(leaf)])`.

  Raises WeightImportError listing missing keys, unused keys (other than `ignored` ones) and shape
  mismatches (`torch_shape(flax shape)` is the shape the file must have).
  """
  def describe(key):
    return f"'{key}'" + (f" (blob '{source_names[key]}')" if source_names and key in source_names else "")

  given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  used, missing, mismatched = set(), [], []
  for collection in ("params", "batch_stats"):
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract.get(collection, {}))[0]:
      path = tuple(k.key for k in key_path)
      if path[0] not in subtrees:
        continue
      key = key_of(collection, path)
      if key is None or key not in given:
        missing.append(f"'{key}' (for {collection}/{'/'.join(path)})" if key else
                       f"{collection}/{'/'.join(path)} (no counterpart in this format)")
        continue
      used.add(key)
      value = np.asarray(given[key])
      if value.shape != torch_shape(leaf.shape):
        mismatched.append(f"{describe(key)} is {value.shape}, expected {torch_shape(leaf.shape)} "
                          f"(for {collection}/{'/'.join(path)} {leaf.shape})")
        continue
      node = variables[collection]
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = np.ascontiguousarray(convert(value, leaf.shape), np.float32)
  unused = [describe(k) + f" {np.shape(v)}" for k, v in given.items() if k not in used and not ignored(k)]
  problems = [f"{len(items)} {what}: " + "; ".join(items[:8]) + (f" ... ({len(items) - 8} more)" * (len(items) > 8))
              for what, items in (("missing keys", missing), ("unexpected keys", unused),
                                  ("shape mismatches", mismatched)) if items]
  if problems:
    raise WeightImportError(f"the checkpoint does not fit {network}: " + ". ".join(problems))
  return variables


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
  """PyTorch shape of a flax leaf: conv (kt, kh, kw, I, O) -> (O, I, kt, kh, kw), dense (I, O) -> (O, I)."""
  if len(shape) == 5:
    return (shape[4], shape[3], *shape[:3])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def _from_torch_layout(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A PyTorch tensor in our layout (the inverse of `_torch_layout`; `shape` is the target's, for `_fill`)."""
  if value.ndim == 5:
    return value.transpose(2, 3, 4, 1, 0)
  return value.T if value.ndim == 2 else value


def convert_pyslowfast(state_dict: Mapping[str, Any], backbone: str, *, num_classes: int | None = None,
                       backbone_args: Mapping[str, Any] | None = None,
                       source_names: Mapping[str, str] | None = None) -> tuple[dict[str, dict], dict[str, Any]]:
  """PySlowFast / Ego-Exo state dict -> (variables, model arguments) for `egoexo.Model(backbone=backbone, ...)`.

  `variables` is {'params': ..., 'batch_stats': ...} (float32 NumPy) holding 'backbone' and each head
  found in the file; `model arguments` ({num_classes, num_object_classes, interaction_channels,
  use_ego_heads, backbone, backbone_args, heads}) builds the `egoexo.Model` whose variables these are
  (`heads` lists the imported head subtrees). Keys of a Caffe2 file (`load_caffe2_checkpoint`) can be
  named in errors by their blob names via `source_names`.
  """
  action_key = next((k for k in ("head.projection", "head.projections.0") if f"{k}.weight" in state_dict), None)
  heads = ["action_head"] if action_key else []
  heads += list(dict.fromkeys(name for (name, _), key in _EGOEXO_HEADS.items() if f"{key}.weight" in state_dict))
  shape = lambda key: tuple(np.shape(state_dict[f"{key}.weight"]))
  if action_key and num_classes is not None and shape(action_key)[0] != num_classes:
    raise WeightImportError(f"'{action_key}.weight' is {shape(action_key)}: a {shape(action_key)[0]}-way action "
                            f"head, but num_classes is {num_classes} (leave num_classes unset to take the file's)")
  if "ego_head" in heads and shape("head.projections.1")[0] != 2:
    raise WeightImportError(f"'head.projections.1.weight' is {shape('head.projections.1')}: not Ego-Exo's "
                            "2-way Ego-Score head (is this a multi-head fine-tuning checkpoint?)")
  arguments = dict(
      backbone=backbone, backbone_args=dict(backbone_args or {}), heads=heads,
      num_classes=shape(action_key)[0] if action_key else (num_classes or 1),
      num_object_classes=shape("head.projections.2")[0] if "object_head" in heads else 1000,
      interaction_channels=(shape(_EGOEXO_HEADS["interaction_head", "conv"])[0] if "interaction_head" in heads
                            else 512),
      use_ego_heads=any(h != "action_head" for h in heads))
  model = egoexo.Model(**{k: v for k, v in arguments.items() if k != "heads"}, dropout_rate=0.0)
  variables = _fill(state_dict, _abstract_variables(model), ["backbone", *heads],
                    lambda collection, path: pyslowfast_key(collection, path, action_key or "head.projection"),
                    _from_torch_layout, _torch_layout, source_names=source_names,
                    network=f"'{backbone}' with backbone_args {arguments['backbone_args']} and heads {heads}")
  return variables, arguments


_RELEASED_HEAD = re.compile(r"(head[^.]*)\.(projection|projections\.(\d+))\.weight")


def released_head_keys(state_dict: Mapping[str, Any], head_names: Sequence[str]) -> dict[str, str]:
  """{our head subtree ('<name>_head'): the file's projection module} for a fine-tuned checkpoint.

  The file must hold exactly one `head{TASK}` module: with `projection`, one head; with `projections.0`
  .. `projections.{n-1}`, n heads in the order of `head_names` (Ego-Exo's NUM_CLASSES_LIST [verbs, nouns])."""
  found = {}
  for key in state_dict:
    if match := _RELEASED_HEAD.fullmatch(key):
      found.setdefault(match.group(1), []).append(match.group(2))
  if len(found) != 1:
    raise WeightImportError(f"expected one classification head 'head{{TASK}}.projection(s)' in the checkpoint, found "
                            f"{sorted(found) or 'none'}")
  (prefix, projections), = found.items()
  if projections == ["projection"]:
    modules = [f"{prefix}.projection"]
  else:
    modules = [f"{prefix}.projections.{i}" for i in range(len(projections))]
    if sorted(projections) != sorted(m[len(prefix) + 1:] for m in modules):
      raise WeightImportError(f"'{prefix}' has projections {sorted(projections)}, not 0..{len(projections) - 1}")
  if len(modules) != len(head_names):
    raise WeightImportError(f"'{prefix}' has {len(modules)} projection(s) ({', '.join(modules)}), the model "
                            f"{len(head_names)} head(s) {list(head_names)} "
                            "(config data.label_layout / model.num_classes)")
  return {f"{name}_head": module for name, module in zip(head_names, modules)}


def convert_pyslowfast_finetune(state_dict: Mapping[str, Any], model, head_names: Sequence[str], *,
                                source_names: Mapping[str, str] | None = None) -> dict[str, dict]:
  """A fine-tuned PySlowFast / Ego-Exo state dict (module docstring: `head{TASK}`, `handobjhead`) ->
  {'params', 'batch_stats'} of `model`, a `finetune.Model`, every array of it filled (its heads in the
  order `head_names`); `_fill`'s errors name missing, unexpected and misshapen keys."""
  heads = released_head_keys(state_dict, head_names)

  def key_of(collection, path):
    if path[0] in heads:
      leaf = _LEAVES.get((collection, path[-1]))
      return f"{heads[path[0]]}.{leaf}" if path[1:-1] == ("linear",) and leaf else None
    return pyslowfast_key(collection, path)

  abstract = _abstract_variables(model)
  return _fill(state_dict, abstract, sorted(abstract["params"]), key_of, _from_torch_layout, _torch_layout,
               source_names=source_names,
               network=f"the fine-tuning model '{model.backbone}' with backbone_args "
               f"{dict(model.backbone_args or {})}, heads {dict(model.num_classes)} and "
               f"use_interaction_head={model.use_interaction_head}")


def inflate_torchvision(state_dict: Mapping[str, Any], backbone: str, *,
                        backbone_args: Mapping[str, Any] | None = None) -> dict[str, dict]:
  """torchvision ImageNet ResNet state dict -> {'params': {'backbone'}, 'batch_stats': {'backbone'}}.

  For the single-pathway backbones (slow_*, i3d_r50, r3d_50, tsm_r50: `resnet3d.ResNet3D`). Every
  2-D kernel (O, I, kh, kw) becomes (kt, kh, kw, I, O) repeated over kt and divided by kt (I3D's
  inflation), so a clip of identical frames gives the 2-D network's features on every frame that no
  temporal padding reaches. The ImageNet classifier 'fc' is left out: the heads start fresh.
  """
  module, _ = backbones.backbone_arguments(backbone, backbone_args)
  if module is not resnet3d.ResNet3D:
    raise WeightImportError(f"torchvision weights inflate only into single-pathway ResNets (ResNet3D), not "
                            f"'{backbone}' ({module.__name__})")
  model = egoexo.Model(num_classes=1, backbone=backbone, backbone_args=backbone_args, use_ego_heads=False)

  def inflate(value, shape):
    if value.ndim == 4:  # (O, I, kh, kw) -> (kt, kh, kw, I, O) / kt
      return np.broadcast_to(value.transpose(2, 3, 1, 0)[None], shape) / shape[0]
    return value

  def torch_shape(shape):
    return (shape[4], shape[3], *shape[1:3]) if len(shape) == 5 else tuple(shape)

  return _fill(state_dict, _abstract_variables(model), ["backbone"], torchvision_key, inflate, torch_shape,
               network=f"'{backbone}' with backbone_args {dict(backbone_args or {})} (torchvision layout; "
               "stage_blocks (3,4,6,3) = ResNet-50, (3,8,36,3) = ResNet-152)",
               ignored=lambda key: key.startswith("fc."))


# --------------------------------------------------------------------------- writing


def save_variables(variables: Mapping[str, Any], output_dir: str) -> str:
  """Writes {'params', 'batch_stats'} as the Orbax checkpoint `<output_dir>/state`; returns its path.

  Written into a hidden temporary sibling folder that is renamed to `output_dir` when complete, so
  `output_dir` either holds a whole checkpoint or does not exist. An existing `output_dir` is an error.
  """
  output_dir = os.path.abspath(output_dir)  # Orbax needs absolute paths
  if os.path.exists(output_dir):
    raise FileExistsError(f"{output_dir} exists; remove it or choose another --output_dir")
  temporary = atomic_files.temporary_name(output_dir)
  shutil.rmtree(temporary, ignore_errors=True)
  tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  try:
    os.makedirs(temporary)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(temporary, checkpointing.STATE), jax.tree.map(jnp.asarray, tree))
    checkpointer.wait_until_finished()
    checkpointer.close()
    os.rename(temporary, output_dir)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  return os.path.join(output_dir, checkpointing.STATE)


def import_file(input_path: str, weight_format: str, backbone: str, output_dir: str, *,
                num_classes: int | None = None, backbone_args: Mapping[str, Any] | None = None,
                config=None) -> dict[str, Any]:
  """Reads `input_path` in `weight_format` (one of FORMATS), converts it and saves it under `output_dir`.

  With `config` (a fine-tuning config), the file is a fine-tuned checkpoint for that config's model
  (`convert_pyslowfast_finetune`; `backbone`, `num_classes` and `backbone_args` come from the config).
  Returns a summary: the model arguments the variables fit, the imported subtrees and parameter count.
  """
  if config is not None:
    from egoexo_jax.input import finetune_pipeline  # pylint: disable=g-import-not-at-top
    from egoexo_jax.models import build_model  # pylint: disable=g-import-not-at-top
    if weight_format not in ("pyslowfast", "caffe2"):
      raise ValueError(f"--config imports fine-tuned PySlowFast checkpoints (format pyslowfast or caffe2), not "
                       f"'{weight_format}'")
    state_dict, sources = (load_caffe2_checkpoint(input_path) if weight_format == "caffe2"
                           else (load_pyslowfast_checkpoint(input_path), None))
    model = build_model(config.model, "finetune")
    heads = [name for name, _ in finetune_pipeline.head_sizes(config)]
    variables = convert_pyslowfast_finetune(state_dict, model, heads, source_names=sources)
    arguments = dict(backbone=config.model.backbone, backbone_args=dict(config.model.backbone_args),
                     heads=sorted(k for k in variables["params"] if k != "backbone"))
  elif weight_format == "torchvision":
    variables = inflate_torchvision(load_torch_state_dict(input_path), backbone, backbone_args=backbone_args)
    arguments = dict(backbone=backbone, backbone_args=dict(backbone_args or {}), heads=[])
  elif weight_format in ("pyslowfast", "caffe2"):
    state_dict, sources = (load_caffe2_checkpoint(input_path) if weight_format == "caffe2"
                           else (load_pyslowfast_checkpoint(input_path), None))
    variables, arguments = convert_pyslowfast(state_dict, backbone, num_classes=num_classes,
                                              backbone_args=backbone_args, source_names=sources)
  else:
    raise ValueError(f"unknown format '{weight_format}'; known: {FORMATS}")
  path = save_variables(variables, output_dir)
  count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables["params"]))
  return dict(arguments, checkpoint=path, num_parameters=count)


def _define_flags() -> None:
  """Command-line flags; defined only when run as a script, so importing this module defines none."""
  flags.DEFINE_string("input", None, "Checkpoint file to import (.pyth, .pkl or torchvision .pth).")
  flags.DEFINE_enum("format", None, list(FORMATS), "Format of --input.")
  flags.DEFINE_string("backbone", None, f"Architecture, a name of models/backbones.py: {sorted(backbones.BACKBONES)}.")
  flags.DEFINE_integer("num_classes", None, "Action classes of the file's head (checked; default: the file's).")
  flags.DEFINE_string("backbone_args", "{}", "JSON overrides of the backbone preset, as config.model.backbone_args.")
  flags.DEFINE_string("output_dir", None, "Folder to create; the checkpoint is written to <output_dir>/state.")
  flags.DEFINE_alias("output", "output_dir")  # its earlier name
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "A fine-tuning config (path[:arg]): import a released fine-tuned "
                                  "checkpoint (head{TASK} names) into its model, for egoexo_jax.evaluate --checkpoint.")
  flags.mark_flags_as_required(["input", "format", "output_dir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.config is None and not f.backbone:
    raise app.UsageError("pass --backbone (an egoexo.Model checkpoint) or --config (a fine-tuned checkpoint)")
  summary = import_file(f.input, f.format, f.backbone, f.output_dir, num_classes=f.num_classes,
                        backbone_args=json.loads(f.backbone_args), config=f.config)
  print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
