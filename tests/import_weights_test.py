"""Weight import: PySlowFast, Ego-Exo and Caffe2 checkpoints, inflated torchvision ResNets, the CLI.

PySlowFast is not installed here, so the parity tests build its networks with torch.nn (conftest.py's
VideoResNet): the same module tree and state-dict names as PySlowFast's `ResNet` (Slow-only) and
`SlowFast`, and Ego-Exo's MultiTaskHead and HandObjHeadSingle, at full depth and width on small clips,
with random weights and random BatchNorm statistics, in eval mode.
"""

import json
import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from conftest import VideoResNet, pack_pathways, randomize, resnet_stages
from egoexo_jax import checkpointing
from egoexo_jax.models import backbones, egoexo, import_weights, resnet2d
from egoexo_jax.models.resnet2d import WeightImportError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BLOCKS = (1, 1, 1, 1)


def run_both(torch_model, arch, variables, model_args, frames, backbone_args=None):
  """Outputs and res5 maps of the torch model and of egoexo.Model with the imported variables, channels-last."""
  slowfast = arch.startswith("slowfast")
  with torch.no_grad():
    want, want_res5 = torch_model(pack_pathways(frames, slowfast))
  model = egoexo.Model(**{k: model_args[k] for k in ("num_classes", "num_object_classes", "interaction_channels",
                                                      "use_ego_heads")}, backbone=arch, backbone_args=backbone_args)
  capture = lambda module, _: module.name == "backbone"
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=capture))
  got, state = apply(variables, jnp.asarray(frames.numpy().transpose(0, 2, 3, 4, 1)))
  got_res5 = state["intermediates"]["backbone"]["__call__"][0]
  return ({k: v.numpy() for k, v in want.items()}, [m.numpy().transpose(0, 2, 3, 4, 1) for m in want_res5],
          {k: np.asarray(v) for k, v in got.items()}, [np.asarray(m) for m in got_res5])


def max_error(a, b):
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


# --------------------------------------------------------------------------- parity at full size


@pytest.mark.parametrize("arch,num_frames", [("slow_r50", 8), ("slowfast_r50", 32)])
def test_pyslowfast_checkpoint_gives_pyslowfast_logits_and_features(arch, num_frames, tmp_path):
  slowfast = arch.startswith("slowfast")
  torch_model = randomize(VideoResNet((3, 4, 6, 3), 10, slowfast))
  path = tmp_path / "checkpoint_epoch_00010.pyth"
  torch.save({"epoch": 10, "model_state": torch_model.state_dict(), "cfg": "MODEL:\n  ARCH: x\n"}, path)

  state_dict = import_weights.load_pyslowfast_checkpoint(str(path))
  variables, model_args = import_weights.convert_pyslowfast(state_dict, arch)
  assert model_args["num_classes"] == 10 and model_args["heads"] == ["action_head"]
  assert set(variables["params"]) == {"backbone", "action_head"} and set(variables["batch_stats"]) == {"backbone"}

  frames = torch.randn(2, 3, num_frames, 64, 64, generator=torch.Generator().manual_seed(1))
  want, want_res5, got, got_res5 = run_both(torch_model, arch, variables, model_args, frames)
  errors = [max_error(g, w) for g, w in zip(got_res5, want_res5)] + [max_error(got["action"], want["action"])]
  print(f"{arch}: max |error| res5 {errors[:-1]}, logits {errors[-1]:.2e}; |res5| up to "
        f"{max(np.abs(w).max() for w in want_res5):.2f}")
  assert len(got_res5) == (2 if slowfast else 1)
  assert max(errors) < 1e-4
  assert all(np.abs(w).max() > 0.1 for w in want_res5)  # the comparison is not between near-zero maps


