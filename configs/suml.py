r"""SUM-L stage (b) (Wang et al., ICCV 2023): joint ego + exo training through narration pseudo-pairs.

Loss (Eq. 12): L_f + 0.1 L_t + 0.02 L_aw + 0.1 L_m, tau 0.06, sigma 0.1, threshold 0.78, 384-d projections
(the released EPIC-100 settings). Two recipes, configs/recipe_suml.py (every value with its source):
`:paper` (the default) is the paper's method, decoupled denominators of cross-view negatives (Eq. 4/6)
over the global batch and L_aw weighted by w; `:released` is what the authors' code trains: no alignment
term (its head computes a triplet loss and drops it), both-view denominators, negatives per half batch
(2 GPUs x 32), label-mined pairs drawn among 3. The stages, their checkpoints passed on by path:
  (a) configs/suml_exo.py   the exo encoder and head on the exo dataset alone;
  (b) this file             joint training, exo side from (a), ego side from Kinetics / Ego-Exo pre-training;
  (c) configs/suml_eval.py  the ego encoder and head on ego records (python -m egoexo_jax.suml_eval).

Full size (EPIC-Kitchens-100 verb + noun as the ego task, LEMMA third-person verb/noun sets as the exo
task; mine the pairs first with python -m egoexo_jax.pseudo_labels.narration_pairs):

  python main.py --config=configs/suml.py --workdir=runs/suml \
      --config.data.ego_records='/data/epic100/train.tfrecord-*' \
      --config.data.exo_records='/data/lemma_tpv/train.tfrecord-*' --config.data.pairs=/data/suml/pairs.npz \
      --config.init_from="ego_backbone=runs/egoexo,exo_backbone=runs/suml_exo:exo_backbone,\
exo_head_0=runs/suml_exo:exo_head_0,exo_head_1=runs/suml_exo:exo_head_1"

The released runs used SlowFast R101 (`--config.model.backbone=slowfast_r101 --config.data.clip_length=32
--config.data.frame_stride=2 --config.data.crop_size=256`); the default here is Slow-only R50 8x8 so that
an Ego-Exo checkpoint (configs/egoexo.py) starts the ego encoder.

Laptop / CPU size, on the shipped clips with the hand-declared pairing of data/suml/ (converted into the
workdir on first use), after stage (a) and the Ego-Exo `:small` run:

  python main.py --config=configs/egoexo.py:small --workdir=runs/egoexo_small
  python main.py --config=configs/suml_exo.py:small --workdir=runs/suml_exo_small
  python main.py --config=configs/suml.py:small --workdir=runs/suml_small \
      --config.init_from="ego_backbone=runs/egoexo_small,exo_backbone=runs/suml_exo_small:exo_backbone,\
exo_head_0=runs/suml_exo_small:exo_head_0"

(`:small,released` for the released recipe.) Expected for `:small`, as printed at steps 10 and 100 (the
averages over steps 1-10 and 91-100), measured on a 2-core CPU shared with many other jobs (about 14 min
each with conversion and compilation; 4 min 47 s on a quieter machine):
  paper     total 1.68 -> 0.51; ego task 0.60 -> 0.04, L_t 2.15 -> 0.19, L_aw 2.72 -> 2.66, L_m 8.11 -> 4.03;
            L_aw sees 66% of each batch (the shipped narrations are unrelated, so `:small` lowers the
            threshold to 0.15); exo accuracy 0.10 -> 0.975.
  released  total 6.13 -> 0.90; ego task 0.60 -> 0.04, L_t 2.12 -> 0.19, no L_align, L_m 53.2 -> 8.37;
            exo accuracy 0.09 -> 0.96.
L_m of the released form is larger because its denominators add same-view similarities, which are high
while the embeddings of one view are still alike. `:small` pairs by narration under both recipes (the
shipped ego and exo clips share no label). The exo accuracy starts low although stage (a) ended at 1.0:
the top-1 partners are mostly tree clips, and BatchNorm's statistics of such batches differ from stage
(a)'s mixed ones. The clips are not a real ego-exo dataset (data/suml/README.md): the numbers show that
every term trains on real pixels, not accuracy.

Baselines of the paper's comparison, as a further argument: `:small,fpv_only`, `:small,typical_cl`,
`:small,triplet`, `:small,domain_adapt`, `:small,joint_embed` (or `:fpv_only` etc. at full size). Table 6
ablations:
`--config.model.share_backbone=True`, or `--config.model.freeze_exo_backbone=True
--config.optimizer.frozen="('exo_backbone',)"`; `--config.loss.negatives=per_device` keeps each device's
negatives to its own slice of the batch (`groups` with `loss.negative_groups`: each group's, on any device
count).
"""

import ml_collections

from configs import common, common_recipe, recipe_suml

BASELINES = ("suml", "fpv_only", "typical_cl", "triplet", "domain_adapt", "joint_embed")
ARG = common.ArgSpec(variants=BASELINES, default_recipe=recipe_suml.RECIPES[0])


