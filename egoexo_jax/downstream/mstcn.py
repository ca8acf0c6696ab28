"""MS-TCN (Farha and Gall, CVPR 2019): a multi-stage temporal convolutional network for action segmentation.

EVGAP's segmentation model is C2F-TCN (c2ftcn.py, `--model=c2ftcn`); MS-TCN stays beside it as the
simpler baseline: one stack of dilated residual convolutions per stage, with no ensembling of resolutions.

  stage 1:  1x1 conv (C -> F), `num_layers` dilated residual layers, 1x1 conv (F -> K)
  stage s>1: the same on softmax(stage s-1 logits)
  dilated residual layer l: x + 1x1conv(dropout(relu(conv3 dilated 2^l (x)))), then x * mask
Loss per stage (summed over stages), over the real (mask 1) and labelled (label >= 0) frames:
  cross-entropy + lambda * T-MSE,  T-MSE = mean_t,k min((log p_t,k - log p_t-1,k)^2, tau^2) with the
  previous frame's log-probabilities held constant (stop_gradient); lambda = 0.15, tau = 4.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DilatedResidual(nn.Module):
  features: int
  dilation: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    y = nn.Conv(self.features, (3,), kernel_dilation=(self.dilation,), padding=[(self.dilation, self.dilation)],
                name="dilated")(x)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(y))
    return (x + nn.Conv(self.features, (1,), name="pointwise")(y)) * mask[..., None]


class Stage(nn.Module):
  num_layers: int
  features: int
  num_classes: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Conv(self.features, (1,), name="input")(x) * mask[..., None]
    for layer in range(self.num_layers):
      x = DilatedResidual(self.features, 2**layer, self.dropout_rate, name=f"layer_{layer}")(x, mask, train=train)
    return nn.Conv(self.num_classes, (1,), name="classifier")(x) * mask[..., None]


class MultiStageTCN(nn.Module):
  """features (B, T, C), mask (B, T) 1 = real frame -> logits (num_stages, B, T, num_classes)."""

  num_classes: int
  num_stages: int = 4
  num_layers: int = 10
  features: int = 64
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    mask = mask.astype(jnp.float32)
    logits = [Stage(self.num_layers, self.features, self.num_classes, self.dropout_rate, name="stage_0")(
        features, mask, train=train)]
    for stage in range(1, self.num_stages):
      probabilities = jax.nn.softmax(logits[-1], axis=-1) * mask[..., None]
      logits.append(Stage(self.num_layers, self.features, self.num_classes, self.dropout_rate,
                          name=f"stage_{stage}")(probabilities, mask, train=train))
    return jnp.stack(logits)


def mstcn_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, smoothing_weight: float = 0.15,
               smoothing_clip: float = 4.0) -> jax.Array:
  """logits (S, B, T, K), labels (B, T) int (-1 = unlabelled), mask (B, T) -> the summed stage losses."""
  valid = (mask > 0) & (labels >= 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[None, ..., None], axis=-1)[..., 0]
  cross_entropy = -jnp.sum(picked * valid, axis=(1, 2)) / jnp.maximum(valid.sum(), 1)
  # Smoothing over consecutive real frames (both frames inside the sequence, labelled or not).
  pairs = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
  difference = log_probs[:, :, 1:] - jax.lax.stop_gradient(log_probs[:, :, :-1])
  squared = jnp.minimum(difference**2, smoothing_clip**2).mean(axis=-1)
  smoothing = jnp.sum(squared * pairs, axis=(1, 2)) / jnp.maximum(pairs.sum(), 1)
  return jnp.sum(cross_entropy + smoothing_weight * smoothing)
