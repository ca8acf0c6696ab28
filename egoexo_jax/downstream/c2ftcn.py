"""C2F-TCN (Singhania et al., "Coarse to Fine Multi-Resolution Temporal Convolutional Network", 2021).

The temporal action segmentation model of EVGAP's Tables 1 and 4 and of Assembly101's benchmark.
Layer list as the released model (dipika-singhania/C2F-TCN model.py, identical in
assembly-101/assembly101-temporal-action-segmentation model.py); widths are fields here so tests can
shrink them, defaults are the released ones:

  double_conv(c):  conv k5 (bias) -> BatchNorm -> ReLU -> conv k5 (bias) -> BatchNorm -> ReLU
  encoder:  x1 = double_conv(256)(input);  x2..x7 = max-pool 2 (floor) -> double_conv, widths
            256, 256, 128, 128, 128, 128
  TPP:      on x7, max-pools of 2, 3, 5, 6 (floor), one shared 1x1 conv (128 -> 1) on each, each linearly
            upsampled back (align_corners) and concatenated with x7 -> 132 channels
  decoder:  6 up blocks: linear x2 upsampling (align_corners), zero padding to the skip's length (half
            each side), [skip, x] concatenated, double_conv(128); skips x6, x5, x4, x3, x2, x1
  outputs:  a 1x1 conv to the classes after ReLU of each of the first five up blocks (coarse to fine)
            and after the last one: 6 resolutions
Ensemble (released `get_c2f_ensemble_output`): each resolution's logits linearly upsampled to the input
length, softmax, averaged with weights (Assembly101: all 1).
Loss (released Trainer.train): NLL of log(ensemble + 1e-10) over labelled frames + 0.17 x the
truncated smoothing term mean(min((log p_t - sg(log p_t-1))^2, 16)) over consecutive real frames
(the release averages over every padded position too; we average over real pairs, as mstcn.py).

The released model also holds an unused `weights` parameter of 6 values; it is left out here. Its
input is the per-frame features max-pooled over chunks of `chunk_size` frames (Assembly101: 20) with
the chunk's majority label (released dataset.py); segmentation.py does that pooling (in the model, so
an encoder fine-tuned under it sees every frame). Inputs must keep at least 6 frames after the six
halvings: length >= MIN_LENGTH.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_DOWN = 6
TPP_POOLS = (2, 3, 5, 6)
MIN_LENGTH = 2**NUM_DOWN * max(TPP_POOLS)  # 384: every TPP pool keeps at least one position
SMOOTHING_WEIGHT = 0.17
SMOOTHING_CLIP = 4.0  # released clamp(max=16) on the squared difference


def upsample_linear(x: jax.Array, length: int) -> jax.Array:
  """(B, L, C) -> (B, length, C), linear interpolation with align_corners=True (PyTorch's)."""
  source = x.shape[1]
  if length == 1 or source == 1:
    positions = np.zeros(length)
  else:
    positions = np.arange(length) * (source - 1) / (length - 1)
  low = np.clip(np.floor(positions).astype(np.int32), 0, source - 1)
  high = np.minimum(low + 1, source - 1)
  weight = jnp.asarray((positions - low)[None, :, None], x.dtype)
  return jnp.take(x, low, axis=1) * (1 - weight) + jnp.take(x, high, axis=1) * weight


def max_pool(x: jax.Array, size: int) -> jax.Array:
  """(B, L, C) -> (B, L // size, C): non-overlapping max-pooling, the remainder dropped (PyTorch floor)."""
  length = x.shape[1] // size
  return x[:, :length * size].reshape(x.shape[0], length, size, x.shape[2]).max(axis=2)


class DoubleConv(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(2):
      x = nn.Conv(self.features, (5,), padding=[(2, 2)], name=f"conv_{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"norm_{i}")(x)
      x = nn.relu(x)
    return x


class PyramidPooling(nn.Module):
  """TPP block: (B, L, C) -> (B, L, C + len(TPP_POOLS))."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    length = x.shape[1]
    if length < max(TPP_POOLS):
      raise ValueError(f"C2F-TCN bottleneck has {length} positions, fewer than the pool of {max(TPP_POOLS)}: "
                       f"inputs need at least {MIN_LENGTH} frames")
    conv = nn.Conv(1, (1,), name="conv")  # one conv shared by the four pools
    maps = [upsample_linear(conv(max_pool(x, size)), length) for size in TPP_POOLS]
    return jnp.concatenate(maps + [x], axis=-1)


class Up(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool) -> jax.Array:
    x = upsample_linear(x, 2 * x.shape[1])
    diff = skip.shape[1] - x.shape[1]
    x = jnp.pad(x, ((0, 0), (diff // 2, diff - diff // 2), (0, 0)))
    return DoubleConv(self.features, name="conv")(jnp.concatenate([skip, x], axis=-1), train=train)


class C2FTCN(nn.Module):
  """features (B, L, C) -> logits of the 6 resolutions, finest first: [(B, L, K), (B, ~L/2, K), ...].

  The order is the released forward's (y, then y5 ... y1: 1/2, 1/4, ... 1/64 of L). Mask is unused, as
  in the release (padding is zeros and only the loss masks); it is taken for the shared interface.
  """

  num_classes: int
  encoder_widths: Sequence[int] = (256, 256, 256, 128, 128, 128, 128)  # inc, down1..down6
  decoder_width: int = 128

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array | None = None, *, train: bool) -> list[jax.Array]:
    if len(self.encoder_widths) != NUM_DOWN + 1:
      raise ValueError(f"C2F-TCN needs {NUM_DOWN + 1} encoder widths, got {self.encoder_widths}")
    if features.shape[1] < MIN_LENGTH:
      raise ValueError(f"C2F-TCN input of {features.shape[1]} frames; it needs at least {MIN_LENGTH}")
    skips = [DoubleConv(self.encoder_widths[0], name="inc")(features, train=train)]
    for i in range(NUM_DOWN):
      skips.append(DoubleConv(self.encoder_widths[i + 1], name=f"down_{i + 1}")(max_pool(skips[-1], 2), train=train))
    x = PyramidPooling(name="tpp")(skips.pop())
    coarse = []
    for i in range(NUM_DOWN):
      x = Up(self.decoder_width, name=f"up_{i}")(x, skips.pop(), train=train)
      if i < NUM_DOWN - 1:
        coarse.append(nn.Conv(self.num_classes, (1,), name=f"out_{i}")(nn.relu(x)))
    finest = nn.Conv(self.num_classes, (1,), name="out")(x)
    return [finest] + coarse[::-1]


def ensemble_probabilities(outputs: Sequence[jax.Array], weights: Sequence[float] | None = None) -> jax.Array:
  """The released ensemble: sum_r w_r softmax(upsample(logits_r)) / sum_r w_r, (B, L, K) float32."""
  weights = [1.0] * len(outputs) if weights is None else list(weights)
  if len(weights) != len(outputs):
    raise ValueError(f"{len(weights)} ensemble weights for {len(outputs)} resolutions")
  length = outputs[0].shape[1]
  total = sum(weights)
  return sum(w / total * jax.nn.softmax(upsample_linear(y.astype(jnp.float32), length), axis=-1)
             for w, y in zip(weights, outputs))


def c2f_loss(probabilities: jax.Array, labels: jax.Array, mask: jax.Array,
             smoothing_weight: float = SMOOTHING_WEIGHT, smoothing_clip: float = SMOOTHING_CLIP) -> jax.Array:
  """probabilities (B, L, K) (the ensemble), labels (B, L) (-1 = unlabelled), mask (B, L) -> scalar."""
  log_p = jnp.log(probabilities + 1e-10)
  valid = (mask > 0) & (labels >= 0)
  picked = jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  nll = -jnp.sum(picked * valid) / jnp.maximum(valid.sum(), 1)
  pairs = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
  squared = jnp.minimum((log_p[:, 1:] - jax.lax.stop_gradient(log_p[:, :-1]))**2, smoothing_clip**2).mean(-1)
  smoothing = jnp.sum(squared * pairs) / jnp.maximum(pairs.sum(), 1)
  return nll + smoothing_weight * smoothing


def chunk_max(frames: jax.Array, mask: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """frames (B, T, C), mask (B, T) -> the max over each chunk's real frames (B, T / chunk, C) (0 for a chunk
  with none) and the chunk mask (B, T / chunk): the released dataset's max-pooling of chunk_size frames."""
  batch, length, channels = frames.shape
  if length % chunk_size:
    raise ValueError(f"{length} frames do not split into chunks of {chunk_size}")
  x = jnp.where(mask[..., None] > 0, frames, -jnp.inf).reshape(batch, length // chunk_size, chunk_size, channels)
  chunk_mask = (mask.reshape(batch, length // chunk_size, chunk_size) > 0).any(axis=-1)
  return jnp.where(chunk_mask[..., None], x.max(axis=2), 0.0), chunk_mask.astype(jnp.float32)


def chunk_labels(labels: np.ndarray, chunk_size: int) -> np.ndarray:
  """(B, T) frame labels (-1 unlabelled) -> (B, T / chunk) the majority labelled class per chunk (the released
  dataset's; ties to the smaller id) or -1."""
  batch, length = labels.shape
  chunks = labels.reshape(batch, length // chunk_size, chunk_size)
  out = np.full(chunks.shape[:2], -1, np.int32)
  for b, c in zip(*np.nonzero((chunks >= 0).any(axis=-1))):
    values, counts = np.unique(chunks[b, c][chunks[b, c] >= 0], return_counts=True)
    out[b, c] = values[np.argmax(counts)]
  return out


class ChunkedC2FTCN(nn.Module):
  """frames (B, T, C), mask (B, T) -> C2F-TCN's 6 resolutions' logits on chunks of `chunk_size` frames."""

  num_classes: int
  chunk_size: int = 20
  encoder_widths: Sequence[int] = (256, 256, 256, 128, 128, 128, 128)
  decoder_width: int = 128

  @nn.compact
  def __call__(self, frames: jax.Array, mask: jax.Array, *, train: bool) -> list[jax.Array]:
    chunks, chunk_mask = chunk_max(frames, mask, self.chunk_size)
    return C2FTCN(self.num_classes, self.encoder_widths, self.decoder_width, name="c2ftcn")(
        chunks, chunk_mask, train=train)
