"""Exported models (egoexo_jax/export.py): one-call loading, and the checks that tie an export to a config.

An export folder holds `state/` (Orbax: {'params', 'batch_stats'} for inference), `model_card.json`
(what it is, from what, how to feed it) and `MODEL_CARD.md`, optionally `forward.jax_export` and
`pyslowfast.pyth` (export.py's docstring lists them). The card's `part` says which network it holds:

    model          the whole network of `config.model` (variables stored as the run had them)
    backbone, ego_backbone, exo_backbone
                   one video backbone (models/backbones.py), e.g. the SUM-L ego encoder
    encoder        the EVGAP sequence encoder (models/transformer.SequenceEncoder)

A part is stored under its own name ({'params': {'ego_backbone': ...}}), so `init_from` and
`checkpointing.load_backbone` read an export folder as they read a training checkpoint; `load_pretrained`
returns the part's own module and unwrapped variables, ready to `apply`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from egoexo_jax import checkpointing

CARD = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
FORWARD = "forward.jax_export"
PYSLOWFAST = "pyslowfast.pyth"
FORMAT = "egoexo_jax export 1"

VIDEO_BACKBONE_PARTS = ("backbone", "ego_backbone", "exo_backbone")
PARTS = ("model", *VIDEO_BACKBONE_PARTS, "encoder")
PART_DESCRIPTIONS = {
    "model": "the whole network of config.model, every head included",
    "backbone": "the video backbone (models/backbones.py): clips -> one feature map per pathway",
    "ego_backbone": "SUM-L's ego encoder f_f, a video backbone: clips -> one feature map per pathway",
    "exo_backbone": "SUM-L's exo encoder, a video backbone: clips -> one feature map per pathway",
    "encoder": "EVGAP's shared sequence encoder: feature windows (B, T, C) -> class tokens per layer, frame tokens",
}
# config.model fields each part depends on; 'model' compares every field but these (compute-only).
_PART_FIELDS = {**{p: ("backbone", "backbone_args") for p in VIDEO_BACKBONE_PARTS},
                "encoder": ("width", "num_layers", "num_heads", "mlp_dim", "max_length", "norm_first")}
_NOT_COMPARED = ("dtype", "param_dtype", "dropout_rate", "name")  # 'name': cards before config.objective alone


class ExportMismatchError(ValueError):
  """An export does not fit the config it is used with; the message names the field."""


def is_export(path: str) -> bool:
  """Whether `path` is an export folder (it holds a model card)."""
  return bool(path) and os.path.isfile(os.path.join(path, CARD))


def read_card(path: str) -> dict[str, Any]:
  """The model card of the export folder `path`."""
  card_path = os.path.join(path, CARD)
  try:
    with open(card_path) as f:
      card = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: not an export folder (no {CARD}); make one with "
                            "python -m egoexo_jax.export") from e
  if card.get("format") != FORMAT:
    raise ValueError(f"{card_path}: format '{card.get('format')}' is not '{FORMAT}'")
  return card


def resolve(path: str) -> tuple[str, dict[str, Any] | None]:
  """(folder holding `state/`, model card or None) of a workdir, its checkpoints/ folder, a step folder
  (newest step, checkpointing.latest_step_dir) or an export folder. The one resolution the trainer's
  init_from, evaluate, downstream.extract and the teachers share."""
  if is_export(path):
    return os.path.abspath(path), read_card(path)
  return checkpointing.latest_step_dir(path), None


def source_subtree(path: str, subtree: str) -> str:
  """The subtree to read from `path` for a requested `subtree`: when `path` is an export of one video
  backbone and `subtree` names a video backbone, the export's (so `init_from=<an ego_backbone export>`
  starts this run's 'backbone'); else `subtree`."""
  if subtree not in VIDEO_BACKBONE_PARTS or not is_export(path):
    return subtree
  part = read_card(path)["part"]
  return part if part in VIDEO_BACKBONE_PARTS else subtree


def _normalized(value: Any) -> Any:
  """A config value as JSON would give it back (tuples -> lists, ConfigDicts -> dicts), None -> {}."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value if value is not None else {}, default=str))


def check_config(card: Mapping[str, Any], config: ml_collections.ConfigDict, *, part: str | None = None,
                 where: str = "the export") -> None:
  """Raises ExportMismatchError naming the first config.model field (of those `part` depends on) whose
  value differs between the card and `config`. `part` defaults to the card's."""
  part = part or card["part"]
  saved, given = dict(card["model"]), config.model.to_dict()
  if part == "model":
    if model_name(card) != config.objective:
      raise ExportMismatchError(f"{where} holds a '{model_name(card)}' model, the config's objective is "
                                f"'{config.objective}'")
    # Fields of both: a field only one side has is a default added or dropped since (same network).
    fields = sorted((set(saved) & set(given)) - set(_NOT_COMPARED))
  else:
    fields = _PART_FIELDS[part]
  for field in fields:
    was, now = _normalized(saved.get(field)), _normalized(given.get(field))
    for name, (was, now) in _differences(f"model.{field}", was, _class_counts_as_saved(was, now)):
      raise ExportMismatchError(f"{where} was made with {name}={json.dumps(was)}, the config has "
                                f"{name}={json.dumps(now)}")


