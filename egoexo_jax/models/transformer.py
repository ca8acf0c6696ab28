"""Transformers: the EVGAP sequence encoder, a video ViT backbone, and 2-D -> 3-D ViT weight inflation.

One `EncoderLayer` serves both networks. Its parameters map one-to-one onto PyTorch's layouts:

    here (Flax)                 torch nn.TransformerEncoderLayer      timm VisionTransformer blocks.{i}
    attention/qkv  (D, 3D)      self_attn.in_proj_weight.T  (3D, D)   attn.qkv.weight.T
    attention/out  (D, D)       self_attn.out_proj.weight.T           attn.proj.weight.T
    norm1, norm2                norm1, norm2                          norm1, norm2
    mlp_in, mlp_out             linear1, linear2                      mlp.fc1, mlp.fc2

The fused qkv output splits as (3, heads, head_dim), as both PyTorch libraries split theirs. Dense
kernels start Xavier-uniform with zero biases (PyTorch's init of the attention projections).

- `SequenceEncoder` (EVGAP): per-frame features (B, L, C) -> every layer's class token and the last
  layer's frame tokens. Post-norm by default, as PyTorch's nn.TransformerEncoderLayer, which the
  original EVGAP stacks; `norm_first=True` gives pre-norm with a final LayerNorm.
- `VideoViT`: clips (B, T, H, W, 3) -> [feature grid (B, T/kt, H/p, W/p, width)], the one-pathway
  backbone contract of models/backbones.py. Pre-norm, GELU, no class token: the heads average the
  grid, and without a class token a clip of identical frames gives exactly the image ViT's tokens
  (see `inflate_image_vit`).
- `inflate_image_vit`: a timm-layout image ViT state dict -> `VideoViT` parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

dense_kernel_init = nn.initializers.xavier_uniform()
embedding_init = nn.initializers.normal(0.02)

# ViT-B/16 with a 2 x 16 x 16 tubelet: 86,390,016 parameters at 8 x 224^2 (4 x 14 x 14 grid).
VIT_B16 = dict(patch_size=16, tubelet_frames=2, width=768, num_layers=12, num_heads=12, mlp_dim=3072)
VIT_S16 = dict(VIT_B16, width=384, num_heads=6, mlp_dim=1536)


class MultiHeadSelfAttention(nn.Module):
  """(B, L, D) tokens, optional (B, L) bool key mask (True = may be attended) -> (B, L, D).

  With attention dropout active (training, rate > 0) the weights are formed explicitly so they can be
  dropped, as PyTorch does; otherwise `jax.nn.dot_product_attention` runs, with `implementation`
  None/'xla' or 'cudnn' (flash attention on NVIDIA GPUs).
  """

  num_heads: int
  attention_dropout_rate: float = 0.0
  deterministic: bool = True
  implementation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    dense = dict(kernel_init=dense_kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = nn.Dense(3 * width, name="qkv", **dense)(x).reshape(batch, length, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, heads, queries, keys)
    if self.attention_dropout_rate > 0 and not self.deterministic:
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
      logits = logits / math.sqrt(head_dim)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      weights = nn.Dropout(self.attention_dropout_rate, deterministic=False)(jax.nn.softmax(logits))
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
    else:
      out = jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=self.implementation)
    return nn.Dense(width, name="out", **dense)(out.reshape(batch, length, width))


class EncoderLayer(nn.Module):
  """One transformer layer, (B, L, D) -> (B, L, D).

  Post-norm (norm_first=False, PyTorch's default): x = norm1(x + attn(x)); x = norm2(x + mlp(x)).
  Pre-norm (norm_first=True, ViT): x = x + attn(norm1(x)); x = x + mlp(norm2(x)).
  mlp = mlp_out(dropout(activation(mlp_in(.)))). Dropout follows the attention and the MLP
  (residual branches), the MLP activation, and the attention weights (attention_dropout_rate), as
  PyTorch's layer with `dropout` places it.
  """

  num_heads: int
  mlp_dim: int
  activation: str = "relu"  # 'relu' or 'gelu' (exact, erf-based, as PyTorch and timm)
  norm_first: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-5
  deterministic: bool = True
  attention_implementation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    activations = {"relu": nn.relu, "gelu": lambda y: nn.gelu(y, approximate=False)}
    if self.activation not in activations:
      raise ValueError(f"unknown activation '{self.activation}'; known: {sorted(activations)}")

    def norm(name):
      return nn.LayerNorm(self.layer_norm_epsilon, use_fast_variance=False, name=name, **dtypes)

    def dropout(y):
      return nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(y)

    def attention(y):
      return dropout(MultiHeadSelfAttention(self.num_heads, self.attention_dropout_rate, self.deterministic,
                                            self.attention_implementation, name="attention", **dtypes)(y, key_mask))

    def mlp(y):
      y = nn.Dense(self.mlp_dim, kernel_init=dense_kernel_init, name="mlp_in", **dtypes)(y)
      y = dropout(activations[self.activation](y))
      return dropout(nn.Dense(x.shape[-1], kernel_init=dense_kernel_init, name="mlp_out", **dtypes)(y))

    if self.norm_first:
      x = x + attention(norm("norm1")(x))
      return x + mlp(norm("norm2")(x))
    x = norm("norm1")(x + attention(x))
    return norm("norm2")(x + mlp(x))


class SequenceEncoder(nn.Module):
  """EVGAP's shared encoder: features (B, L, C), optional (B, L) bool mask (True = real frame) -> dict.

  input_projection (C -> width, C taken from the input), a learned class token in front, learned
  position embeddings (row 0 for the class token, rows 1..L for the frames, L <= max_length), then
  `num_layers` EncoderLayers (ReLU). Padded frames are never attended; the class token always is.
  Returns float32:
    'class_tokens' (num_layers, B, width): the class token after each layer (auxiliary losses use
        all of them; the last is the clip embedding). Pre-norm passes each through the final LayerNorm.
    'tokens' (B, L, width): the last layer's frame tokens (final LayerNorm under pre-norm); zeros at
        padded frames.
  With train=True and a dropout rate > 0 it needs a 'dropout' rng.
  """

  width: int = 512
  num_layers: int = 6
  num_heads: int = 8
  mlp_dim: int = 2048
  max_length: int = 256
  dropout_rate: float = 0.1  # PyTorch nn.TransformerEncoderLayer's default
  norm_first: bool = False
  layer_norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array | None = None, *, train: bool) -> dict[str, jax.Array]:
    batch, length, _ = features.shape
    if length > self.max_length:
      raise ValueError(f"sequence of {length} frames is longer than SequenceEncoder.max_length={self.max_length}")
    if mask is not None and mask.shape != (batch, length):
      raise ValueError(f"mask has shape {mask.shape}, expected (batch, length) = {(batch, length)}")
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.width, kernel_init=dense_kernel_init, name="input_projection", **dtypes)(features)
    class_token = self.param("class_token", embedding_init, (self.width,), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(class_token.astype(x.dtype), (batch, 1, self.width)), x], axis=1)
    position = self.param("position_embedding", embedding_init, (self.max_length + 1, self.width), self.param_dtype)
    x = x + position[:length + 1].astype(x.dtype)
    key_mask = None
    if mask is not None:
      key_mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask.astype(bool)], axis=1)

    class_tokens = []
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.mlp_dim, "relu", norm_first=self.norm_first,
                       dropout_rate=self.dropout_rate, attention_dropout_rate=self.dropout_rate,
                       layer_norm_epsilon=self.layer_norm_epsilon, deterministic=not train, name=f"layer_{i}",
                       **dtypes)(x, key_mask)
      class_tokens.append(x[:, 0])
    class_tokens, tokens = jnp.stack(class_tokens), x[:, 1:]
    if self.norm_first:
      final_norm = nn.LayerNorm(self.layer_norm_epsilon, use_fast_variance=False, name="final_norm", **dtypes)
      class_tokens, tokens = final_norm(class_tokens), final_norm(tokens)
    if mask is not None:
      tokens = jnp.where(mask.astype(bool)[..., None], tokens, 0)
    return {"class_tokens": class_tokens.astype(jnp.float32), "tokens": tokens.astype(jnp.float32)}


class TubeletEmbedding(nn.Module):
  """Clips (B, T, H, W, C) -> (B, T/kt, H/p, W/p, width): a linear map of each kt x p x p x C tube.

  The same maths as a Conv3D with kernel = stride = (kt, p, p); run as one matmul over the tubes.
  Parameters 'kernel' (kt, p, p, C, width) as nn.Conv's, and 'bias'.
  """

  width: int
  patch_size: int = 16
  tubelet_frames: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, clips: jax.Array) -> jax.Array:
    batch, frames, height, width, channels = clips.shape
    kt, p = self.tubelet_frames, self.patch_size
    if frames % kt or height % p or width % p:
      raise ValueError(f"clips of {frames} x {height} x {width} do not divide into {kt} x {p} x {p} tubelets")
    t, h, w = frames // kt, height // p, width // p
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4),
                        (kt, p, p, channels, self.width), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.width,), self.param_dtype)
    tubes = clips.astype(self.dtype).reshape(batch, t, kt, h, p, w, p, channels)
    tubes = tubes.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(batch, t, h, w, kt * p * p * channels)
    return tubes @ kernel.reshape(-1, self.width).astype(self.dtype) + bias.astype(self.dtype)


class VideoViT(nn.Module):
  """Video ViT backbone: clips (B, T, H, W, 3) -> [tokens (B, T/kt, H/p, W/p, width)] (one pathway).

  Tubelet embedding (kt x p x p), separable learned position embeddings (a spatial (h, w, width)
  table plus a temporal (t, width) table, sized by the first clips seen), `num_layers` pre-norm
  EncoderLayers (GELU, joint space-time attention, LayerNorm epsilon 1e-6 as timm), a final
  LayerNorm. No class token. `remat_policy` names a `jax.checkpoint_policies` policy
  ('nothing_saveable', 'dots_with_no_batch_dims_saveable', ...) to recompute each layer's
  activations in the backward pass instead of storing them; None stores everything.
  """

  patch_size: int = 16
  tubelet_frames: int = 2
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  remat_policy: str | None = None
  attention_implementation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, clips: jax.Array, *, train: bool) -> list[jax.Array]:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = TubeletEmbedding(self.width, self.patch_size, self.tubelet_frames, name="tubelet_embedding", **dtypes)(clips)
    batch, t, h, w, width = x.shape
    try:
      spatial = self.param("spatial_position_embedding", embedding_init, (h, w, width), self.param_dtype)
      temporal = self.param("temporal_position_embedding", embedding_init, (t, width), self.param_dtype)
    except flax.errors.ScopeParamShapeError as error:
      raise ValueError(f"clips {clips.shape} give a {(t, h, w)} token grid, but the position embeddings were made "
                       "for another; adapt them with resize_position_embeddings") from error
    x = x + (spatial[None] + temporal[:, None, None]).astype(x.dtype)
    x = x.reshape(batch, t * h * w, width)

    layer = EncoderLayer
    if self.remat_policy is not None:
      policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
      if policy is None:
        raise ValueError(f"unknown remat_policy '{self.remat_policy}': not in jax.checkpoint_policies")
      layer = nn.remat(EncoderLayer, policy=policy)
    for i in range(self.num_layers):
      x = layer(self.num_heads, self.mlp_dim, "gelu", norm_first=True, dropout_rate=self.dropout_rate,
                layer_norm_epsilon=1e-6, deterministic=not train,
                attention_implementation=self.attention_implementation, name=f"layer_{i}", **dtypes)(x)
    x = nn.LayerNorm(1e-6, use_fast_variance=False, name="final_norm", **dtypes)(x)
    return [x.reshape(batch, t, h, w, width)]  # one pathway (see models/backbones.py)


# --------------------------------------------------------------------------- position embeddings


def resize_grid(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Linear interpolation of a (*grid, width) table to (*shape, width); the identity when shapes agree.

  Half-pixel sample centres (jax.image.resize 'linear'): a constant table stays constant.
  """
  table = np.asarray(table, np.float32)
  if tuple(table.shape[:-1]) == tuple(shape):
    return table
  return np.asarray(jax.image.resize(table, (*shape, table.shape[-1]), "linear", antialias=False))


def resize_position_embeddings(params: Mapping[str, Any], grid: tuple[int, int, int]) -> dict[str, Any]:
  """VideoViT params with their position embeddings interpolated to a (t, h, w) token grid.

  For fine-tuning at another clip length or crop than the parameters were made for.
  """
  params = dict(params)
  params["spatial_position_embedding"] = resize_grid(params["spatial_position_embedding"], grid[1:])
  params["temporal_position_embedding"] = resize_grid(params["temporal_position_embedding"], grid[:1])
  return params


# --------------------------------------------------------------------------- 2-D -> 3-D inflation

INFLATIONS = ("average", "central")
# timm image ViT entries that have no counterpart in VideoViT (no class token, no classifier).
IGNORED_IMAGE_KEYS = ("cls_token", "head.weight", "head.bias")


def _numpy(value: Any) -> np.ndarray:
  """A numpy float32 copy of an array or (CPU) torch tensor."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def inflate_image_vit(state_dict: Mapping[str, Any], video_params: Mapping[str, Any], *,
                      inflation: str = "average") -> dict[str, Any]:
  """VideoViT params from a timm-layout image ViT state dict (e.g. ViT-B/16's `vit_base_patch16_224`).

  `video_params` is the target VideoViT's parameter tree (arrays or jax.eval_shape structs): it fixes
  the tubelet length, the token grid and the layer count. Returns a new tree of float32 numpy arrays.
  - Patch kernel (width, 3, p, p) -> tubelet kernel (kt, p, p, 3, width). inflation='average' puts
    kernel / kt on each of the kt frames (a clip of identical frames embeds as the image does);
    'central' puts the whole kernel on frame kt // 2 and zeros elsewhere (each tubelet embeds as its
    frame kt // 2 alone).
  - pos_embed (1, [1 +] n, width): the class-token row (present when the state dict has 'cls_token')
    is dropped; the sqrt(n) x sqrt(n) spatial table is linearly interpolated to the video grid's
    (h, w) when they differ. The temporal table starts at zero, so at initialisation every time step
    sees the image's position embeddings.
  - blocks.{i}.* and norm.* -> layer_{i}/* and final_norm/* (transposed linear weights).
  'cls_token' and 'head.*' are not used. A missing key, a leftover key or a shape that does not fit
  the target raises ValueError naming the key.
  """
  if inflation not in INFLATIONS:
    raise ValueError(f"unknown inflation '{inflation}'; use one of {INFLATIONS}")
  remaining = {k: v for k, v in state_dict.items() if k not in IGNORED_IMAGE_KEYS}

  def take(key: str) -> np.ndarray:
    if key not in remaining:
      raise ValueError(f"image ViT state dict has no '{key}'")
    return _numpy(remaining.pop(key))

  def fit(key: str, value: np.ndarray, target: Any) -> np.ndarray:
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f"'{key}' converts to shape {tuple(value.shape)} but VideoViT expects {tuple(target.shape)}")
    return value

  tubelet = video_params["tubelet_embedding"]
  kt = tubelet["kernel"].shape[0]
  patch = take("patch_embed.proj.weight").transpose(2, 3, 1, 0)  # (width, C, p, p) -> (p, p, C, width)
  if inflation == "average":
    kernel = np.stack([patch / kt] * kt)
  else:
    kernel = np.zeros((kt, *patch.shape), np.float32)
    kernel[kt // 2] = patch
  params: dict[str, Any] = {"tubelet_embedding": {
      "kernel": fit("patch_embed.proj.weight", kernel, tubelet["kernel"]),
      "bias": fit("patch_embed.proj.bias", take("patch_embed.proj.bias"), tubelet["bias"])}}

  position = take("pos_embed")[0]
  if "cls_token" in state_dict:
    position = position[1:]
  side = math.isqrt(position.shape[0])
  if side * side != position.shape[0]:
    raise ValueError(f"'pos_embed' has {position.shape[0]} patch positions, not a square grid")
  spatial_target = video_params["spatial_position_embedding"]
  params["spatial_position_embedding"] = fit(
      "pos_embed", resize_grid(position.reshape(side, side, -1), spatial_target.shape[:2]), spatial_target)
  params["temporal_position_embedding"] = np.zeros(video_params["temporal_position_embedding"].shape, np.float32)

  def linear(key: str, target: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"kernel": fit(f"{key}.weight", take(f"{key}.weight").T, target["kernel"]),
            "bias": fit(f"{key}.bias", take(f"{key}.bias"), target["bias"])}

  def layer_norm(key: str, target: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"scale": fit(f"{key}.weight", take(f"{key}.weight"), target["scale"]),
            "bias": fit(f"{key}.bias", take(f"{key}.bias"), target["bias"])}

  num_layers = sum(1 for name in video_params if name.startswith("layer_"))
  for i in range(num_layers):
    target, prefix = video_params[f"layer_{i}"], f"blocks.{i}"
    params[f"layer_{i}"] = {
        "norm1": layer_norm(f"{prefix}.norm1", target["norm1"]),
        "attention": {"qkv": linear(f"{prefix}.attn.qkv", target["attention"]["qkv"]),
                      "out": linear(f"{prefix}.attn.proj", target["attention"]["out"])},
        "norm2": layer_norm(f"{prefix}.norm2", target["norm2"]),
        "mlp_in": linear(f"{prefix}.mlp.fc1", target["mlp_in"]),
        "mlp_out": linear(f"{prefix}.mlp.fc2", target["mlp_out"])}
  params["final_norm"] = layer_norm("norm", video_params["final_norm"])
  if remaining:
    raise ValueError(f"image ViT state dict has entries VideoViT has no place for: {sorted(remaining)} "
                     f"(VideoViT has {num_layers} layers)")
  return params