def test_egoexo_multitask_and_interaction_heads_import(tmp_path):
  torch_model = randomize(VideoResNet(TINY_BLOCKS, 6, True, width=16, egoexo_heads=True), seed=2)
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  backbone_args = dict(stage_blocks=TINY_BLOCKS, width=16)
  variables, model_args = import_weights.convert_pyslowfast(state_dict, "slowfast_r50", num_classes=6,
                                                            backbone_args=backbone_args)
  assert model_args["heads"] == ["action_head", "ego_head", "object_head", "interaction_head"]
  assert (model_args["num_object_classes"], model_args["interaction_channels"]) == (12, 32)
  frames = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(3))
  want, _, got, _ = run_both(torch_model, "slowfast_r50", variables, model_args, frames, backbone_args)
  for name in ("action", "ego_score", "object", "interaction"):
    assert max_error(got[name], want[name]) < 1e-5, name


# --------------------------------------------------------------------------- Caffe2 names


# Blob names of the PySlowFast model zoo's Caffe2 files and the PySlowFast keys they load into.
CAFFE2_NAMES = {
    "conv1_w": "s1.pathway0_stem.conv.weight",
    "res_conv1_bn_s": "s1.pathway0_stem.bn.weight",
    "res_conv1_bn_riv": "s1.pathway0_stem.bn.running_var",
    "t_conv1_w": "s1.pathway1_stem.conv.weight",
    "t_res_conv1_bn_rm": "s1.pathway1_stem.bn.running_mean",
    "res2_0_branch2a_w": "s2.pathway0_res0.branch2.a.weight",
    "res2_0_branch2a_bn_b": "s2.pathway0_res0.branch2.a_bn.bias",
    "res4_5_branch2c_bn_s": "s4.pathway0_res5.branch2.c_bn.weight",
    "res3_0_branch1_w": "s3.pathway0_res0.branch1.weight",
    "res3_0_branch1_bn_rm": "s3.pathway0_res0.branch1_bn.running_mean",
    "t_res5_2_branch2b_w": "s5.pathway1_res2.branch2.b.weight",
    "t_res2_0_branch1_bn_riv": "s2.pathway1_res0.branch1_bn.running_var",
    "t_pool1_subsample_w": "s1_fuse.conv_f2s.weight",
    "t_pool1_subsample_bn_s": "s1_fuse.bn.weight",
    "t_res4_5_branch2c_bn_subsample_w": "s4_fuse.conv_f2s.weight",
    "t_res4_5_branch2c_bn_subsample_bn_riv": "s4_fuse.bn.running_var",
    "pred_w": "head.projection.weight",
    "pred_b": "head.projection.bias",
}


def test_caffe2_blob_names_map_to_pyslowfast_keys():
  assert {blob: import_weights.caffe2_to_pyslowfast(blob) for blob in CAFFE2_NAMES} == CAFFE2_NAMES


def to_caffe2_name(key, blocks_per_stage):
  """PySlowFast key -> Caffe2 blob name (the inverse of the mapping above), for writing test files."""
  leaf = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
  module, field = key.rsplit(".", 1)
  if match := re.fullmatch(r"s(\d)_fuse\.(conv_f2s|bn)", module):
    stage = int(match.group(1))
    last_block = blocks_per_stage[stage - 2] - 1 if stage > 1 else None
    base = "t_pool1_subsample" if stage == 1 else f"t_res{stage}_{last_block}_branch2c_bn_subsample"
    return f"{base}_w" if match.group(2) == "conv_f2s" else f"{base}_bn_{leaf[field]}"
  if match := re.fullmatch(r"s1\.pathway(\d)_stem\.(conv|bn)", module):
    prefix = "t_" if match.group(1) == "1" else ""
    return f"{prefix}conv1_w" if match.group(2) == "conv" else f"{prefix}res_conv1_bn_{leaf[field]}"
  if match := re.fullmatch(r"s(\d)\.pathway(\d)_res(\d+)\.(branch1|branch2\.[abc])(_bn)?", module):
    stage, pathway, block, branch, is_bn = match.groups()
    branch = "1" if branch == "branch1" else "2" + branch[-1]
    name = f"{'t_' if pathway == '1' else ''}res{stage}_{block}_branch{branch}"
    return f"{name}_bn_{leaf[field]}" if is_bn else f"{name}_w"
  assert module == "head.projection", key
  return "pred_w" if field == "weight" else "pred_b"


