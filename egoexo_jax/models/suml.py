"""The SUM-L network: ego and exo video encoders with projection and task heads (Wang et al., ICCV 2023).

    ego clips -> f_f ('ego_backbone') -> pool -> h_f ('ego_projection') -> z_f    (B, D), L2-normalised
                                              -> g_f ('ego_head_<i>')    -> ego task logits
    exo clips -> f_t ('exo_backbone') -> pool -> h_t ('exo_projection') -> z_t
                                              -> g_t ('exo_head_<i>')    -> exo task logits

Switches (the SUM-L Table 6 ablations and the Domain-adapt baseline):
  share_backbone       one 'backbone' subtree encodes both views (ego and exo clips in one batch, so
                       BatchNorm sees both); the projection and task heads stay per view.
  freeze_exo_backbone  the exo encoder runs in inference mode (BatchNorm running statistics, no gradient);
                       pair it with optimizer.frozen = ('exo_backbone',), which the objective checks.
  discriminator_width  > 0 adds an ego/exo discriminator on the pooled features behind a gradient
                       reversal layer (the Domain-adapt baseline, Ganin & Lempitsky 2015).

Either view may be absent (None): stage (a) trains the exo side alone, stage (c) evaluates the ego side.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from egoexo_jax import losses
from egoexo_jax.models.backbones import build_backbone
from egoexo_jax.models.egoexo import pool_pathways
from egoexo_jax.models.heads import ClassificationHead


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def reverse_gradient(x: jax.Array, scale: float) -> jax.Array:
  """Identity forward; the backward pass multiplies the incoming gradient by -scale."""
  return x


def _reverse_gradient_forward(x, scale):
  del scale
  return x, None


def _reverse_gradient_backward(scale, _, gradient):
  return (-scale * gradient,)


reverse_gradient.defvjp(_reverse_gradient_forward, _reverse_gradient_backward)


TORCH_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default, which the released SUM-L code calls


class ProjectionHead(nn.Module):
  """Pooled features (B, C) -> (B, D) L2-normalised embedding: normalise, linear with bias, normalise
  (h_f / h_t; the released SUM-L code normalises the pooled features before the linear layer too)."""

  dim: int = 384
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(
        losses.l2_normalize(features, TORCH_NORMALIZE_EPS))
    return losses.l2_normalize(x, TORCH_NORMALIZE_EPS)


class DomainDiscriminator(nn.Module):
  """Features (B, C) -> (B, 2) float32 ego/exo logits: linear, ReLU, linear."""

  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(nn.Dense(self.width, name="hidden", **dtypes)(features))
    return nn.Dense(2, name="logits", **dtypes)(x).astype(jnp.float32)


HEAD_ORDER = ("verb", "noun")  # the label order of EPIC-Kitchens' and LEMMA's records, and of the released heads


def head_order(num_classes: Mapping[str, int] | Sequence[int]) -> list[tuple[str, int]]:
  """[(head name, classes)] in the order of the numbered heads (Model's docstring); a sequence of counts
  names its heads '0', '1', ..."""
  if not isinstance(num_classes, Mapping) and not hasattr(num_classes, "items"):
    return [(str(i), int(n)) for i, n in enumerate(num_classes)]
  counts = dict(num_classes.items())
  names = [n for n in HEAD_ORDER if n in counts] + sorted(n for n in counts if n not in HEAD_ORDER)
  return [(name, int(counts[name])) for name in names]


class Model(nn.Module):
  """(ego clips, exo clips), each normalised (B, T, H, W, 3) or None -> dict of float32 outputs.

  Per present view v in ('ego', 'exo'): '<v>_features' (B, C) pooled backbone features,
  '<v>_embedding' (B, projection_dim) L2-normalised projection z, '<v>_logits' a tuple of (B, K_i) logits,
  one per entry of `<v>_num_classes`, {head name: classes} (e.g. EPIC {'verb': 97, 'noun': 300}) in
  head_order (a config dict sorts its keys, so the order is not the dict's: 'verb' then 'noun', the order
  of the records' labels and of the released heads; other names after them, sorted); parameters
  '<v>_head_<i>' by that position (a sequence of counts, as configs before issue 14 wrote them, works too).
  With both views and discriminator_width > 0: 'domain_logits' (2B, 2), ego rows first, computed behind
  a gradient reversal of `gradient_reversal_scale`.
  """

  ego_num_classes: Mapping[str, int] | Sequence[int] = (97, 300)
  exo_num_classes: Mapping[str, int] | Sequence[int] = (400,)
  backbone: str = "slow_r50"
  backbone_args: Mapping[str, Any] | None = None
  projection_dim: int = 384
  dropout_rate: float = 0.5
  share_backbone: bool = False
  freeze_exo_backbone: bool = False
  discriminator_width: int = 0
  gradient_reversal_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _encode(self, ego_clips, exo_clips, train: bool) -> dict[str, jax.Array]:
    """Pooled features per present view."""
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.share_backbone:
      if self.freeze_exo_backbone:
        raise ValueError("model.freeze_exo_backbone needs separate encoders; model.share_backbone is set")
      backbone = build_backbone(self.backbone, self.backbone_args, name="backbone", **dtypes)
      present = {v: c for v, c in (("ego", ego_clips), ("exo", exo_clips)) if c is not None}
      features = pool_pathways(backbone(jnp.concatenate(list(present.values())), train=train))
      sizes = [c.shape[0] for c in present.values()]
      return dict(zip(present, jnp.split(features, [sizes[0]]) if len(sizes) == 2 else [features]))
    out = {}
    if ego_clips is not None:
      backbone = build_backbone(self.backbone, self.backbone_args, name="ego_backbone", **dtypes)
      out["ego"] = pool_pathways(backbone(ego_clips, train=train))
    if exo_clips is not None:
      backbone = build_backbone(self.backbone, self.backbone_args, name="exo_backbone", **dtypes)
      if self.freeze_exo_backbone:
        out["exo"] = jax.lax.stop_gradient(pool_pathways(backbone(exo_clips, train=False)))
      else:
        out["exo"] = pool_pathways(backbone(exo_clips, train=train))
    return out

  @nn.compact
  def __call__(self, ego_clips: jax.Array | None = None, exo_clips: jax.Array | None = None, *,
               train: bool) -> dict[str, Any]:
    if ego_clips is None and exo_clips is None:
      raise ValueError("the SUM-L model needs ego clips, exo clips or both")
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    outputs = {}
    features = self._encode(ego_clips, exo_clips, train)
    for view, pooled in features.items():
      num_classes = self.ego_num_classes if view == "ego" else self.exo_num_classes
      num_classes = [n for _, n in head_order(num_classes)]
      outputs[f"{view}_features"] = pooled
      outputs[f"{view}_embedding"] = ProjectionHead(self.projection_dim, name=f"{view}_projection",
                                                    **dtypes)(pooled)
      outputs[f"{view}_logits"] = tuple(
          ClassificationHead(n, self.dropout_rate, name=f"{view}_head_{i}", **dtypes)(pooled, train=train)
          for i, n in enumerate(num_classes))
    if self.discriminator_width and len(features) == 2:
      both = jnp.concatenate([features["ego"], features["exo"]])
      outputs["domain_logits"] = DomainDiscriminator(self.discriminator_width, name="domain_discriminator",
                                                     **dtypes)(reverse_gradient(both, self.gradient_reversal_scale))
    return outputs
