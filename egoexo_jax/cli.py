"""One entry point for every command line of the project: `cli.run(main)` instead of `absl.app.run(main)`.

What it adds to absl:
  - user mistakes end in ONE line on stderr, `<program>: error: <message>`, and exit status 2, with no
    traceback: the exception types of USER_ERRORS (a missing manifest, checkpoint or .pyth file, a
    config that does not fit the run, a locked workdir, a full disk ...) and UserError. `--debug` gives the
    traceback instead. Any other exception is a bug and keeps its traceback (exit status 1).
  - a config override naming a field that does not exist (`--config.optimizer.base_lr=0.1`) is such a
    mistake, said with the nearest field names: `did you mean --config.optimizer.base_learning_rate?`
    (absl already suggests names for misspelt ordinary flags).
  - `--config=configs/x.py[:arg]` (and any ml_collections config flag) is found relative to the repository
    when it is not a file relative to the working directory, and so are the config's relative data paths
    (`resolve_repo_paths`): commands run from any folder.
  - a quiet console (console.configure_logging): third-party INFO logs hidden unless `--log_level=all`.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_USER_ERROR = 2

flags.DEFINE_enum("log_level", "quiet", ["quiet", "all"], "quiet: this project's lines and every warning "
                  "(third-party INFO logs, e.g. Orbax internals, hidden); all: every library's logs.")
flags.DEFINE_bool("debug", False, "Show the full traceback of a user error (missing file, config mismatch ...) "
                  "instead of its one-line message.")

# Exception types that mean "the user asked for something that cannot be done", by module (looked up only in
# modules already imported, so this module stays light). Builtins: files and folders that are not there.
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "builtins": ("FileNotFoundError", "FileExistsError", "NotADirectoryError", "IsADirectoryError"),
    "egoexo_jax.cli": ("UserError",),
    "egoexo_jax.run_config": ("ConfigMismatchError",),
    "egoexo_jax.pretrained": ("ExportMismatchError",),
    "egoexo_jax.checkpointing": ("ShapeMismatchError", "DiskSpaceError", "CheckpointSaveError", "DataPositionError"),
    "egoexo_jax.run_lock": ("WorkdirLockedError",),
    "egoexo_jax.lr_policy": ("RecordCountUnknown",),
    "egoexo_jax.input.records": ("RecordError",),
    "egoexo_jax.input.stream": ("ConfigMismatchError",),
    "egoexo_jax.input.convert": ("ManifestError", "PseudoLabelError", "ConversionError"),
    "egoexo_jax.input.annotations": ("AnnotationError",),
    "egoexo_jax.input.feature_records": ("FeatureManifestError",),
    "egoexo_jax.input.suml_pipeline": ("PairingError",),
    "egoexo_jax.input.assembly101": ("Assembly101Error",),
    "egoexo_jax.input.video_features": ("VideoFeatureError",),
    "egoexo_jax.input.teacher_checks": ("BoxContentError",),
    "egoexo_jax.downstream.annotations": ("AnnotationError",),
    "egoexo_jax.models.resnet2d": ("WeightImportError",),
    "egoexo_jax.pseudo_labels.label_pairs": ("LabelCsvError",),
    "egoexo_jax.pseudo_labels.narration_pairs": ("NarrationCsvError", "PairFileError", "TextModelError"),
    "egoexo_jax.pseudo_labels.object_score": ("ObjectScoreError",),
}


class UserError(Exception):
  """A request that cannot be carried out as given; the message says what and what to do instead."""


def user_error_types() -> tuple[type, ...]:
  """The USER_ERRORS classes of the modules imported so far."""
  found = []
  for module_name, names in USER_ERRORS.items():
    module = sys.modules.get(module_name)
    found += [getattr(module, n) for n in names if module is not None and isinstance(getattr(module, n, None), type)]
  return tuple(found)


def one_line(error: BaseException) -> str:
  """The error's message on one line (KeyError's quotes dropped); its type name when it has no message."""
  message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(message.split()) or type(error).__name__


# --------------------------------------------------------------------------- config files and overrides


def find_config_file(value: str) -> str:
  """`path[:arg]` with the path made absolute: relative to the working directory when a file is there, else
  relative to the repository root (so `--config=configs/egoexo.py:small` works from any folder)."""
  path, sep, arg = value.partition(":")
  if path and not os.path.isfile(path) and not os.path.isabs(path):
    candidate = os.path.join(REPO_ROOT, path)
    if os.path.isfile(candidate):
      path = candidate
  return path + sep + arg


def load_config_file(value: str):
  """The config of `path[:arg]` as ml_collections builds it: the module's get_config(arg), or get_config()."""
  path, _, arg = find_config_file(value).partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location("_egoexo_cli_config", path)
  module = importlib.util.module_from_spec(spec)
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # configs import each other as `configs.x`
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _close_names(wanted: str, names: Sequence[str]) -> list[str]:
  """Names that `wanted` abbreviates (its letters in order, same first letter), then difflib's close ones."""
  def abbreviates(name):
    if not name or name[0] != wanted[0]:
      return False
    rest = iter(name)
    return all(c in rest for c in wanted)
  found = [n for n in names if abbreviates(n)]
  found += [n for n in difflib.get_close_matches(wanted, names, n=3, cutoff=0.6) if n not in found]
  return found[:3]


