"""C2F-TCN: parameter count from the released layer list, output shapes, interpolation against PyTorch,
ensemble and loss against NumPy, chunk pooling, a few training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from egoexo_jax.downstream import c2ftcn


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def expected_parameters(channels: int, classes: int, enc=(256, 256, 256, 128, 128, 128, 128), dec=128) -> int:
  """The released model.py's layers (dipika-singhania/C2F-TCN), counted by hand:
  double_conv(i, o) = conv5 (i o 5 + o) + BN (2 o) + conv5 (o o 5 + o) + BN (2 o)."""
  def double_conv(i, o):
    return (i * o * 5 + o) + 2 * o + (o * o * 5 + o) + 2 * o
  total = double_conv(channels, enc[0])  # inc
  total += sum(double_conv(enc[i], enc[i + 1]) for i in range(6))  # down1..down6
  total += enc[6] * 1 + 1  # TPP's shared 1x1 conv to one channel
  skips = [enc[5], enc[4], enc[3], enc[2], enc[1], enc[0]]  # x6 .. x1
  inputs = [enc[6] + 4] + [dec] * 5  # after TPP: 4 extra channels; then the decoder width
  total += sum(double_conv(s + x, dec) for s, x in zip(skips, inputs))  # up, up0..up4
  total += 6 * (dec * classes + classes)  # outcc0..outcc4, outcc
  return total


def test_parameter_count_is_the_released_models():
  # Assembly101's released run: 2048-d TSM features, 202 coarse actions. The release's up-block input
  # widths are 260, 256, 256, 384, 384, 384, which the hand count reproduces from the skips.
  model = c2ftcn.C2FTCN(202)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 384, 2048)), train=False))
  assert count(shapes["params"]) == expected_parameters(2048, 202)
  # = 6,888,765; the release prints 6 more (its unused `weights` parameter).
  assert count(shapes["params"]) == 6_888_765
  # BatchNorm statistics: mean and variance of each of the 13 double convs' two norms.
  batch_norm_channels = 2 * (256 + 256 + 256 + 128 * 4) + 2 * 128 * 6
  assert count(shapes["batch_stats"]) == 2 * batch_norm_channels


def test_tiny_widths_shapes_for_even_and_odd_lengths():
  widths = (8, 8, 8, 4, 4, 4, 4)
  model = c2ftcn.C2FTCN(5, widths, 6)
  x = np.random.default_rng(0).normal(size=(2, 400, 3)).astype(np.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))  # shapes only: no compilation
  assert count(variables["params"]) == expected_parameters(3, 5, widths, 6)
  outputs = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  # 400 -> 200 -> 100 -> 50 -> 25 -> 12 -> 6 positions; decoder back up through the skips' lengths.
  assert [y.shape for y in outputs] == [(2, 400, 5), (2, 200, 5), (2, 100, 5), (2, 50, 5), (2, 25, 5), (2, 12, 5)]
  with pytest.raises(ValueError, match="at least 384"):
    jax.eval_shape(lambda v: model.apply(v, x[:, :383], train=False), variables)


@pytest.mark.parametrize("source, target", [(7, 14), (12, 400), (1, 5), (25, 50)])
def test_upsample_linear_matches_torch_align_corners(source, target):
  x = np.random.default_rng(source).normal(size=(2, source, 3)).astype(np.float32)
  reference = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 2, 1), size=target, mode="linear",
                                              align_corners=True).permute(0, 2, 1).numpy()
  np.testing.assert_allclose(c2ftcn.upsample_linear(jnp.asarray(x), target), reference, rtol=1e-5, atol=1e-5)


def test_max_pool_floors_like_torch():
  x = np.random.default_rng(1).normal(size=(1, 11, 2)).astype(np.float32)
  reference = torch.nn.functional.max_pool1d(torch.from_numpy(x).permute(0, 2, 1), 3).permute(0, 2, 1).numpy()
  np.testing.assert_allclose(c2ftcn.max_pool(jnp.asarray(x), 3), reference)


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_ensemble_and_loss_match_numpy():
  rng = np.random.default_rng(2)
  outputs = [rng.normal(size=(2, n, 4)).astype(np.float32) for n in (8, 4, 2)]
  weights = (1.0, 2.0, 3.0)
  expected = np.zeros((2, 8, 4))
  for w, y in zip(weights, outputs):
    n = y.shape[1]
    grid = np.arange(8) * (n - 1) / 7  # align_corners positions
    up = np.array([[np.interp(grid, np.arange(n), y[b, :, k]) for k in range(4)] for b in range(2)]).transpose(0, 2, 1)
    expected += w / 6 * np_softmax(up)
  probabilities = c2ftcn.ensemble_probabilities([jnp.asarray(y) for y in outputs], weights)
  np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)

  labels = rng.integers(-1, 4, (2, 8)).astype(np.int32)
  mask = np.array([[1] * 8, [1] * 6 + [0] * 2], np.float32)
  log_p = np.log(expected + 1e-10)
  nll = np.mean([-log_p[b, t, labels[b, t]] for b in range(2) for t in range(8) if mask[b, t] and labels[b, t] >= 0])
  smooth = np.mean([np.minimum((log_p[b, t] - log_p[b, t - 1]) ** 2, 16).mean()
                    for b in range(2) for t in range(1, 8) if mask[b, t] and mask[b, t - 1]])
  loss = c2ftcn.c2f_loss(probabilities, labels, mask)
  np.testing.assert_allclose(loss, nll + 0.17 * smooth, rtol=1e-5)


def test_chunk_pooling_and_majority_labels():
  frames = np.arange(12, dtype=np.float32).reshape(1, 6, 2)
  mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
  pooled, chunk_mask = c2ftcn.chunk_max(jnp.asarray(frames), jnp.asarray(mask), 3)
  np.testing.assert_array_equal(pooled, [[[4, 5], [8, 9]]])  # the padded frame 5 is left out
  np.testing.assert_array_equal(chunk_mask, [[1, 1]])
  labels = np.array([[2, 1, 1, 0, 0, 3, -1, -1, -1, 4, -1, -1]])
  np.testing.assert_array_equal(c2ftcn.chunk_labels(labels, 3), [[1, 0, -1, 4]])


def test_a_few_training_steps_lower_the_loss():
  model = c2ftcn.ChunkedC2FTCN(3, chunk_size=2, encoder_widths=(8,) * 7, decoder_width=8)
  rng = np.random.default_rng(3)
  labels = np.repeat(rng.integers(0, 3, (2, 8)), 96, axis=1).astype(np.int32)  # 768 frames, 8 segments
  frames = (np.eye(3)[labels] + 0.3 * rng.normal(size=(2, 768, 3))).astype(np.float32)
  mask = np.ones((2, 768), np.float32)
  chunks = c2ftcn.chunk_labels(labels, 2)
  variables = model.init(jax.random.key(0), frames, mask, train=False)
  params, stats = variables["params"], variables["batch_stats"]
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(params):
      outputs, new = model.apply({"params": params, "batch_stats": stats}, frames, mask, train=True,
                                 mutable=["batch_stats"])
      return c2ftcn.c2f_loss(c2ftcn.ensemble_probabilities(outputs), chunks, mask[:, ::2]), new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  losses = []
  for _ in range(6):
    params, new_stats, opt_state, loss = step(params, stats, opt_state)
    assert not jax.tree_util.tree_all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), stats, new_stats))
    stats = new_stats
    losses.append(float(loss))
  assert losses[-1] < losses[0]
