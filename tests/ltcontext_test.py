"""LTContext: one block against a PyTorch block written from the paper (windowed and long-term sparse
attention as dense masks), the parameter count against the released layer list counted by hand, the
full model's stages and masking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from egoexo_jax.downstream import ltcontext


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def conv(params, x, dilation=1):
  """x (C, L) through a flax Conv's parameters (kernel (k, in, out)), 'same' padding."""
  kernel = torch.from_numpy(np.asarray(params["kernel"]).transpose(2, 1, 0).copy())
  pad = dilation * (kernel.shape[-1] // 2)
  return F.conv1d(x[None], kernel, torch.from_numpy(np.array(params["bias"])), padding=pad, dilation=dilation)[0]


def torch_attention(p, qk, values, allowed):
  """One-head attention of the paper: q, k, v 1x1 convs, softmax(q.k / sqrt(d)) over the allowed keys,
  out = conv1x1(gelu(a v)); qk, values (D, L); allowed (L, L) bool [query, key]."""
  q, k, v = conv(p["query"], qk), conv(p["key"], qk), conv(p["value"], values)
  energy = (q.T @ k / math.sqrt(q.shape[0])).masked_fill(~allowed, float("-inf"))
  return conv(p["out"], F.gelu(v @ torch.softmax(energy, dim=-1).T))


def torch_block(p, x, dilation, window, stride, values=None):
  """Windowed attention: frames in windows of W from frame 0; window n's queries see frames
  nW - W/2 ... nW + W + W/2 - 1. Long-term: frame j sees the frames i with i = j (mod G)."""
  length = x.shape[1]
  j, i = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
  start = (j // window) * window - window // 2
  windowed = (i >= start) & (i < start + 2 * window)
  long_term = (i % stride) == (j % stride)
  h = F.gelu(conv(p["dilated_conv"], x, dilation))
  h = torch_attention(p["windowed"]["attention"], h, h if values is None else values, windowed) + h
  h = torch_attention(p["long_term"]["attention"], h, h if values is None else values, long_term) + h
  return x + conv(p["pointwise"], h)


@pytest.mark.parametrize("window, stride, dilation, with_values", [(4, 3, 1, False), (2, 5, 4, True)])
def test_block_matches_torch_on_the_unpadded_sequence(window, stride, dilation, with_values):
  rng = np.random.default_rng(window)
  real, padded, width = 11, 16, 8
  x = rng.normal(size=(1, padded, width)).astype(np.float32)
  x[0, real:] = 0  # blocks get masked inputs (Stage masks its input projection)
  values = rng.normal(size=(1, padded, width)).astype(np.float32) if with_values else None
  if with_values:
    values[0, real:] = 0
  mask = np.zeros((1, padded), np.float32)
  mask[0, :real] = 1
  block = ltcontext.Block(width, dilation, window, stride)
  params = block.init(jax.random.key(0), x, values, mask, train=False)["params"]
  out = np.asarray(block.apply({"params": params}, x, values, mask, train=False))
  to_torch = lambda t: torch.from_numpy(t[0, :real].T.copy())
  with torch.no_grad():
    expected = torch_block(params, to_torch(x), dilation, window, stride, None if values is None else to_torch(values))
  np.testing.assert_allclose(out[0, :real], expected.T.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out[0, real:], 0)


def expected_parameters(channels: int, classes: int, stages=4, layers=9, width=64, reduction=2) -> int:
  """The released ltcontext.py counted by hand: attention = q, k, v 1x1 convs (D -> D / 2) + out (D / 2 -> D),
  all with bias; block = dilated conv3 (D -> D) + 2 attentions + conv1x1 (D -> D)."""
  def stage(inputs, d):
    attention = 3 * (d * d // 2 + d // 2) + (d // 2 * d + d)
    block = (3 * d * d + d) + 2 * attention + (d * d + d)
    return (inputs * d + d) + layers * block + (d * classes + classes)
  reduced = width // reduction
  return stage(channels, width) + (width * reduced + reduced) + (stages - 1) * stage(classes, reduced)


def test_parameter_count_is_the_released_assembly101_models():
  model = ltcontext.LTContext(202)  # configs/Assembly101/LTContext.yaml: 2048-d TSM features, 202 actions
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 2048)), jnp.ones((1, 64)),
                                             train=False))
  assert count(shapes["params"]) == expected_parameters(2048, 202)


def test_model_outputs_ignore_padded_frames():
  model = ltcontext.LTContext(3, num_stages=3, num_layers=2, features=8, window=4, stride=3)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 19, 5)).astype(np.float32)
  mask = np.ones((2, 19), np.float32)
  mask[1, 13:] = 0
  variables = model.init(jax.random.key(0), x, mask, train=False)
  assert variables["params"]["stage_1"]["input"]["kernel"].shape == (1, 3, 4)  # later stages: width 8 / 2
  apply = jax.jit(lambda v, x: model.apply(v, x, mask, train=False))
  out = np.asarray(apply(variables, x))
  assert out.shape == (3, 2, 19, 3)
  changed = x.copy()
  changed[1, 13:] = 100.0
  np.testing.assert_allclose(np.asarray(apply(variables, changed))[:, 1, :13], out[:, 1, :13], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[:, 1, 13:], 0)
