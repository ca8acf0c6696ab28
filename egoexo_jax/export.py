r"""Exports a trained run for inference and sharing: variables, a model card, a serialised forward function.

  python -m egoexo_jax.export --workdir=runs/egoexo_small --config=configs/egoexo.py:small \
      --output_dir=exports/egoexo_small [--step=300] [--dtype=bfloat16] [--part=model] [--pyslowfast]

writes `--output_dir` (created whole under a temporary name, then renamed; an existing folder is an error):

  state/              Orbax checkpoint of the inference variables {'params', 'batch_stats'} of `--part`
                      (no optimiser state, no data position), in `--dtype` (float32 or bfloat16)
  model_card.json     what the export is: objective, model and backbone, part, parameter count, input
                      spec, the resolved config, recipe, data seen, step, final and best metrics, version
  MODEL_CARD.md       the same, short and readable
  forward.jax_export  `jax.export` of the part's inference function for one input shape (`--forward_batch`
                      clips of the config's size): `jax.export.deserialize(bytes).call(variables, inputs)`,
                      no egoexo_jax code needed (--noforward to skip)
  pyslowfast.pyth     with --pyslowfast: backbone and heads in PySlowFast's names and layouts
                      (models/export_weights.py), for Slow-only, SlowFast and I3D backbones

`--part` (pretrained.PARTS): 'model' (default), a video backbone ('backbone'; SUM-L's ego encoder
'ego_backbone'), or EVGAP's sequence encoder 'encoder'. The config: `<workdir>/config.json` when the
run wrote one, else `--config` (as main.py's; both given: they must agree on the model). `--output_dir`
(the project's name for output folders); `--output` is accepted as its alias (issue 21's wording).
Load the result with `egoexo_jax.load_pretrained(DIR)`; `--config.init_from=DIR`, `evaluate --workdir=DIR`,
`downstream.extract --checkpoint=DIR` and `ego_score --workdir=DIR` read it too.

Metrics come from the workdir's TensorBoard event files (the trainer's `train/*` scalars, evaluate's
`eval/*`) and from `results*.json` files in the workdir: 'final' is each scalar's last value, 'best'
its minimum (losses, times) or maximum (accuracies, mAP, recall, F1 ...).
"""

from __future__ import annotations

import datetime
import functools
import glob
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from egoexo_jax import atomic_files, checkpointing, pretrained

_LOWER_IS_BETTER = ("loss", "error", "wait", "rss", "memory", "seconds", "time")


# --------------------------------------------------------------------------- what the run was


def load_run_config(workdir: str, config: ml_collections.ConfigDict | None) -> tuple[ml_collections.ConfigDict, str]:
  """(config, where it came from): `<workdir>/config.json` if present, else `config` (--config)."""
  recorded = os.path.join(workdir, "config.json")
  if os.path.isfile(recorded):
    with open(recorded) as f:
      saved = ml_collections.ConfigDict(json.load(f))
    if config is not None:
      pretrained.check_config({"part": "model", "model": saved.model.to_dict()}, config, where=recorded)
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
    for key in ("manifest", "num_classes_seen"):
      if key in content:
        entry.setdefault("summaries", {})[os.path.basename(summary)] = {
            k: content[k] for k in ("manifest", "num_records", "labels", "teacher_files") if k in content}
  if counts and None not in counts:
    entry["records"] = int(sum(counts))
  return entry