def test_caffe2_pickle_round_trip(tmp_path):
  torch_model = randomize(VideoResNet(TINY_BLOCKS, 5, True, width=16), seed=4)
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked")}
  blobs = {to_caffe2_name(k, TINY_BLOCKS): v for k, v in state_dict.items()}
  blobs.update({"conv1_w_momentum": np.zeros_like(blobs["conv1_w"]), "lr": np.float32(0.1), "model_iter": np.int64(9)})
  path = tmp_path / "SLOWFAST_tiny.pkl"
  with open(path, "wb") as f:
    pickle.dump({"blobs": blobs}, f)

  loaded, sources = import_weights.load_caffe2_checkpoint(str(path))
  assert set(loaded) == set(state_dict)
  assert all(np.array_equal(loaded[k], v) for k, v in state_dict.items())
  assert sources["s1_fuse.conv_f2s.weight"] == "t_pool1_subsample_w"

  backbone_args = dict(stage_blocks=TINY_BLOCKS, width=16)
  from_caffe2, _ = import_weights.convert_pyslowfast(loaded, "slowfast_r50", backbone_args=backbone_args)
  from_torch, _ = import_weights.convert_pyslowfast(state_dict, "slowfast_r50", backbone_args=backbone_args)
  jax.tree.map(np.testing.assert_array_equal, from_caffe2, from_torch)

  del loaded["s2.pathway1_res0.branch2.b.weight"]
  loaded["s1_fuse.conv_f2s.weight"] = loaded["s1_fuse.conv_f2s.weight"][:, :, :5]
  with pytest.raises(WeightImportError) as error:
    import_weights.convert_pyslowfast(loaded, "slowfast_r50", backbone_args=backbone_args, source_names=sources)
  message = str(error.value)
  assert "'s2.pathway1_res0.branch2.b.weight'" in message and "missing" in message
  assert ("'s1_fuse.conv_f2s.weight' (blob 't_pool1_subsample_w') is (4, 2, 5, 1, 1), expected (4, 2, 7, 1, 1)"
          in message)


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def tiny_slow_state_dict():
  torch_model = randomize(VideoResNet(TINY_BLOCKS, 5, False, width=8), seed=5)
  return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def test_checkpoint_of_another_architecture_is_an_error_naming_keys(tiny_slow_state_dict):
  tiny = dict(stage_blocks=TINY_BLOCKS, width=8)
  with pytest.raises(WeightImportError) as error:
    import_weights.convert_pyslowfast(tiny_slow_state_dict, "slowfast_r50", backbone_args=tiny)
  message = str(error.value)
  assert re.search(r"\d+ missing keys: 's\d\.pathway1_", message)  # no Fast pathway in a Slow-only file
  assert "'s2.pathway0_res0.branch1.weight' is (32, 8, 1, 1, 1), expected (32, 10, 1, 1, 1)" in message

  with pytest.raises(WeightImportError, match=r"'s4\.pathway0_res0\.branch2\.a\.weight' is \(32, 64, 3, 1, 1\), "
                                              r"expected \(32, 64, 1, 1, 1\)"):
    import_weights.convert_pyslowfast(tiny_slow_state_dict, "tsm_r50", backbone_args=tiny)

  deeper = dict(tiny, stage_blocks=(1, 1, 2, 1))
  with pytest.raises(WeightImportError, match=r"15 missing keys: 's4\.pathway0_res1\."):
    import_weights.convert_pyslowfast(tiny_slow_state_dict, "slow_r50", backbone_args=deeper)

  extra = dict(tiny_slow_state_dict, **{"s3.pathway0_nonlocal1.conv_g.weight": np.zeros((4, 4, 1, 1, 1))})
  with pytest.raises(WeightImportError,
                     match=r"unexpected keys: 's3\.pathway0_nonlocal1\.conv_g\.weight' \(4, 4, 1, 1, 1\)"):
    import_weights.convert_pyslowfast(extra, "slow_r50", backbone_args=tiny)


