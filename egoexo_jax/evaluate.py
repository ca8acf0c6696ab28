r"""Multi-view testing of a trained model: Charades mAP, EPIC verb/noun/action top-k, Kinetics top-k.

One module over 400 lines on purpose: the test protocol, its restore paths (run, --step, best, export,
imported folder), resumable partial results and the CLI; the metrics are in eval_metrics.py.

  python -m egoexo_jax.evaluate --workdir=runs/epic100 --records='/data/epic100/validation.tfrecord-*'

The run's config is the one it saved (<workdir>/config.json, egoexo_jax/run_config.py); --config is
optional and, when given, must match it (run_config.check_matches; its test-time `eval.*` settings apply).
--step picks the checkpoint: empty for the newest of <workdir>/checkpoints, a step number, or 'best' (the
best kept during training, <workdir>/best); --workdir may also be a folder written by
models/import_weights.py or an export folder (egoexo_jax/export.py), with --config. Every record is cut into
num_clips x num_crops views (finetune_pipeline.multi_view_clips: PySlowFast's 10 clips x 3 crops of 256 at
short side 256), run through a jitted forward over this host's devices (views split over the data x fsdp
mesh, parameters sharded as in training; run it on one host), turned into probabilities (sigmoid for
multi-label, softmax per head; with `eval.fully_convolutional`, at every window position of the head and
then averaged, as PySlowFast tests), and each record's views are combined (`eval.ensemble`: 'max' for
Charades, 'mean' for EPIC and Kinetics) and scored. Without --records, `eval.manifest` is converted into
<workdir>/records/eval first.

Writes under --output_dir (default the workdir, where export's model card finds it): `results.json`
(`results_step<N>.json` with --step=N, `results_best.json` with --step=best) with the metrics, per-class
numbers (`per_class`) and the settings; `<results stem>_predictions.npz`: ids, labels, and per head `<h>`
the aggregated scores (N, K) float32 and `<h>_views` (N, V, K) float16, for later ensembling; CLU scalars
'eval/<metric>' under <workdir>/eval. A progress line every --log_every records. Resumable: every
--save_every records the per-record view scores so far are written (atomically) to
`<results stem>.partial.npz`; a rerun for the same checkpoint step, records and views skips those
records, and the file is removed when the results are written.

Metrics: egoexo_jax/eval_metrics.py (mAP as sklearn, top-k, EPIC action accuracy, per-class numbers).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from egoexo_jax import atomic_files, checkpointing, objectives, processes, run_config, sharding, train
from egoexo_jax.eval_metrics import (  # re-exported: callers and tests use evaluate.<metric>
    action_top_k_accuracy, aggregate_views, average_precision, compute_metrics, mean_average_precision,
    per_class_metrics, top_k_accuracy)
from egoexo_jax.input import finetune_pipeline, prepared_records, sources, transforms

# --------------------------------------------------------------------------- model and views


def eval_settings(config) -> ml_collections.ConfigDict:
  """`config.eval` (`config.evaluate` in configs saved before the rename), with PySlowFast's Kinetics test
  defaults for configs without one (10 x 3 views at short side = crop = data.min_short_side, Kinetics clip
  placement, mean, global pooling).

  `fully_convolutional`: the heads run at every window position of the test crop's res5 grid (window =
  a training clip's grid, `heads.window_pool`), probabilities averaged over the positions, as PySlowFast
  tests; False: global average pooling, then the heads."""
  defaults = dict(manifest="", num_clips=10, num_crops=3, short_side=config.data.min_short_side,
                  crop_size=config.data.min_short_side, placement="kinetics", ensemble="mean", batch_size=30,
                  fully_convolutional=False)
  given = config.get("eval", config.get("evaluate", None))
  given = given.to_dict() if given is not None else {}
  return ml_collections.ConfigDict({**defaults, **given})


def restore_variables(config, workdir: str, mesh, checkpoint: str = "", step: int | None = None
                      ) -> tuple[Any, dict, int]:
  """(model, {'params', 'batch_stats'} on `mesh`, step), opened read-only.

  `checkpoint`: '' a checkpoint of <workdir>/checkpoints, `step` (default the newest); 'best' the one of
  <workdir>/best (kept by periodic evaluation during training, egoexo_jax/train_eval.py); otherwise a folder
  holding a `state/` item with 'params' and 'batch_stats' (models/import_weights.py writes one, e.g. from a
  released fine-tuned checkpoint), whose step is reported as 0. `workdir` may also be an export folder
  (python -m egoexo_jax.export) whose model card fits `config`, or an imported folder itself.
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
  if checkpoint == "" and is_imported_folder(workdir):
    checkpoint = workdir
  if checkpoint not in ("", "best"):
    return model, imported_variables(checkpoint, abstract), 0
  directory = os.path.join(os.path.abspath(workdir), "best" if checkpoint == "best" else "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}: train first (python main.py --workdir={workdir})")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint step in {directory}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; its steps: {steps}")
  checkpointing.check_saved_shapes(manager, step, abstract)
  restored = manager.restore(step, args=ocp.args.Composite(
      **{checkpointing.STATE: ocp.args.StandardRestore(abstract)}))[checkpointing.STATE]
  manager.close()
  return model, {"params": restored.params, "batch_stats": restored.batch_stats}, step


