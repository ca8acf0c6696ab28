"""The model card of an export (egoexo_jax/export.py): what the exported network is, from what, how to feed it.

`model_card` gathers: objective, model and backbone, part, parameter count, input spec (`input_spec`),
the resolved config and where it came from (`load_run_config`: `<workdir>/config.json`, else --config),
the recipe (config field `recipe`, when the config has one), the record sets the run read (`data_seen`:
files, bytes, records from the converter's summary JSON), step, final and best metrics (`read_metrics`:
TensorBoard event files read without TensorFlow, and `results*.json`), the git commit and the export
date. `card_markdown` renders the short human-readable version.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import subprocess
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from egoexo_jax import pretrained

_LOWER_IS_BETTER = ("loss", "error", "wait", "rss", "memory", "seconds", "time")


# --------------------------------------------------------------------------- what the run was


def load_run_config(workdir: str, config: ml_collections.ConfigDict | None) -> tuple[ml_collections.ConfigDict, str]:
  """(config, where it came from): `<workdir>/config.json` if present, else `config` (--config)."""
  recorded = os.path.join(workdir, "config.json")
  if os.path.isfile(recorded):
    with open(recorded) as f:
      saved = ml_collections.ConfigDict(json.load(f))
    if config is not None:
      pretrained.check_config({"part": "model", "objective": saved.get("objective", ""), "model": saved.model.to_dict()},
                              config, where=recorded)
    return saved, recorded
  if config is None:
    raise ValueError(f"{workdir} records no config.json: pass the run's config with --config=path[:arg]")
  return config, "--config"


def git_version() -> dict[str, Any]:
  """{'git_commit', 'git_dirty'} of the checkout holding this package; 'unknown' outside a git checkout."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                            timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, check=True, timeout=30).stdout.strip()
    return {"git_commit": commit, "git_dirty": bool(dirty)}
  except (OSError, subprocess.SubprocessError):
    return {"git_commit": "unknown", "git_dirty": None}


def folder_bytes(path: str) -> int:
  """Bytes of the files under `path` (or of the file `path`)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _record_set(pattern: str) -> dict[str, Any]:
  """Files of a record glob (or prefix), their bytes, and the record count from the converter's summary."""
  files = sorted(glob.glob(pattern)) or sorted(glob.glob(pattern + "*"))
  files = [f for f in files if not f.endswith(".json")]
  entry: dict[str, Any] = {"pattern": pattern, "files": len(files), "bytes": sum(os.path.getsize(f) for f in files)}
  summaries = {f.split(".tfrecord")[0].split(".array_record")[0] + ".json" for f in files}
  counts = []
  for summary in sorted(s for s in summaries if os.path.isfile(s)):
    with open(summary) as f:
      content = json.load(f)
    counts.append(content.get("num_records"))
    entry.setdefault("summaries", {})[os.path.basename(summary)] = {
        k: content[k] for k in ("manifest", "num_records", "labels", "teacher_files") if k in content}
  if counts and None not in counts:
    entry["records"] = int(sum(counts))
  return entry


