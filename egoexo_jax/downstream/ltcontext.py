"""LTContext (Bahrami, Francesca and Gall, "How Much Temporal Long-Term Context is Needed for Action
Segmentation?", ICCV 2023).

One of the segmentation models of EVGAP's Table 2. Layer list as the authors' release (github
LTContext/LTContext, ltc/model/ltcontext.py, multi_head_attention.py, attention_utils.py) with the
settings of its Assembly101 run (configs/Assembly101/LTContext.yaml over ltc/config/defaults.py): 4
stages, 9 layers, model width 64 (later stages 64 / DIM_REDUCTION 2 = 32), W = G = 64, one head, channel
masking 0.3, dropout 0.2, attention dropout 0.2; widths are fields so tests can shrink them.

  stage 1:   channel dropout (whole input channels) -> 1x1 conv (C -> D) -> `num_layers` blocks
             (dilation 2^i) -> 1x1 conv (D -> K), masked; its features go through a 1x1 conv D -> D / 2
  stage s>1: the same on softmax(previous logits) x mask with width D / 2; the attention values come from
             the previous stage's features (masked), the queries and keys from the stage's own
  block:     h = gelu(conv3 dilated 2^i (x)) x mask
             h = windowed_attention(h) + h;  h = long_term_attention(h) + h
             out = (x + dropout(conv1x1(h))) x mask
  attention: one head; q, k, v = 1x1 convs (D -> D / 2) with bias, q.k / sqrt(D / 2), keys beyond the
             sequence masked (-inf), dropout 0.2 on the weights, out = dropout 0.1 (1x1 conv D / 2 -> D of
             gelu(a v)), masked
    windowed:  frames in non-overlapping windows of W; a window's queries see the 2W frames from W / 2
               before it to W / 2 after it (zeros beyond the sequence, masked)
    long-term: after padding to a multiple of G, frame j sees the frames j mod G, j mod G + G, ... (a
               sparse attention over the whole sequence with stride G)

Loss (released ltc/model/loss.py, CEplusMSE): per stage cross-entropy + 0.17 (Assembly101's
MSE_LOSS_FRACTION) x the smoothing term clamped at 16, summed over stages: mstcn.mstcn_loss with weight
0.17 (it averages the smoothing term over pairs of real frames; the release over every position).
Training (the same yaml): Adam 2.5e-4, weight decay 1e-3, batch 1, 120 epochs, cosine decay after 15
warm-up epochs (the schedule is not done by downstream/loop.py).

The release's flag USE_INSTANCE_NORM is inverted in its code (True builds nn.Identity, False an
InstanceNorm1d); its Assembly101 yaml keeps the default True, so the released model normalises nothing
before the attentions. `instance_norm=False` is that model; True adds the norm (over the real frames).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from egoexo_jax.downstream.asformer import masked_instance_norm, windows

SMOOTHING_WEIGHT = 0.17  # configs/Assembly101/LTContext.yaml MODEL.MSE_LOSS_FRACTION


class Attention(nn.Module):
  """The release's MultiHeadAttention with one head: queries (N, Lq, D), keys/values (N, Lk, D), key mask
  (N, Lk) -> (N, Lq, D). A group with no real key gives zeros (the release's all-masked blocks)."""

  features: int
  dropout_rate: float = 0.2  # ATTENTION.DROPOUT, on the attention weights
  output_dropout_rate: float = 0.1  # fixed in the release's MultiHeadAttention

  @nn.compact
  def __call__(self, queries, keys, values, key_mask, *, train: bool):
    inner = self.features // 2
    q = nn.Conv(inner, (1,), name="query")(queries) / math.sqrt(inner)
    k = nn.Conv(inner, (1,), name="key")(keys)
    v = nn.Conv(inner, (1,), name="value")(values)
    real = key_mask[:, None, :] > 0
    energy = jnp.where(real, jnp.einsum("nqc,nkc->nqk", q, k), -jnp.inf)
    any_real = jnp.any(real, axis=-1, keepdims=True)
    weights = jax.nn.softmax(jnp.where(any_real, energy, 0.0), axis=-1)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    out = jnp.where(any_real, jnp.einsum("nqk,nkc->nqc", weights, v), 0.0)
    out = nn.Conv(self.features, (1,), name="out")(nn.gelu(out, approximate=False))
    return nn.Dropout(self.output_dropout_rate, deterministic=not train)(out)


def _pad_to(x: jax.Array, multiple: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, -x.shape[1] % multiple)) + ((0, 0),) * (x.ndim - 2))


