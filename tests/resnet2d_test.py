"""Image ResNet (torchvision layout): sizes by jax.eval_shape, torchvision weight import, logit parity.

torchvision is not installed here, so the parity test builds torchvision's ResNet module tree with
torch.nn (same module names, same forward), small and with random weights and BN statistics.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from torch import nn as tnn

from egoexo_jax.models import build_model, resnet2d

TINY = dict(stage_blocks=(2, 1, 2, 1), width=8, num_classes=10)  # block 2 of a stage has no downsample


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_variables(model, size=224):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


# --------------------------------------------------------------------------- torchvision's layout, in torch.nn


class TorchBottleneck(tnn.Module):
  """torchvision.models.resnet.Bottleneck (v1.5, stride on conv2), same attribute names."""

  def __init__(self, in_c, inner, stride):
    super().__init__()
    out_c = 4 * inner
    self.conv1 = tnn.Conv2d(in_c, inner, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(inner)
    self.conv2 = tnn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
    self.bn2 = tnn.BatchNorm2d(inner)
    self.conv3 = tnn.Conv2d(inner, out_c, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(out_c)
    self.relu = tnn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_c != out_c:
      self.downsample = tnn.Sequential(tnn.Conv2d(in_c, out_c, 1, stride=stride, bias=False), tnn.BatchNorm2d(out_c))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class TorchResNet(tnn.Module):
  """torchvision.models.resnet.ResNet with Bottleneck blocks, same attribute names."""

  def __init__(self, stage_blocks, width, num_classes):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.relu = tnn.ReLU(inplace=True)
    self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1)
    in_c = width
    for stage, num_blocks in enumerate(stage_blocks):
      inner = width * 2**stage
      blocks = []
      for block in range(num_blocks):
        blocks.append(TorchBottleneck(in_c, inner, (1 if stage == 0 else 2) if block == 0 else 1))
        in_c = 4 * inner
      setattr(self, f"layer{stage + 1}", tnn.Sequential(*blocks))
    self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
    self.fc = tnn.Linear(in_c, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def random_torch_resnet(seed=0, **kwargs):
  torch.manual_seed(seed)
  net = TorchResNet(**kwargs)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, tnn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.3, 0.3)
        module.running_mean.normal_(0.0, 0.3)
        module.running_var.uniform_(0.5, 2.0)
        module.num_batches_tracked.fill_(7)
    net.fc.bias.uniform_(-0.5, 0.5)
  return net.eval()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("config, expected", [(resnet2d.RESNET50, 25_557_032), (resnet2d.RESNET101, 44_549_160),
                                              (resnet2d.RESNET152, 60_192_808)])
def test_parameter_counts_equal_torchvision(config, expected):
  model = resnet2d.Model(**config)
  variables = abstract_variables(model)
  assert count(variables["params"]) == expected  # torchvision's num_params
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jax.ShapeDtypeStruct((2, 224, 224, 3),
                                                                                          jnp.float32))
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


def full_size_state_dict(config):
  """A zero-valued state dict in torchvision's layout (broadcast views: no memory until converted)."""
  with torch.device("meta"):  # a module tree with names and shapes but no storage
    net = TorchResNet(config["stage_blocks"], 64, 1000)
  return {key: np.broadcast_to(np.float32(0), tuple(value.shape)) for key, value in net.state_dict().items()}


def test_converted_tree_matches_the_flax_model_at_full_size():
  state = {name: full_size_state_dict(config) for name, config in (("r50", resnet2d.RESNET50),
                                                                   ("r152", resnet2d.RESNET152))}
  for name, config in (("r50", resnet2d.RESNET50), ("r152", resnet2d.RESNET152)):
    converted = resnet2d.convert_torchvision_resnet(state[name], config["stage_blocks"])
    expected = abstract_variables(resnet2d.Model(**config))
    assert jax.tree.structure(converted) == jax.tree.structure(expected)
    assert jax.tree.map(np.shape, converted) == jax.tree.map(lambda x: x.shape, expected)

  with pytest.raises(resnet2d.WeightImportError, match=r"missing keys: 'layer2\.4\.conv1\.weight'"):
    resnet2d.convert_torchvision_resnet(state["r50"], resnet2d.RESNET152["stage_blocks"])  # R50 file for R152
  with pytest.raises(resnet2d.WeightImportError, match=r"unexpected keys: 'layer2\.4\.conv1\.weight'"):
    resnet2d.convert_torchvision_resnet(state["r152"], resnet2d.RESNET50["stage_blocks"])
  with pytest.raises(resnet2d.WeightImportError, match=r"'fc\.weight' is \(1000, 2048\), expected \(400, 2048\)"):
    resnet2d.convert_torchvision_resnet(state["r50"], resnet2d.RESNET50["stage_blocks"], num_classes=400)


def test_torchvision_weights_give_torchvision_logits(tmp_path):
  torch.set_num_threads(2)
  net = random_torch_resnet(**TINY)
  path = tmp_path / "tiny_resnet.pth"
  torch.save(net.state_dict(), path)

  state_dict = resnet2d.load_torch_state_dict(str(path))
  assert state_dict["layer1.0.downsample.0.weight"].shape == (32, 8, 1, 1)
  variables = resnet2d.convert_torchvision_resnet(state_dict, TINY["stage_blocks"], width=TINY["width"],
                                                  num_classes=TINY["num_classes"])
  model = resnet2d.Model(**TINY)

  # Odd sizes: stride-2 convs and the max-pool must pad as PyTorch does (symmetrically), not as 'SAME'.
  images = np.random.default_rng(0).normal(size=(3, 67, 61, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, images))
  print(f"max |logit| {np.abs(expected).max():.3f}, max abs error {np.abs(logits - expected).max():.2e}")
  assert np.abs(expected).std() > 0.1  # the comparison is not between near-zero vectors
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_load_accepts_training_checkpoints_and_reports_bad_files(tmp_path):
  net = random_torch_resnet(stage_blocks=(1, 1, 1, 1), width=4, num_classes=3)
  raw = {k: v.numpy() for k, v in net.state_dict().items()}
  wrapped = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}
  for name, content in (("raw", net.state_dict()), ("wrapped", wrapped), ("model", {"model": net.state_dict()})):
    torch.save(content, tmp_path / f"{name}.pth")
    loaded = resnet2d.load_torch_state_dict(str(tmp_path / f"{name}.pth"))
    assert sorted(loaded) == sorted(raw)
    for key, value in raw.items():
      np.testing.assert_array_equal(loaded[key], value)

  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(resnet2d.WeightImportError, match="junk.pth: cannot read a PyTorch checkpoint"):
    resnet2d.load_torch_state_dict(str(tmp_path / "junk.pth"))
  torch.save([1, 2], tmp_path / "list.pth")
  with pytest.raises(resnet2d.WeightImportError, match="expected a state dict"):
    resnet2d.load_torch_state_dict(str(tmp_path / "list.pth"))


def test_build_model_and_train_mode():
  config = ml_collections.ConfigDict(dict(name="resnet2d", stage_blocks=(1, 1, 1, 1), width=4, num_classes=3,
                                          dtype="float32"))
  model = build_model(config)
  assert isinstance(model, resnet2d.ResNet2D)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x))(images)  # rbg: fast to compile
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
  assert logits.shape == (4, 3)
  # momentum 0.9: the running mean moves 10% of the way to the batch mean (from 0).
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], 0.0)