def data_seen(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The record sets the run read: every non-empty config.data '*records*' glob, else the records the
  trainer converted into the workdir (records/, feature_records/), with counts where a summary exists."""
  data = config.get("data", ml_collections.ConfigDict()).to_dict()
  sets = {key: _record_set(value) for key, value in data.items()
          if "records" in key and isinstance(value, str) and value}
  for folder in ("records", "feature_records"):
    for summary in sorted(glob.glob(os.path.join(workdir, folder, "*.json"))):
      name = f"{folder}/{os.path.basename(summary)[:-5]}"
      if not any(s["pattern"].startswith(summary[:-5]) for s in sets.values()):
        sets[name] = _record_set(summary[:-5])
  manifests = {k: v for k, v in data.items() if ("manifest" in k or k in ("pairs", "ego_logits", "object_logits",
                                                                           "hand_object_dir")) and v}
  return {"record_sets": sets, "sources": manifests}


_TENSOR_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}  # TensorProto DataType


def _scalar(tensor) -> float | None:
  """The value of a one-element numeric TensorProto (as TF2 summaries store scalars), else None."""
  dtype = _TENSOR_DTYPES.get(tensor.dtype)
  if dtype is None or int(np.prod([d.size for d in tensor.tensor_shape.dim])) != 1:
    return None
  if tensor.tensor_content:
    return float(np.frombuffer(tensor.tensor_content, dtype)[0])
  for field in (tensor.float_val, tensor.double_val, tensor.int_val, tensor.int64_val):
    if len(field):
      return float(field[0])
  return None


def event_scalars(path: str):
  """Yields (tag, step, value) of the scalar summaries of one TensorBoard event file, read as TFRecords
  (input/records.py) with TensorBoard's protos: no TensorFlow. A record cut short by a writer still
  running ends the file."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from egoexo_jax.input import records  # pylint: disable=g-import-not-at-top
  fd = os.open(path, os.O_RDONLY)
  try:
    for offset, length in records.scan_tfrecord(path):
      event = event_pb2.Event.FromString(records.read_tfrecord_at(fd, offset, length, path))
      for value in event.summary.value:
        number = value.simple_value if value.HasField("simple_value") else (
            _scalar(value.tensor) if value.HasField("tensor") else None)
        if number is not None:
          yield value.tag, int(event.step), float(number)
  except records.RecordError as e:
    logging.warning("Event file read up to a damaged or unfinished record: %s", e)
  finally:
    os.close(fd)


def _event_file_time(path: str) -> tuple[int, str]:
  """Sort key of an event file: the creation time in its name ('events.out.tfevents.<time>.<host>...')."""
  stamp = os.path.basename(path).split(".tfevents.")[1].split(".")[0]
  return (int(stamp) if stamp.isdigit() else 0, path)


def read_metrics(workdir: str, up_to_step: int | None = None) -> dict[str, Any]:
  """{'source', 'final': {tag: {step, value}}, 'best': {tag: {step, value, mode}}} from the TensorBoard
  event files under `workdir` (not under checkpoints/) and the `results*.json` files in it.

  Only steps up to `up_to_step` (the exported checkpoint's) count, and only results of that checkpoint
  (their 'checkpoint_step'). A step logged twice (a run resumed from an earlier checkpoint) keeps the
  value of the newer event file.
  """
  final, best, sources = {}, {}, []
  event_files = sorted((os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files if ".tfevents." in f
                        and "checkpoints" not in os.path.relpath(d, workdir).split(os.sep)), key=_event_file_time)
  series: dict[str, dict[int, float]] = {}
  for path in event_files:
    sources.append(os.path.relpath(path, workdir))
    for tag, step, value in event_scalars(path):
      if "/" in tag and (up_to_step is None or step <= up_to_step):  # no '/': clu's own 'uptime' and the like
        series.setdefault(tag, {})[step] = value
  for tag, values in series.items():
    points = sorted(values.items())
    final[tag] = {"step": points[-1][0], "value": points[-1][1]}
    lower = any(word in tag.split("/")[-1] for word in _LOWER_IS_BETTER)
    step, value = (min if lower else max)(points, key=lambda p: p[1])
    best[tag] = {"step": step, "value": value, "mode": "min" if lower else "max"}
  for results in sorted(glob.glob(os.path.join(workdir, "results*.json"))):
    with open(results) as f:
      content = json.load(f)
    if up_to_step is not None and content.get("checkpoint_step", up_to_step) != up_to_step:
      continue
    metrics = content.get("metrics", content)
    sources.append(os.path.basename(results))
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        final[f"{os.path.basename(results)}/{key}"] = {"step": content.get("checkpoint_step"), "value": float(value)}
  return {"source": ("TensorBoard event files and results: " + ", ".join(sources)) if sources else "none found",
          "up_to_step": up_to_step, "final": final, "best": best}


def input_spec(config: ml_collections.ConfigDict, part: str, batch: int) -> dict[str, Any]:
  """What the part eats: shape, dtype and, for video, frames, stride, crop and normalisation."""
  data = config.data
  if config.get("objective") == "evgap":
    frames = int(data.window_frames)
    return {"kind": "feature windows", "shape": [batch, frames, int(data.feature_dim)], "dtype": "float32",
            "window_frames": frames, "window_stride": int(data.get("window_stride", 0)),
            "feature_dim": int(data.feature_dim),
            "note": "per-frame features (B, T, C), e.g. TSM features; padded frames masked with mask (B, T)"}
  from egoexo_jax.input import transforms  # pylint: disable=g-import-not-at-top
  frames, crop = int(data.clip_length), int(data.crop_size)
  spec = {"kind": "video clips", "shape": [batch, frames, crop, crop, 3], "layout": "(B, T, H, W, RGB)",
          "frames": frames, "frame_stride": int(data.get("frame_stride", 1)), "crop_size": crop,
          "short_side_range": [data.get("min_short_side"), data.get("max_short_side")],
          "mean": [transforms.MEAN] * 3, "std": [transforms.STD] * 3,
          "dtype": "uint8 pixels to forward.jax_export; float (x / 255 - mean) / std to model.apply",
          "compute_dtype": str(config.model.get("dtype", "float32"))}
  if str(config.model.get("backbone", "")).startswith("slowfast"):
    spec["pathways"] = "the clip feeds the Fast pathway; the Slow pathway takes T / alpha of its frames inside"
  if "eval" in config:
    spec["test_views"] = {k: v for k, v in config.eval.to_dict().items()
                          if k in ("num_clips", "num_crops", "short_side", "crop_size")}
  return spec


def model_card(config, config_source: str, *, workdir: str, step_dir: str, step: int, part: str, dtype: str,
               variables: Mapping[str, Any], forward: dict | None, pyth: dict | None, batch: int) -> dict[str, Any]:
  """The model card (JSON-serialisable)."""
  model = config.model.to_dict()
  num_parameters = int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))
  recipe = config.get("recipe")
  recipe = recipe.to_dict() if isinstance(recipe, ml_collections.ConfigDict) else recipe
  return json.loads(json.dumps({
      "format": pretrained.FORMAT,
      "part": part,
      "part_description": pretrained.PART_DESCRIPTIONS[part],
      "objective": config.get("objective"),
      "model": model,
      "backbone": model.get("backbone"),
      "backbone_args": model.get("backbone_args"),
      "num_parameters": num_parameters,
      "dtype": dtype,
      "input": input_spec(config, part, batch),
      "training": {"step": int(step), "num_train_steps": config.get("num_train_steps"),
                   "global_batch_size": config.get("global_batch_size"),
                   "examples_seen": int(step) * int(config.get("global_batch_size", 0))},
      "metrics": read_metrics(workdir, up_to_step=int(step)),
      "recipe": recipe if recipe else "none recorded (the config has no 'recipe' field)",
      "data": data_seen(config, workdir),
      "config": config.to_dict(),
      "config_source": config_source,
      "source": {"workdir": os.path.abspath(workdir), "checkpoint": step_dir,
                 "checkpoint_bytes": folder_bytes(step_dir)},
      "version": git_version(),
      "libraries": {"jax": jax.__version__, "flax": _version("flax"), "orbax-checkpoint": _version("orbax-checkpoint")},
      "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "files": {"state": "state/ (Orbax)", "model_card": pretrained.CARD, "readme": pretrained.CARD_MARKDOWN,
                "forward": forward, "pyslowfast": pyth},
  }, default=str))