def test_head_that_does_not_fit_num_classes_is_an_error(tiny_slow_state_dict):
  tiny = dict(stage_blocks=TINY_BLOCKS, width=8)
  with pytest.raises(WeightImportError, match=r"'head\.projection\.weight' is \(5, 256\): a 5-way action head, "
                                              r"but num_classes is 400"):
    import_weights.convert_pyslowfast(tiny_slow_state_dict, "slow_r50", num_classes=400, backbone_args=tiny)
  backbone_only = {k: v for k, v in tiny_slow_state_dict.items() if not k.startswith("head.")}
  variables, model_args = import_weights.convert_pyslowfast(backbone_only, "slow_r50", num_classes=400,
                                                            backbone_args=tiny)
  assert set(variables["params"]) == {"backbone"} and model_args["heads"] == []


# --------------------------------------------------------------------------- torchvision inflation


def torchvision_state_dict(variables):
  """ResNet2D variables -> the torchvision state dict they came from (names and (O, I, kh, kw) layout)."""
  state_dict = {}
  for collection in ("params", "batch_stats"):
    for key_path, value in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      *modules, leaf = (k.key for k in key_path)
      name = ".".join(modules).replace("_", ".").replace("downsample.conv", "downsample.0").replace(
          "downsample.bn", "downsample.1")
      field = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}[leaf]
      value = np.asarray(value)
      state_dict[f"{name}.{field}"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else (
          value.T if value.ndim == 2 else value)
  return state_dict


@pytest.fixture(scope="module")
def image_resnet():
  """A small torchvision-layout ResNet2D with random weights and BN statistics, and its state dict."""
  net = resnet2d.ResNet2D(stage_blocks=TINY_BLOCKS, width=8, num_classes=7)
  shapes = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  rng = np.random.default_rng(0)

  def random_leaf(leaf):  # kernels He-normal; BN gamma, beta, mean, var and fc bias U(0.5, 1.5)
    if len(leaf.shape) == 1:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))).astype(np.float32)

  variables = jax.tree.map(random_leaf, shapes)
  return net, variables, torchvision_state_dict(variables)


@pytest.fixture(scope="module")
def image_features(image_resnet):
  """Images (2, 64, 64, 3) and the 2-D network's layer4 output on them (2, 2, 2, 256)."""
  net, variables, _ = image_resnet
  images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  _, state = jax.jit(lambda v, x: net.apply(v, x, capture_intermediates=lambda m, _: m.name == "layer4_0"))(
      variables, images)
  return images, np.asarray(state["intermediates"]["layer4_0"]["__call__"][0])


# (backbone, clip length, the output frames no temporal zero-padding reaches)
INFLATION_CASES = [
    ("slow_r50", 8, slice(2, 6)),  # res4, res5: one 3x1x1 conv each
    ("r3d_50", 12, slice(5, 7)),  # stem 3x7x7 + four 3x3x3 convs
    ("i3d_r50", 24, slice(4, 8)),  # stem 5, res2 3, pool /2, res3 3, res4 3 (of 12 pooled frames)
    ("tsm_r50", 10, slice(4, 6)),  # four shifts
]


