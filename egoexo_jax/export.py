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

The card is gathered by egoexo_jax/model_card.py. Metrics come from the workdir's TensorBoard event files
(the trainer's `train/*` scalars, evaluate's `eval/*`) and from `results*.json` files in the workdir:
'final' is each scalar's last value, 'best' its minimum (losses, times) or maximum (accuracies, mAP ...).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from egoexo_jax import atomic_files, checkpointing, model_card, pretrained


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


def serialize_forward(module, part: str, variables: Any, input_shape: Sequence[int], compute_dtype: Any,
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
                 "inputs": {"variables": f"state/'s {{'params', 'batch_stats'}}" + (
                                "" if part == "model" else f", each collection's '{part}' subtree: "
                                                           f"{{c: tree[c]['{part}']}}"),
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
  if part == "model":
    return {c: dict(v) for c, v in variables.items()}
  if part not in variables["params"]:
    raise ValueError(f"the checkpoint has no parameter subtree '{part}' (it has {sorted(variables['params'])})")
  return {c: {part: v[part]} for c, v in variables.items() if part in v}


def export(workdir: str, output_dir: str, *, config: ml_collections.ConfigDict | None = None,
           step: int | None = None, dtype: str = "float32", part: str = "model", forward: bool = True,
           forward_batch: int = 1, pyslowfast: bool = False) -> dict[str, Any]:
  """Writes the export folder `output_dir` (module docstring) from `workdir`; returns the model card."""
  workdir, output_dir = os.path.abspath(workdir), os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    raise FileExistsError(f"{output_dir} exists; remove it or choose another --output_dir")
  if part not in pretrained.PARTS:
    raise ValueError(f"unknown --part '{part}': use one of {pretrained.PARTS}")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype must be float32 or bfloat16, not '{dtype}'")
  config, config_source = model_card.load_run_config(workdir, config)
  if pyslowfast and (part == "encoder" or "backbone" not in config.model):
    raise ValueError("--pyslowfast exports video backbones; the EVGAP encoder has no PySlowFast form")
  step_dir = (os.path.join(workdir, "checkpoints", str(step)) if step is not None
              else checkpointing.latest_step_dir(workdir))
  if not os.path.isdir(os.path.join(step_dir, checkpointing.STATE)):
    folder = os.path.dirname(step_dir)
    steps = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(f"no checkpoint at {step_dir} (steps there: {steps})")
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
    module = pretrained.part_module(model_dict, part, config.objective)
    unwrapped = variables if part == "model" else {c: v[part] for c, v in variables.items()}
    batch_input = model_card.input_spec(config, part, forward_batch)["shape"]
    forward_info = None
    if forward:
      blob, forward_info = serialize_forward(module, part, unwrapped, batch_input,
                                             jnp.dtype(model_dict.get("dtype", "float32")))
      with open(os.path.join(temporary, pretrained.FORWARD), "wb") as f:
        f.write(blob)
    pyth_info = None
    if pyslowfast:
      from egoexo_jax.models import export_weights  # pylint: disable=g-import-not-at-top
      if part != "model":
        unwrapped = {c: {"backbone": v} for c, v in unwrapped.items()}
      pyth_info = export_weights.export_pyth(unwrapped, model_dict, os.path.join(temporary, pretrained.PYSLOWFAST),
                                             data_config=config.data.to_dict(), epoch=step_number)
    card = model_card.model_card(config, config_source, workdir=workdir, step_dir=step_dir, step=step_number,
                                 part=part, dtype=dtype, variables=variables, forward=forward_info, pyth=pyth_info,
                                 batch=forward_batch)
    card["files"]["state_bytes"] = model_card.folder_bytes(os.path.join(temporary, checkpointing.STATE))
    card["files"]["total_bytes"] = model_card.folder_bytes(temporary)
    with open(os.path.join(temporary, pretrained.CARD), "w") as f:
      json.dump(card, f, indent=1)
    with open(os.path.join(temporary, pretrained.CARD_MARKDOWN), "w") as f:
      f.write(model_card.card_markdown(card))
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
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
