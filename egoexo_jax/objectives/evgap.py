"""EVGAP pre-training on per-frame feature sequences, both steps (config.stage):

  'pair'  (step 1): batches of B synchronised ego-exo window pairs, G = 10 per recording (hard
          negatives); CLIP pair loss on every layer's embedding, scale exp(params['pair_log_scale']).
  'group' (step 2): batches of B scenes, each M ego + N exo synchronised windows, G = 10 consecutive
          scenes per recording as in step 1; the sigmoid group loss (block-diagonal positives) with
          scale exp(params['group_log_scale']). By default EVGAP's Eq. 2: no bias, the mean over all
          B^2 M N ego-exo pairs of each device's own scenes, averaged over devices (loss.group_scope
          'local', loss.group_normalization 'pairs', loss.use_group_bias False). SigLIP's variant is
          configuration: use_group_bias adds params['group_bias'], normalization 'ego' divides by
          B M, scope 'global' takes negatives from the whole batch with a ppermute ring.

Both: total = L_L + w sum_{l<L} L_l over the L layers' class-token embeddings (w = loss.auxiliary_weight,
0.2). Scalars: loss, loss_last_layer, loss_auxiliary (the mean over layers 1..L-1), logit_scale (t),
logit_bias (step 2), and a retrieval accuracy (step 1: ego -> exo top-1 among the batch's pairs; step
2: mean cosine of same-scene minus other-scene pairs, 'similarity_gap', computed without the B M x B N
matrix).

Held-out evaluation (`evaluate`, called by the trainer at every log step): the last
`data.heldout_fraction` of every record's frames and the recordings named in `data.heldout_recordings`
are left out of training. Every nominal window there (windows of w1 frames every w2, no scale
augmentation) is a held-out scene, embedded in every view; each ego window is matched to the scene
whose exo group (the mean of its exo windows' unit embeddings) is most similar. 'heldout_group_top1' is
the fraction matched to their own scene (chance: one over the number of held-out scenes, logged as
'heldout_chance').
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from egoexo_jax import losses, pictures, sharding
from egoexo_jax.input import feature_pipeline, feature_records, prepared_records
from egoexo_jax.models import build_model
from egoexo_jax.objectives import Objective

STEPS = (feature_pipeline.PAIR, feature_pipeline.GROUP)


def _step(config) -> str:
  step = config.stage
  if step not in STEPS:
    raise ValueError(f"unknown EVGAP config stage '{step}': use 'pair' (step 1) or 'group' (step 2)")
  return step


def heldout_recordings(config) -> tuple[str, ...]:
  """config data.heldout_recordings (comma-separated recording ids) as a tuple."""
  return tuple(r.strip() for r in config.data.get("heldout_recordings", "").split(",") if r.strip())


def _open_source(config, workdir: str) -> feature_records.FeatureRecordSource:
  source = feature_records.FeatureRecordSource(prepared_records.feature_records(config, workdir),
                                               config.data.get("feature_format") or None)
  if source.feature_dim != config.data.feature_dim:
    raise ValueError(f"the feature records hold {source.feature_dim}-d features but config data.feature_dim is "
                     f"{config.data.feature_dim}")
  unknown = set(heldout_recordings(config)) - {e["recording"] for e in source.entries}
  if unknown:
    raise ValueError(f"config data.heldout_recordings names {sorted(unknown)}, which the feature records "
                     f"({source!r}) do not hold")
  return source


def objective(config) -> Objective:
  step, model = _step(config), build_model(config.model, "evgap")

  def model_inputs(batch) -> tuple:
    views = (batch["ego_features"], batch["exo_features"])
    if step == feature_pipeline.PAIR:
      return (jnp.stack(views),)  # (2, B, T, C): one encoder pass for both views
    return (jnp.concatenate(views, axis=1),)  # (B, M + N, T, C)

  return Objective(name="evgap", model=model, make_dataset=make_dataset, example_batch=example_batch,
                   model_inputs=model_inputs, loss=loss,
                   evaluate=lambda params, config, workdir: evaluate(model, params, config, workdir))


def make_dataset(config, workdir: str, *, process_index: int, process_count: int):
  return feature_pipeline.make_dataset(config, _open_source(config, workdir), _step(config),
                                       process_index=process_index, process_count=process_count,
                                       exclude_recordings=heldout_recordings(config))


def example_batch(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the feature windows of one batch (pair: (B, T, C) per view; group: (B, M, T, C)
  ego and (B, N, T, C) exo)."""
  data = config.data
  window = (data.window_frames, data.feature_dim)
  if _step(config) == feature_pipeline.PAIR:
    ego, exo = (batch_size, *window), (batch_size, *window)
  else:
    ego, exo = (batch_size, data.ego_views_per_group, *window), (batch_size, data.exo_views_per_group, *window)
  return {"ego_features": jax.ShapeDtypeStruct(ego, jnp.float32),
          "exo_features": jax.ShapeDtypeStruct(exo, jnp.float32)}


