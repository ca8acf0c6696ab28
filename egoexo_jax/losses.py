"""Loss functions: pure jnp functions, computed in float32 whatever the dtype of the logits.

Weighting convention: `weights` is an optional (B,) 0/1 mask of the examples that carry the signal
(a teacher score, detector boxes). A loss is computed per example, then averaged over the weighted
examples: sum_i w_i l_i / max(sum_i w_i, 1e-8). Masked examples do not dilute the mean, and a batch in
which no example carries the signal gives 0 with zero gradient. Masked examples must still hold finite
values (the input pipeline fills a missing teacher signal with zeros). Without weights: plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

EGO_TERMS = ("ego", "object", "interaction")


def _weighted_mean(per_example: jax.Array, weights: jax.Array | None) -> jax.Array:
  """(B,) per-example losses -> scalar, by the convention in the module docstring."""
  if weights is None:
    return jnp.mean(per_example)
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1e-8)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Cross-entropy of logits (B, K) against integer labels (B,), (weighted) mean over examples."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return _weighted_mean(per_example, weights)


def soft_target_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                   weights: jax.Array | None = None) -> jax.Array:
  """Distillation loss of Ego-Exo Eq. 2 and 4: beta^2 KL(softmax(teacher / beta) || softmax(student / beta)).

  Logits are (B, K); the KL is summed over the K classes, then (weighted) averaged over examples. The
  beta^2 factor keeps gradient magnitudes independent of the temperature beta. Teacher classes of
  probability exactly 0 (logit -inf) contribute 0.
  """
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
  teacher_probs = jnp.exp(teacher_log_probs)
  per_class = jnp.where(teacher_probs > 0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0)
  return _weighted_mean(jnp.sum(per_class, axis=-1) * temperature**2, weights)


def interaction_map_bce(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Interaction-map loss of Ego-Exo Eq. 6: sigmoid binary cross-entropy per cell.

  logits and targets are (B, t, h, w, 2) with targets soft scores in [0, 1]; the loss is averaged over
  the cells and both channels of each example, then (weighted) averaged over examples.
  """
  per_cell = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
  return _weighted_mean(per_cell.reshape(per_cell.shape[0], -1).mean(axis=1), weights)


def egoexo_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], weights: Mapping[str, float],
                temperature_ego: float, temperature_object: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Ego-Exo pre-training objective (Eq. 7): L_act + w_ego L_ego + w_object L_object + w_interaction L_int.

  outputs: egoexo.Model outputs 'action' (B, K_act), 'ego' (B, 2), 'object' (B, K_obj), 'interaction'
    (B, t, h, w, 2); a term's output is only read when its weight is non-zero.
  batch: 'label' (B,) int; teacher signals 'ego_logits' (B, 2), 'object_logits' (B, K_obj),
    'interaction_map' (B, t, h, w, 2) in [0, 1]; 0/1 masks 'has_ego', 'has_object', 'has_interaction' (B,).
  weights: Python floats keyed by 'ego', 'object', 'interaction'. A missing key or a weight of 0 skips
    the term: it is not computed and is reported as 0. Any other key is an error.

  Returns (total, terms): terms holds the unweighted 'action', 'ego', 'object', 'interaction' losses and
  the weighted 'total', all float32 scalars.
  """
  unknown = set(weights) - set(EGO_TERMS)
  if unknown:
    raise ValueError(f"unknown loss weights {sorted(unknown)}; expected a subset of {EGO_TERMS}")
  compute_term = {
      "ego": lambda: soft_target_kl(outputs["ego"], batch["ego_logits"], temperature_ego, batch["has_ego"]),
      "object": lambda: soft_target_kl(outputs["object"], batch["object_logits"], temperature_object,
                                       batch["has_object"]),
      "interaction": lambda: interaction_map_bce(outputs["interaction"], batch["interaction_map"],
                                                 batch["has_interaction"]),
  }
  terms = {"action": softmax_cross_entropy(outputs["action"], batch["label"])}
  total = terms["action"]
  for name in EGO_TERMS:
    weight = weights.get(name, 0.0)
    if weight:
      terms[name] = compute_term[name]()
      total = total + weight * terms[name]
    else:
      terms[name] = jnp.zeros((), jnp.float32)
  terms["total"] = total
  return total, terms
