"""Fine-tuning on a target task (Charades-Ego, EPIC-Kitchens, Kinetics), optionally Ego-Exo*.

Loss, with z_h the logits of head h and y the clip's labels (egoexo_jax/input/finetune_pipeline.py):
  multi-label (Charades-Ego): L_cls = mean over (b, k) of BCE(sigmoid(z_bk), y_bk)   (PySlowFast 'bce_logit')
  per-head (EPIC verb + noun, Kinetics action): L_cls = sum_h CE(softmax(z_h), y_h)
Ego-Exo* (model.use_interaction_head) adds the interaction-map loss of Eq. 6 on the target data, as in
pre-training (losses.interaction_map_bce with config.loss.interaction_reduction):
  L = L_cls + w_int L_int,  L_int = BCE_hand + BCE_obj = 2 losses.interaction_map_bce ('sum', the default
and the release's: it weights the hand and the object map BCE means separately, HAND_LOSS_WEIGHT =
OBJ_LOSS_WEIGHT = w_int: 0.1 for Charades-Ego, 3.0 for EPIC) or their mean ('mean'). The reported
'loss_interaction' is interaction_map_bce (per cell). Clips of records without detector output do not
count in it (has_interaction mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from egoexo_jax import losses
from egoexo_jax.input import finetune_pipeline, pipelines, transforms


def make_train_dataset(config, workdir: str, model, *, process_index: int, process_count: int):
  del model
  pattern = pipelines.prepare_records(config, workdir)
  return finetune_pipeline.make_train_dataset(config, pattern, process_index=process_index,
                                              process_count=process_count)


def init_variables(model, config, rng: jax.Array):
  data = config.data
  clips = jnp.zeros((1, data.clip_length, data.crop_size, data.crop_size, 3), jnp.float32)
  return model.init({"params": rng, "dropout": rng}, clips, train=False)


def classification_loss(outputs, labels, heads, multi_label: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_cls (module docstring) and its scalars.

  labels: (B, K) 0/1 float (multi-label) or (B, H) int (per head). Scalars: multi-label 'loss_bce' and
  'top1_precision' (the share of clips whose top-scoring class is a positive); per head 'loss_<h>' and
  'accuracy_<h>' (top-1), and 'accuracy_action' (every head right) when there are several heads.
  """
  if multi_label:
    (name, _), = heads
    logits = outputs[name]
    bce = losses.multi_label_bce(logits, labels)
    top = jnp.take_along_axis(labels, jnp.argmax(logits, -1)[:, None], axis=1)[:, 0]
    return bce, {"loss_bce": bce, "top1_precision": jnp.mean(top).astype(jnp.float32)}
  total, scalars, all_right = 0.0, {}, True
  for i, (name, _) in enumerate(heads):
    term = losses.softmax_cross_entropy(outputs[name], labels[:, i])
    right = jnp.argmax(outputs[name], -1) == labels[:, i]
    scalars[f"loss_{name}"], scalars[f"accuracy_{name}"] = term, jnp.mean(right).astype(jnp.float32)
    total, all_right = total + term, all_right & right
  if len(heads) > 1:
    scalars["accuracy_action"] = jnp.mean(all_right).astype(jnp.float32)
  return total, scalars


def loss(model, params, batch_stats, batch, *, config, rng: jax.Array, mesh):
  """L_cls (+ w_int L_int in Ego-Exo* mode) on the global batch; scalars as classification_loss, plus
  'loss' and, with the interaction head, 'loss_interaction' (the BCE per cell)."""
  del mesh  # one global batch array; XLA inserts the cross-device reductions
  clips = transforms.normalize_clips(batch["clips"], jnp.dtype(config.model.dtype))
  outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, clips, train=True,
                                 rngs={"dropout": rng}, mutable=["batch_stats"])
  total, scalars = classification_loss(outputs, batch["labels"], finetune_pipeline.head_sizes(config),
                                       bool(config.data.multi_label))
  weight = config.loss.get("weight_interaction", 0.0)
  if weight and "interaction" not in outputs:
    raise ValueError("config.loss.weight_interaction is non-zero but model.use_interaction_head is False")
  if "interaction" in outputs:
    if outputs["interaction"].shape != batch["interaction_map"].shape:
      raise ValueError(f"interaction-map targets have shape {batch['interaction_map'].shape} but the model's "
                       f"pathway-0 grid gives {outputs['interaction'].shape}; check data.crop_size/clip_length")
    interaction = losses.interaction_map_bce(outputs["interaction"], batch["interaction_map"],
                                             batch["has_interaction"])
    scalars["loss_interaction"] = interaction
    scale = losses.interaction_term_scale(config.loss.get("interaction_reduction", "sum"))
    total = total + weight * scale * interaction
  scalars["loss"] = total
  return total, (scalars, updates["batch_stats"])