def _layer_losses(per_layer: list[jax.Array], config) -> tuple[jax.Array, dict[str, jax.Array]]:
  per_layer = jnp.stack(per_layer)
  total = losses.with_auxiliary_layers(per_layer, config.loss.auxiliary_weight)
  auxiliary = jnp.mean(per_layer[:-1]) if per_layer.shape[0] > 1 else jnp.zeros((), jnp.float32)
  return total, {"loss": total, "loss_last_layer": per_layer[-1], "loss_auxiliary": auxiliary}


def loss(outputs, batch, *, config, rng: jax.Array, mesh):
  """The configured step's loss on the global batch (module docstring)."""
  del rng
  step, embeddings = _step(config), outputs["embeddings"]

  if step == feature_pipeline.PAIR:
    log_scale = outputs["pair_log_scale"]
    per_layer = [losses.clip_pair_loss(layer[0], layer[1], log_scale) for layer in embeddings]
    total, scalars = _layer_losses(per_layer, config)
    ego, exo = losses.l2_normalize(embeddings[-1, 0]), losses.l2_normalize(embeddings[-1, 1])
    scalars["accuracy"] = jnp.mean(jnp.argmax(ego @ exo.T, axis=1) == jnp.arange(ego.shape[0])).astype(jnp.float32)
    scalars["logit_scale"] = jnp.exp(jnp.minimum(log_scale, losses.CLIP_MAX_LOG_SCALE))
    return total, scalars

  m = batch["ego_features"].shape[1]
  ego_layers, exo_layers = embeddings[:, :, :m], embeddings[:, :, m:]
  bias = outputs["group_bias"] if config.loss.use_group_bias else jnp.zeros((), jnp.float32)
  per_layer = [losses.siglip_group_loss_sharded(ego, exo, outputs["group_log_scale"], bias,
                                                mesh=mesh, scope=config.loss.group_scope, axis_name=sharding.BATCH_AXES,
                                                tile_rows=config.loss.get("tile_rows", 0),
                                                normalization=config.loss.get("group_normalization", "pairs"))
               for ego, exo in zip(ego_layers, exo_layers)]
  total, scalars = _layer_losses(per_layer, config)
  scalars["similarity_gap"] = similarity_gap(ego_layers[-1], exo_layers[-1])
  scalars["logit_scale"] = jnp.exp(outputs["group_log_scale"])
  scalars["logit_bias"] = bias
  return total, scalars


def similarity_gap(ego: jax.Array, exo: jax.Array) -> jax.Array:
  """Mean cosine of same-scene (ego, exo) windows minus that of other-scene ones; ego (B, M, D), exo (B, N, D).

  Sums of unit vectors give both means in O(B (M + N) D): sum_ij <e_i, x_j> = <sum_i e_i, sum_j x_j>.
  """
  ego, exo = losses.l2_normalize(ego), losses.l2_normalize(exo)
  scenes, m, n = ego.shape[0], ego.shape[1], exo.shape[1]
  same = jnp.sum(jnp.sum(ego, 1) * jnp.sum(exo, 1))
  every = jnp.sum(jnp.sum(ego, (0, 1)) * jnp.sum(exo, (0, 1)))
  other = (every - same) / jnp.maximum(scenes * m * (scenes - 1) * n, 1)
  return same / (scenes * m * n) - other


