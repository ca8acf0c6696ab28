"""Transformers: parameter counts by hand, per-layer class tokens, key-padding masks, one layer against
PyTorch's nn.TransformerEncoderLayer, and 2-D -> 3-D inflation against a PyTorch image ViT."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from egoexo_jax.models import egoexo, transformer

TINY_ENCODER = dict(width=32, num_layers=3, num_heads=4, mlp_dim=64, max_length=12)
# A small timm-layout image ViT: 32 x 32 images, 8 x 8 patches (a 4 x 4 grid), 2 blocks.
IMAGE_VIT = dict(width=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def init(module, *args, **kwargs):
  return module.init(jax.random.key(0), *args, **kwargs)


def encoder_layer_param_count(width, mlp_dim):
  """qkv, out projection, two LayerNorms, the two MLP linears; weights and biases."""
  return (width * 3 * width + 3 * width) + (width * width + width) + 2 * 2 * width + \
      (width * mlp_dim + mlp_dim) + (mlp_dim * width + width)


# --------------------------------------------------------------------------- sizes


def test_vit_b16_video_has_86_4m_parameters_and_a_4x14x14_grid():
  clips = jax.ShapeDtypeStruct((1, 8, 224, 224, 3), jnp.float32)
  vit = transformer.VideoViT(**transformer.VIT_B16)
  (grid,), variables = jax.eval_shape(lambda x: vit.init_with_output(jax.random.key(0), x, train=False), clips)
  assert grid.shape == (1, 4, 14, 14, 768)
  width = 768
  expected = (2 * 16 * 16 * 3 * width + width  # tubelet kernel and bias
              + 14 * 14 * width + 4 * width  # spatial and temporal position embeddings
              + 12 * encoder_layer_param_count(width, 3072) + 2 * width)  # layers, final LayerNorm
  assert count(variables["params"]) == expected == 86_390_016
  assert 86e6 <= expected <= 87e6


@pytest.mark.parametrize("norm_first", [False, True])
def test_sequence_encoder_parameter_count_by_hand(norm_first):
  encoder = transformer.SequenceEncoder(norm_first=norm_first)
  features = jax.ShapeDtypeStruct((2, 32, 2048), jnp.float32)
  outputs, variables = jax.eval_shape(lambda x: encoder.init_with_output(jax.random.key(0), x, train=False),
                                      features)
  expected = (2048 * 512 + 512  # input projection
              + 512 + 257 * 512  # class token, position embeddings (class row + max_length 256)
              + 6 * encoder_layer_param_count(512, 2048) + (2 * 512 if norm_first else 0))  # final LayerNorm
  assert count(variables["params"]) == expected
  assert outputs["class_tokens"].shape == (6, 2, 512)
  assert outputs["tokens"].shape == (2, 32, 512)


def test_sequence_encoder_rejects_a_sequence_longer_than_max_length():
  encoder = transformer.SequenceEncoder(**TINY_ENCODER)
  with pytest.raises(ValueError, match="13 frames is longer than SequenceEncoder.max_length=12"):
    jax.eval_shape(lambda x: init(encoder, x, train=False), jax.ShapeDtypeStruct((1, 13, 8), jnp.float32))


# --------------------------------------------------------------------------- sequence encoder


@pytest.fixture(scope="module")
def features():
  """(features (2, 10, 24), mask with 7 and 4 real frames)."""
  features = jax.random.normal(jax.random.key(1), (2, 10, 24))
  mask = jnp.arange(10)[None, :] < jnp.array([[7], [4]])
  return features, mask


@pytest.mark.parametrize("norm_first", [False, True])
def test_class_tokens_are_each_layers_class_token(features, norm_first):
  x, _ = features
  encoder = transformer.SequenceEncoder(**TINY_ENCODER, norm_first=norm_first)
  params = init(encoder, x, train=False)["params"]
  outputs = encoder.apply({"params": params}, x, train=False)

  # The same network run one layer at a time.
  hidden = x @ params["input_projection"]["kernel"] + params["input_projection"]["bias"]
  hidden = jnp.concatenate([jnp.broadcast_to(params["class_token"], (2, 1, 32)), hidden], axis=1)
  hidden = hidden + params["position_embedding"][:11]
  layer = transformer.EncoderLayer(num_heads=4, mlp_dim=64, activation="relu", norm_first=norm_first)
  expected = []
  for i in range(3):
    hidden = layer.apply({"params": params[f"layer_{i}"]}, hidden)
    expected.append(hidden[:, 0])
  expected, tokens = jnp.stack(expected), hidden[:, 1:]
  if norm_first:
    final_norm = lambda y: transformer.nn.LayerNorm(1e-5, use_fast_variance=False).apply(
        {"params": params["final_norm"]}, y)
    expected, tokens = final_norm(expected), final_norm(tokens)
  np.testing.assert_allclose(outputs["class_tokens"], expected, atol=1e-5)
  np.testing.assert_allclose(outputs["tokens"], tokens, atol=1e-5)
  assert not np.allclose(outputs["class_tokens"][0], outputs["class_tokens"][-1])  # the layers do differ


@pytest.mark.parametrize("train", [False, True], ids=["fused_attention", "explicit_attention_with_dropout_path"])
def test_padded_frames_are_never_attended(features, train):
  """Padding content changes nothing; an all-valid mask equals no mask. train=True takes the explicit
  attention path (attention dropout); a rate that drops nothing makes it comparable."""
  x, mask = features
  encoder = transformer.SequenceEncoder(**TINY_ENCODER, dropout_rate=1e-12)
  variables = init(encoder, x, train=False)
  apply = functools.partial(encoder.apply, variables, train=train, rngs={"dropout": jax.random.key(3)})

  outputs = apply(x, mask)
  scrambled = jnp.where(mask[..., None], x, 100.0 * jax.random.normal(jax.random.key(2), x.shape))
  outputs_scrambled = apply(scrambled, mask)
  np.testing.assert_allclose(outputs["class_tokens"], outputs_scrambled["class_tokens"], atol=1e-5)
  np.testing.assert_allclose(outputs["tokens"], outputs_scrambled["tokens"], atol=1e-5)
  assert np.all(np.asarray(outputs["tokens"])[~np.asarray(mask)] == 0)
  # Without the mask the scrambled padding does reach the class token.
  assert not np.allclose(apply(x)["class_tokens"], apply(scrambled)["class_tokens"], atol=1e-3)

  all_valid = apply(x, jnp.ones(x.shape[:2], bool))
  no_mask = apply(x)
  np.testing.assert_allclose(all_valid["class_tokens"], no_mask["class_tokens"], atol=1e-6)
  np.testing.assert_allclose(all_valid["tokens"], no_mask["tokens"], atol=1e-6)
  if train:  # the explicit path equals the fused one
    fused = encoder.apply(variables, x, mask, train=False)
    np.testing.assert_allclose(outputs["class_tokens"], fused["class_tokens"], atol=1e-5)


def test_attention_dropout_is_active_in_training(features):
  x, mask = features
  encoder = transformer.SequenceEncoder(**TINY_ENCODER, dropout_rate=0.5)
  variables = init(encoder, x, train=False)
  apply = lambda seed: encoder.apply(variables, x, mask, train=True, rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(apply(0)["class_tokens"], apply(1)["class_tokens"])
  np.testing.assert_array_equal(encoder.apply(variables, x, mask, train=False)["class_tokens"],
                                encoder.apply(variables, x, mask, train=False)["class_tokens"])


def test_bfloat16_compute_keeps_float32_parameters(features):
  x, mask = features
  encoder = transformer.SequenceEncoder(**TINY_ENCODER, dtype=jnp.bfloat16)
  variables = init(encoder, x, train=False)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  outputs = encoder.apply(variables, x, mask, train=False)
  reference = transformer.SequenceEncoder(**TINY_ENCODER).apply(variables, x, mask, train=False)
  assert outputs["class_tokens"].dtype == jnp.float32
  np.testing.assert_allclose(outputs["class_tokens"], reference["class_tokens"], atol=0.1)


# --------------------------------------------------------------------------- one layer against PyTorch


def torch_layer_to_flax(layer: torch.nn.TransformerEncoderLayer) -> dict:
  sd = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
  linear = lambda key: {"kernel": sd[f"{key}.weight"].T, "bias": sd[f"{key}.bias"]}
  norm = lambda key: {"scale": sd[f"{key}.weight"], "bias": sd[f"{key}.bias"]}
  return {"attention": {"qkv": {"kernel": sd["self_attn.in_proj_weight"].T, "bias": sd["self_attn.in_proj_bias"]},
                        "out": linear("self_attn.out_proj")},
          "norm1": norm("norm1"), "norm2": norm("norm2"), "mlp_in": linear("linear1"), "mlp_out": linear("linear2")}


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "relu"), (True, "gelu")])
def test_encoder_layer_matches_torch_transformer_encoder_layer(norm_first, activation):
  torch.manual_seed(0)
  reference = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=activation, batch_first=True,
                                               norm_first=norm_first).eval()
  with torch.no_grad():  # move LayerNorms and biases off their trivial initial values
    for name, value in reference.named_parameters():
      if "norm" in name or "bias" in name:
        value.add_(0.3 * torch.randn_like(value))
  x = np.random.default_rng(0).normal(size=(3, 9, 32)).astype(np.float32)
  padding = np.zeros((3, 9), bool)
  padding[1, 6:] = padding[2, 3:] = True

  layer = transformer.EncoderLayer(num_heads=4, mlp_dim=64, activation=activation, norm_first=norm_first)
  params = torch_layer_to_flax(reference)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x)).numpy()
    expected_masked = reference(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(padding)).numpy()
  np.testing.assert_allclose(layer.apply({"params": params}, jnp.asarray(x)), expected, atol=1e-5)
  masked = np.asarray(layer.apply({"params": params}, jnp.asarray(x), jnp.asarray(~padding)))
  np.testing.assert_allclose(masked[~padding], expected_masked[~padding], atol=1e-5)


# --------------------------------------------------------------------------- video ViT and inflation


def random_image_vit_state_dict(seed=0, *, width=32, num_layers=2, mlp_dim=64, patch_size=8, image_size=32,
                                **_):
  """Random weights in timm's VisionTransformer layout (class token, 1 + n position rows, a head)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, std=0.2: (std * rng.normal(size=shape)).astype(np.float32)
  n = (image_size // patch_size) ** 2
  sd = {"patch_embed.proj.weight": normal(width, 3, patch_size, patch_size, std=0.1),
        "patch_embed.proj.bias": normal(width), "cls_token": normal(1, 1, width),
        "pos_embed": normal(1, 1 + n, width), "norm.weight": 1 + normal(width), "norm.bias": normal(width),
        "head.weight": normal(10, width), "head.bias": normal(10)}
  for i in range(num_layers):
    p = f"blocks.{i}"
    sd.update({f"{p}.norm1.weight": 1 + normal(width), f"{p}.norm1.bias": normal(width),
               f"{p}.attn.qkv.weight": normal(3 * width, width), f"{p}.attn.qkv.bias": normal(3 * width),
               f"{p}.attn.proj.weight": normal(width, width), f"{p}.attn.proj.bias": normal(width),
               f"{p}.norm2.weight": 1 + normal(width), f"{p}.norm2.bias": normal(width),
               f"{p}.mlp.fc1.weight": normal(mlp_dim, width), f"{p}.mlp.fc1.bias": normal(mlp_dim),
               f"{p}.mlp.fc2.weight": normal(width, mlp_dim), f"{p}.mlp.fc2.bias": normal(width)})
  return sd


def torch_image_vit_patch_tokens(sd, images: np.ndarray, num_heads: int, num_layers: int) -> np.ndarray:
  """timm's ViT forward in PyTorch ops, without the class token: images (N, H, W, 3) -> (N, h*w, width)."""
  t = {k: torch.from_numpy(v) for k, v in sd.items()}
  patch = t["patch_embed.proj.weight"].shape[-1]
  x = F.conv2d(torch.from_numpy(images).permute(0, 3, 1, 2), t["patch_embed.proj.weight"],
               t["patch_embed.proj.bias"], stride=patch)
  x = x.flatten(2).transpose(1, 2) + t["pos_embed"][:, 1:]
  n, length, width = x.shape
  norm = lambda y, key: F.layer_norm(y, (width,), t[f"{key}.weight"], t[f"{key}.bias"], eps=1e-6)
  for i in range(num_layers):
    p = f"blocks.{i}"
    qkv = F.linear(norm(x, f"{p}.norm1"), t[f"{p}.attn.qkv.weight"], t[f"{p}.attn.qkv.bias"])
    q, k, v = qkv.reshape(n, length, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, width)
    x = x + F.linear(attended, t[f"{p}.attn.proj.weight"], t[f"{p}.attn.proj.bias"])
    hidden = F.gelu(F.linear(norm(x, f"{p}.norm2"), t[f"{p}.mlp.fc1.weight"], t[f"{p}.mlp.fc1.bias"]))
    x = x + F.linear(hidden, t[f"{p}.mlp.fc2.weight"], t[f"{p}.mlp.fc2.bias"])
  return norm(x, "norm").numpy()


def small_video_vit(**overrides):
  args = {k: IMAGE_VIT[k] for k in ("width", "num_layers", "num_heads", "mlp_dim", "patch_size")}
  return transformer.VideoViT(**{**args, "tubelet_frames": 2, **overrides})


def inflated(vit, clips_shape, inflation, sd=None):
  abstract = jax.eval_shape(lambda x: init(vit, x, train=False), jax.ShapeDtypeStruct(clips_shape, jnp.float32))
  return transformer.inflate_image_vit(sd or random_image_vit_state_dict(), abstract["params"], inflation=inflation)


@pytest.mark.parametrize("inflation", ["average", "central"])
def test_inflated_vit_on_identical_frames_gives_the_image_vits_tokens_at_every_time_step(inflation):
  sd = random_image_vit_state_dict()
  frame = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  clips = np.repeat(frame[:, None], 4, axis=1)  # 4 identical frames -> 2 time steps
  vit = small_video_vit()
  (grid,) = vit.apply({"params": inflated(vit, clips.shape, inflation, sd)}, clips, train=False)
  assert grid.shape == (2, 2, 4, 4, 32)
  expected = torch_image_vit_patch_tokens(sd, frame, num_heads=4, num_layers=2).reshape(2, 4, 4, 32)
  for time_step in range(2):
    np.testing.assert_allclose(grid[:, time_step], expected, atol=2e-5)


def test_central_inflation_reads_only_the_central_frame_of_each_tubelet():
  vit = small_video_vit()
  clips = np.random.default_rng(2).normal(size=(1, 4, 32, 32, 3)).astype(np.float32)
  params = inflated(vit, clips.shape, "central")
  apply = lambda x: vit.apply({"params": params}, x, train=False)[0]
  changed_first_frames = clips.copy()
  changed_first_frames[:, 0::2] += 1.0  # frames 0 and 2: not the tubelets' frame kt // 2 = 1
  np.testing.assert_allclose(apply(changed_first_frames), apply(clips), atol=1e-5)
  changed_central_frames = clips.copy()
  changed_central_frames[:, 1::2] += 1.0
  assert not np.allclose(apply(changed_central_frames), apply(clips), atol=1e-3)


def test_inflation_interpolates_position_embeddings_to_another_grid():
  sd = random_image_vit_state_dict()
  sd["pos_embed"][0, 1:] = np.linspace(-1, 1, 32, dtype=np.float32)  # the same row at every position
  vit = small_video_vit()
  params = inflated(vit, (1, 6, 48, 48, 3), "average", sd)  # a 3 x 6 x 6 grid from the image's 4 x 4
  assert params["spatial_position_embedding"].shape == (6, 6, 32)
  np.testing.assert_allclose(params["spatial_position_embedding"], np.broadcast_to(sd["pos_embed"][0, 1], (6, 6, 32)),
                             atol=1e-6)
  np.testing.assert_array_equal(params["temporal_position_embedding"], np.zeros((3, 32)))

  same = inflated(vit, (1, 4, 32, 32, 3), "average", random_image_vit_state_dict())
  np.testing.assert_array_equal(same["spatial_position_embedding"],
                                random_image_vit_state_dict()["pos_embed"][0, 1:].reshape(4, 4, 32))
  resized = transformer.resize_position_embeddings(same, (3, 6, 6))
  vit.apply({"params": resized}, np.zeros((1, 6, 48, 48, 3), np.float32), train=False)


def test_inflation_errors_name_the_offending_key():
  vit = small_video_vit()
  shape = (1, 4, 32, 32, 3)
  missing = random_image_vit_state_dict()
  del missing["blocks.1.mlp.fc2.bias"]
  with pytest.raises(ValueError, match="no 'blocks.1.mlp.fc2.bias'"):
    inflated(vit, shape, "average", missing)
  with pytest.raises(ValueError, match="'patch_embed.proj.weight' converts to shape"):
    inflated(vit, shape, "average", random_image_vit_state_dict(patch_size=16))
  with pytest.raises(ValueError, match=r"no place for: \['blocks.2.attn.proj.bias'"):
    inflated(vit, shape, "average", random_image_vit_state_dict(num_layers=3))
  with pytest.raises(ValueError, match="unknown inflation"):
    inflated(vit, shape, "first")


# --------------------------------------------------------------------------- as an Ego-Exo backbone


def test_egoexo_model_with_vit_backbone_trains_and_remat_gives_the_same_gradients():
  tiny = dict(patch_size=8, width=32, num_layers=2, num_heads=4, mlp_dim=64, dropout_rate=0.1)
  clips = jax.random.normal(jax.random.key(1), (2, 4, 32, 32, 3))
  labels = jnp.array([0, 3])

  def loss_and_grads(remat_policy):
    model = egoexo.Model(num_classes=5, num_object_classes=7, backbone="vit_b16", interaction_channels=16,
                         backbone_args=dict(tiny, remat_policy=remat_policy))
    params = init(model, clips, train=False)["params"]

    @jax.jit
    def loss_fn(params):
      outputs = model.apply({"params": params}, clips, train=True, rngs={"dropout": jax.random.key(2)})
      assert outputs["interaction"].shape == (2, 2, 4, 4, 2)
      assert outputs["features"].shape == (2, 32)
      log_probs = jax.nn.log_softmax(outputs["action"])
      return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

    return jax.value_and_grad(loss_fn)(params)

  (loss, grads), (loss_remat, grads_remat) = loss_and_grads(None), loss_and_grads("nothing_saveable")
  assert np.isfinite(loss) and abs(float(loss) - np.log(5)) < 0.5
  assert float(jnp.abs(grads["backbone"]["layer_0"]["attention"]["qkv"]["kernel"]).sum()) > 0
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_remat, grads)
