r"""Ego-Exo pre-training (Li et al., CVPR 2021): Slow-only R50 8x8 with ego-signal distillation.

Loss (Eq. 7): w_act L_act + 0.1 L_ego + 0.5 L_obj + 1.0 L_int.

Recipes (configs/recipe_egoexo.py holds every value with its source; the README's "Recipes" section shows
the table): `released` (the default; what produced the authors' checkpoints: w_act 0.5, L_int the sum of
the hand and the object map's BCE means, head dropout 0, clips resampled to 30 fps, PySlowFast's cosine
over 200 epochs with 34 warm-up epochs ending on the curve, weight decay on all non-BatchNorm parameters)
or `paper` (the text: w_act 1, L_int one mean over both maps). Name it after the size, comma-separated:
`configs/egoexo.py:small,paper`.

Full size (the paper's model; point `data.train_records` at your converted Kinetics shards and set
`model.num_classes` for your data; the 200 epochs become steps from the record count at start):

  python main.py --config=configs/egoexo.py --workdir=runs/egoexo \
      --config.data.train_records='/data/k400/train.tfrecord-*'

On a pod or several GPU hosts, the same command on every host with --multihost (main.py); add
`--config.mesh.fsdp=8` to shard parameters and optimiser state 8 ways (data parallel over the rest),
`--config.profile_steps='(100,105)'` for a profiler trace in <workdir>/profile.

Laptop / CPU size, on the real clips shipped in data/ (converted into the workdir on first run):

  python main.py --config=configs/egoexo.py:small --workdir=runs/egoexo_small

Expected for `:small` on a 2-core CPU (measured): conversion, compilation and 300 steps in about
2 minutes; under the released recipe the total loss averages 3.25 over steps 1-20 and about 0.66 over
steps 281-300, the 5-class action term falling from 1.50 to about 0.1 (`:small,paper`: 3.63 and 0.54;
its total weighs the action term 1 and the interaction term half). Checkpoints (steps 100, 200, 300) and
TensorBoard event files go under the workdir. The shipped clips carry hand-declared labels and
stand-in teachers (data/README.md): the numbers show that training works, not accuracy.
"""

import ml_collections

