r"""SUM-L stage (c): the ego encoder f_f and task head g_f of a SUM-L run, evaluated on ego records.

  python -m egoexo_jax.suml_eval --workdir=runs/suml_small [--step=N] [--config=configs/suml_eval.py:small]

The run's config is the one it saved (<workdir>/config.json); --config is optional and must match it
(egoexo_jax/run_config.py), its `eval.*` settings applying (defaults: records '', batch_size 32).

Only the ego side of the checkpoint is read ('ego_backbone' or the shared 'backbone', 'ego_head_<i>');
the exo encoder, projections and discriminator are ignored. Protocol, deliberately minimal: one centre
clip and centre crop per record (ClipSampler with rng None). Metrics, by `data.ego_label_kind`:
  'single'       per head 'top1_<i>' and 'top5_<i>' (top-5 only for heads of more than 5 classes), and
                 'top1' = every head right (EPIC-Kitchens' action accuracy; with one head, plain top-1).
  'multi_label'  'mAP': mean over classes with at least one positive of the average precision
                 (as sklearn.metrics.average_precision_score, ties grouped), Charades-Ego's measure.
The JSON written to --output (default <workdir>/suml_eval.json) holds the metrics, the number of
records, the checkpoint step folder and the record glob.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from egoexo_jax import atomic_files, checkpointing, run_config
from egoexo_jax.evaluate import mean_average_precision, top_k_accuracy
from egoexo_jax.input import prepared_records, sources, suml_pipeline, transforms
from egoexo_jax.models import build_model


# --------------------------------------------------------------------------- metrics


def classification_metrics(logits: Sequence[np.ndarray], targets: np.ndarray, kind: str) -> dict[str, float]:
  """Metrics of per-head logits [(N, K_i)] against 'single' labels (N, H) or 'multi_label' targets (N, sum K)."""
  if kind == "multi_label":
    return {"mAP": mean_average_precision(targets, np.concatenate(logits, axis=1))[0]}
  metrics, all_right = {}, np.ones(len(targets), bool)
  for i, head in enumerate(logits):
    ranked = np.argsort(-head, axis=1, kind="stable")
    right = ranked[:, 0] == targets[:, i]
    all_right &= right
    metrics[f"top1_{i}"] = float(right.mean())
    if head.shape[1] > 5:
      metrics[f"top5_{i}"] = top_k_accuracy(head, targets[:, i], ks=(5,))[5]
  metrics["top1"] = float(all_right.mean())
  return metrics


# --------------------------------------------------------------------------- the ego model


def load_ego_variables(model, config, checkpoint: str, step: int | None = None) -> tuple[dict, str]:
  """The ego side's variables from a SUM-L checkpoint (a workdir, its checkpoints/ or a step folder;
  with `step`, that step of the workdir's checkpoints/).

  Returns (variables {'params', 'batch_stats'} shaped as the ego-only model, the step folder read).
  """
  data = config.data
  clips = jnp.zeros((1, data.clip_length, data.crop_size, data.crop_size, 3), jnp.float32)
  wanted = jax.eval_shape(lambda: model.init(jax.random.key(0), clips, None, train=False))
  step_dir = (checkpointing.latest_step_dir(checkpoint) if step is None
              else os.path.join(os.path.abspath(checkpoint), "checkpoints", str(step)))
  if not os.path.isdir(os.path.join(step_dir, checkpointing.STATE)):
    raise FileNotFoundError(f"no checkpoint at {step_dir}")
  saved = ocp.StandardCheckpointer().restore(os.path.join(step_dir, checkpointing.STATE))
  variables = {}
  for collection, tree in wanted.items():
    variables[collection] = {}
    for name, subtree in tree.items():
      source = saved.get(collection, {}).get(name)
      if source is None:
        raise KeyError(f"{step_dir}: the checkpoint has no '{collection}/{name}' (is it a SUM-L stage (b) run?)")
      shapes_saved = jax.tree.map(np.shape, source)
      shapes_wanted = jax.tree.map(lambda x: x.shape, subtree)
      if shapes_saved != shapes_wanted:
        raise ValueError(f"{step_dir}: '{collection}/{name}' does not match the configured model "
                         f"(check model.backbone_args and model.ego_num_classes)")
      variables[collection][name] = jax.tree.map(jnp.asarray, source)
  return variables, step_dir


def predict(model, variables, source, config, batch_size: int) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
  """Per-head logits [(N, K_i)], targets (suml_pipeline.view_labels) and ids of every record of `source`."""
  sampler = suml_pipeline.clip_sampler(config)
  heads = suml_pipeline.view_heads(config, "ego")
  dtype = jnp.dtype(config.model.dtype)

  @jax.jit
  def forward(clips):
    outputs = model.apply(variables, transforms.normalize_clips(clips, dtype), None, train=False)
    return outputs["ego_logits"]

  logits, targets, ids = [], [], []
  for start in range(0, len(source), batch_size):
    batch = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    clips = np.stack([sampler(record, None) for record in batch])
    pad = batch_size - len(batch)  # a fixed batch shape compiles once
    outputs = forward(np.concatenate([clips, np.zeros((pad, *clips.shape[1:]), clips.dtype)]))
    logits.append([np.asarray(head)[:len(batch)] for head in outputs])
    targets += [suml_pipeline.view_labels(r, heads, ego_label_kind(config), "ego") for r in batch]
    ids += [r.video_id for r in batch]
  per_head = [np.concatenate([chunk[h] for chunk in logits]) for h in range(len(logits[0]))]
  return per_head, np.stack(targets), ids


def ego_label_kind(config) -> str:
  """`data.ego_label_kind` ('single' | 'multi_label'; `data.ego_labels` in configs from before that name)."""
  return config.data.get("ego_label_kind", None) or config.data.get("ego_labels", "single")


def eval_settings(config):
  """`config.eval` over the defaults (records '': the ego manifest converted into the workdir; batch 32)."""
  given = config.get("eval", None)
  return {"records": "", "checkpoint": "", "batch_size": 32, **(given.to_dict() if given is not None else {})}


def evaluate(config, workdir: str, output: str | None = None, step: int | None = None) -> dict:
  """Stage (c): evaluates the newest checkpoint (or `step`) of `workdir` on `eval.records` (default: the ego
  manifest converted into the workdir) and writes JSON. `config` None: the run's saved config; given, it is
  checked against that (run_config.resolve). `eval.checkpoint` (deprecated) reads another run's weights."""
  workdir = os.path.abspath(workdir)
  config = run_config.resolve(workdir, config)
  settings = eval_settings(config)
  if settings["checkpoint"]:
    logging.warning("config eval.checkpoint is deprecated: name the run with --workdir (and --step).")
  model = build_model(config.model, "suml")
  variables, step_dir = load_ego_variables(model, config, settings["checkpoint"] or workdir, step)
  pattern = settings["records"] or prepared_records.view_records(config, workdir, "ego")
  logits, targets, ids = predict(model, variables, sources.open_records(pattern), config, settings["batch_size"])
  kind = ego_label_kind(config)
  result = {"metrics": classification_metrics(logits, targets, kind), "num_records": len(ids),
            "checkpoint": step_dir, "records": pattern, "labels": kind,
            "protocol": "1 centre clip x 1 centre crop"}
  output = output or os.path.join(workdir, "suml_eval.json")
  with atomic_files.atomic_write(output, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  logging.info("SUM-L ego evaluation of %s on %d records: %s -> %s", step_dir, len(ids), result["metrics"], output)
  return result


# --------------------------------------------------------------------------- command line


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Required. The SUM-L run (stage (b)) to evaluate.")
  config_flags.DEFINE_config_file("config", None, "Optional: configs/suml_eval.py[:arg] with the run's argument; "
                                  "default <workdir>/config.json, which it must match.", lock_config=False)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_string("output_dir", None, "Folder for suml_eval.json (default: --workdir).")
  flags.DEFINE_string("output", None, "Deprecated: the JSON file itself (use --output_dir).")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  output = f.output or (os.path.join(f.output_dir, "suml_eval.json") if f.output_dir else None)
  result = evaluate(f.config, f.workdir, output, f.step)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(main)
