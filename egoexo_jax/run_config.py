"""The resolved config of a run, kept in its workdir, and the checks that tie a reader's config to it.

At start the trainer writes `<workdir>/config.json` (`save`: the resolved config as readable JSON,
written whole or not at all, by process 0 only) and appends the command line that started it to
`<workdir>/commands.txt` (one line per start: UTC time, then the argv as a shell would take it). Every
tool that reads a run's checkpoint (evaluate, pseudo_labels.ego_score, suml_eval, downstream.extract,
export) then needs only `--workdir`: `resolve(workdir, given)` returns the saved config, or the given
one after `check_matches` found no difference in the fields that make the run what it is.

Fields that may legitimately differ between training and reading (READ_TIME_FIELDS; a dotted name
covers everything under it):
  eval, evaluate, train_eval       test-time settings (views, crops, batch size, records to score)
  num_train_steps, epochs, log_every_steps, checkpoint_every_steps, max_checkpoints_to_keep,
  async_checkpointing, profile_steps
                                   how long and how a run trains, not what it trains
  global_batch_size, mesh          the training batch and the device layout; a reader picks its own
  init_from, pair_workdir          where the training started from; the checkpoint now holds the weights
  data.num_workers, data.read_threads, data.prefetch_batches, data.batch_timeout_s, data.check_records
                                   input speed and safety settings
  data.*records*, data.*manifest*  where the data lies (a reader names its own records)
  model.dtype, model.dropout_rate  compute-only settings (evaluating a bfloat16 run in float32 is fine)
Every other leaf must be equal (tuples and lists compare equal); a field only one side has differs.

`flat_hparams(config)` is the whole config as {dotted name: scalar} for TensorBoard's hparams plugin.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from egoexo_jax import atomic_files

CONFIG_FILE = "config.json"
COMMANDS_FILE = "commands.txt"
ABSENT = "(absent)"

READ_TIME_FIELDS = (
    "eval", "evaluate", "train_eval",
    "num_train_steps", "epochs", "log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep",
    "async_checkpointing", "profile_steps",
    "global_batch_size", "mesh", "init_from", "pair_workdir",
    "data.num_workers", "data.read_threads", "data.prefetch_batches", "data.batch_timeout_s", "data.check_records",
    "data.*records*", "data.*manifest*",
    "model.dtype", "model.dropout_rate",
)


class ConfigMismatchError(ValueError):
  """The config given to a reader differs from the one the run saved; the message names the fields."""


def path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CONFIG_FILE)


def to_jsonable(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as plain JSON types: ConfigDicts -> dicts, tuples -> lists, anything else JSON lacks -> str."""
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return json.loads(json.dumps(tree, default=str))


def save(config: ml_collections.ConfigDict, workdir: str, argv: Sequence[str] | None = None,
         process_index: int | None = None) -> list[str]:
  """Writes `<workdir>/config.json` and appends the command line to `<workdir>/commands.txt` (process 0 only).

  Returns the fields in which `config` differs from a config.json already there (a resumed run given
  other settings), [] otherwise; the caller logs them. `argv` defaults to sys.argv."""
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index()
  if process_index != 0:
    return []
  changed = []
  if os.path.isfile(path(workdir)):
    changed = differences(load_dict(workdir), to_jsonable(config), ignore=())
  with atomic_files.atomic_write(path(workdir), "w") as f:
    json.dump(to_jsonable(config), f, indent=2, sort_keys=True)
    f.write("\n")
  argv = list(sys.argv if argv is None else argv)
  commands = os.path.join(os.path.abspath(workdir), COMMANDS_FILE)
  before = open(commands).read() if os.path.isfile(commands) else ""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
  with atomic_files.atomic_write(commands, "w") as f:
    f.write(f"{before}{stamp} {shlex.join([os.path.basename(sys.executable) or 'python', *argv])}\n")
  return [name for name, _, _ in changed]


def load_dict(workdir: str) -> dict[str, Any]:
  """The saved config of `workdir` as a dict; FileNotFoundError (one line) when the run saved none."""
  try:
    with open(path(workdir)) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path(workdir)} does not exist: not a workdir of this trainer, or a run from "
                            "before configs were saved; pass its config with --config=path[:arg]") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path(workdir)}: not valid JSON ({e})") from None


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (the configs' own sequence type), recursively."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load(workdir: str) -> ml_collections.ConfigDict:
  """The saved config of `workdir` as a ConfigDict (sequences as tuples)."""
  return ml_collections.ConfigDict(_tuples(load_dict(workdir)))


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(_leaves(value, name + "."))
    else:
      out[name] = value
  return out


def _ignored(name: str, ignore: Sequence[str]) -> bool:
  return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in ignore)


def differences(saved: Mapping[str, Any], given: Mapping[str, Any],
                ignore: Sequence[str] = READ_TIME_FIELDS) -> list[tuple[str, Any, Any]]:
  """(dotted field, saved value, given value) of each leaf that differs, sorted by name; a side that
  lacks the field gives ABSENT. Fields matching `ignore` are skipped."""
  saved_leaves, given_leaves = _leaves(to_jsonable(saved)), _leaves(to_jsonable(given))
  missing = object()
  out = []
  for name in sorted(set(saved_leaves) | set(given_leaves)):
    if _ignored(name, ignore):
      continue
    was, now = saved_leaves.get(name, missing), given_leaves.get(name, missing)
    if was != now:
      out.append((name, ABSENT if was is missing else was, ABSENT if now is missing else now))
  return out


def check_matches(saved: Mapping[str, Any] | ml_collections.ConfigDict, given: ml_collections.ConfigDict, *,
                  where: str = "the saved config") -> None:
  """Raises ConfigMismatchError, one line naming every differing field (READ_TIME_FIELDS aside)."""
  found = differences(saved, given)
  if found:
    shown = "; ".join(f"{name}: saved {_shown(was)}, given {_shown(now)}" for name, was, now in found[:8])
    more = f" (and {len(found) - 8} more)" if len(found) > 8 else ""
    raise ConfigMismatchError(f"the given config differs from {where} in {len(found)} field(s): {shown}{more}. "
                              "Drop --config to use the saved one")


def _shown(value: Any) -> str:
  return value if value is ABSENT else json.dumps(value)


def resolve(workdir: str, given: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The config a reader uses for the run in `workdir`: the saved one when `given` is None; `given` after
  check_matches when both exist (so test-time fields of `given` apply); `given` when the run saved none
  (older runs)."""
  if not os.path.isfile(path(workdir)):
    if given is None:
      load_dict(workdir)  # raises the one-line FileNotFoundError
    return given
  if given is None:
    return load(workdir)
  check_matches(load_dict(workdir), given, where=path(workdir))
  return given


def flat_hparams(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, bool | int | float | str]:
  """Every leaf of the config as {dotted name: scalar} for TensorBoard's hparams: numbers, bools and
  strings as they are, None as 'None', sequences and empty dicts as their JSON text."""
  out = {}
  for name, value in _leaves(to_jsonable(config)).items():
    if value is None:
      out[name] = "None"
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    else:
      out[name] = json.dumps(value)
  return out
