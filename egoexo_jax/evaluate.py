r"""Multi-view testing of a trained model: Charades mAP, EPIC verb/noun/action top-k, Kinetics top-k.

  python -m egoexo_jax.evaluate --config=configs/finetune_epic100.py --workdir=runs/epic100 \
      --records='/data/epic100/validation.tfrecord-*' --output=runs/epic100/results.json

Restores the newest checkpoint of --workdir (read-only; --checkpoint=best: the best kept during training,
or --checkpoint=<folder> written by models/import_weights.py), cuts every record into num_clips x num_crops
views (finetune_pipeline.multi_view_clips: PySlowFast's 10 clips x 3 crops of 256 at short side 256),
runs them through a jitted forward over this host's devices (views split over the data x fsdp mesh,
parameters sharded as in training; run it on one host), turns logits into probabilities
(sigmoid for multi-label, softmax per head; with `evaluate.fully_convolutional`, at every window
position of the head and then averaged, as PySlowFast tests), combines each record's views
(`evaluate.ensemble`: 'max' for Charades, 'mean' for EPIC and Kinetics) and scores them. Without
--records, `evaluate.manifest` is converted into <workdir>/records/eval first. Writes --output (JSON), CLU scalars 'eval/<metric>' under
<workdir>/eval, and `<output stem>_predictions.npz`: ids, labels, and per head `<h>` the aggregated
scores (N, K) float32 and `<h>_views` (N, V, K) float16, for later ensembling.

Metrics (fractions in [0, 1]):
  multi-label  mAP: per class, average precision exactly as sklearn's average_precision_score
               (AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds), averaged over the
               classes with at least one positive (PySlowFast's get_map drops the others).
  per head     top-1 / top-5 of each head. With heads 'verb' and 'noun', also 'action': top-1 is right
               when both are; top-5 ranks the verb x noun pairs by p(verb) p(noun), as the EPIC-Kitchens
               evaluation does (it multiplies the softmaxed verb and noun scores).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from egoexo_jax import atomic_files, checkpointing, objectives, processes, sharding, train
from egoexo_jax.input import finetune_pipeline, sources, transforms

# --------------------------------------------------------------------------- metrics


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
  """AP of one class: labels (N,) 0/1, scores (N,); sum over the distinct thresholds t (high to low) of
  (recall(t) - recall(previous t)) * precision(t). NaN when there is no positive."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  sorted_scores, hits = np.asarray(scores, np.float64)[order], np.asarray(labels, np.float64)[order]
  if hits.sum() == 0:
    return float("nan")
  last_of_threshold = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(hits) - 1]
  true_positives = np.cumsum(hits)[last_of_threshold]
  precision = true_positives / (last_of_threshold + 1)
  recall = true_positives / true_positives[-1]
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
  """(mAP over the classes with a positive, per-class AP (K,) with NaN for the others); labels and
  scores (N, K)."""
  per_class = np.array([average_precision(labels[:, k], scores[:, k]) for k in range(labels.shape[1])])
  if np.all(np.isnan(per_class)):
    raise ValueError("no class has a positive example: mAP is undefined")
  return float(np.nanmean(per_class)), per_class


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
  """{k: share of rows whose label is among the k highest scores}; scores (N, K), labels (N,)."""
  ranked = np.argsort(-scores, axis=1, kind="stable")
  return {k: float(np.mean(np.any(ranked[:, :k] == labels[:, None], axis=1))) for k in ks}