def parse_arg(arg: str, config_file: str = "configs/suml.py") -> common.Arg:
  """'small,released,triplet' -> Arg (small, variant: the baseline, recipe: 'paper' unless named)."""
  return common.parse_arg(arg, config_file, ARG)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: '' (full size) or 'small' (CPU size on the shipped clips), optionally ',paper' (the default) or
  ',released' (configs/recipe_suml.py), and ',<baseline>'."""
  return build(parse_arg(arg))


def build(arg: common.Arg) -> ml_collections.ConfigDict:
  """The SUM-L stage (b) config for a parsed argument (also the base of suml_exo.py and suml_eval.py)."""
  small, baseline, recipe = arg.small, arg.variant, arg.recipe
  config = common.trainer_defaults(ml_collections.ConfigDict(), objective="suml",
                                   log_every_steps=10 if small else 100,
                                   checkpoint_every_steps=50 if small else 500)
  config.stage = "joint"  # 'exo' is stage (a), configs/suml_exo.py

  config.data = ml_collections.ConfigDict()
  # Record globs; empty: convert the manifest below into <workdir>/records/<view> on first use.
  config.data.ego_records = ""
  config.data.exo_records = ""
  config.data.ego_manifest = "data/suml/ego.csv"
  config.data.exo_manifest = "data/suml/exo.csv"
  # Narration pair file (.npz, egoexo_jax.pseudo_labels.narration_pairs) or a true-pair CSV (ego_id,exo_id).
  config.data.pairs = "data/suml/pairs.npz"
  # data.pair_top_k: draw each ego clip's partner among its first k candidates (the recipe sets it).
  config.data.ego_label_kind = "single"  # 'single': one class per head; 'multi_label': class sets
  config.data.exo_label_kind = "single" if small else "multi_label"
  config.data.convert_short_side = 160 if small else 320
  config.data.clip_length = 8
  config.data.frame_stride = 8
  config.data.crop_size = 112 if small else 224
  config.data.min_short_side = 128 if small else 256
  config.data.max_short_side = 160 if small else 320
  common.loader_defaults(config.data, num_workers=1 if small else 12)
  common.record_checks(config.data)

  config.model = ml_collections.ConfigDict()
  # Heads per view, head name -> classes: EPIC-100 verbs and nouns; LEMMA verbs and nouns (multi-label).
  # data/suml: one head of 2 (ego) and 3 (exo) classes. Parameters: <view>_head_<i> in this order.
  config.model.ego_num_classes = ml_collections.ConfigDict({"action": 2} if small else {"verb": 97, "noun": 300})
  config.model.exo_num_classes = ml_collections.ConfigDict({"action": 3} if small else {"verb": 25, "noun": 64})
  # The order of a record's labels over the heads (a config dict sorts its keys); models/suml.py numbers its
  # heads in the same order (HEAD_ORDER), which objectives/suml.py checks.
  config.data.ego_label_layout = () if small else ("verb", "noun")
  config.data.exo_label_layout = () if small else ("verb", "noun")
  config.model.backbone = "slow_r50"
  config.model.backbone_args = ml_collections.ConfigDict(dict(stage_blocks=(1, 1, 1, 1), width=16) if small else {})
  config.model.share_backbone = False
  config.model.freeze_exo_backbone = False
  config.model.discriminator_width = 0
  config.model.gradient_reversal_scale = 1.0
  config.model.dtype = "float32" if small else "bfloat16"

  config.loss = ml_collections.ConfigDict()
  # Weights, tau, sigma, threshold, negatives, the DCL form and L_t's reduction: the recipe sets them.
  config.loss.min_aligned_pairs = 2
  config.loss.triplet_margin = 0.1

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # LR per 64 clips (scaled linearly), warm-up, decay, steps: the recipe
  config.optimizer.schedule = "steps"
  config.optimizer.reference_batch_size = 64
  config.optimizer.warmup_start_fraction = 0.1
  config.optimizer.decay_factor = 0.1
  config.optimizer.frozen = ()

  # init_from (common.trainer_defaults): "ego_backbone=<Kinetics or Ego-Exo run>,exo_backbone=<stage (a)
  # run>:exo_backbone,exo_head_<i>=...". config.mesh: per_device negatives mean per device of this mesh.

  # Every value that comes from the paper or the release, with its source: configs/recipe_suml.py.
  common_recipe.apply_recipe(config, recipe_suml.ROWS, recipe, "suml", small=small)

  if baseline == "fpv_only":
    config.loss.alignment = "none"
    config.loss.weight_exo_task = config.loss.weight_align = config.loss.weight_video_text = 0.0
  elif baseline == "typical_cl":
    config.loss.alignment = "contrastive"
    config.loss.weight_video_text = 0.0
  elif baseline in ("triplet", "joint_embed"):
    config.loss.alignment = "triplet" if baseline == "triplet" else "joint_embedding"
    config.loss.weight_video_text = 0.0
    if baseline == "joint_embed":
      # True pairs; the shipped ones are declared by hand (data/suml/README.md). Charades-Ego: its own pairs.
      config.data.pairs = "data/suml/declared_true_pairs.csv"
  elif baseline == "domain_adapt":
    config.loss.alignment = "domain_adversarial"
    config.loss.weight_video_text = 0.0
    config.model.discriminator_width = 64 if small else 1024
  return config
