"""SUM-L (Wang et al., ICCV 2023): unpaired ego + exo training through narration pseudo-pairs, and the
baselines of its comparison, as switches of one objective.

config.stage:
  'exo'    stage (a): the exo encoder f_t and head g_t on the exo dataset alone; loss L_t.
  'joint'  stage (b): ego clips with their exo pseudo-pairs; Eq. 12:
             L = L_f + w_t L_t + w_align L_align + w_m L_m
           (loss.weight_exo_task, loss.weight_align, loss.weight_video_text; released defaults 0.1, 0.02, 0.1).
Stage (c), evaluating the ego encoder and head, is egoexo_jax/suml_eval.py.

config.loss.alignment, the L_align term:
  'suml'                L_aw (Eq. 8-10): weighted decoupled InfoNCE over pairs above loss.threshold.
  'info_nce'            InfoNCE (Eq. 2-4) over all pseudo-pairs.
  'contrastive'         Typical CL: decoupled InfoNCE (Eq. 6) over all pseudo-pairs, unweighted.
  'triplet'             Triplet: anchor z_f, positive its partner's z_t, negative another ego clip's z_f
                        (as the released code), margin loss.triplet_margin (0.1).
  'joint_embedding'     Joint-embed: the same triplet on true pairs (data.pairs a CSV), negative another
                        pair's exo clip.
  'domain_adversarial'  Domain-adapt: cross-entropy of an ego/exo discriminator on the pooled features,
                        behind gradient reversal (model.discriminator_width > 0).
  'none'                no alignment term; with w_t = w_m = 0 this is FPV-only (the exo clips and the
                        pair file are then not read at all).

config.loss.negatives: 'global' uses every row of the global batch, across devices, as negatives (the
jitted step sees the global arrays); 'per_device' computes the batch-coupled terms (L_align, L_m) on each
device's slice with jax.shard_map over the mesh's batch axes (`data` x `fsdp`) and averages them over
devices; 'groups' splits the global batch into loss.negative_groups consecutive slices, whatever the
devices, and averages the terms over them (the release: 2 GPUs x 32 clips, each GPU's loss on its own
slice, DDP averaging the gradients).

config.loss.dcl_negatives: the rows of the decoupled InfoNCE denominators in L_aw, Typical CL and L_m:
'cross_view' (SUM-L Eq. 4/6) or 'both_views' (the released DCL). config.loss.semantic_weights: w of
Eq. 9-10 on L_aw's positives (True) or 1 (the release). config.loss.multi_label_reduction, for
multi-label task heads (LEMMA's L_t): 'sum_over_heads' (a BCE mean per head, summed: the release's
BCE(verbs) + BCE(nouns)) or 'mean_over_classes' (one BCE mean over all heads' logits). Recipes and
their sources: configs/recipe_suml.py.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from egoexo_jax import losses, sharding
from egoexo_jax.input import prepared_records, suml_pipeline
from egoexo_jax.models import build_model
from egoexo_jax.models import suml as suml_model
from egoexo_jax.objectives import Objective, finetune

ALIGNMENTS = ("suml", "info_nce", "contrastive", "triplet", "joint_embedding", "domain_adversarial", "none")
NEGATIVES = ("global", "per_device", "groups")
MULTI_LABEL_REDUCTIONS = ("sum_over_heads", "mean_over_classes")


def loss_weights(config) -> dict[str, float]:
  """w_t, w_align, w_m of Eq. 12 by term name ('align' is 0 when loss.alignment is 'none')."""
  align = config.loss.weight_align if config.loss.alignment != "none" else 0.0
  return {"exo_task": config.loss.weight_exo_task, "align": align, "video_text": config.loss.weight_video_text}


def needs_exo(config) -> bool:
  """Whether the step sees exo clips (every variant but FPV-only)."""
  w = loss_weights(config)
  return config.stage == "exo" or bool(w["exo_task"]) or bool(w["video_text"]) or bool(w["align"])


def needs_text(config) -> bool:
  """Whether the step sees narration embeddings (L_aw or L_m)."""
  w = loss_weights(config)
  return config.stage == "joint" and (bool(w["video_text"]) or (config.loss.alignment == "suml" and bool(w["align"])))


def check_config(config) -> None:
  """Rejects combinations that cannot train as meant, naming the config fields."""
  if config.stage not in ("exo", "joint"):
    raise ValueError(f"config stage '{config.stage}': use 'exo' (stage a) or 'joint' (stage b)")
  alignment = config.loss.alignment
  if alignment not in ALIGNMENTS:
    raise ValueError(f"config loss.alignment '{alignment}': use one of {ALIGNMENTS}")
  if config.loss.negatives not in NEGATIVES:
    raise ValueError(f"config loss.negatives '{config.loss.negatives}': use one of {NEGATIVES}")
  if config.loss.negatives == "groups" and (config.loss.negative_groups < 1
                                            or config.global_batch_size % config.loss.negative_groups):
    raise ValueError(f"config loss.negative_groups ({config.loss.negative_groups}) must be >= 1 and divide "
                     f"global_batch_size ({config.global_batch_size})")
  if config.loss.dcl_negatives not in losses.DCL_NEGATIVES:
    raise ValueError(f"config loss.dcl_negatives '{config.loss.dcl_negatives}': use one of {losses.DCL_NEGATIVES}")
  if config.loss.multi_label_reduction not in MULTI_LABEL_REDUCTIONS:
    raise ValueError(f"config loss.multi_label_reduction '{config.loss.multi_label_reduction}': use one of "
                     f"{MULTI_LABEL_REDUCTIONS}")
  if config.model.freeze_exo_backbone and "exo_backbone" not in tuple(config.optimizer.frozen):
    raise ValueError("config model.freeze_exo_backbone is set but optimizer.frozen lacks 'exo_backbone' "
                     "(weight decay would still move the frozen encoder)")
  if (alignment == "domain_adversarial") != bool(config.model.discriminator_width):
    raise ValueError("config loss.alignment 'domain_adversarial' and model.discriminator_width > 0 go together "
                     f"(got '{alignment}' and {config.model.discriminator_width})")
  if alignment == "joint_embedding" and not config.data.pairs.endswith(".csv"):
    raise ValueError(f"config loss.alignment 'joint_embedding' trains on true pairs: data.pairs must be a CSV "
                     f"of ego_id,exo_id pairs, not '{config.data.pairs}'")


def objective(config) -> Objective:
  """SUM-L's Objective; its step key is split into the dropout key and the key of the triplet negatives."""
  check_config(config)
  for view in ("ego", "exo"):  # the pipeline's label order must be the model's numbered heads' order
    data_order = suml_pipeline.view_heads(config, view)
    model_order = tuple(suml_model.head_order(config.model[f"{view}_num_classes"]))
    if len(data_order) > 1 and data_order != model_order:
      raise ValueError(f"config data.{view}_label_layout orders the heads {[n for n, _ in data_order]} but the "
                       f"SUM-L model numbers them {[n for n, _ in model_order]} (models/suml.py HEAD_ORDER)")
  return Objective(name="suml", model=build_model(config.model, "suml"), make_dataset=make_dataset,
                   example_batch=example_batch, model_inputs=model_inputs, loss=loss, split_rng=True)


