"""TempAgg (Sener et al., "Temporal Aggregate Representations for Long-Range Video Understanding", ECCV 2020).

The anticipation model of EVGAP's Tables 3 and 5 and of Assembly101's benchmark. Layer list and settings as
the released code (dibschat/tempAgg network.py, non_local_embedded_gaussian.py; Assembly101's copy in
assembly-101/assembly101-action-anticipation tempAgg-action-anticipation/, whose defaults we take:
features 2048-d, latent 512, linear 512, dropout 0.3, no past attention (`--past_attention` is
store_true there), batch 32, Adam 1e-4, 15 epochs, x0.1 after 10):

Snippets (released dataset): the observation ends tau_a (1 s) before the action starts, at frame e.
  spanning: [e - 6 s, e] cut at linspace(start, e, K + 1) into K = 5, 3, 2 snippets (three scales);
  recent:   [e - r, e] for r = 1.6, 1.2, 0.8, 0.4 s (four scales), each cut into R = 2 snippets;
  each snippet is the max over its frames, both boundaries included; starts clamp at frame 0.
Non-local block NL(past, current), as released: 1x1 convolutions whose channels are the *snippets*
  (theta on current, phi and g on past: n snippets -> latent), applied at each of the D feature
  positions; attention softmax(theta^T phi / sqrt(latent)) is D x D; then LayerNorm over (latent, D),
  ReLU, a 1x1 conv latent -> n current snippets, dropout, plus the current snippets (residual).
Coupling block (recent R, spanning K): z = ReLU(NL(spanning, recent)); [z, recent] (2R x D) -> fc_recent;
  [spanning, z, recent] ((K + 2R) x D) -> fc_context; each fc: Linear -> ReLU -> dropout -> Linear (linear).
  With past attention the spanning snippets first pass ReLU(NL(spanning, spanning)).
Temporal aggregate block (one recent scale): a coupling block per spanning scale; recent outputs
  concatenated -> Linear(3 linear -> linear); context outputs max-pooled over the three.
Network: one block per recent scale (4), each [recent, context] (2 linear) -> action, verb, object heads.
  Loss: cross-entropy of every head of every block, summed; scores: the four blocks' logits summed.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from egoexo_jax import losses

HEADS = ("verb", "object", "action")


@dataclasses.dataclass(frozen=True)
class SnippetSettings:
  fps: float = 30.0
  anticipation_seconds: float = 1.0  # tau_a
  spanning_seconds: float = 6.0
  spanning_snippets: tuple[int, ...] = (5, 3, 2)
  recent_seconds: tuple[float, ...] = (1.6, 1.2, 0.8, 0.4)
  recent_snippets: int = 2
  min_observed_seconds: float = 2.0  # released: segments whose observation ends before 2 s are left out

  @property
  def window_frames(self) -> int:
    return int(np.ceil(self.spanning_seconds * self.fps)) + 1

  @property
  def num_snippets(self) -> int:
    return sum(self.spanning_snippets) + self.recent_snippets * len(self.recent_seconds)


def snippet_membership(end: int, settings: SnippetSettings) -> np.ndarray:
  """(num_snippets, window_frames) bool: frame j of the window [end - W + 1, end] in each snippet.

  Rows: the spanning scales' snippets in order, then each recent scale's. Frames before 0 are never members.
  """
  width = settings.window_frames
  first = end - width + 1
  rows = []

  def cut(start: float, count: int):
    bounds = np.linspace(start, end, count + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
      row = np.zeros(width, bool)
      row[max(a, 0) - first:b - first + 1] = True
      rows.append(row)

  for count in settings.spanning_snippets:
    cut(max(end - settings.spanning_seconds * settings.fps, 0), count)
  for seconds in settings.recent_seconds:
    cut(max(end - seconds * settings.fps, 0), settings.recent_snippets)
  return np.stack(rows)


def snippet_examples(features: np.ndarray, segments, settings: SnippetSettings) -> dict[str, np.ndarray]:
  """One example per segment with enough past: 'window' (S, W, C) frames [e - W + 1, e] (zeros and mask 0
  before frame 0 or after the last frame), 'mask' (S, W), 'membership' (S, num_snippets, W), 'labels' (S, 3)
  (verb, object, action)."""
  width = settings.window_frames
  out = {"window": [], "mask": [], "membership": [], "labels": []}
  for segment in segments:
    observed_end = segment.start / settings.fps - settings.anticipation_seconds
    if observed_end < settings.min_observed_seconds:
      continue
    end = int(np.floor(observed_end * settings.fps))
    frames = np.arange(end - width + 1, end + 1)
    inside = (frames >= 0) & (frames < len(features))
    window = np.zeros((width, features.shape[1]), np.float32)
    window[inside] = features[frames[inside]]
    membership = snippet_membership(end, settings) & inside[None]
    if not membership.any(axis=1).all():
      continue  # a snippet past the last feature frame: the annotation outruns the features
    out["window"].append(window)
    out["mask"].append(inside.astype(np.float32))
    out["membership"].append(membership)
    out["labels"].append((segment.verb, segment.object, segment.action))
  if not out["labels"]:
    return {"window": np.zeros((0, width, features.shape[1]), np.float32), "mask": np.zeros((0, width), np.float32),
            "membership": np.zeros((0, settings.num_snippets, width), bool), "labels": np.zeros((0, 3), np.int32)}
  return {"window": np.stack(out["window"]), "mask": np.stack(out["mask"]),
          "membership": np.stack(out["membership"]), "labels": np.asarray(out["labels"], np.int32)}


def pool_snippets(frames: jax.Array, membership: jax.Array) -> jax.Array:
  """frames (B, W, D), membership (B, S, W) bool -> (B, S, D): max over each snippet's frames."""
  masked = jnp.where(membership[..., None], frames[:, None], -jnp.inf)
  return masked.max(axis=2)


