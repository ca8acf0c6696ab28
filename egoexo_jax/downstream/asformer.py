"""ASFormer (Yi, Zhou and Hu, "ASFormer: Transformer for Action Segmentation", BMVC 2021).

One of the segmentation models of EVGAP's Table 2. Layer list as the authors' release (github
ChinaYi/ASFormer, model.py and main.py); widths are fields so tests can shrink them, the defaults are the
released ones (num_layers 10, num_f_maps 64, r1 = r2 = 2, 3 decoders, channel masking 0.3):

  encoder:  channel dropout (whole input channels, rate 0.3) -> 1x1 conv (C -> F) -> `num_layers` blocks
            with dilation and window 2^i -> 1x1 conv (F -> K), masked
  decoder d (d = 0, 1, 2): input softmax(previous logits) x mask -> 1x1 conv (K -> F) -> `num_layers`
            blocks (cross-attention: values from the previous stage's features, held for all blocks),
            alpha = exp(-3 d) -> 1x1 conv (F -> K)
  block (dilation and window l):  h = relu(conv3 dilated l (x))
                                  h = alpha x attention(instance_norm(h), values) + h
                                  out = (x + dropout(conv1x1(h))) x mask        (dropout 0.5)
  attention: q, k = 1x1 convs (F -> F / r1) of the normalised h; v = 1x1 conv (F -> F / r2) of h (encoder)
             or of the previous stage's features (decoder); local window: the query at frame j attends the
             keys at j - l // 2 ... j - l // 2 + l - 1; a = softmax(q.k / sqrt(F / r1) + log(m + 1e-6)) x m
             with m = 1 for real keys (the released masking: not renormalised); out = 1x1 conv (F / r2 -> F)
             of relu(a v), masked

Loss (released Trainer.train): per stage, cross-entropy + 0.15 x the truncated smoothing term, summed over
the 4 stages: mstcn.mstcn_loss. Training (released main.py): Adam 5e-4 (Breakfast 1e-4), L2 weight
decay 1e-5, batch 1, 120 epochs (the release also halves the rate on a loss plateau; not done here).

Deliberate differences: the instance norm takes its statistics over the real frames only (the release
trains one unpadded sequence per batch, so the two agree there; our batches are padded to one length);
the release's sliding-window attention asserts a batch of one; this one takes any batch.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

MASK_EPSILON = 1e-6  # the release's log(mask + 1e-6)
NORM_EPSILON = 1e-5  # torch.nn.InstanceNorm1d's default


def masked_instance_norm(x: jax.Array, mask: jax.Array, epsilon: float = NORM_EPSILON) -> jax.Array:
  """(B, L, C) normalised per sequence and channel over the real frames (mask (B, L) 1 = real); no affine."""
  weight = mask[..., None]
  count = jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1.0)
  mean = jnp.sum(x * weight, axis=1, keepdims=True) / count
  variance = jnp.sum(((x - mean) * weight)**2, axis=1, keepdims=True) / count
  return (x - mean) * jax.lax.rsqrt(variance + epsilon)


def windows(x: jax.Array, size: int, stride: int) -> jax.Array:
  """(B, L, C) -> (B, n, size, C): windows of `size` frames every `stride` frames, n = (L - size) // stride + 1."""
  count = (x.shape[1] - size) // stride + 1
  index = jnp.arange(count)[:, None] * stride + jnp.arange(size)[None, :]
  return jnp.take(x, index, axis=1)