def unknown_override(config, field_path: str, flag: str = "config") -> str | None:
  """None when every part of the dotted `field_path` exists in `config`; else a one-line message naming the
  first missing part and the closest existing names."""
  node, walked = config, []
  for part in field_path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(walked)
      if not keys:
        return f"'{where}' is a value ({type(node).__name__}), it has no field '{part}'"
      close = _close_names(part, [str(k) for k in keys])
      hint = ("; did you mean " + " or ".join(f"--{flag}.{'.'.join([*walked, c])}" for c in close) + "?") if close \
          else f"; its fields: {', '.join(sorted(map(str, keys)))}"
      return f"{flag}{'.' + where if where else ''} has no field '{part}'{hint}"
    node, walked = node[part], [*walked, part]
  return None


_OVERRIDE = re.compile(r"^--?([A-Za-z_][\w]*)\.([\w.]+)(=.*)?$")


def check_overrides(argv: Sequence[str]) -> None:
  """Raises UserError naming the first `--<config flag>.<field>` of `argv` whose field does not exist."""
  values = {}
  for arg in argv[1:]:
    if arg == "--":
      break
    match = re.match(r"^--?([A-Za-z_]\w*)=(.*)$", arg)
    if match:
      values[match.group(1)] = match.group(2)
  loaded = {}
  for arg in argv[1:]:
    if arg == "--":
      break
    match = _OVERRIDE.match(arg)
    if not match or match.group(1) not in values:
      continue
    name = match.group(1)
    if name not in loaded:
      try:
        loaded[name] = load_config_file(values[name])
      except Exception:  # pylint: disable=broad-except  (absl reports a config that does not load)
        return
    problem = unknown_override(loaded[name], match.group(2), name)
    if problem:
      raise UserError(f"--{name}.{match.group(2)}: {problem}")


def _with_repo_config_paths(argv: Sequence[str]) -> list[str]:
  """argv with the value of every ml_collections config-file flag found as find_config_file finds it."""
  config_flags = {name for name, flag in flags.FLAGS._flags().items()  # pylint: disable=protected-access
                  if type(flag).__name__ == "_ConfigFlag"}
  out = [argv[0]]
  for arg in argv[1:]:
    match = re.match(r"^(--?)([A-Za-z_]\w*)=(.*)$", arg)
    if match and match.group(2) in config_flags:
      arg = f"{match.group(1)}{match.group(2)}={find_config_file(match.group(3))}"
    out.append(arg)
  return out


def resolve_repo_paths(config, fields: Sequence[str] = ("data",)) -> None:
  """In place: each relative path string under `config.<fields>` that names nothing from the working
  directory but exists under the repository root (e.g. 'data/manifest.csv') becomes that absolute path."""
  for field in fields:
    node = config.get(field) if hasattr(config, "get") else None
    if node is None or not hasattr(node, "items"):
      continue
    for key, value in list(node.items()):
      if hasattr(value, "items"):
        resolve_repo_paths(node, (key,))
      elif isinstance(value, str) and value and not os.path.isabs(value) and "/" in value and ":" not in value:
        parts = [p for p in value.split(",")]
        if any(os.path.exists(p) for p in parts):
          continue
        rooted = [os.path.join(REPO_ROOT, p) if os.path.exists(os.path.join(REPO_ROOT, p)) else p for p in parts]
        if rooted != parts:
          node[key] = ",".join(rooted)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  argv = _with_repo_config_paths(argv)
  try:
    check_overrides(argv)
  except UserError as e:
    if "--debug" in argv:
      raise
    print(f"{os.path.basename(argv[0])}: error: {one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  remaining = app.parse_flags_with_usage(argv)
  for name, flag in flags.FLAGS._flags().items():  # pylint: disable=protected-access
    if type(flag).__name__ == "_ConfigFlag" and flag.value is not None:
      resolve_repo_paths(flag.value)
  return remaining


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """absl.app.run(main) with the module docstring's additions (one-line user errors, --debug, override
  suggestions, configs found relative to the repository)."""

  def guarded(args):
    from egoexo_jax import console  # pylint: disable=g-import-not-at-top  (before TensorFlow: its C++ log level)
    console.configure_logging(flags.FLAGS.log_level)  # every tool's console is quiet by default
    try:
      return main(args)
    except user_error_types() as e:
      if flags.FLAGS.debug:
        raise
      print(f"{os.path.basename(sys.argv[0])}: error: {one_line(e)}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  app.run(guarded, argv=list(argv) if argv is not None else None, flags_parser=_parse_flags)