@pytest.mark.parametrize("arch,num_frames,exact_frames", INFLATION_CASES)
def test_inflated_imagenet_resnet_on_a_still_clip_gives_the_image_features(arch, num_frames, exact_frames,
                                                                           image_resnet, image_features):
  _, _, state_dict = image_resnet
  state_dict = dict(state_dict, **{"layer1.0.num_batches_tracked": np.int64(3)})
  backbone_args = dict(stage_blocks=TINY_BLOCKS, width=8)
  variables = import_weights.inflate_torchvision(state_dict, arch, backbone_args=backbone_args)
  assert set(variables["params"]) == {"backbone"}  # the ImageNet fc is left out

  image, want = image_features

  backbone = backbones.build_backbone(arch, backbone_args)
  clip = jnp.repeat(image[:, None], num_frames, axis=1)
  (got,) = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(
      {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}, clip)
  assert got.shape[1] == (num_frames // 2 if arch == "i3d_r50" else num_frames)
  for frame in range(exact_frames.start, exact_frames.stop):
    np.testing.assert_allclose(got[:, frame], want, rtol=1e-4, atol=1e-4)


def test_torchvision_inflation_errors(image_resnet):
  _, _, state_dict = image_resnet
  with pytest.raises(WeightImportError, match=r"\(3,8,36,3\) = ResNet-152\): 15 missing keys: 'layer3\.1\."):
    import_weights.inflate_torchvision(state_dict, "slow_r50", backbone_args=dict(stage_blocks=(1, 1, 2, 1), width=8))
  with pytest.raises(WeightImportError, match="single-pathway"):
    import_weights.inflate_torchvision(state_dict, "slowfast_r50")


# --------------------------------------------------------------------------- CLI


def test_cli_writes_a_checkpoint_that_load_backbone_reads(tmp_path):
  torch_model = randomize(VideoResNet(TINY_BLOCKS, 5, True, width=16), seed=6)
  source = tmp_path / "slowfast_tiny.pyth"
  torch.save({"model_state": torch_model.state_dict()}, source)
  output = tmp_path / "imported"
  backbone_args = dict(stage_blocks=list(TINY_BLOCKS), width=16)
  command = [sys.executable, "-m", "egoexo_jax.models.import_weights", f"--input={source}", "--format=pyslowfast",
             "--backbone=slowfast_r50", "--num_classes=5", f"--backbone_args={json.dumps(backbone_args)}",
             f"--output={output}"]
  environment = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout[result.stdout.index("{"):])["heads"] == ["action_head"]
  assert sorted(os.listdir(tmp_path)) == ["imported", "slowfast_tiny.pyth"]  # no temporary folder left

  model = egoexo.Model(num_classes=7, backbone="slowfast_r50", backbone_args=backbone_args)  # a new task's heads
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 8, 64, 64, 3), jnp.float32))
  fresh = jax.tree.map(lambda leaf: np.full(leaf.shape, 0.5, leaf.dtype), shapes)
  params, batch_stats = checkpointing.load_backbone(str(output), fresh["params"], fresh["batch_stats"])
  want, _ = import_weights.convert_pyslowfast({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                              "slowfast_r50", backbone_args=backbone_args)
  jax.tree.map(np.testing.assert_array_equal, params["backbone"], want["params"]["backbone"])
  jax.tree.map(np.testing.assert_array_equal, batch_stats["backbone"], want["batch_stats"]["backbone"])
  np.testing.assert_array_equal(params["action_head"]["linear"]["kernel"], 0.5)  # the new task's head, untouched

  with pytest.raises(FileExistsError, match="imported exists"):
    import_weights.save_variables(want, str(output))


def test_import_file_inflates_a_torchvision_file(image_resnet, tmp_path):
  _, _, state_dict = image_resnet
  source = tmp_path / "resnet50-tiny.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, source)
  backbone_args = dict(stage_blocks=TINY_BLOCKS, width=8)
  summary = import_weights.import_file(str(source), "torchvision", "i3d_r50", str(tmp_path / "i3d"),
                                       backbone_args=backbone_args)
  assert summary["heads"] == [] and summary["checkpoint"] == str(tmp_path / "i3d" / "state")

  model = egoexo.Model(num_classes=3, backbone="i3d_r50", backbone_args=backbone_args)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 8, 64, 64, 3), jnp.float32))
  fresh = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
  params, _ = checkpointing.load_backbone(str(tmp_path / "i3d"), fresh["params"], fresh["batch_stats"])
  stem = params["backbone"]["stem"]["conv"]["kernel"]  # conv1 (8, 3, 7, 7) inflated to 5 x 7 x 7, divided by 5
  np.testing.assert_allclose(stem, np.broadcast_to(state_dict["conv1.weight"].transpose(2, 3, 1, 0) / 5, stem.shape),
                             rtol=1e-6)