class WindowAttention(nn.Module):
  """ASFormer's AttLayer with its sliding window: (B, L, F) -> (B, L, F).

  Computed block by block as the release: queries in blocks of `window` frames; each block's keys are the
  `window + 2 (window // 2)` frames around it (zeros beyond the sequence, masked), of which query i of the
  block sees keys i ... i + window - 1: the frame j sees j - window // 2 ... j - window // 2 + window - 1.
  Memory grows as L x 2 window, not L^2.
  """

  features: int
  window: int
  r1: int = 2
  r2: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    qk_dim = self.features // self.r1
    q = nn.Conv(qk_dim, (1,), name="query")(x)
    k = nn.Conv(qk_dim, (1,), name="key")(x)
    v = nn.Conv(self.features // self.r2, (1,), name="value")(values)
    batch, length, _ = x.shape
    size, half = self.window, self.window // 2
    blocks = -(-length // size)
    pad = blocks * size - length
    real = jnp.pad(mask.astype(x.dtype), ((0, 0), (half, pad + half)))[..., None]
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(batch, blocks, size, qk_dim)
    k, v = (windows(jnp.pad(t, ((0, 0), (half, pad + half), (0, 0))), size + 2 * half, size) for t in (k, v))
    keys = windows(real, size + 2 * half, size)[..., 0]  # (B, blocks, size + 2 half)
    offset = jnp.arange(size + 2 * half)[None, :] - jnp.arange(size)[:, None]
    keys = keys[:, :, None, :] * ((offset >= 0) & (offset < size)).astype(x.dtype)  # (B, blocks, size, keys)
    energy = jnp.einsum("bnqc,bnkc->bnqk", q, k) / math.sqrt(qk_dim) + jnp.log(keys + MASK_EPSILON)
    attention = jax.nn.softmax(energy, axis=-1) * keys
    out = jnp.einsum("bnqk,bnkc->bnqc", attention, v).reshape(batch, blocks * size, -1)[:, :length]
    return nn.Conv(self.features, (1,), name="out")(nn.relu(out)) * mask[..., None]


class Block(nn.Module):
  """ASFormer's AttModule: dilated conv feed-forward, windowed attention, 1x1 conv, residual."""

  features: int
  dilation: int
  alpha: float
  dropout_rate: float = 0.5
  r1: int = 2
  r2: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, values: jax.Array | None, mask: jax.Array, *, train: bool) -> jax.Array:
    d = self.dilation
    h = nn.relu(nn.Conv(self.features, (3,), kernel_dilation=(d,), padding=[(d, d)], name="feed_forward")(x))
    normed = masked_instance_norm(h, mask)
    attention = WindowAttention(self.features, d, self.r1, self.r2, name="attention")
    h = self.alpha * attention(normed, normed if values is None else values, mask) + h
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.Conv(self.features, (1,), name="pointwise")(h))
    return (x + h) * mask[..., None]


class Stage(nn.Module):
  """The encoder (values=None: self-attention) or one decoder: (B, L, C) -> (logits (B, L, K), features)."""

  num_classes: int
  num_layers: int
  features: int
  alpha: float
  dropout_rate: float
  r1: int
  r2: int

  @nn.compact
  def __call__(self, x: jax.Array, values: jax.Array | None, mask: jax.Array, *, train: bool):
    h = nn.Conv(self.features, (1,), name="input")(x) * mask[..., None]  # padding stays zero, as unpadded
    for i in range(self.num_layers):
      h = Block(self.features, 2**i, self.alpha, self.dropout_rate, self.r1, self.r2, name=f"layer_{i}")(
          h, values, mask, train=train)
    return nn.Conv(self.num_classes, (1,), name="classifier")(h) * mask[..., None], h


class ASFormer(nn.Module):
  """features (B, T, C), mask (B, T) 1 = real frame -> logits (1 + num_decoders, B, T, num_classes).

  Parameters: 'stage_0' the encoder, 'stage_1' ... the decoders."""

  num_classes: int
  num_layers: int = 10
  features: int = 64
  num_decoders: int = 3
  r1: int = 2
  r2: int = 2
  channel_masking_rate: float = 0.3
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    mask = mask.astype(jnp.float32)
    # nn.Dropout2d on (B, C, 1, L): whole channels of a sequence dropped, the rest scaled by 1 / (1 - rate).
    x = nn.Dropout(self.channel_masking_rate, broadcast_dims=(1,), deterministic=not train)(features)
    stage = lambda alpha, name: Stage(self.num_classes, self.num_layers, self.features, alpha, self.dropout_rate,
                                      self.r1, self.r2, name=name)
    logits, h = stage(1.0, "stage_0")(x, None, mask, train=train)  # the encoder; not 'encoder' (encoder_stack's)
    outputs = [logits]
    for d in range(self.num_decoders):
      probabilities = jax.nn.softmax(logits, axis=-1) * mask[..., None]
      logits, h = stage(math.exp(-3 * d), f"stage_{d + 1}")(probabilities, h * mask[..., None], mask, train=train)
      outputs.append(logits)
    return jnp.stack(outputs)