def data_seen(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The record sets the run read: every non-empty config.data '*records*' glob, else the records the
  trainer converted into the workdir (records/, feature_records/), with counts where a summary exists."""
  data = config.get("data", ml_collections.ConfigDict()).to_dict()
  sets = {key: _record_set(value) for key, value in data.items() if "records" in key and isinstance(value, str) and value}
  for folder in ("records", "feature_records"):
    for summary in sorted(glob.glob(os.path.join(workdir, folder, "*.json"))):
      name = f"{folder}/{os.path.basename(summary)[:-5]}"
      if not any(s["pattern"].startswith(summary[:-5]) for s in sets.values()):
        sets[name] = _record_set(summary[:-5])
  manifests = {k: v for k, v in data.items() if ("manifest" in k or k in ("pairs", "ego_logits", "object_logits",
                                                                           "hand_object_dir")) and v}
  return {"record_sets": sets, "sources": manifests}


def read_metrics(workdir: str) -> dict[str, Any]:
  """{'source', 'final': {tag: {step, value}}, 'best': {tag: {step, value}}} from TensorBoard event files
  under `workdir` (not under checkpoints/) and `results*.json` files in it."""
  final, best, sources = {}, {}, []
  event_dirs = sorted({d for d, _, files in os.walk(workdir) if any(".tfevents." in f for f in files)
                       and "checkpoints" not in os.path.relpath(d, workdir).split(os.sep)})
  if event_dirs:
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
    from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
    for directory in event_dirs:
      accumulator = event_accumulator.EventAccumulator(directory, size_guidance={"tensors": 0, "scalars": 0})
      accumulator.Reload()
      sources.append(os.path.relpath(directory, workdir))
      series = {}
      for tag in accumulator.Tags().get("tensors", []):
        values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)]
        series[tag] = [(s, float(v)) for s, v in values if np.size(v) == 1 and np.issubdtype(np.asarray(v).dtype, np.number)]
      for tag in accumulator.Tags().get("scalars", []):
        series[tag] = [(e.step, float(e.value)) for e in accumulator.Scalars(tag)]
      for tag, points in series.items():
        if not points or "/" not in tag:
          continue
        final[tag] = {"step": int(points[-1][0]), "value": points[-1][1]}
        lower = any(word in tag.split("/")[-1] for word in _LOWER_IS_BETTER)
        step, value = (min if lower else max)(points, key=lambda p: p[1])
        best[tag] = {"step": int(step), "value": value, "mode": "min" if lower else "max"}
  for results in sorted(glob.glob(os.path.join(workdir, "results*.json"))):
    with open(results) as f:
      content = json.load(f)
    metrics = content.get("metrics", content)
    sources.append(os.path.basename(results))
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        final[f"{os.path.basename(results)}/{key}"] = {"step": content.get("checkpoint_step"), "value": float(value)}
  return {"source": ("TensorBoard event files in " + ", ".join(sources)) if sources else "none found",
          "final": final, "best": best}


def input_spec(config: ml_collections.ConfigDict, part: str, batch: int) -> dict[str, Any]:
  """What the part eats: shape, dtype and, for video, frames, stride, crop and normalisation."""
  data = config.data
  if config.model.name == "evgap":
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
  if "evaluate" in config:
    spec["test_views"] = {k: v for k, v in config.evaluate.to_dict().items()
                          if k in ("num_clips", "num_crops", "short_side", "crop_size")}
  return spec


# --------------------------------------------------------------------------- the forward function


def forward_function(module, part: str, dtype: Any):
  """f(variables, inputs) -> outputs of the part in inference mode; video inputs are uint8 clips,
  normalised inside (transforms.normalize_clips), EVGAP inputs float32 windows."""
  from egoexo_jax.input import transforms  # pylint: disable=g-import-not-at-top

  if part == "encoder" or getattr(module, "__module__", "").endswith("evgap"):
    return lambda variables, windows: module.apply(variables, windows, train=False)

  def forward(variables, clips):
    return module.apply(variables, transforms.normalize_clips(clips, dtype), train=False)
  return forward


def serialise_forward(module, part: str, variables: Any, input_shape: Sequence[int], compute_dtype: Any,
                      platforms: Sequence[str] = ("cpu", "cuda", "tpu")) -> tuple[bytes, dict[str, Any]]:
  """(bytes of jax.export's Exported, its description) of the part's forward for one input shape.

  Lowered for every platform of `platforms` that lowers here (XLA can lower for GPUs and TPUs on a CPU
  host), else for this host's platform alone.
  """
  evgap = len(input_shape) == 3
  inputs = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32 if evgap else jnp.uint8)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  function = jax.jit(forward_function(module, part, compute_dtype))
  try:
    exported = jax.export.export(function, platforms=tuple(platforms))(abstract, inputs)
  except Exception as e:  # pylint: disable=broad-except  (a platform that cannot lower this program)
    logging.warning("Lowering for %s failed (%s); exporting for %s only.", platforms, e, jax.default_backend())
    exported = jax.export.export(function)(abstract, inputs)
  description = {"file": pretrained.FORWARD, "platforms": list(exported.platforms),
                 "inputs": {"variables": "the {'params', 'batch_stats'} of state/ (part subtrees unwrapped)",
                            "x": {"shape": list(inputs.shape), "dtype": str(inputs.dtype)}},
                 "outputs": jax.tree.map(lambda a: {"shape": list(a.shape), "dtype": str(a.dtype)},
                                         jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)),
                 "call": "jax.export.deserialize(open(file, 'rb').read()).call(variables, x)"}
  return bytes(exported.serialize()), description


# --------------------------------------------------------------------------- export


def _cast(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
                      else np.asarray(x), tree)


def select_part(variables: Mapping[str, Any], part: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} of the whole model ('model') or of the subtree `part` (kept under its name)."""
  if part not in pretrained.PARTS:
    raise ValueError(f"unknown --part '{part}': use one of {pretrained.PARTS}")
  if part == "model":
    return {c: dict(v) for c, v in variables.items()}
  if part not in variables["params"]:
    raise ValueError(f"the checkpoint has no parameter subtree '{part}' (it has {sorted(variables['params'])})")
  return {c: {part: v[part]} for c, v in variables.items() if part in v}


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
      "metrics": read_metrics(workdir),
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
  lines = [f"# {card['objective']} / {card['model'].get('name')}: {card['part']}", "",
           f"- Part: `{card['part']}` of model `{card['model'].get('name')}`"
           + (f", backbone `{card['backbone']}` {card['backbone_args'] or ''}" if card.get("backbone") else ""),
           f"- Parameters: {card['num_parameters']:,} ({card['dtype']})",
           f"- Trained: step {training['step']} of {training['num_train_steps']}, global batch "
           f"{training['global_batch_size']} ({training['examples_seen']:,} examples)",
           f"- Input: {spec['kind']} {spec['shape']}"
           + (f", {spec['frames']} frames at stride {spec['frame_stride']}, crop {spec['crop_size']}, "
              f"mean {spec['mean'][0]} std {spec['std'][0]}" if "frames" in spec else ""),
           f"- Recipe: {card['recipe'] if isinstance(card['recipe'], str) else json.dumps(card['recipe'])}",
           "- Data: " + "; ".join(f"{name}: {s['files']} files" + (f", {s['records']} records" if "records" in s else "")
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


def export(workdir: str, output_dir: str, *, config: ml_collections.ConfigDict | None = None,
           step: int | None = None, dtype: str = "float32", part: str = "model", forward: bool = True,
           forward_batch: int = 1, pyslowfast: bool = False) -> dict[str, Any]:
  """Writes the export folder `output_dir` (module docstring) from `workdir`; returns the model card."""
  workdir, output_dir = os.path.abspath(workdir), os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    raise FileExistsError(f"{output_dir} exists; remove it or choose another --output_dir")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype must be float32 or bfloat16, not '{dtype}'")
  config, config_source = load_run_config(workdir, config)
  step_dir = (os.path.join(workdir, "checkpoints", str(step)) if step is not None
              else checkpointing.latest_step_dir(workdir))
  if not os.path.isdir(os.path.join(step_dir, checkpointing.STATE)):
    raise FileNotFoundError(f"no checkpoint at {step_dir} (steps there: "
                            f"{sorted(os.listdir(os.path.dirname(step_dir))) if os.path.isdir(os.path.dirname(step_dir)) else []})")
  saved = checkpointing.restore_on_this_host(os.path.join(step_dir, checkpointing.STATE))
  variables = select_part({"params": saved["params"], "batch_stats": saved.get("batch_stats", {})}, part)
  variables = _cast(variables, jnp.dtype(dtype))
  step_number = int(np.asarray(saved["step"])) if "step" in saved else int(os.path.basename(step_dir))
  del saved  # the optimiser state is not exported

  temporary = atomic_files.temporary_name(output_dir)
  shutil.rmtree(temporary, ignore_errors=True)
  os.makedirs(temporary)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(temporary, checkpointing.STATE), jax.tree.map(jnp.asarray, variables))
    checkpointer.wait_until_finished()
    checkpointer.close()
    model_dict = config.model.to_dict()
    module = pretrained.part_module(model_dict, part)
    unwrapped = variables if part == "model" else {c: v[part] for c, v in variables.items()}
    batch_input = input_spec(config, part, forward_batch)["shape"]
    forward_info = None
    if forward:
      blob, forward_info = serialise_forward(module, part, unwrapped, batch_input,
                                             jnp.dtype(model_dict.get("dtype", "float32")))
      with open(os.path.join(temporary, pretrained.FORWARD), "wb") as f:
        f.write(blob)
    pyth_info = None
    if pyslowfast:
      from egoexo_jax.models import export_weights  # pylint: disable=g-import-not-at-top
      if part == "encoder":
        raise ValueError("--pyslowfast exports video backbones; the EVGAP encoder has no PySlowFast form")
      if part != "model":
        unwrapped = {c: {"backbone": v} for c, v in unwrapped.items()}
      pyth_info = export_weights.export_pyth(unwrapped, model_dict, os.path.join(temporary, pretrained.PYSLOWFAST),
                                             data_config=config.data.to_dict(), epoch=step_number)
    card = model_card(config, config_source, workdir=workdir, step_dir=step_dir, step=step_number, part=part,
                      dtype=dtype, variables=variables, forward=forward_info, pyth=pyth_info, batch=forward_batch)
    card["files"]["state_bytes"] = folder_bytes(os.path.join(temporary, checkpointing.STATE))
    card["files"]["total_bytes"] = folder_bytes(temporary)
    with open(os.path.join(temporary, pretrained.CARD), "w") as f:
      json.dump(card, f, indent=1)
    with open(os.path.join(temporary, pretrained.CARD_MARKDOWN), "w") as f:
      f.write(card_markdown(card))
    os.rename(temporary, output_dir)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  return card


# --------------------------------------------------------------------------- CLI


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "The run's config (path[:arg]), when <workdir>/config.json is "
                                  "absent.", lock_config=False)
  flags.DEFINE_string("workdir", None, "The run's workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
  flags.DEFINE_string("output_dir", None, "Export folder to create.")
  flags.DEFINE_string("output", None, "Alias of --output_dir.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the exported variables.")
  flags.DEFINE_enum("part", "model", list(pretrained.PARTS), "What to export (egoexo_jax/pretrained.py).")
  flags.DEFINE_bool("forward", True, "Also write forward.jax_export (jax.export of the inference function).")
  flags.DEFINE_integer("forward_batch", 1, "Batch size of forward.jax_export's fixed input shape.")
  flags.DEFINE_bool("pyslowfast", False, "Also write pyslowfast.pyth (Slow-only, SlowFast and I3D backbones).")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if bool(f.output_dir) == bool(f.output):
    raise app.UsageError("give the export folder as --output_dir (or its alias --output), once")
  card = export(f.workdir, f.output_dir or f.output, config=f.config, step=f.step, dtype=f.dtype, part=f.part,
                forward=f.forward, forward_batch=f.forward_batch, pyslowfast=f.pyslowfast)
  print(json.dumps({"output_dir": os.path.abspath(f.output_dir or f.output), "part": card["part"],
                    "step": card["training"]["step"], "num_parameters": card["num_parameters"],
                    "export_bytes": card["files"]["total_bytes"], "state_bytes": card["files"]["state_bytes"],
                    "checkpoint_bytes": card["source"]["checkpoint_bytes"]}, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