def _version(package: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "unknown"


def card_markdown(card: Mapping[str, Any]) -> str:
  """A short human-readable rendering of the card."""
  spec, training, metrics = card["input"], card["training"], card["metrics"]
  from egoexo_jax import pretrained  # pylint: disable=g-import-not-at-top
  lines = [f"# {card['objective']} / {pretrained.model_name(card)}: {card['part']}", "",
           f"- Part: `{card['part']}` of model `{pretrained.model_name(card)}` ({card['part_description']})"
           + (f", backbone `{card['backbone']}` {card['backbone_args'] or ''}" if card.get("backbone") else ""),
           f"- Parameters: {card['num_parameters']:,} ({card['dtype']})",
           f"- Trained: step {training['step']} of {training['num_train_steps']}, global batch "
           f"{training['global_batch_size']} ({training['examples_seen']:,} examples)",
           f"- Input: {spec['kind']} {spec['shape']}"
           + (f", {spec['frames']} frames at stride {spec['frame_stride']}, crop {spec['crop_size']}, "
              f"mean {spec['mean'][0]} std {spec['std'][0]}" if "frames" in spec else ""),
           f"- Recipe: {card['recipe'] if isinstance(card['recipe'], str) else json.dumps(card['recipe'])}",
           "- Data: " + "; ".join(f"{name}: {s['files']} files" + (f", {s['records']} records" if "records" in s
                                                                     else "")
                                  for name, s in card["data"]["record_sets"].items()),
           f"- Version: {card['version']['git_commit']}" + (" (uncommitted changes)" if card["version"]["git_dirty"]
                                                            else "") + f", exported {card['exported_at']}",
           f"- Metrics ({metrics['source']}):"]
  for tag in sorted(metrics["final"]):
    if any(skip in tag for skip in ("steps_per_sec", "clips_per_sec", "uptime", "rss", "learning_rate")):
      continue
    best = metrics["best"].get(tag)
    lines.append(f"  - {tag}: final {metrics['final'][tag]['value']:.4g}"
                 + (f", best {best['value']:.4g} at step {best['step']}" if best else ""))
  lines += ["", "Files: `state/` (Orbax variables), `model_card.json` (everything above and the full config)"
            + (", `forward.jax_export` (jax.export)" if card["files"]["forward"] else "")
            + (", `pyslowfast.pyth` (PySlowFast state dict)" if card["files"]["pyslowfast"] else "") + ".",
            "", "```python", "import egoexo_jax", f"model, variables = egoexo_jax.load_pretrained('<this folder>')",
            "```", ""]
  return "\n".join(lines)