def make_dataset(config, workdir: str, *, process_index: int, process_count: int):
  check_config(config)
  if config.stage == "exo":
    return suml_pipeline.make_exo_dataset(config, prepared_records.view_records(config, workdir, "exo"),
                                          process_index=process_index, process_count=process_count)
  with_exo = needs_exo(config)
  ego_pattern = prepared_records.view_records(config, workdir, "ego")
  exo_pattern = prepared_records.view_records(config, workdir, "exo") if with_exo else None
  return suml_pipeline.make_paired_dataset(
      config, ego_pattern, exo_pattern, with_exo=with_exo, with_text=needs_text(config),
      cache_dir=os.path.join(os.path.abspath(workdir), "records"), process_index=process_index,
      process_count=process_count)


def example_batch(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the batch's clips, per view the step sees (labels and narration embeddings,
  whose sizes come from the label layout and the pair file, are left out: the model does not read them)."""
  data = config.data
  clips = jax.ShapeDtypeStruct((batch_size, data.clip_length, data.crop_size, data.crop_size, 3), jnp.uint8)
  views = (["ego"] if config.stage == "joint" else []) + (["exo"] if needs_exo(config) else [])
  return {f"{view}_clips": clips for view in views}


def model_inputs(batch) -> tuple:
  """(ego clips, exo clips), None for a view the batch lacks (stage (a), FPV-only)."""
  return batch.get("ego_clips"), batch.get("exo_clips")


# --------------------------------------------------------------------------- terms


def task_loss(logits: tuple[jax.Array, ...], labels: jax.Array, kind: str, view: str,
              reduction: str = "sum_over_heads") -> tuple[jax.Array, dict]:
  """L_f or L_t (finetune.classification_terms, the one classification loss) and its accuracies: with
  'single' labels '<view>_accuracy' (every head right: EPIC's action) and, with several heads,
  '<view>_accuracy_<i>'."""
  total, _, correct = finetune.classification_terms(logits, labels, kind, reduction)
  if kind == "multi_label":
    return total, {}
  scalars = {f"{view}_accuracy": jnp.mean(jnp.all(jnp.stack(correct), axis=0)).astype(jnp.float32)}
  if len(logits) > 1:
    scalars.update({f"{view}_accuracy_{i}": jnp.mean(c).astype(jnp.float32) for i, c in enumerate(correct)})
  return total, scalars


def batch_coupled_terms(arrays: dict[str, jax.Array], rng: jax.Array, *, config) -> dict[str, jax.Array]:
  """The terms whose value depends on the other rows of the batch: 'align' (all but domain_adversarial),
  'video_text' (L_m) and 'aligned_pair_fraction'. arrays: 'ego_embedding', 'exo_embedding' (B, D) and,
  when needed, 'ego_text', 'exo_text' (B, D)."""
  loss, w = config.loss, loss_weights(config)
  z_f, z_t = arrays["ego_embedding"], arrays["exo_embedding"]
  out = {}
  dcl = loss.dcl_negatives
  if w["align"] and loss.alignment == "suml":
    out["align"], count = losses.semantic_alignment_loss(
        z_f, z_t, arrays["ego_text"], arrays["exo_text"], temperature=loss.temperature, sigma=loss.sigma,
        threshold=loss.threshold, min_pairs=loss.min_aligned_pairs, negatives=dcl, weighted=loss.semantic_weights)
    out["aligned_pair_fraction"] = count / z_f.shape[0]
  elif w["align"] and loss.alignment == "info_nce":
    out["align"] = losses.info_nce(z_f, z_t, loss.temperature) + losses.info_nce(z_t, z_f, loss.temperature)
  elif w["align"] and loss.alignment == "contrastive":
    out["align"] = (losses.decoupled_info_nce(z_f, z_t, loss.temperature, negatives=dcl)
                    + losses.decoupled_info_nce(z_t, z_f, loss.temperature, negatives=dcl))
  elif w["align"] and loss.alignment in ("triplet", "joint_embedding"):
    if z_f.shape[0] < 2:
      raise ValueError("the triplet baselines need at least 2 clips per batch (per device with per_device negatives)")
    shift = jax.random.randint(rng, (), 1, z_f.shape[0])  # never 0: a row is never its own negative
    negatives = jnp.roll(z_f if loss.alignment == "triplet" else z_t, shift, axis=0)
    out["align"] = losses.triplet_margin_loss(z_f, z_t, negatives, loss.triplet_margin)
  if w["video_text"]:
    out["video_text"] = losses.video_text_loss(z_f, z_t, arrays["ego_text"], arrays["exo_text"], loss.temperature,
                                               negatives=dcl)
  return out


def _check_text_dims(outputs, batch) -> None:
  for view in ("ego", "exo"):
    z, d = outputs[f"{view}_embedding"], batch[f"{view}_text"]
    if z.shape[-1] != d.shape[-1]:
      raise ValueError(f"model.projection_dim is {z.shape[-1]} but the narration embeddings (data.pairs) have "
                       f"{d.shape[-1]} dimensions; the text terms need them equal")


def loss(outputs, batch, *, config, rng: jax.Array, mesh):
  """Stage (a): L_t. Stage (b): Eq. 12 with the configured alignment. Scalars: loss and the unweighted
  terms computed in this configuration (loss_ego_task, loss_exo_task, loss_align, loss_video_text),
  accuracies, and aligned_pair_fraction (SUM-L) or domain_accuracy (Domain-adapt). `rng`: the key of the
  triplet negatives (Objective.split_rng)."""
  align_rng, with_exo = rng, "exo_clips" in batch
  terms, scalars = {}, {}
  if with_exo:
    terms["exo_task"], accuracy = task_loss(outputs["exo_logits"], batch["exo_labels"], config.data.exo_label_kind,
                                            "exo", config.loss.multi_label_reduction)
    scalars.update(accuracy)
  if config.stage == "exo":
    total = terms["exo_task"]
  else:
    terms["ego_task"], accuracy = task_loss(outputs["ego_logits"], batch["ego_labels"], config.data.ego_label_kind,
                                            "ego", config.loss.multi_label_reduction)
    scalars.update(accuracy)
    if with_exo:
      arrays = {k: outputs[k] for k in ("ego_embedding", "exo_embedding")}
      if needs_text(config):
        _check_text_dims(outputs, batch)
        arrays.update(ego_text=batch["ego_text"], exo_text=batch["exo_text"])
      if config.loss.negatives == "per_device":
        axes = sharding.BATCH_AXES  # every device of the mesh holds its own slice of the batch
        per_device = lambda a, r: jax.tree.map(lambda x: jax.lax.pmean(x, axes),
                                               batch_coupled_terms(a, r, config=config))
        coupled = jax.shard_map(per_device, mesh=mesh, in_specs=(P(axes), P()), out_specs=P())(arrays, align_rng)
      elif config.loss.negatives == "groups":
        groups = config.loss.negative_groups
        split = jax.tree.map(lambda x: x.reshape(groups, x.shape[0] // groups, *x.shape[1:]), arrays)
        per_group = jax.vmap(lambda a: batch_coupled_terms(a, align_rng, config=config))(split)
        coupled = jax.tree.map(lambda x: jnp.mean(x, axis=0), per_group)
      else:
        coupled = batch_coupled_terms(arrays, align_rng, config=config)
      if "aligned_pair_fraction" in coupled:
        scalars["aligned_pair_fraction"] = coupled.pop("aligned_pair_fraction")
      terms.update(coupled)
      if config.loss.alignment == "domain_adversarial" and config.loss.weight_align:
        domain = jnp.concatenate([jnp.zeros(batch["ego_clips"].shape[0], jnp.int32),
                                  jnp.ones(batch["exo_clips"].shape[0], jnp.int32)])
        terms["align"] = losses.softmax_cross_entropy(outputs["domain_logits"], domain)
        scalars["domain_accuracy"] = jnp.mean(jnp.argmax(outputs["domain_logits"], -1) == domain).astype(jnp.float32)
    total = losses.suml_total(terms, loss_weights(config))
  scalars.update({"loss": total, **{f"loss_{name}": value for name, value in terms.items()}})
  return total, scalars