def action_top_k_accuracy(verb_scores: np.ndarray, noun_scores: np.ndarray, verb_labels: np.ndarray,
                          noun_labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
  """{k: share of segments whose (verb, noun) pair is among the k pairs of highest p(verb) p(noun)}.

  Scores are probabilities (N, V) and (N, M). Only the top-k verbs and nouns can form a top-k pair
  (a pair outside them is beaten by k pairs), so k x k candidates per segment decide it exactly.
  """
  out = {}
  for k in ks:
    top_verbs = np.argsort(-verb_scores, axis=1, kind="stable")[:, :k]
    top_nouns = np.argsort(-noun_scores, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(verb_scores))[:, None]
    pair_scores = (verb_scores[rows, top_verbs][:, :, None] * noun_scores[rows, top_nouns][:, None, :])
    best = np.argsort(-pair_scores.reshape(len(verb_scores), -1), axis=1, kind="stable")[:, :k]
    verbs, nouns = top_verbs[rows, best // top_nouns.shape[1]], top_nouns[rows, best % top_nouns.shape[1]]
    hit = (verbs == verb_labels[:, None]) & (nouns == noun_labels[:, None])
    out[k] = float(np.mean(np.any(hit, axis=1)))
  return out


def aggregate_views(view_scores: np.ndarray, method: str) -> np.ndarray:
  """(N, V, K) per-view scores -> (N, K): 'max' or 'mean' over the V views."""
  if method == "max":
    return view_scores.max(axis=1)
  if method == "mean":
    return view_scores.mean(axis=1)
  raise ValueError(f"unknown config evaluate.ensemble '{method}': use 'max' or 'mean'")


def compute_metrics(scores: dict[str, np.ndarray], labels: np.ndarray, heads, multi_label: bool) -> dict:
  """The metrics of the module docstring from aggregated scores {head: (N, K)} and the labels:
  (N, K) 0/1 for multi-label, (N, H) per head."""
  if multi_label:
    (name, _), = heads
    mean_ap, per_class = mean_average_precision(labels, scores[name])
    return {"mAP": mean_ap, "num_classes_with_positives": int(np.sum(~np.isnan(per_class)))}
  metrics = {}
  for i, (name, _) in enumerate(heads):
    for k, value in top_k_accuracy(scores[name], labels[:, i]).items():
      metrics[f"{name}_top{k}"] = value
  names = [name for name, _ in heads]
  if {"verb", "noun"} <= set(names):
    v, n = names.index("verb"), names.index("noun")
    for k, value in action_top_k_accuracy(scores["verb"], scores["noun"], labels[:, v], labels[:, n]).items():
      metrics[f"action_top{k}"] = value
  return metrics


# --------------------------------------------------------------------------- model and views


def eval_settings(config) -> ml_collections.ConfigDict:
  """`config.eval`, with PySlowFast's Kinetics test defaults for configs without one
  (10 x 3 views at short side = crop = data.min_short_side, Kinetics clip placement, mean, global pooling).

  `fully_convolutional`: the heads run at every window position of the test crop's res5 grid (window =
  a training clip's grid, `heads.window_pool`), probabilities averaged over the positions, as PySlowFast
  tests; False: global average pooling, then the heads."""
  defaults = dict(manifest="", num_clips=10, num_crops=3, short_side=config.data.min_short_side,
                  crop_size=config.data.min_short_side, placement="kinetics", ensemble="mean", batch_size=30,
                  fully_convolutional=False)
  given = config.get("eval", ml_collections.ConfigDict()).to_dict()
  return ml_collections.ConfigDict({**defaults, **given})


def restore_variables(config, workdir: str, mesh, checkpoint: str = "") -> tuple[Any, dict, int]:
  """(model, {'params', 'batch_stats'} on `mesh`, step), opened read-only.

  `checkpoint`: '' the newest checkpoint of <workdir>/checkpoints; 'best' the one of <workdir>/best
  (kept by periodic evaluation during training, egoexo_jax/train_eval.py); otherwise a folder holding
  a `state/` item with 'params' and 'batch_stats' (models/import_weights.py writes one, e.g. from a
  released fine-tuned checkpoint), whose step is reported as 0. `workdir` may also be an export
  folder (python -m egoexo_jax.export) whose model card fits `config`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from egoexo_jax import pretrained  # pylint: disable=g-import-not-at-top

  if pretrained.is_export(workdir):
    model, variables, step = pretrained.load_for_config(workdir, config)
    return model, jax.device_put(variables, sharding.replicated(mesh)), step
  objective = objectives.resolve(config)
  model = objective.model
  optimizer, _ = train.make_optimizer(config)
  abstract, _ = train.abstract_state(objective, optimizer, config, mesh)
  if checkpoint not in ("", "best"):
    return model, imported_variables(checkpoint, abstract), 0
  directory = os.path.join(os.path.abspath(workdir), "best" if checkpoint == "best" else "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}: train first (python main.py --workdir={workdir})")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint step in {directory}")
  checkpointing.check_saved_shapes(manager, step, abstract)
  restored = manager.restore(step, args=ocp.args.Composite(
      **{checkpointing.STATE: ocp.args.StandardRestore(abstract)}))[checkpointing.STATE]
  manager.close()
  return model, {"params": restored.params, "batch_stats": restored.batch_stats}, step


def imported_variables(path: str, abstract) -> dict:
  """{'params', 'batch_stats'} of the `state/` item under `path`, checked against the model's abstract
  state and placed in its shardings; an error names the first array that is missing or misshapen."""
  state_dir = os.path.join(os.path.abspath(path), checkpointing.STATE)
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"--checkpoint={path}: no '{checkpointing.STATE}/' folder there (expected the output "
                            "of python -m egoexo_jax.models.import_weights, 'best', or empty for the newest)")
  saved = checkpointing.restore_on_this_host(state_dir)
  out = {}
  for collection in ("params", "batch_stats"):
    target = getattr(abstract, collection)
    flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved.get(collection, {}))[0])
    flat_target = jax.tree_util.tree_flatten_with_path(target)[0]
    unused = sorted(set(map(jax.tree_util.keystr, flat_saved)) - {jax.tree_util.keystr(k) for k, _ in flat_target})
    if unused:
      raise ValueError(f"{state_dir}: '{collection}' has arrays this model lacks: {unused[:5]} (config model.* differs "
                       "from the imported network?)")
    leaves = []
    for key, leaf in flat_target:
      name = f"{collection}{jax.tree_util.keystr(key)}"
      if key not in flat_saved:
        raise ValueError(f"{state_dir}: no '{name}' (config model.* differs from the imported network?)")
      if flat_saved[key].shape != leaf.shape:
        raise ValueError(f"{state_dir}: '{name}' is {flat_saved[key].shape}, the model's is {leaf.shape}")
      leaves.append(jax.device_put(jnp.asarray(flat_saved[key], leaf.dtype), leaf.sharding))
    out[collection] = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
  return out


def make_forward(model, variables, mesh, dtype, heads, multi_label: bool, window_crop: int | None = None):
  """Jitted uint8 views (B, T, S, S, 3), B a multiple of the mesh size -> {head: float32 probabilities (B, K)},
  the batch split over the mesh, the variables kept in the shardings they were restored into.

  With `window_crop` (the training crop size; fully convolutional testing) the model gives logits per
  position (B, t', h', w', K): the activation is applied at each position, then averaged over them
  (PySlowFast ResNetBasicHead in eval mode: act, then x.mean([1, 2, 3]))."""
  variable_shardings = jax.tree.map(lambda x: x.sharding, variables)
  extra = {"window_crop": int(window_crop)} if window_crop else {}

  @functools.partial(jax.jit, in_shardings=(variable_shardings, sharding.batch_sharding(mesh)),
                     out_shardings=sharding.replicated(mesh))
  def forward(variables, views):
    outputs = model.apply(variables, transforms.normalize_clips(views, dtype), train=False, **extra)
    activation = jax.nn.sigmoid if multi_label else functools.partial(jax.nn.softmax, axis=-1)
    probabilities = {name: activation(outputs[name].astype(jnp.float32)) for name, _ in heads}
    return {name: p.mean(axis=(1, 2, 3)) if p.ndim == 5 else p for name, p in probabilities.items()}

  return lambda views: jax.device_get(forward(variables, views))


def predict(elements, forward, batch_size: int) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
  """Runs every element's views through `forward` in batches of `batch_size` views (the last one padded).

  elements: iterable of MultiViewTransform outputs. Returns (ids, labels stacked, {head: (N, V, K)}).
  """
  ids, labels, pending, outputs, num_views = [], [], [], {}, None

  def run(final: bool):
    nonlocal pending
    while sum(len(p) for p in pending) >= batch_size or (final and pending):
      views = np.concatenate(pending)
      batch, rest = views[:batch_size], views[batch_size:]
      pending = [rest] if len(rest) else []
      padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
      for name, probabilities in forward(padded).items():
        outputs.setdefault(name, []).append(np.asarray(probabilities[:len(batch)]))

  for element in elements:
    views = element["views"]
    if num_views is not None and len(views) != num_views:
      raise ValueError(f"record '{element['video_id']}' gave {len(views)} views, the others {num_views}")
    num_views = len(views)
    ids.append(str(element["video_id"]))
    labels.append(element["labels"])
    pending.append(views)
    run(final=False)
  run(final=True)
  if not ids:
    raise ValueError("no records to evaluate")
  view_scores = {name: np.concatenate(chunks).reshape(len(ids), num_views, -1) for name, chunks in outputs.items()}
  return ids, np.stack(labels), view_scores


def prepare_eval_records(config, workdir: str, manifest: str) -> str:
  """Converts `manifest` into <workdir>/records/eval once (a finished conversion leaves eval.json)."""
  if not manifest:
    raise ValueError("no records to evaluate: pass --records or set config evaluate.manifest")
  prefix = os.path.join(os.path.abspath(workdir), "records", "eval")
  if not os.path.exists(prefix + ".json"):
    from egoexo_jax.input import convert  # pylint: disable=g-import-not-at-top  (PyAV only when converting)
    report = convert.convert_manifest(manifest, prefix, short_side=config.data.convert_short_side,
                                      workers=max(1, config.data.num_workers))
    logging.info("Converted %s: %s", manifest, report.summary_line())
  return prefix + ".tfrecord-*"


def score_records(config, model, variables, mesh, pattern: str, settings) -> dict:
  """Runs the views of every record of `pattern` through the model and scores them.

  Returns {'ids', 'labels', 'view_scores' {head: (N, V, K)}, 'scores' {head: (N, K)}, 'metrics',
  'view_args'}. Shared by the command line and the periodic evaluation during training."""
  import grain  # pylint: disable=g-import-not-at-top

  heads = finetune_pipeline.head_sizes(config)
  multi_label = config.data.get("label_kind", "single") == "multi_label"
  batch_size = -(-settings.batch_size // mesh.size) * mesh.size
  window_crop = config.data.crop_size if settings.fully_convolutional else None
  forward = make_forward(model, variables, mesh, jnp.dtype(config.model.dtype), heads, multi_label, window_crop)
  view_args = dict(clip_length=config.data.clip_length, frame_stride=config.data.frame_stride,
                   num_clips=settings.num_clips, num_crops=settings.num_crops, short_side=settings.short_side,
                   crop_size=settings.crop_size, placement=settings.placement)
  transform = finetune_pipeline.MultiViewTransform(heads, multi_label, tuple(view_args.items()))
  dataset = grain.MapDataset.source(sources.open_records(pattern)).map(transform).to_iter_dataset(
      grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=config.data.prefetch_batches))
  if config.data.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers),
                                  worker_init_fn=processes.worker_init_fn())  # workers end with this process
  ids, labels, view_scores = predict(dataset, forward, batch_size)
  scores = {name: aggregate_views(v, settings.ensemble) for name, v in view_scores.items()}
  return {"ids": ids, "labels": labels, "view_scores": view_scores, "scores": scores,
          "metrics": compute_metrics(scores, labels, heads, multi_label), "view_args": view_args}


def evaluate(config, workdir: str, records: str, output: str, predictions: str | None = None,
             checkpoint: str = "") -> dict:
  """Evaluates a checkpoint of `workdir` (restore_variables: the newest, 'best', or an imported folder)
  on `records` (a glob; empty: evaluate.manifest); writes the JSON results, the predictions .npz and
  CLU scalars; returns the results."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  settings = eval_settings(config)
  pattern = records or prepare_eval_records(config, workdir, settings.manifest)
  mesh = sharding.make_mesh(devices=jax.local_devices(), fsdp=config.mesh.get("fsdp", 1))
  model, variables, step = restore_variables(config, workdir, mesh, checkpoint)
  scored = score_records(config, model, variables, mesh, pattern, settings)
  ids, labels, view_scores, scores, metrics = (scored[k] for k in ("ids", "labels", "view_scores", "scores", "metrics"))
  predictions = predictions or os.path.splitext(output)[0] + "_predictions.npz"
  with atomic_files.atomic_write(predictions) as f:
    np.savez(f, ids=np.asarray(ids), labels=labels, **{name: s.astype(np.float32) for name, s in scores.items()},
             **{f"{name}_views": v.astype(np.float16) for name, v in view_scores.items()})
  views = {**scored["view_args"], "views_per_record": settings.num_clips * settings.num_crops,
           "fully_convolutional": bool(settings.fully_convolutional)}
  results = {"workdir": os.path.abspath(workdir), "checkpoint": checkpoint or "newest",
             "checkpoint_step": int(step), "records": pattern,
             "num_records": len(ids), "views": views, "ensemble": settings.ensemble, "metrics": metrics,
             "predictions": predictions}
  with atomic_files.atomic_write(output, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  writer = metric_writers.create_default_writer(workdir, collection="eval")
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  writer.flush()
  writer.close()
  return results


# --------------------------------------------------------------------------- command line


def main(argv) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  results = evaluate(f.config, f.workdir, f.records or "", f.output, f.predictions, f.checkpoint or "")
  print(json.dumps({"checkpoint_step": results["checkpoint_step"], "num_records": results["num_records"],
                    **results["metrics"]}, indent=None))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "The run's config file (path[:arg]).")
  flags.DEFINE_string("workdir", None, "The run's workdir; its newest checkpoint is evaluated (read-only); "
                      "eval scalars are written under it.")
  flags.DEFINE_string("records", None, "Glob of the test record shards (default: convert evaluate.manifest).")
  flags.DEFINE_string("output", None, "Results JSON.")
  flags.DEFINE_string("predictions", None, "Predictions .npz (default: <output stem>_predictions.npz).")
  flags.DEFINE_string("checkpoint", "", "Empty: the newest checkpoint of --workdir; 'best': <workdir>/best; or a "
                      "folder written by egoexo_jax.models.import_weights (e.g. a released fine-tuned model).")
  flags.mark_flags_as_required(["config", "workdir", "output"])


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top

  _define_flags()
  _app.run(main)
