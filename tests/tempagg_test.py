"""TempAgg: parameter count from the released layer list, the non-local block against PyTorch layers with
the same weights, snippets on a hand-worked example, output shapes and a few training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from egoexo_jax.downstream import annotations, tempagg


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def expected_parameters(dim, classes, latent=512, linear=512, spans=(5, 3, 2), recent=2, blocks=4, past=False):
  """The released network.py / non_local_embedded_gaussian.py layers, counted by hand."""
  def non_local(n_current, n_past):
    return (n_current * latent + latent) + 2 * (n_past * latent + latent) + 2 * latent * dim \
        + (latent * n_current + n_current)  # theta, phi + g, LayerNorm([latent, D]), 1x1 conv back
  def feed_forward(inputs):
    return inputs * linear + linear + linear * linear + linear
  def coupling(k):
    return non_local(recent, k) + (non_local(k, k) if past else 0) + feed_forward(2 * recent * dim) \
        + feed_forward((k + 2 * recent) * dim)
  block = sum(coupling(k) for k in spans) + 3 * linear * linear + linear
  heads = sum(2 * linear * c + c for c in classes.values())
  return blocks * (block + heads)


ASSEMBLY101_CLASSES = {"verb": 17, "object": 90, "action": 1064}  # released main.py defaults


def test_parameter_count_is_the_released_models():
  settings = tempagg.SnippetSettings()
  inputs = (jnp.zeros((1, settings.window_frames, 2048)), jnp.ones((1, settings.window_frames)),
            jnp.ones((1, settings.num_snippets, settings.window_frames), bool))
  for past in (False, True):
    model = tempagg.TempAgg(ASSEMBLY101_CLASSES, past_attention=past)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
    assert count(shapes["params"]) == expected_parameters(2048, ASSEMBLY101_CLASSES, past=past)
  assert settings.num_snippets == 5 + 3 + 2 + 4 * 2 and settings.window_frames == 181


def torch_non_local(params, past, current, latent):
  """The released NONLocalBlock1D forward in PyTorch layers (Conv1d over snippets as channels), eval mode."""
  n_current, dim = current.shape[1], current.shape[2]
  n_past = past.shape[1]
  def conv(name, cin, cout):
    layer = torch.nn.Conv1d(cin, cout, 1)
    layer.weight.data = torch.tensor(np.asarray(params[name]["kernel"]).T[:, :, None])
    layer.bias.data = torch.tensor(np.asarray(params[name]["bias"]))
    return layer
  theta, phi, g = conv("theta", n_current, latent), conv("phi", n_past, latent), conv("g", n_past, latent)
  norm = torch.nn.LayerNorm([latent, dim])
  norm.weight.data = torch.tensor(np.asarray(params["norm"]["scale"]))
  norm.bias.data = torch.tensor(np.asarray(params["norm"]["bias"]))
  out = conv("out", latent, n_current)
  x_past, x_curr = torch.tensor(past), torch.tensor(current)
  theta_x = theta(x_curr).permute(0, 2, 1)
  p = torch.softmax(torch.matmul(theta_x, phi(x_past)) * latent**-0.5, dim=-1)
  t = torch.matmul(p, g(x_past).permute(0, 2, 1)).permute(0, 2, 1)
  return (out(torch.relu(norm(t))) + x_curr).detach().numpy()


def test_non_local_block_matches_the_released_layers():
  rng = np.random.default_rng(0)
  past = rng.normal(size=(2, 5, 12)).astype(np.float32)
  current = rng.normal(size=(2, 2, 12)).astype(np.float32)
  block = tempagg.NonLocal(latent=6, dropout_rate=0.3)
  params = block.init(jax.random.key(1), past, current, train=False)["params"]
  # Larger weights than the release's N(0, 0.01) init so that the attention is not uniform.
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), params)
  ours = block.apply({"params": params}, past, current, train=False)
  np.testing.assert_allclose(ours, torch_non_local(params, past, current, 6), rtol=1e-4, atol=1e-5)


def test_snippets_hand_worked():
  # fps 1: frame t = second t. One spanning scale of 2 snippets over 6 s, one recent scale of 2 over 2 s.
  settings = tempagg.SnippetSettings(fps=1.0, anticipation_seconds=1.0, spanning_seconds=6.0, spanning_snippets=(2,),
                                     recent_seconds=(2.0,), recent_snippets=2, min_observed_seconds=2.0)
  features = np.arange(12, dtype=np.float32)[:, None] + 100
  segments = [annotations.Segment(2, 5, 0, 0, 0), annotations.Segment(5, 10, 1, 1, 0),
              annotations.Segment(10, 12, 2, 0, 1)]
  out = tempagg.snippet_examples(features, segments, settings)
  # Segment at 2: observation ends at 1 s < 2 s -> left out. Segment at 5: ends at frame 4, window frames
  # -2..4 (two masked); spanning linspace(0, 4, 3) = 0, 2, 4 -> [0..2], [2..4]; recent linspace(2, 4, 3) ->
  # [2..3], [3..4]. Segment at 10: ends at 9, window 3..9; spanning [3..6], [6..9]; recent [7..8], [8..9].
  np.testing.assert_array_equal(out["labels"], [[1, 0, 1], [0, 1, 2]])
  np.testing.assert_array_equal(out["mask"], [[0, 0, 1, 1, 1, 1, 1], [1] * 7])
  np.testing.assert_array_equal(out["window"][0, :, 0], [0, 0, 100, 101, 102, 103, 104])
  expected = np.zeros((2, 4, 7), bool)
  for row, (a, b) in enumerate([(2, 4), (4, 6), (4, 5), (5, 6)]):
    expected[0, row, a:b + 1] = True
  for row, (a, b) in enumerate([(0, 3), (3, 6), (4, 5), (5, 6)]):
    expected[1, row, a:b + 1] = True
  np.testing.assert_array_equal(out["membership"], expected)
  pooled = tempagg.pool_snippets(jnp.asarray(out["window"]), jnp.asarray(out["membership"]))
  np.testing.assert_array_equal(pooled[..., 0], [[102, 104, 103, 104], [106, 109, 108, 109]])  # max = last frame


def test_shapes_and_a_few_training_steps_lower_the_loss():
  settings = tempagg.SnippetSettings(fps=4.0, anticipation_seconds=0.5, spanning_seconds=3.0, spanning_snippets=(3, 2),
                                     recent_seconds=(1.0, 0.5), min_observed_seconds=0.5)
  rng = np.random.default_rng(4)
  num_classes = {"verb": 3, "object": 2, "action": 6}
  features = rng.normal(size=(80, 8)).astype(np.float32)
  segments = [annotations.Segment(s, s + 4, (s // 4) % 6, (s // 4) % 3, (s // 4) % 2) for s in range(0, 80, 4)]
  data = tempagg.snippet_examples(features, segments, settings)
  model = tempagg.TempAgg(num_classes, spanning_snippets=(3, 2), recent_scales=2, latent=4, linear=8, dropout_rate=0.0)
  inputs = (data["window"], data["mask"], data["membership"])
  params = jax.jit(lambda r: model.init(r, *inputs, train=False))(jax.random.key(0))["params"]
  logits = jax.eval_shape(lambda: model.apply({"params": params}, *inputs, train=False))
  batch = len(data["labels"])
  assert {k: v.shape for k, v in logits.items()} == {"verb": (2, batch, 3), "object": (2, batch, 2),
                                                     "action": (2, batch, 6)}
  assert {k: v.shape for k, v in jax.eval_shape(tempagg.scores, logits).items()} == {"verb": (batch, 3), "object": (batch, 2),
                                                                     "action": (batch, 6)}
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: tempagg.tempagg_loss(
        model.apply({"params": p}, *inputs, train=False), data["labels"]))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(5):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