# --------------------------------------------------------------------------- released fine-tuned checkpoints


class ReleasedFinetuneNet(tnn.Module):
  """An Ego-Exo fine-tuned network with the released module names: the backbone's stages, the head as
  `head{task}` (PySlowFast ResNetBasicHead 'projection' for one head, Ego-Exo MultiTaskHead 'projections.i'
  for several) and, for Ego-Exo*, 'handobjhead' (HandObjHeadSingle, slow pathway). In eval mode the head
  tests fully convolutionally as theirs: AvgPool3d(pool_size, stride=1) per pathway, concatenate, the
  projection at every position, softmax (dim 4) or sigmoid, then the mean over (t, h, w)."""

  def __init__(self, backbone, task, num_classes, pool_sizes, act, interaction_channels=0):
    super().__init__()
    for name, module in backbone.named_children():
      if name != "head":
        self.add_module(name, module)
    self.slowfast = backbone.slowfast
    features = sum(m.branch2.c.out_channels for m in (getattr(self.s5, f"pathway{p}_res0")
                                                        for p in range(len(pool_sizes))))
    head = tnn.Module()
    if len(num_classes) == 1:
      head.projection = tnn.Linear(features, num_classes[0])
    else:
      head.projections = tnn.ModuleList([tnn.Linear(features, n) for n in num_classes])
    self.head_name = f"head{task}"
    self.add_module(self.head_name, head)
    self.pools = [tnn.AvgPool3d(size, stride=1) for size in pool_sizes]
    self.act = tnn.Softmax(dim=4) if act == "softmax" else tnn.Sigmoid()
    if interaction_channels:
      self.handobjhead = tnn.Module()
      self.handobjhead.pathway0_conv_fcn0 = tnn.Conv3d(features if not self.slowfast else
                                                       self.s5.pathway0_res0.branch2.c.out_channels,
                                                       interaction_channels, (1, 3, 3), padding=(0, 1, 1))
      self.handobjhead.score_projection = tnn.Conv3d(interaction_channels, 2, 1)

  def forward(self, pathways):
    x = resnet_stages(self, pathways)
    head = getattr(self, self.head_name)
    feat = torch.cat([pool(p) for pool, p in zip(self.pools, x)], 1).permute(0, 2, 3, 4, 1)
    projections = [head.projection] if hasattr(head, "projection") else list(head.projections)
    probabilities = [self.act(projection(feat)).mean([1, 2, 3]) for projection in projections]
    interaction = None
    if hasattr(self, "handobjhead"):
      hidden = torch.relu(self.handobjhead.pathway0_conv_fcn0(x[0]))
      interaction = self.handobjhead.score_projection(hidden).permute(0, 2, 3, 4, 1)
    return probabilities, interaction


RELEASED_CASES = {
    # name: (arch, frames, task, heads, activation, interaction channels)
    "charades_ego_slow": ("slow_r50", 8, "charades-ego", {"action": 6}, "sigmoid", 0),
    "epic100_slowfast_star": ("slowfast_r50", 32, "epic100", {"verb": 5, "noun": 7}, "softmax", 12),
    "epic55_slowfast": ("slowfast_r50", 32, "epic", {"verb": 4, "noun": 3}, "softmax", 0),
}


