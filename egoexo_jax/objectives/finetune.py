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

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from egoexo_jax import losses
from egoexo_jax.input import finetune_pipeline, prepared_records
from egoexo_jax.models import build_model
from egoexo_jax.objectives import Objective, egoexo


def objective(config) -> Objective:
  model = build_model(config.model, "finetune")
  interaction = bool(config.model.get("use_interaction_head", False))
  grid = functools.cache(lambda: egoexo.interaction_grid(model, config) if interaction else (1, 1, 1))

  def make_dataset(config, workdir: str, *, process_index: int, process_count: int):
    return finetune_pipeline.make_train_dataset(config, prepared_records.train_records(config, workdir),
                                                process_index=process_index, process_count=process_count,
                                                grid=grid())

  return Objective(name="finetune", model=model, make_dataset=make_dataset,
                   example_batch=lambda config, batch_size: example_batch(config, batch_size, grid()),
                   model_inputs=egoexo.model_inputs, loss=loss)


def example_batch(config, batch_size: int, grid: tuple[int, int, int]) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one fine-tuning batch (finetune_pipeline.FinetuneTrainTransform)."""
  data, heads = config.data, finetune_pipeline.head_sizes(config)
  labels = (jax.ShapeDtypeStruct((batch_size, heads[0][1]), jnp.float32) if data.label_kind == "multi_label"
            else jax.ShapeDtypeStruct((batch_size, len(heads)), jnp.int32))
  batch = {"clips": jax.ShapeDtypeStruct((batch_size, data.clip_length, data.crop_size, data.crop_size, 3), jnp.uint8),
           "labels": labels}
  if config.model.get("use_interaction_head", False):
    batch["interaction_map"] = jax.ShapeDtypeStruct((batch_size, *grid, 2), jnp.float32)
    batch["has_interaction"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  return batch


def classification_terms(logits: Sequence[jax.Array], labels: jax.Array, label_kind: str,
                         reduction: str = "sum_over_heads") -> tuple[jax.Array, list, list]:
  """The classification loss of every method with task heads (fine-tuning's L_cls, SUM-L's L_f and L_t).

  'single': labels int (B, H), the sum over heads of softmax cross-entropy; returns (total, per-head
  terms, per-head top-1 correctness (B,) bool). 'multi_label': targets (B, sum K) 0/1 with the heads laid
  end to end; BCE mean per head summed over heads ('sum_over_heads'; one head: PySlowFast's 'bce_logit')
  or one BCE mean over all the logits ('mean_over_classes'); returns (total, [], []).
  """
  if label_kind == "multi_label":
    if reduction == "mean_over_classes":
      return losses.multi_label_bce(jnp.concatenate(logits, axis=-1), labels), [], []
    bounds = [0]
    for head in logits:
      bounds.append(bounds[-1] + head.shape[-1])
    total = sum(losses.multi_label_bce(head, labels[:, bounds[i]:bounds[i + 1]]) for i, head in enumerate(logits))
    return total, [], []
  terms = [losses.softmax_cross_entropy(head, labels[:, i]) for i, head in enumerate(logits)]
  correct = [jnp.argmax(head, -1) == labels[:, i] for i, head in enumerate(logits)]
  return sum(terms), terms, correct


def classification_loss(outputs, labels, heads, label_kind: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_cls (module docstring, classification_terms) and its scalars.

  labels: (B, K) 0/1 float (multi-label) or (B, H) int (per head). Scalars: multi-label 'loss_bce' and
  'top1_precision' (the share of clips whose top-scoring class is a positive); per head 'loss_<h>' and
  'accuracy_<h>' (top-1), and 'accuracy_action' (every head right) when there are several heads.
  """
  logits = [outputs[name] for name, _ in heads]
  total, terms, correct = classification_terms(logits, labels, label_kind)
  if label_kind == "multi_label":
    top = jnp.take_along_axis(labels, jnp.argmax(logits[0], -1)[:, None], axis=1)[:, 0]
    return total, {"loss_bce": total, "top1_precision": jnp.mean(top).astype(jnp.float32)}
  scalars = {}
  for (name, _), term, right in zip(heads, terms, correct):
    scalars[f"loss_{name}"], scalars[f"accuracy_{name}"] = term, jnp.mean(right).astype(jnp.float32)
  if len(heads) > 1:
    scalars["accuracy_action"] = jnp.mean(jnp.all(jnp.stack(correct), axis=0)).astype(jnp.float32)
  return total, scalars


def loss(outputs, batch, *, config, rng: jax.Array, mesh):
  """L_cls (+ w_int L_int in Ego-Exo* mode) on the global batch; scalars as classification_loss, plus
  'loss' and, with the interaction head, 'loss_interaction' (the BCE per cell)."""
  del rng, mesh  # one global batch array; XLA inserts the cross-device reductions
  total, scalars = classification_loss(outputs, batch["labels"], finetune_pipeline.head_sizes(config),
                                       config.data.label_kind)
  weight = config.loss.get("weight_interaction", 0.0)
  if weight and "interaction" not in outputs:
    raise ValueError("config.loss.weight_interaction is non-zero but model.use_interaction_head is False")
  if "interaction" in outputs:
    egoexo.check_interaction_shape(outputs, batch)
    interaction = losses.interaction_map_bce(outputs["interaction"], batch["interaction_map"],
                                             batch["has_interaction"])
    scalars["loss_interaction"] = interaction
    scale = losses.interaction_term_scale(config.loss.get("interaction_reduction", "sum"))
    total = total + weight * scale * interaction
  scalars["loss"] = total
  return total, scalars
