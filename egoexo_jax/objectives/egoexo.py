"""Ego-Exo pre-training (Eq. 7) and plain single-label video classification on the same records.

Loss: w_act L_act + w_ego L_ego + w_object L_object + w_interaction L_int (config.loss: weight_action,
interaction_reduction; configs/recipe_egoexo.py); with the ego weights at 0 and model.use_ego_heads
False it is plain action cross-entropy (the Ego-Score view classifier).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from egoexo_jax import losses
from egoexo_jax.input import pipelines, transforms


def make_train_dataset(config, workdir: str, model, *, process_index: int, process_count: int):
  del model
  pattern = pipelines.prepare_records(config, workdir)
  return pipelines.make_train_dataset(config, pattern, process_index=process_index, process_count=process_count)


def example_batch(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one batch of the Ego-Exo pipeline."""
  data, (t, h, w) = config.data, pipelines.feature_grid(config)
  return {
      "clips": jax.ShapeDtypeStruct((batch_size, data.clip_length, data.crop_size, data.crop_size, 3), jnp.uint8),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "ego_logits": jax.ShapeDtypeStruct((batch_size, 2), jnp.float32),
      "object_logits": jax.ShapeDtypeStruct((batch_size, config.model.num_object_classes), jnp.float32),
      "interaction_map": jax.ShapeDtypeStruct((batch_size, t, h, w, 2), jnp.float32),
      "has_ego": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
      "has_object": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
      "has_interaction": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
  }


def init_variables(model, config, rng: jax.Array):
  data = config.data
  clips = jnp.zeros((1, data.clip_length, data.crop_size, data.crop_size, 3), jnp.float32)
  return model.init({"params": rng, "dropout": rng}, clips, train=False)


def loss(model, params, batch_stats, batch, *, config, rng: jax.Array, mesh):
  """Eq. 7 on the global batch. Scalars: loss, loss_action, loss_ego, loss_object, loss_interaction
  (unweighted terms, L_int as its BCE per cell; a term whose weight is 0 is reported as 0) and accuracy (action top-1)."""
  del mesh  # the global batch is one array; XLA inserts the cross-device reductions
  clips = transforms.normalize_clips(batch["clips"], jnp.dtype(config.model.dtype))
  loss_weights = {"ego": config.loss.weight_ego, "object": config.loss.weight_object,
                  "interaction": config.loss.weight_interaction}
  outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, clips, train=True,
                                 rngs={"dropout": rng}, mutable=["batch_stats"])
  if "interaction" in outputs and outputs["interaction"].shape != batch["interaction_map"].shape:
    raise ValueError(f"interaction-map targets have shape {batch['interaction_map'].shape} but the model's "
                     f"pathway-0 grid gives {outputs['interaction'].shape}; check data.crop_size/clip_length")
  missing = sorted(k for k, w in loss_weights.items() if w and k not in outputs)
  if missing:
    raise ValueError(f"loss weights {missing} are non-zero but the model has no such heads "
                     "(model.use_ego_heads is False): set their config.loss.weight_* to 0")
  total, terms = losses.egoexo_loss(outputs, batch, loss_weights, config.loss.temperature_ego,
                                    config.loss.temperature_object,
                                    action_weight=config.loss.get("weight_action", 1.0),
                                    interaction_reduction=config.loss.get("interaction_reduction", "mean"))
  scalars = {"loss" if name == "total" else f"loss_{name}": value for name, value in terms.items()}
  scalars["accuracy"] = jnp.mean(jnp.argmax(outputs["action"], -1) == batch["label"]).astype(jnp.float32)
  return total, (scalars, updates["batch_stats"])
