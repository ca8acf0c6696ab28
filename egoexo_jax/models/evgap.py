"""EVGAP model: one shared sequence encoder for every view, a projection per layer, learnable logit scales.

    windows (..., T, C) --SequenceEncoder (models/transformer.py; the same weights for ego and exo)-->
        class token after each of the L layers (L, ..., width) --heads/projection_l (Dense width -> embed_dim)-->
        'embeddings' (L, ..., embed_dim)

The last layer's embedding is the window's representation; layers 1..L-1 feed the auxiliary losses.
Logit scales are parameters s with scale t = exp(s) (CLIP's and SigLIP's parameterisation):
  'pair_log_scale'   step 1 (CLIP pair loss): s = `pair_log_scale_init`, 0 by default, so t starts at 1.
  'group_log_scale'  step 2 (SigLIP group loss): s = `group_log_scale_init`.
  'group_bias'       step 2: b = `group_bias_init` (SigLIP: -10).
Both steps' scalars live in every model, so step 2 restores step 1's 'encoder' and 'heads' and starts
its own scale and bias fresh (init_from 'encoder=...,heads=...').
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from egoexo_jax.models.transformer import SequenceEncoder, dense_kernel_init


class Model(nn.Module):
  """EVGAP encoder + per-layer projections. Defaults: the paper's 6 layers, width 512, 8 heads, MLP 2048."""

  width: int = 512
  num_layers: int = 6
  num_heads: int = 8
  mlp_dim: int = 2048
  embed_dim: int = 512
  max_length: int = 64
  dropout_rate: float = 0.1
  norm_first: bool = False
  pair_log_scale_init: float = 0.0
  group_log_scale_init: float = 0.0
  group_bias_init: float = -10.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.encoder = SequenceEncoder(width=self.width, num_layers=self.num_layers, num_heads=self.num_heads,
                                   mlp_dim=self.mlp_dim, max_length=self.max_length, dropout_rate=self.dropout_rate,
                                   norm_first=self.norm_first, dtype=self.dtype, param_dtype=self.param_dtype)
    self.heads = LayerProjections(self.num_layers, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype)
    constant = lambda value: lambda *_: jnp.asarray(value, self.param_dtype)
    self.pair_log_scale = self.param("pair_log_scale", constant(self.pair_log_scale_init))
    self.group_log_scale = self.param("group_log_scale", constant(self.group_log_scale_init))
    self.group_bias = self.param("group_bias", constant(self.group_bias_init))

  def encode(self, windows: jax.Array, mask: jax.Array | None = None, *, train: bool) -> dict[str, jax.Array]:
    """windows (..., T, C), optional mask (..., T) (True = real frame) -> 'class_tokens' (L, ..., width),
    'tokens' (..., T, width), float32."""
    lead = windows.shape[:-2]
    if mask is not None:
      mask = mask.reshape(-1, mask.shape[-1])
    outputs = self.encoder(windows.reshape(-1, *windows.shape[-2:]), mask, train=train)
    layers = outputs["class_tokens"].shape[0]
    return {"class_tokens": outputs["class_tokens"].reshape(layers, *lead, self.width),
            "tokens": outputs["tokens"].reshape(*lead, *outputs["tokens"].shape[1:])}

  def __call__(self, windows: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """windows (..., T, C) -> 'embeddings' (L, ..., embed_dim) (not normalised; the losses normalise),
    'class_tokens' (L, ..., width), 'tokens' (..., T, width); all float32; and the loss scalars
    'pair_log_scale', 'group_log_scale', 'group_bias' (the parameters, so the losses read them as outputs)."""
    outputs = self.encode(windows, train=train)
    return {**outputs, "embeddings": self.heads(outputs["class_tokens"]), "pair_log_scale": self.pair_log_scale,
            "group_log_scale": self.group_log_scale, "group_bias": self.group_bias}


class LayerProjections(nn.Module):
  """(L, ..., width) class tokens -> (L, ..., embed_dim): a separate Dense per layer ('projection_l')."""

  num_layers: int
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, class_tokens: jax.Array) -> jax.Array:
    if class_tokens.shape[0] != self.num_layers:
      raise ValueError(f"{class_tokens.shape[0]} layers of class tokens for {self.num_layers} projections")
    return jnp.stack([
        nn.Dense(self.embed_dim, kernel_init=dense_kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                 name=f"projection_{layer}")(class_tokens[layer]).astype(jnp.float32)
        for layer in range(self.num_layers)])