def _class_counts_as_saved(was: Any, now: Any) -> Any:
  """Class counts of cards written before they became {head: count}: an int (one head) or a list (heads in
  order) on the card compares with the config's dict's values."""
  if isinstance(now, dict) and all(isinstance(v, int) for v in now.values()):
    if isinstance(was, int) and len(now) == 1:
      return next(iter(now.values()))
    if isinstance(was, list):
      return list(now.values())
  return now


def _differences(name: str, was: Any, now: Any):
  """(dotted name, (card value, config value)) of each leaf that differs; dicts compared key by key."""
  if isinstance(was, dict) and isinstance(now, dict):
    for key in sorted(set(was) | set(now)):
      yield from _differences(f"{name}.{key}", was.get(key), now.get(key))
  elif was != now:
    yield name, (was, now)


def model_name(card: Mapping[str, Any]) -> str:
  """The models/ module of the card's network: its objective's (objectives/), or model.name on older cards."""
  return card["model"].get("name") or card["objective"]


def part_module(model_config: Mapping[str, Any], part: str, name: str = ""):
  """The flax module of `part` (PARTS) of the network `model_config` (config.model as a dict), `name` the
  models/ module of the whole network (model_name; needed for part 'model')."""
  from egoexo_jax.models import backbones, build_model, transformer  # pylint: disable=g-import-not-at-top

  model_config = dict(model_config)
  dtypes = {k: jnp.dtype(model_config[k]) for k in ("dtype", "param_dtype") if k in model_config}
  if part == "model":
    return build_model(ml_collections.ConfigDict(model_config), name or None)
  if part in VIDEO_BACKBONE_PARTS:
    return backbones.build_backbone(model_config["backbone"], model_config.get("backbone_args"), name=None, **dtypes)
  if part == "encoder":
    fields = {k: model_config[k] for k in _PART_FIELDS["encoder"] + ("dropout_rate",) if k in model_config}
    return transformer.SequenceEncoder(**fields, **dtypes)
  raise ValueError(f"unknown part '{part}': use one of {PARTS}")


def restore_variables(path: str) -> dict[str, Any]:
  """The stored {'params', 'batch_stats'} of an export folder, as saved (part subtrees included)."""
  tree = checkpointing.restore_on_this_host(os.path.join(os.path.abspath(path), checkpointing.STATE))
  return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}


def load_pretrained(path: str, *, dtype: Any = None) -> tuple[Any, dict[str, Any]]:
  """(flax module, variables) of the export folder `path`, ready for `module.apply(variables, x, train=False)`.

  The module is the card's part (the whole model, a video backbone or the EVGAP encoder), built from the
  card alone: no config is needed. `dtype` (e.g. jnp.float32) casts floating-point variables, say to
  compute in float32 from a bfloat16 export; None keeps them as stored.
  """
  card = read_card(path)
  part = card["part"]
  variables = restore_variables(path)
  if part != "model":
    variables = {collection: tree[part] for collection, tree in variables.items() if part in tree}
  if dtype is not None:
    variables = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
  return part_module(card["model"], part, model_name(card)), variables


def load_for_config(path: str, config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any], int]:
  """(model of config.model, its variables, training step) from the whole-model export `path`, after
  checking that the card fits `config` (check_config). For evaluate and the Ego-Score teacher."""
  card = read_card(path)
  if card["part"] != "model":
    raise ExportMismatchError(f"{path} holds only part '{card['part']}' of a model; this needs a whole-model "
                              "export (python -m egoexo_jax.export ... --part=model)")
  check_config(card, config, where=path)
  from egoexo_jax import objectives, train  # pylint: disable=g-import-not-at-top
  variables = restore_variables(path)
  objective = objectives.resolve(config)
  model = objective.model
  expected = jax.eval_shape(lambda: train.init_variables(objective, config, jax.random.key(0)))
  _check_shapes(path, variables, {c: expected.get(c, {}) for c in variables})
  param_dtype = jnp.dtype(config.model.get("param_dtype", "float32"))
  variables = jax.tree.map(lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                           variables)
  return model, variables, int(card["training"]["step"])


def _check_shapes(path: str, stored: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raises ExportMismatchError naming the first variable missing, extra or of another shape."""
  flat = lambda tree: {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(stored), flat(expected)
  for name in sorted(set(have) | set(want)):
    if have.get(name) != want.get(name):
      raise ExportMismatchError(f"{path}: variable {name} is {have.get(name, 'absent')} in the export, "
                                f"{want.get(name, 'absent')} in the config's model")
