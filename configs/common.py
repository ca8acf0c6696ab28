"""What every config shares: the config argument, the trainer and loader defaults, the mesh.

A config file's `get_config(arg)` reads `arg` (the part after ':' in `--config=configs/<file>.py:<arg>`)
with `parse_arg`: comma-separated, in any order, at most one of each kind:
  small      a CPU-sized run on the data shipped in data/ (else the paper's size);
  options    the file's on/off switches (e.g. `star`, `siglip`);
  a variant  one of the file's alternatives (e.g. SUM-L's baselines), its first when none is named;
  a recipe   'released' or 'paper' (configs/common_recipe.py), the file's default when none is named.
Anything else is a one-line error naming the file and the arguments it takes. `python -m configs` lists
every config with its arguments.

`trainer_defaults` and `loader_defaults` set the fields every method's config has with the same
values; a method's config sets only what is its own (and overrides these where it differs).
"""

from __future__ import annotations

import dataclasses

import ml_collections

RECIPES = ("released", "paper")


@dataclasses.dataclass(frozen=True)
class Arg:
  """A parsed config argument."""

  small: bool
  options: frozenset[str]  # the on/off switches named
  variant: str  # the variant named, else the file's first ('' when the file has none)
  recipe: str  # the recipe named, else the file's default ('' when the file has no recipes)


@dataclasses.dataclass(frozen=True)
class ArgSpec:
  """What a config file's argument accepts (also what `python -m configs` lists)."""

  options: tuple[str, ...] = ()
  variants: tuple[str, ...] = ()
  default_recipe: str = ""  # '' : the file takes no recipe

  def valid(self) -> str:
    parts = ["small"] + list(self.options)
    text = ", ".join(parts)
    if self.variants:
      text += f"; at most one variant of {', '.join(self.variants)} (default {self.variants[0]})"
    if self.default_recipe:
      text += f"; at most one recipe of {', '.join(RECIPES)} (default {self.default_recipe})"
    return text


def parse_arg(arg: str, config_file: str, spec: ArgSpec = ArgSpec()) -> Arg:
  """`arg` of `--config=<config_file>:<arg>` -> Arg; a one-line ValueError for anything `spec` does not take."""
  names = [a.strip() for a in arg.split(",") if a.strip()]
  recipes = RECIPES if spec.default_recipe else ()
  unknown = [n for n in names if n != "small" and n not in spec.options and n not in spec.variants
             and n not in recipes]
  problem = ""
  if unknown:
    problem = f"{', '.join(repr(u) for u in unknown)} not taken"
  elif len(named_variants := [n for n in names if n in spec.variants]) > 1:
    problem = f"name at most one variant, got {named_variants}"
  elif len(named_recipes := [n for n in names if n in recipes]) > 1:
    problem = f"name at most one recipe, got {named_recipes}"
  if problem:
    raise ValueError(f"unknown config argument '{arg}' for {config_file}: {problem}; valid (comma-separated): "
                     f"{spec.valid()}")
  variant = next((n for n in names if n in spec.variants), spec.variants[0] if spec.variants else "")
  recipe = next((n for n in names if n in recipes), spec.default_recipe)
  return Arg(small="small" in names, options=frozenset(n for n in names if n in spec.options), variant=variant,
             recipe=recipe)


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh` of every objective's config: all devices, data parallel.

  Devices: data x fsdp (sharding.py). The batch is split over both axes; parameters and optimizer
  state are fully sharded over `fsdp` (each array of >= fsdp_min_size elements along its largest
  dimension divisible by fsdp) and replicated over `data`. fsdp = 1: plain data parallelism.
  """
  mesh = ml_collections.ConfigDict()
  mesh.num_devices = -1  # devices to use, from the first; -1: all
  mesh.data = -1  # -1: the devices fsdp leaves
  mesh.fsdp = 1
  mesh.fsdp_min_size = 2**14  # elements; smaller arrays stay replicated
  return mesh


def trainer_defaults(config: ml_collections.ConfigDict, *, objective: str, log_every_steps: int,
                     checkpoint_every_steps: int) -> ml_collections.ConfigDict:
  """Sets the trainer's fields (egoexo_jax/train.py) that every method shares; the cadences are per method."""
  config.seed = 0
  config.objective = objective  # egoexo_jax/objectives/<objective>.py: the method, its model and data
  config.init_from = ""  # a workdir or checkpoint, or "subtree=path[:subtree there],..." (train.parse_init_from)
  config.mesh = mesh_config()
  config.log_every_steps = log_every_steps
  config.checkpoint_every_steps = checkpoint_every_steps
  config.max_checkpoints_to_keep = 3
  config.async_checkpointing = True
  # (start, stop): a JAX profiler trace of steps start..stop into <workdir>/profile; () for none.
  config.profile_steps = ()
  return config


def loader_defaults(data: ml_collections.ConfigDict, *, num_workers: int,
                    batch_timeout_s: float = 600) -> ml_collections.ConfigDict:
  """Sets the Grain loader's fields of `config.data` (egoexo_jax/input/) that every method shares."""
  data.num_workers = num_workers  # Grain worker processes per host
  # Whole batches built at once per worker: Grain runs no more read threads than prefetch_batches.
  data.read_threads = 2
  data.prefetch_batches = 2
  # Seconds to wait for a batch before stopping with an error naming the step and the workers' state
  # (a hung Grain worker or unreachable storage); 0 waits forever. Covers worker start-up at step 1.
  data.batch_timeout_s = batch_timeout_s
  return data


def record_checks(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The video-record fields every video method shares: the checks when records are opened (the feature
  records of EVGAP have their own) and the JPEG decoder of clips."""
  data.strict = False  # True: a damaged shard stops the run instead of being skipped past (README, Data)
  data.check_records = 32  # records checked against the config when the data is opened
  # transforms.decode_and_crop: 'fast' (input/jpeg_decode.py, about half the CPU per clip) or 'exact'
  # (Pillow, bit for bit the clips of runs made before the fast decoder). README: Decoding clips.
  data.decoder = "fast"
  # Where the fast decoder's training clips are resized to crop_size: 'device' (the CPU decodes and sends
  # the window's stored pixels; the jitted step resamples them, input/device_resize.py), 'host' (OpenCV in
  # the input workers) or 'auto': 'device' on a GPU or TPU, 'host' on a CPU-only machine. README: Decoding
  # clips. data.decoder='exact' always resizes on the host.
  data.resize = "auto"
  # JPEG quality of videos converted on first use (data.manifest -> <workdir>/records): the converter's
  # default, chosen for storage (README: Storage); data.convert_short_side is each method's.
  data.convert_jpeg_quality = 75
  return data