# --------------------------------------------------------------------------- held-out group retrieval


@functools.lru_cache(maxsize=2)
def _heldout_windows(prefix: str, fmt: str | None, recordings: tuple[str, ...], fraction: float, window_frames: int,
                     window_stride: int) -> dict[str, np.ndarray]:
  """Every nominal window of the held-out frames in every view: 'windows' (K, w1, C) float32, 'scene' (K,)
  and 'is_ego' (K,) bool; scenes numbered over (record, window)."""
  source = feature_records.FeatureRecordSource(prefix, fmt)
  windows, scenes, is_ego = [], [], []
  for index, entry in enumerate(source.entries):
    first = 0 if entry["recording"] in recordings else feature_pipeline.training_frames(entry["num_frames"], fraction)
    starts = first + feature_pipeline.window_starts(entry["num_frames"] - first, window_frames, window_stride)
    if not len(starts):
      continue
    recording = source[index]
    for start in starts:
      scene = len(set(scenes))
      for view, kind in enumerate(recording.view_kinds):
        windows.append(recording.features[view, start:start + window_frames].astype(np.float32))
        scenes.append(scene)
        is_ego.append(kind == "ego")
  if not windows:
    raise ValueError(f"the held-out frames (config data.heldout_recordings {list(recordings)}, data.heldout_fraction "
                     f"{fraction}) hold no window of {window_frames} frames")
  return {"windows": np.stack(windows), "scene": np.asarray(scenes), "is_ego": np.asarray(is_ego)}


@functools.lru_cache(maxsize=2)
def _embed_fn(model):
  return jax.jit(lambda params, windows: losses.l2_normalize(
      model.apply({"params": params}, windows, train=False)["embeddings"][-1]))


def group_retrieval_top1(ego: np.ndarray, ego_scene: np.ndarray, exo: np.ndarray, exo_scene: np.ndarray) -> float:
  """Top-1 accuracy of ego -> exo group matching: unit ego rows (Q, D) against the groups of unit exo rows
  (K, D) by scene; a group's score is the mean cosine to its rows, <e, mean_j x_j>; ties go to the lowest
  scene id. Scenes are 0..S-1."""
  scenes = int(max(ego_scene.max(), exo_scene.max())) + 1
  centroids = np.zeros((scenes, exo.shape[1]), np.float64)
  np.add.at(centroids, exo_scene, exo)
  counts = np.bincount(exo_scene, minlength=scenes)
  scores = ego @ (centroids / np.maximum(counts, 1)[:, None]).T
  scores[:, counts == 0] = -np.inf
  return float(np.mean(np.argmax(scores, axis=1) == ego_scene))


def evaluate(model, params, config, workdir: str) -> dict[str, float]:
  """Held-out ego -> exo group retrieval (module docstring); {} when nothing is held out."""
  recordings, fraction = heldout_recordings(config), config.data.get("heldout_fraction", 0.0)
  if not recordings and not fraction:
    return {}
  data = _heldout_windows(prepared_records.feature_records(config, workdir), config.data.get("feature_format") or None,
                          recordings, fraction, config.data.window_frames, config.data.window_stride)
  embed = _embed_fn(model)
  chunk = 256
  embeddings = np.concatenate([np.asarray(embed(params, data["windows"][i:i + chunk]), np.float64)
                               for i in range(0, len(data["windows"]), chunk)])
  ego, scene = data["is_ego"], data["scene"]
  top1 = group_retrieval_top1(embeddings[ego], scene[ego], embeddings[~ego], scene[~ego])
  if jax.process_index() == 0:  # ego x exo cosine similarities, rows and columns by scene (the newest window's)
    order_ego, order_exo = np.argsort(scene[ego], kind="stable"), np.argsort(scene[~ego], kind="stable")
    pictures.save_similarity(os.path.join(workdir, "pictures", "evgap_heldout_similarity.png"),
                             embeddings[ego][order_ego], embeddings[~ego][order_exo])
  return {"heldout_group_top1": top1, "heldout_chance": 1.0 / (int(scene.max()) + 1)}