def is_imported_folder(path: str) -> bool:
  """Whether `path` holds a `state/` item of its own (models/import_weights.py output), not a run."""
  return (os.path.isdir(os.path.join(path, checkpointing.STATE))
          and not os.path.isdir(os.path.join(path, "checkpoints")))


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


def predict(elements, forward, batch_size: int, *, done: dict | None = None, save=None, save_every: int = 0,
            progress=None) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
  """Runs every element's views through `forward` in batches of `batch_size` views (the last one padded).

  elements: iterable of MultiViewTransform outputs. Returns (ids, labels stacked, {head: (N, V, K)}).
  done: {'ids', 'labels', 'view_scores'} of records scored by an earlier run (load_partial): they come
  first in the output, in their order. save: called with that same dict of every record finished so far,
  after each `save_every` newly finished records. progress: called with the count of newly finished
  records after each batch.
  """
  done_ids = list(done["ids"]) if done else []
  done_labels = list(done["labels"]) if done else []
  done_views = {name: list(v) for name, v in done["view_scores"].items()} if done else {}
  num_views = next(iter(done["view_scores"].values())).shape[1] if done and done_ids else None
  ids, labels, pending, outputs = [], [], [], {}
  last_saved = 0

  def finished() -> dict:
    rows = min((sum(len(c) for c in chunks) for chunks in outputs.values()), default=0)
    count = rows // num_views if num_views else 0
    view_scores = {}
    for name in outputs or done_views:
      new = np.concatenate(outputs[name])[:count * num_views].reshape(count, num_views, -1) if count else None
      old = np.stack(done_views[name]) if done_views.get(name) else None
      view_scores[name] = np.concatenate([a for a in (old, new) if a is not None])
    return {"ids": done_ids + ids[:count], "labels": done_labels + labels[:count], "view_scores": view_scores,
            "new": count}

  def run(final: bool):
    nonlocal pending, last_saved
    while sum(len(p) for p in pending) >= batch_size or (final and pending):
      views = np.concatenate(pending)
      batch, rest = views[:batch_size], views[batch_size:]
      pending = [rest] if len(rest) else []
      padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
      for name, probabilities in forward(padded).items():
        outputs.setdefault(name, []).append(np.asarray(probabilities[:len(batch)]))
      count = min(sum(len(c) for c in chunks) for chunks in outputs.values()) // num_views
      if progress is not None:
        progress(count)
      if save is not None and save_every > 0 and count - last_saved >= save_every:
        save(finished())
        last_saved = count

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
  if not ids and not done_ids:
    raise ValueError("no records to evaluate")
  result = finished()
  return result["ids"], np.stack(result["labels"]), result["view_scores"]


def save_partial(path: str, key: dict, scored: dict) -> None:
  """Writes the records scored so far ({'ids', 'labels', 'view_scores'}) and what they depend on (`key`:
  checkpoint step, records, views) to `path` (.npz), whole or not at all."""
  with atomic_files.atomic_write(path) as f:
    np.savez(f, key=json.dumps(key, sort_keys=True), ids=np.asarray(scored["ids"], dtype=str),
             labels=np.stack(scored["labels"]) if scored["ids"] else np.zeros((0,)),
             **{f"views_{name}": v.astype(np.float32) for name, v in scored["view_scores"].items()})


def load_partial(path: str, key: dict) -> dict | None:
  """{'ids', 'labels', 'view_scores'} saved by save_partial for the same `key`; None when there is no file
  or it was made for another checkpoint step, records or views (then it is ignored, with a warning)."""
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    if str(saved["key"]) != json.dumps(key, sort_keys=True):
      logging.warning("Ignoring %s: it holds scores of another checkpoint, records or views.", path)
      return None
    return {"ids": [str(i) for i in saved["ids"]], "labels": list(saved["labels"]),
            "view_scores": {k[len("views_"):]: saved[k] for k in saved.files if k.startswith("views_")}}


