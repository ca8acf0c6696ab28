"""ASFormer: one block against a PyTorch block written from the paper (local window, instance norm, masking),
the parameter count against the released layer list counted by hand, the window by hand, the full model's
masking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from egoexo_jax.downstream import asformer, mstcn


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def conv(params, x, dilation=1):
  """x (C, L) torch through a flax Conv's parameters (kernel (k, in, out)), 'same' padding as the release."""
  kernel = torch.from_numpy(np.asarray(params["kernel"]).transpose(2, 1, 0).copy())
  pad = dilation * (kernel.shape[-1] // 2)
  return F.conv1d(x[None], kernel, torch.from_numpy(np.array(params["bias"])), padding=pad, dilation=dilation)[0]


def torch_block(p, x, window, alpha, values=None):
  """The paper's block on one unpadded sequence x (F, L): h = relu(dilated conv3); h = alpha att(IN(h)) + h;
  x + conv1x1(h). Attention: frame j sees frames j - window // 2 ... j - window // 2 + window - 1 inside
  the sequence (softmax over those only); q, k from IN(h), v from IN(h) or the given values."""
  h = torch.relu(conv(p["feed_forward"], x, dilation=window))
  normed = F.instance_norm(h[None], eps=1e-5)[0]
  a = p["attention"]
  q, k = conv(a["query"], normed), conv(a["key"], normed)
  v = conv(a["value"], normed if values is None else values)
  length = x.shape[1]
  j, i = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
  allowed = (i >= j - window // 2) & (i < j - window // 2 + window)
  energy = (q.T @ k / math.sqrt(q.shape[0])).masked_fill(~allowed, float("-inf"))
  attended = v @ torch.softmax(energy, dim=-1).T
  h = alpha * conv(a["out"], torch.relu(attended)) + h
  return x + conv(p["pointwise"], h)


@pytest.mark.parametrize("window, decoder", [(1, False), (4, False), (8, True)])
def test_block_matches_torch_on_the_unpadded_sequence(window, decoder):
  rng = np.random.default_rng(window)
  real, padded, width = 13, 18, 8
  x = rng.normal(size=(1, padded, width)).astype(np.float32)
  values = rng.normal(size=(1, padded, width)).astype(np.float32) if decoder else None
  mask = np.zeros((1, padded), np.float32)
  mask[0, :real] = 1
  x[0, real:] = 0  # blocks get masked inputs (Stage masks its input projection)
  alpha = math.exp(-3) if decoder else 1.0
  block = asformer.Block(width, window, alpha)
  params = block.init(jax.random.key(0), x, values, mask, train=False)["params"]
  out = np.asarray(block.apply({"params": params}, x, values, mask, train=False))
  to_torch = lambda t: torch.from_numpy(t[0, :real].T.copy())
  with torch.no_grad():
    expected = torch_block(params, to_torch(x), window, alpha, None if values is None else to_torch(values))
  np.testing.assert_allclose(out[0, :real], expected.T.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out[0, real:], 0)


def test_window_of_each_frame_by_hand():
  """Which frames' values reach frame j (the values' Jacobian): window 4 -> j-2 .. j+1; window 1 -> j; the masked frame 9 never."""
  width, length = 4, 10
  mask = np.ones((1, length), np.float32)
  mask[0, 9] = 0
  x = np.random.default_rng(0).normal(size=(1, length, width)).astype(np.float32)
  for window, span in ((4, (-2, 1)), (1, (0, 0)), (2, (-1, 0))):
    layer = asformer.WindowAttention(width, window)
    params = layer.init(jax.random.key(1), x, x, mask)["params"]
    params["value"]["bias"] = params["value"]["bias"] + 100.0  # keeps the relu after the attention open
    jacobian = jax.jacrev(lambda v: layer.apply({"params": params}, x, v, mask))(x)  # (1, L, F, 1, L, F)
    reaches = np.abs(np.asarray(jacobian)[0, :, :, 0]).sum(axis=(1, 3)) > 0  # [j, i]
    for j in range(9):
      expected = [i for i in range(j + span[0], j + span[1] + 1) if 0 <= i < 9]
      assert np.nonzero(reaches[j])[0].tolist() == expected, (window, j)
    assert not reaches[9].any()


def expected_parameters(channels: int, classes: int, layers=10, width=64, decoders=3, r1=2, r2=2) -> int:
  """The released model.py counted by hand: AttLayer = q, k (F -> F / r1), v (F -> F / r2), out (F / r2 -> F)
  1x1 convs with bias; AttModule = conv3 (F -> F) + AttLayer + conv1x1 (F -> F)."""
  attention = 2 * (width * width // r1 + width // r1) + (width * width // r2 + width // r2) + (width // r2 * width + width)
  block = (3 * width * width + width) + attention + (width * width + width)
  encoder = (channels * width + width) + layers * block + (width * classes + classes)
  decoder = (classes * width + width) + layers * block + (width * classes + classes)
  return encoder + decoders * decoder


def test_parameter_count_is_the_released_models():
  # The release's defaults (main.py): 2048-d I3D features, 10 layers, 64 maps, 3 decoders; 202 classes here
  # (Assembly101's coarse actions, EVGAP's Table 2).
  model = asformer.ASFormer(202)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 2048)), jnp.ones((1, 16)),
                                             train=False))
  assert count(shapes["params"]) == expected_parameters(2048, 202)


def test_model_outputs_ignore_padded_frames_and_train():
  model = asformer.ASFormer(3, num_layers=2, features=8, num_decoders=2)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 20, 5)).astype(np.float32)
  mask = np.ones((2, 20), np.float32)
  mask[1, 14:] = 0
  variables = model.init(jax.random.key(0), x, mask, train=False)
  apply = jax.jit(lambda v, x: model.apply(v, x, mask, train=False))
  out = np.asarray(apply(variables, x))
  assert out.shape == (3, 2, 20, 3)
  changed = x.copy()
  changed[1, 14:] = 100.0  # what padding holds must not matter
  np.testing.assert_allclose(np.asarray(apply(variables, changed))[:, 1, :14], out[:, 1, :14], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[:, 1, 14:], 0)

  labels = rng.integers(0, 3, (2, 20)).astype(np.int32)
  loss = lambda p, key: mstcn.mstcn_loss(model.apply({"params": p}, x, mask, train=True, rngs={"dropout": key}),
                                         labels, mask)
  grads = jax.grad(loss)(variables["params"], jax.random.key(1))
  assert all(float(jnp.sum(g**2)) > 0 for g in jax.tree_util.tree_leaves(grads["stage_0"]["layer_1"]))