from configs import common_recipe, recipe_egoexo


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh` of every objective's config: all devices, data parallel.

  Devices: data x fsdp (sharding.py). The batch is split over both axes; parameters and optimiser
  state are fully sharded over `fsdp` (each array of >= fsdp_min_size elements along its largest
  dimension divisible by fsdp) and replicated over `data`. fsdp = 1: plain data parallelism.
  """
  mesh = ml_collections.ConfigDict()
  mesh.num_devices = -1  # devices to use, from the first; -1: all
  mesh.data = -1  # -1: the devices fsdp leaves
  mesh.fsdp = 1
  mesh.fsdp_min_size = 2**14  # elements; smaller arrays stay replicated
  return mesh


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: comma-separated; 'small' for a CPU-sized run on the embedded data (else the paper's size), and
  a recipe, 'released' (default) or 'paper' (configs/recipe_egoexo.py)."""
  options, recipe = common_recipe.parse_options(arg, "configs/egoexo.py", ("small",), "released")
  small = "small" in options
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.objective = "egoexo"  # egoexo_jax/objectives/egoexo.py

  config.data = ml_collections.ConfigDict()
  # Glob of record shards (TFRecord or ArrayRecord). Empty: convert the embedded manifest below
  # into <workdir>/records on first use (once) and train on that.
  config.data.train_records = ""
  config.data.manifest = "data/manifest.csv"
  config.data.ego_logits = "data/pseudo_labels/ego_logits.pkl"
  config.data.object_logits = "data/pseudo_labels/object_logits.pkl"
  config.data.hand_object_dir = "data/pseudo_labels/hand_object"
  config.data.num_train_examples = 0  # records per epoch; 0: counted from the records at start
  config.data.convert_short_side = 160 if small else 320
  config.data.clip_length = 8  # T
  config.data.frame_stride = 8  # tau
  config.data.crop_size = 112 if small else 224
  config.data.min_short_side = 128 if small else 256
  config.data.max_short_side = 160 if small else 320
  # > 0: resample to this fps and place clip_length frames by linspace over clip_length x frame_stride
  # frames (PySlowFast's decoder); 0: every frame_stride-th stored frame (transforms.sample_frame_indices).
  config.data.target_fps = 30.0
  # How a clip longer than the map grid (SlowFast's fast frames) maps onto it: 'slow_frames' (the slow
  # pathway's frames, floor(linspace)) or 'max' (the max over each group of frames).
  config.data.interaction_frames = "slow_frames"
  config.data.box_score_threshold = 0.5
  config.data.num_workers = 1 if small else 12  # Grain worker processes per host
  # Whole batches built at once per worker: Grain runs no more read threads than prefetch_batches.
  config.data.read_threads = 2
  config.data.prefetch_batches = 2
  # transforms.decode_and_crop: 'fast' (input/jpeg_decode.py, about half the CPU per clip) or 'exact'
  # (Pillow, bit for bit the clips of runs made before the fast decoder). README: Decoding clips.
  config.data.decoder = "fast"
  # Seconds to wait for a batch before stopping with an error naming the step and the workers' state
  # (a hung Grain worker or unreachable storage); 0 waits forever. Covers worker start-up at step 1.
  config.data.batch_timeout_s = 600.0
  config.data.strict = False  # True: a damaged shard stops the run instead of being skipped past (README, Data)
  config.data.check_records = 32  # records checked against the config when the data is opened

  config.model = ml_collections.ConfigDict()
  config.model.name = "egoexo"
  config.model.num_classes = 5 if small else 400
  config.model.num_object_classes = 1000
  config.model.backbone = "slow_r50"  # models/backbones.py: slow_r50, slow_r101, ...
  # Overrides of the backbone's preset arguments; `:small` thins and shortens Slow-only R50.
  config.model.backbone_args = ml_collections.ConfigDict(
      dict(stage_blocks=(1, 1, 1, 1), width=16) if small else {})
  config.model.dropout_rate = 0.0  # set by the recipe (configs/recipe_egoexo.py), as every value it lists
  config.model.interaction_channels = 128 if small else 512
  # Compute dtype; parameters stay float32. XLA:CPU has no fast bf16 convolutions.
  config.model.dtype = "float32" if small else "bfloat16"

  config.loss = ml_collections.ConfigDict()
  config.loss.weight_action = 1.0
  config.loss.weight_ego = 0.1
  config.loss.weight_object = 0.5
  config.loss.weight_interaction = 1.0
  config.loss.temperature_ego = 1.0
  config.loss.temperature_object = 1.0
  # L_int from the two maps: 'sum' of the hand and the object map's BCE means, or one 'mean' over both.
  config.loss.interaction_reduction = "sum"

  config.global_batch_size = 8 if small else 64
  # Epoch-based (epochs > 0 with an lr_policy): num_train_steps = ceil(epochs x records / global batch),
  # derived at start from data.num_train_examples or, when 0, the record count (egoexo_jax/lr_policy.py).
  config.epochs = 0.0 if small else 200.0
  config.num_train_steps = 300 if small else 0
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"
  # lr_policy: PySlowFast's 'cosine' (warm-up ends on the cosine curve) or 'steps_with_relative_lrs'
  # (lr_steps, lrs), in epochs (or in steps when epochs is 0); '' for `schedule` ('cosine'/'steps': warm-up
  # to the peak, then a cosine or steps over the remaining num_train_steps).
  config.optimizer.lr_policy = "cosine"
  config.optimizer.schedule = "cosine"
  config.optimizer.base_learning_rate = 0.05 if small else 0.1  # per 64 clips, scaled linearly
  config.optimizer.reference_batch_size = 64
  config.optimizer.warmup_steps = 30 if small else 0  # warm-up when counted in steps
  config.optimizer.warmup_epochs = 0.0 if small else 34.0  # warm-up when counted in epochs
  config.optimizer.warmup_start_fraction = 0.1
  config.optimizer.lr_steps = ()  # steps_with_relative_lrs: epochs (steps) where each lrs entry starts
  config.optimizer.lrs = ()  # ... and the multiples of the peak from there
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.optimizer.weight_decay_on = "all_but_batchnorm"  # or 'kernels' (conv and dense kernels only)
  config.optimizer.frozen = ()  # top-level parameter names to keep fixed

  # A workdir or checkpoint whose `backbone` starts this run (heads stay new), or
  # "subtree=path[:subtree there],..." (train.parse_init_from).
  config.init_from = ""

  config.mesh = mesh_config()

  config.log_every_steps = 20 if small else 100
  config.checkpoint_every_steps = 100 if small else 5_000
  config.max_checkpoints_to_keep = 3
  config.async_checkpointing = True
  # (start, stop): a JAX profiler trace of steps start..stop into <workdir>/profile; () for none.
  config.profile_steps = ()
  return common_recipe.apply_recipe(config, recipe_egoexo.ROWS, recipe, "egoexo", small=small)
