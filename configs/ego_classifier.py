r"""Ego-Score teacher (Ego-Exo Eq. 1): a Slow-only R50 ego/exo view classifier.

Train it on videos labelled by view (Charades-Ego: 0 = first-person, 1 = third-person; only the
binary label is used), from a Kinetics-style initialisation (`init_from`: a workdir or checkpoint
whose `backbone` matches), then score every exo video with
`python -m egoexo_jax.pseudo_labels.ego_score` (N = 2 clips, logits averaged). The same trainer
as Ego-Exo pre-training: the ego/object/interaction heads are off and their loss weights are 0,
so the loss is the 2-way cross-entropy.

  python main.py --config=configs/ego_classifier.py --workdir=runs/ego_cls \
      --config.data.train_records='/data/charades_ego_views/train.tfrecord-*' --config.init_from=runs/k400

On the shipped clips (`data/views_manifest.csv`), for a laptop:

  python main.py --config=configs/ego_classifier.py:small --workdir=runs/ego_cls_small
"""

import ml_collections

from configs import common, common_recipe, egoexo, recipe_egoexo

ARG = egoexo.ARG


def get_config(arg: str = ""):
  """`arg` as configs/egoexo.py's ('small', a recipe); the teacher's own rows (supplement S1: LR 0.01 per
  64 clips, cosine, 100 epochs) are the same under both recipes, as no teacher config was released."""
  parsed = common.parse_arg(arg, "configs/ego_classifier.py", ARG)
  config = egoexo.build(parsed)
  config.data.manifest = "data/views_manifest.csv"
  config.data.ego_logits = config.data.object_logits = config.data.hand_object_dir = ""
  config.model.num_classes = ml_collections.ConfigDict({"action": 2})  # 0 = first-person, 1 = third-person
  config.model.use_ego_heads = False
  config.loss.weight_ego_score = config.loss.weight_object = config.loss.weight_interaction = 0.0
  config.init_from = ""  # workdir or checkpoint to take the backbone from (Kinetics pre-training)
  if parsed.small:
    config.num_train_steps = 100
    config.optimizer.warmup_steps = 10
    config.checkpoint_every_steps = 50
  # Steps from 100 epochs over the records (counted at start; or set data.num_train_examples).
  return common_recipe.apply_recipe(config, recipe_egoexo.ROWS, parsed.recipe, "ego_classifier",
                                    small=parsed.small)