class NonLocal(nn.Module):
  """NL(past (B, n_past, D), current (B, n_current, D)) -> (B, n_current, D), the released block."""

  latent: int
  dropout_rate: float

  @nn.compact
  def __call__(self, past: jax.Array, current: jax.Array, *, train: bool) -> jax.Array:
    init = dict(kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)
    # Convolutions over the snippet axis, at every feature position: (B, n, D) -> (B, D, latent).
    theta = nn.Dense(self.latent, name="theta", **init)(jnp.swapaxes(current, 1, 2))
    phi = nn.Dense(self.latent, name="phi", **init)(jnp.swapaxes(past, 1, 2))
    g = nn.Dense(self.latent, name="g", **init)(jnp.swapaxes(past, 1, 2))
    attention = jax.nn.softmax(theta @ jnp.swapaxes(phi, 1, 2) * self.latent**-0.5, axis=-1)  # (B, D, D)
    t = jnp.swapaxes(attention @ g, 1, 2)  # (B, latent, D)
    t = nn.relu(nn.LayerNorm(epsilon=1e-5, reduction_axes=(-2, -1), feature_axes=(-2, -1), name="norm")(t))
    out = nn.Dense(current.shape[1], name="out")(jnp.swapaxes(t, 1, 2))  # (B, D, n_current)
    out = nn.Dropout(self.dropout_rate, deterministic=not train)(jnp.swapaxes(out, 1, 2))
    return out + current


class FeedForward(nn.Module):
  width: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.relu(nn.Dense(self.width, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.width, name="out")(nn.Dropout(self.dropout_rate, deterministic=not train)(x))


class Coupling(nn.Module):
  latent: int
  linear: int
  dropout_rate: float
  past_attention: bool

  @nn.compact
  def __call__(self, spanning: jax.Array, recent: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    if self.past_attention:
      spanning = nn.relu(NonLocal(self.latent, self.dropout_rate, name="past")(spanning, spanning, train=train))
    future = nn.relu(NonLocal(self.latent, self.dropout_rate, name="recent")(spanning, recent, train=train))
    all_future = jnp.concatenate([future, recent], axis=1)
    recent_out = FeedForward(self.linear, self.dropout_rate, name="fc_recent")(all_future, train=train)
    context_out = FeedForward(self.linear, self.dropout_rate, name="fc_context")(
        jnp.concatenate([spanning, all_future], axis=1), train=train)
    return recent_out, context_out


class TempAgg(nn.Module):
  """window (B, W, D), mask (B, W), membership (B, S, W) -> {head: (4, B, K_head)} logits of the 4 blocks."""

  num_classes: dict[str, int]
  spanning_snippets: Sequence[int] = (5, 3, 2)
  recent_scales: int = 4
  recent_snippets: int = 2
  latent: int = 512
  linear: int = 512
  dropout_rate: float = 0.3
  past_attention: bool = False

  @nn.compact
  def __call__(self, window: jax.Array, mask: jax.Array, membership: jax.Array, *, train: bool
               ) -> dict[str, jax.Array]:
    snippets = pool_snippets(window, membership)
    bounds = np.cumsum([0, *self.spanning_snippets, *[self.recent_snippets] * self.recent_scales])
    if snippets.shape[1] != bounds[-1]:
      raise ValueError(f"{snippets.shape[1]} snippets; the settings need {bounds[-1]}")
    parts = [snippets[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    spanning, recent = parts[:len(self.spanning_snippets)], parts[len(self.spanning_snippets):]
    logits = {head: [] for head in HEADS}
    for block, current in enumerate(recent):
      recent_outs, context_outs = [], []
      for scale, past in enumerate(spanning):
        r, c = Coupling(self.latent, self.linear, self.dropout_rate, self.past_attention,
                        name=f"block_{block}_coupling_{scale}")(past, current, train=train)
        recent_outs.append(r)
        context_outs.append(c)
      recent_out = nn.Dense(self.linear, name=f"block_{block}_recent")(jnp.concatenate(recent_outs, axis=-1))
      joint = jnp.concatenate([recent_out, jnp.max(jnp.stack(context_outs), axis=0)], axis=-1)
      for head in HEADS:
        logits[head].append(nn.Dense(self.num_classes[head], name=f"block_{block}_{head}")(joint))
    return {head: jnp.stack(values).astype(jnp.float32) for head, values in logits.items()}


def tempagg_loss(logits: dict[str, jax.Array], labels: jax.Array) -> jax.Array:
  """Sum over heads (verb, object, action = labels[:, 0..2]) and blocks of the mean cross-entropy."""
  return sum(losses.softmax_cross_entropy(block_logits, labels[:, i])
             for i, head in enumerate(HEADS) for block_logits in logits[head])


def scores(logits: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The released test-time scores: each head's logits summed over the blocks."""
  return {head: value.sum(axis=0) for head, value in logits.items()}