class WindowedAttention(nn.Module):
  features: int
  window: int
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, qk: jax.Array, values: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    batch, length, _ = qk.shape
    w, half = self.window, self.window // 2
    padded = [_pad_to(t, w) for t in (qk, values, mask)]
    blocks = padded[0].shape[1] // w
    queries = padded[0].reshape(batch * blocks, w, -1)
    around = [windows(jnp.pad(t, ((0, 0), (half, half)) + ((0, 0),) * (t.ndim - 2)), 2 * w, w) for t in padded]
    keys, vals, key_mask = (t.reshape((batch * blocks, 2 * w) + t.shape[3:]) for t in around)
    out = Attention(self.features, self.dropout_rate, name="attention")(queries, keys, vals, key_mask, train=train)
    return out.reshape(batch, blocks * w, -1)[:, :length] * mask[..., None]


class LongTermAttention(nn.Module):
  features: int
  stride: int
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, qk: jax.Array, values: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    batch, length, _ = qk.shape
    g = self.stride

    def groups(t):  # (B, n G, ...) -> (B G, n, ...): frames p, p + G, p + 2G, ... together
      t = _pad_to(t, g)
      t = t.reshape((batch, t.shape[1] // g, g) + t.shape[2:])
      return jnp.swapaxes(t, 1, 2).reshape((batch * g, t.shape[1]) + t.shape[3:])

    out = Attention(self.features, self.dropout_rate, name="attention")(
        groups(qk), groups(qk), groups(values), groups(mask), train=train)
    out = jnp.swapaxes(out.reshape(batch, g, -1, out.shape[-1]), 1, 2).reshape(batch, -1, out.shape[-1])
    return out[:, :length] * mask[..., None]


class Block(nn.Module):
  features: int
  dilation: int
  window: int
  stride: int
  instance_norm: bool = False
  dropout_rate: float = 0.2
  attention_dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, values: jax.Array | None, mask: jax.Array, *, train: bool) -> jax.Array:
    d = self.dilation
    norm = (lambda t: masked_instance_norm(t, mask)) if self.instance_norm else (lambda t: t)
    h = nn.gelu(nn.Conv(self.features, (3,), kernel_dilation=(d,), padding=[(d, d)], name="dilated_conv")(x),
                approximate=False) * mask[..., None]
    n = norm(h)
    h = WindowedAttention(self.features, self.window, self.attention_dropout_rate, name="windowed")(
        n, n if values is None else values, mask, train=train) + h
    n = norm(h)
    h = LongTermAttention(self.features, self.stride, self.attention_dropout_rate, name="long_term")(
        n, n if values is None else values, mask, train=train) + h
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.Conv(self.features, (1,), name="pointwise")(h))
    return (x + h) * mask[..., None]


class Stage(nn.Module):
  num_classes: int
  num_layers: int
  features: int
  window: int
  stride: int
  instance_norm: bool
  channel_masking_rate: float
  dropout_rate: float
  attention_dropout_rate: float

  @nn.compact
  def __call__(self, x: jax.Array, values: jax.Array | None, mask: jax.Array, *, train: bool):
    # nn.Dropout1d on (B, C, L): whole channels of a sequence dropped, the rest scaled by 1 / (1 - rate).
    x = nn.Dropout(self.channel_masking_rate, broadcast_dims=(1,), deterministic=not train)(x)
    h = nn.Conv(self.features, (1,), name="input")(x) * mask[..., None]  # padding stays zero, as unpadded
    for i in range(self.num_layers):
      h = Block(self.features, 2**i, self.window, self.stride, self.instance_norm, self.dropout_rate,
                self.attention_dropout_rate, name=f"layer_{i}")(h, values, mask, train=train)
    return nn.Conv(self.num_classes, (1,), name="classifier")(h) * mask[..., None], h


class LTContext(nn.Module):
  """features (B, T, C), mask (B, T) 1 = real frame -> logits (num_stages, B, T, num_classes)."""

  num_classes: int
  num_stages: int = 4
  num_layers: int = 9
  features: int = 64
  dim_reduction: int = 2
  window: int = 64  # W
  stride: int = 64  # G
  instance_norm: bool = False
  channel_masking_rate: float = 0.3
  dropout_rate: float = 0.2
  attention_dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    mask = mask.astype(jnp.float32)
    stage = lambda width, name: Stage(self.num_classes, self.num_layers, width, self.window, self.stride,
                                      self.instance_norm, self.channel_masking_rate, self.dropout_rate,
                                      self.attention_dropout_rate, name=name)
    logits, h = stage(self.features, "stage_0")(features, None, mask, train=train)
    outputs = [logits]
    reduced = self.features // self.dim_reduction
    h = nn.Conv(reduced, (1,), name="dim_reduction")(h)
    for s in range(1, self.num_stages):
      probabilities = jax.nn.softmax(logits, axis=-1) * mask[..., None]
      logits, h = stage(reduced, f"stage_{s}")(probabilities, h * mask[..., None], mask, train=train)
      outputs.append(logits)
    return jnp.stack(outputs)