def score_records(config, model, variables, mesh, pattern: str, settings, *, partial: str | None = None,
                  partial_key: dict | None = None, save_every: int = 0, log_every: int = 0) -> dict:
  """Runs the views of every record of `pattern` through the model and scores them.

  Returns {'ids', 'labels', 'view_scores' {head: (N, V, K)}, 'scores' {head: (N, K)}, 'metrics', 'per_class',
  'view_args'}. Shared by the command line and the periodic evaluation during training. With `partial`
  (a .npz path), records scored there for the same `partial_key` are skipped and the scores so far are
  saved there every `save_every` records. A progress line is logged every `log_every` records."""
  import grain  # pylint: disable=g-import-not-at-top

  heads = finetune_pipeline.head_sizes(config)
  multi_label = is_multi_label(config)
  batch_size = -(-settings.batch_size // mesh.size) * mesh.size
  window_crop = config.data.crop_size if settings.fully_convolutional else None
  forward = make_forward(model, variables, mesh, jnp.dtype(config.model.dtype), heads, multi_label, window_crop)
  view_args = dict(clip_length=config.data.clip_length, frame_stride=config.data.frame_stride,
                   num_clips=settings.num_clips, num_crops=settings.num_crops, short_side=settings.short_side,
                   crop_size=settings.crop_size, placement=settings.placement)
  transform = finetune_pipeline.MultiViewTransform(heads, multi_label, tuple(view_args.items()))
  key = {**(partial_key or {}), "records": pattern, "views": view_args}
  done = load_partial(partial, key) if partial else None
  source = sources.open_records(pattern)
  dataset = grain.MapDataset.source(source)
  if done:
    skip = set(done["ids"])
    logging.info("Resuming: %d of %d records already scored in %s.", len(skip), len(source), partial)
    dataset = dataset.filter(lambda record: record.video_id not in skip)
  dataset = dataset.map(transform).to_iter_dataset(
      grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=config.data.prefetch_batches))
  if config.data.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers),
                                  worker_init_fn=processes.worker_init_fn())  # workers end with this process
  progress = _progress_logger(len(source) - (len(done["ids"]) if done else 0), log_every) if log_every else None
  ids, labels, view_scores = predict(dataset, forward, batch_size, done=done, progress=progress,
                                     save=(lambda scored: save_partial(partial, key, scored)) if partial else None,
                                     save_every=save_every)
  scores = {name: aggregate_views(v, settings.ensemble) for name, v in view_scores.items()}
  return {"ids": ids, "labels": labels, "view_scores": view_scores, "scores": scores,
          "metrics": compute_metrics(scores, labels, heads, multi_label),
          "per_class": per_class_metrics(scores, labels, heads, multi_label), "view_args": view_args}


def is_multi_label(config) -> bool:
  """`data.label_kind == 'multi_label'` (`data.multi_label` in configs from before that name)."""
  kind = config.data.get("label_kind", None)
  return kind == "multi_label" if kind is not None else bool(config.data.get("multi_label", False))