@pytest.mark.parametrize("case", sorted(RELEASED_CASES))
def test_released_finetuned_checkpoint_gives_the_released_test_probabilities(case, tmp_path):
  """A head{TASK} checkpoint imports into finetune.Model; evaluate's fully convolutional forward at a
  test crop of 96 (3 x 3 res5 grid) on a 64 training-crop window (2 x 2 positions) matches the torch net."""
  from egoexo_jax import evaluate, sharding  # pylint: disable=g-import-not-at-top
  from egoexo_jax.input import transforms  # pylint: disable=g-import-not-at-top
  from egoexo_jax.models import finetune  # pylint: disable=g-import-not-at-top

  arch, num_frames, task, heads, act, interaction_channels = RELEASED_CASES[case]
  slowfast = arch.startswith("slowfast")
  width = 16 if slowfast else 8
  backbone = VideoResNet(TINY_BLOCKS, 1, slowfast, width=width)
  pools = [(num_frames // 4, 2, 2), (num_frames, 2, 2)] if slowfast else [(num_frames, 2, 2)]
  torch_model = randomize(ReleasedFinetuneNet(backbone, task, list(heads.values()), pools, act,
                                               interaction_channels), seed=7)
  path = tmp_path / "released.pyth"
  torch.save({"epoch": 30, "model_state": torch_model.state_dict()}, path)
  state_dict = import_weights.load_pyslowfast_checkpoint(str(path))
  assert any(k.startswith(f"head{task}.projection") for k in state_dict)

  model = finetune.Model(num_classes=heads, backbone=arch, backbone_args=dict(stage_blocks=TINY_BLOCKS, width=width),
                         use_interaction_head=bool(interaction_channels),
                         interaction_channels=interaction_channels or 512)
  variables = import_weights.convert_pyslowfast_finetune(state_dict, model, list(heads))
  assert set(variables["params"]) == {"backbone", *(f"{h}_head" for h in heads)} | (
      {"interaction_head"} if interaction_channels else set())

  views = np.random.default_rng(8).integers(0, 256, (2, num_frames, 96, 96, 3), dtype=np.uint8)
  mesh = sharding.make_mesh(1)
  on_mesh = jax.device_put(jax.tree.map(jnp.asarray, variables), sharding.replicated(mesh))
  forward = evaluate.make_forward(model, on_mesh, mesh, jnp.float32, tuple(heads.items()), act == "sigmoid",
                                  window_crop=64)
  got = forward(views)
  clips = np.asarray(transforms.normalize_clips(views, jnp.float32)).transpose(0, 4, 1, 2, 3)
  with torch.no_grad():
    want, want_interaction = torch_model(pack_pathways(torch.from_numpy(clips), slowfast))
  for name, probabilities in zip(heads, want):
    error = max_error(got[name], probabilities.numpy())
    print(f"{case} {name}: max |error| {error:.2e}")
    assert error < 1e-5, name
  if interaction_channels:
    outputs = model.apply(variables, jnp.asarray(clips.transpose(0, 2, 3, 4, 1)), train=False)
    assert max_error(np.asarray(outputs["interaction"]), want_interaction.numpy()) < 1e-4

  # Global pooling gives other probabilities: the fully convolutional path is what matched.
  pooled = evaluate.make_forward(model, on_mesh, mesh, jnp.float32, tuple(heads.items()), act == "sigmoid")(views)
  assert max(max_error(pooled[n], w.numpy()) for n, w in zip(heads, want)) > 1e-4


def test_released_head_names_that_do_not_fit_are_errors(tiny_slow_state_dict):
  from egoexo_jax.models import finetune  # pylint: disable=g-import-not-at-top

  tiny = dict(stage_blocks=TINY_BLOCKS, width=8)
  backbone = {k: v for k, v in tiny_slow_state_dict.items() if not k.startswith("head.")}
  two = dict(backbone, **{f"headepic100.projections.{i}.{leaf}": np.zeros((n, 256) if leaf == "weight" else (n,))
                          for i, n in enumerate((5, 7)) for leaf in ("weight", "bias")})
  model = finetune.Model(num_classes={"action": 5}, backbone="slow_r50", backbone_args=tiny)
  with pytest.raises(WeightImportError,
                     match=r"'headepic100' has 2 projection\(s\).*the model 1 head\(s\) \['action'\]"):
    import_weights.convert_pyslowfast_finetune(two, model, ["action"])
  with pytest.raises(WeightImportError, match="expected one classification head.*found none"):
    import_weights.convert_pyslowfast_finetune(backbone, model, ["action"])
  epic = finetune.Model(num_classes={"verb": 7, "noun": 5}, backbone="slow_r50", backbone_args=tiny)
  with pytest.raises(WeightImportError,
                     match=r"'headepic100\.projections\.0\.weight' is \(5, 256\), expected \(7, 256\)"):
    import_weights.convert_pyslowfast_finetune(two, epic, ["verb", "noun"])  # verbs first, as NUM_CLASSES_LIST
  with_maps = dict(two, **{"handobjhead.score_projection.weight": np.zeros((2, 4, 1, 1, 1))})
  with pytest.raises(WeightImportError, match=r"unexpected keys: 'handobjhead\.score_projection\.weight'"):
    import_weights.convert_pyslowfast_finetune(with_maps, finetune.Model(num_classes={"verb": 5, "noun": 7},
                                                                         backbone="slow_r50", backbone_args=tiny),
                                               ["verb", "noun"])


def test_released_epic_checkpoint_is_evaluated_by_the_cli_without_training(tmp_path):
  """import_weights --config (a head{TASK} file -> the fine-tuning model), then egoexo_jax.evaluate
  --checkpoint on the shipped EPIC-100-format clips, fully convolutionally at test crop 96 on a 64
  window; a record's view probabilities equal the torch network's on the same views."""
  from egoexo_jax.input import finetune_pipeline, sources, transforms  # pylint: disable=g-import-not-at-top

  torch_model = randomize(ReleasedFinetuneNet(VideoResNet(TINY_BLOCKS, 1, False, width=8), "epic100", [97, 300],
                                              [(4, 2, 2)], "softmax"), seed=9)
  source = tmp_path / "epic100_released.pyth"
  torch.save({"model_state": torch_model.state_dict()}, source)
  config_flags = ["--config=configs/finetune_epic100.py:small", "--config.data.clip_length=4",
                  "--config.data.frame_stride=2", "--config.data.crop_size=64", "--config.data.num_workers=0",
                  "--config.data.read_threads=1", "--config.data.convert_short_side=72",
                  "--config.model.backbone_args.width=8", "--config.eval.short_side=96",
                  "--config.eval.crop_size=96", "--config.eval.num_clips=2", "--config.eval.batch_size=12"]
  environment = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                     XLA_FLAGS="--xla_force_host_platform_device_count=2")
  imported = tmp_path / "imported"
  result = subprocess.run([sys.executable, "-m", "egoexo_jax.models.import_weights", f"--input={source}",
                           "--format=pyslowfast", f"--output={imported}", *config_flags],
                          capture_output=True, text=True, env=environment, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout[result.stdout.index("{"):])["heads"] == ["noun_head", "verb_head"]

  output = tmp_path / "results.json"
  result = subprocess.run([sys.executable, "-m", "egoexo_jax.evaluate", f"--workdir={tmp_path / 'run'}",
                           f"--checkpoint={imported}", f"--output={output}", *config_flags],
                          capture_output=True, text=True, env=environment, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(output.read_text())
  assert results["checkpoint"] == str(imported) and results["checkpoint_step"] == 0
  assert results["num_records"] == 8 and results["views"]["fully_convolutional"]
  assert {"verb_top1", "noun_top5", "action_top1"} <= set(results["metrics"])

  predictions = np.load(results["predictions"])
  record = sources.open_records(results["records"])[0]
  index = list(predictions["ids"]).index(record.video_id)
  views = finetune_pipeline.multi_view_clips(record, clip_length=4, frame_stride=2, num_clips=2, num_crops=3,
                                             short_side=96, crop_size=96, placement="spread")
  clips = np.asarray(transforms.normalize_clips(views, jnp.float32)).transpose(0, 4, 1, 2, 3)
  with torch.no_grad():
    (verb, noun), _ = torch_model([torch.from_numpy(clips)])
  assert max_error(predictions["verb_views"][index].astype(np.float32), verb.numpy()) < 1e-3  # stored as float16
  assert max_error(predictions["noun_views"][index].astype(np.float32), noun.numpy()) < 1e-3
