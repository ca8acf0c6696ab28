"""Shared settings of the fine-tuning configs (finetune_charades_ego.py, finetune_epic100.py, finetune_epic55.py).

The full size follows the Ego-Exo release's Slow-only R50 8x8 fine-tuning recipe (PySlowFast): SGD momentum
0.9, weight decay 1e-4, batch 64, train clips of 8 frames every 8th from short side [256, 320] cropped to
224, test 10 clips x 3 crops of 256 at short side 256. `:small` shrinks the network to the one of
`configs/egoexo.py:small`, so a small pre-training run can start it (`--config.init_from=<its workdir>`).
"""

import ml_collections

from configs import common, common_recipe, recipe_egoexo
from egoexo_jax import lr_policy

ARG = common.ArgSpec(options=("star",), default_recipe="released")  # 'star': Ego-Exo* (the interaction loss)


def parse_arg(arg: str, config_file: str) -> common.Arg:
  """`arg` of `--config=<file>:<arg>`: 'small', 'star' and a recipe ('released' or 'paper',
  configs/recipe_egoexo.py), comma-separated."""
  return common.parse_arg(arg, config_file, ARG)


def apply_recipe(config, arg: common.Arg, config_name: str):
  """Sets the recipe rows of `config_name` (configs/recipe_egoexo.py) for the recipe named in `arg`."""
  return common_recipe.apply_recipe(config, recipe_egoexo.ROWS, arg.recipe, config_name, small=arg.small)


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
  """ceil(epochs x records / batch), as the trainer counts epochs (egoexo_jax/lr_policy.py)."""
  return lr_policy.steps_for_epochs(epochs, num_examples, batch_size)


def base_config(*, small: bool, star: bool) -> ml_collections.ConfigDict:
  config = common.trainer_defaults(ml_collections.ConfigDict(), objective="finetune",
                                   log_every_steps=10 if small else 100,
                                   checkpoint_every_steps=50 if small else 2_000)

  config.data = ml_collections.ConfigDict()
  # Glob of record shards; empty: convert `manifest` into <workdir>/records on first use.
  config.data.train_records = ""
  config.data.manifest = ""
  config.data.eval_records = ""  # glob of validation record shards for periodic evaluation (train_eval below)
  config.data.label_kind = "single"  # 'single': one class per head; 'multi_label': class sets
  # What a record's `labels` hold: per head, labels[i] is the class of head label_layout[i]; multi-label,
  # the class ids of the single head named here. The heads' sizes are model.num_classes.
  config.data.label_layout = ()
  config.data.label_intervals = ""  # multi-label: {video_id: [[class, start, end]]} for clip-level labels
  config.data.num_train_examples = 0  # records per epoch, to turn epochs into steps
  config.data.ego_logits = ""
  config.data.object_logits = ""
  # Ego-Exo*: detector output on the target videos (convert.py's --hand_object_dir format).
  config.data.hand_object_dir = ""
  config.data.convert_short_side = 160 if small else 320
  config.data.clip_length = 8
  config.data.frame_stride = 4 if small else 8
  config.data.crop_size = 112 if small else 224
  config.data.min_short_side = 128 if small else 256
  config.data.max_short_side = 160 if small else 320
  config.data.target_fps = 0.0  # stride over stored frames (transforms.sample_frame_indices), as the release
  config.data.interaction_frames = "slow_frames"  # as configs/egoexo.py
  config.data.box_score_threshold = 0.5
  common.loader_defaults(config.data, num_workers=1 if small else 12)
  common.record_checks(config.data)

  config.model = ml_collections.ConfigDict()
  config.model.num_classes = ml_collections.ConfigDict()  # head name -> classes
  config.model.backbone = "slow_r50"
  config.model.backbone_args = ml_collections.ConfigDict(
      dict(stage_blocks=(1, 1, 1, 1), width=16) if small else {})
  config.model.dropout_rate = 0.5
  config.model.use_interaction_head = star
  config.model.interaction_channels = 128 if small else 512
  config.model.dtype = "float32" if small else "bfloat16"

  config.loss = ml_collections.ConfigDict()
  config.loss.weight_interaction = 0.0  # per map (hand, object), as the released HANDOBJ weights
  config.loss.interaction_reduction = "sum"  # L_int = BCE mean of the hand map + that of the object map

  config.eval = ml_collections.ConfigDict()
  config.eval.manifest = ""  # converted into <workdir>/records/eval when --records is not given
  config.eval.num_clips = 10
  config.eval.num_crops = 3
  config.eval.short_side = 128 if small else 256
  config.eval.crop_size = 128 if small else 256
  config.eval.placement = "spread"  # the Ego-Exo Charades/EPIC loaders' clip placement
  config.eval.ensemble = "mean"  # how views combine: 'mean' or 'max' (of probabilities)
  config.eval.batch_size = 30 if small else 120  # views per forward pass (a multiple of the devices)
  # PySlowFast tests fully convolutionally (head_helper.ResNetBasicHead / Ego-Exo's MultiTaskHead in eval
  # mode): the head at every position of a training-crop-sized window (data.crop_size) over the test
  # crop's res5 grid, softmax / sigmoid there, then the mean over positions. False: global pooling first.
  config.eval.fully_convolutional = True

  # Precise BatchNorm statistics (egoexo_jax/precise_bn.py; PySlowFast BN.USE_PRECISE_STATS with
  # NUM_BATCHES_PRECISE): batches averaged before each periodic evaluation and at the last step; 0 = off.
  config.precise_bn = ml_collections.ConfigDict()
  config.precise_bn.num_batches = 0  # the recipe table sets 200 for full-size EPIC runs
  # Periodic evaluation on data.eval_records (egoexo_jax/train_eval.py), as the released fine-tuning yamls'
  # TRAIN.EVAL_PERIOD: 2 (epochs); every_steps > 0 overrides every_epochs. The best state by best_metric
  # ('' = mAP / action_top1 / <head>_top1) is kept in <workdir>/best.
  config.train_eval = ml_collections.ConfigDict()
  config.train_eval.every_epochs = 0.0  # the recipe table sets 2.0 for full-size runs
  config.train_eval.every_steps = 0
  config.train_eval.best_metric = ""
  config.train_eval.num_clips = 1  # views per record during training (PySlowFast's 'val' mode: 1 clip, 1 crop)
  config.train_eval.num_crops = 1

  config.global_batch_size = 8 if small else 64
  config.epochs = 0.0
  config.num_train_steps = 0
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"
  config.optimizer.schedule = "cosine"
  config.optimizer.base_learning_rate = 0.0
  config.optimizer.reference_batch_size = 64  # PySlowFast's rates are for batch 64; scaled linearly
  config.optimizer.warmup_steps = 0
  config.optimizer.warmup_start_fraction = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.optimizer.weight_decay_on = "all_but_batchnorm"  # PySlowFast: every parameter but BatchNorm's
  config.optimizer.decay_steps = ()
  config.optimizer.decay_factor = 0.1
  config.optimizer.frozen = ()

  # init_from (common.trainer_defaults): the pre-training run whose backbone starts this one (heads stay new),
  # a workdir or checkpoint, or "backbone=<run>,interaction_head=<run>:interaction_head" to carry Ego-Exo's
  # map head over too.
  return config