def _progress_logger(total: int, every: int):
  """A callback logging 'evaluated n/total records, r records/s, ETA' each time n passes a multiple of `every`."""
  start, shown = time.monotonic(), [0]

  def report(count: int) -> None:
    if count // every > shown[0] // every or count == total:
      if count == shown[0]:
        return
      shown[0] = count
      rate = count / max(time.monotonic() - start, 1e-9)
      eta = (total - count) / rate if rate > 0 else float("nan")
      logging.info("Evaluated %d/%d records, %.2f records/s, ETA %s.", count, total, rate,
                   time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?")
  return report


def evaluate(config, workdir: str, records: str, output: str | None = None, predictions: str | None = None,
             checkpoint: str = "", *, step: int | None = None, output_dir: str | None = None, save_every: int = 50,
             log_every: int = 10) -> dict:
  """Evaluates a checkpoint of `workdir` (restore_variables: the newest or `step`, 'best', or an imported
  folder) on `records` (a glob; empty: eval.manifest); writes the results JSON (`output`, default
  <output_dir>/results[_step<N>|_best].json, output_dir defaulting to `workdir`), the predictions .npz
  and CLU scalars; returns the results. `config` None: the run's saved config (run_config)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  config = run_config.resolve(workdir, config)  # the saved config, or the given one checked against it
  requested = step
  settings = eval_settings(config)
  pattern = records or prepared_records.eval_records(config, workdir, settings.manifest)
  mesh = sharding.make_mesh(devices=jax.local_devices(), fsdp=config.mesh.get("fsdp", 1))
  model, variables, step = restore_variables(config, workdir, mesh, checkpoint, step)
  if output is None:
    name = ("results_best.json" if checkpoint == "best" else f"results_step{step}.json" if requested is not None
            else "results.json")
    output = os.path.join(output_dir or workdir, name)
  stem = os.path.splitext(output)[0]
  partial = stem + ".partial.npz"
  scored = score_records(config, model, variables, mesh, pattern, settings, partial=partial,
                         partial_key={"checkpoint": checkpoint or "checkpoints", "step": int(step)},
                         save_every=save_every, log_every=log_every)
  ids, labels, view_scores, scores, metrics = (scored[k] for k in ("ids", "labels", "view_scores", "scores", "metrics"))
  predictions = predictions or stem + "_predictions.npz"
  with atomic_files.atomic_write(predictions) as f:
    np.savez(f, ids=np.asarray(ids), labels=labels, **{name: s.astype(np.float32) for name, s in scores.items()},
             **{f"{name}_views": v.astype(np.float16) for name, v in view_scores.items()})
  from egoexo_jax import pictures  # pylint: disable=g-import-not-at-top  (matplotlib only when evaluating)
  figures = pictures.save_eval_figures(os.path.splitext(output)[0] + "_", scores, labels,
                                       finetune_pipeline.head_sizes(config),
                                       finetune_pipeline.label_kind(config) == "multi_label")
  views = {**scored["view_args"], "views_per_record": settings.num_clips * settings.num_crops,
           "fully_convolutional": bool(settings.fully_convolutional)}
  which = checkpoint or ("newest" if requested is None else "step")
  results = {"workdir": os.path.abspath(workdir), "checkpoint": which, "checkpoint_step": int(step), "records": pattern,
             "num_records": len(ids), "views": views, "ensemble": settings.ensemble, "metrics": metrics,
             "per_class": scored["per_class"], "predictions": predictions, "figures": figures}
  with atomic_files.atomic_write(output, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  if os.path.exists(partial):
    os.remove(partial)
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
  checkpoint, step = "", None
  if f.checkpoint:
    logging.warning("--checkpoint is deprecated: name the folder with --workdir and the step with --step.")
    checkpoint = f.checkpoint
  if f.step:
    if f.step == "best":
      checkpoint = "best"
    elif f.step.isdigit():
      step = int(f.step)
    else:
      raise app.UsageError(f"--step={f.step}: give a step number or 'best' (empty: the newest)")
  output = f.output
  if output:
    logging.warning("--output is deprecated: use --output_dir (the results file is <output_dir>/results.json).")
  results = evaluate(f.config, f.workdir, f.records or "", output, f.predictions, checkpoint, step=step,
                     output_dir=f.output_dir, save_every=f.save_every, log_every=f.log_every)
  print(json.dumps({"checkpoint_step": results["checkpoint_step"], "num_records": results["num_records"],
                    **results["metrics"]}, indent=None))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Required. The run's workdir (its checkpoints are opened read-only; eval "
                      "scalars are written under it), or a folder of models/import_weights.py or egoexo_jax.export.")
  config_flags.DEFINE_config_file("config", None, "Optional: the run's config file (path[:arg]); default "
                                  "<workdir>/config.json. When given it must match that file (eval.* may differ).")
  flags.DEFINE_string("step", "", "Checkpoint to evaluate: a step number, 'best' (<workdir>/best), or empty for the "
                      "newest.")
  flags.DEFINE_string("records", None, "Glob of the test record shards (default: convert eval.manifest).")
  flags.DEFINE_string("output_dir", None, "Folder for results[_step<N>].json, its predictions .npz and the partial "
                      "results of an interrupted run (default: --workdir).")
  flags.DEFINE_string("output", None, "Deprecated: the results JSON file itself (use --output_dir).")
  flags.DEFINE_string("predictions", None, "Predictions .npz (default: <results stem>_predictions.npz).")
  flags.DEFINE_string("checkpoint", "", "Deprecated: 'best' is --step=best; a folder of import_weights is --workdir.")
  flags.DEFINE_integer("save_every", 50, "Records between writes of the partial results (a rerun resumes there).")
  flags.DEFINE_integer("log_every", 10, "Records between progress lines.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(main)
