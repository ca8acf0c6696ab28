r"""SUM-L stage (a): the exo encoder f_t and task head g_t trained on the exo dataset alone.

Its checkpoint starts stage (b) (configs/suml.py) through
`--config.init_from="...,exo_backbone=<this workdir>:exo_backbone,exo_head_0=<this workdir>:exo_head_0"`.
The exo encoder starts from a Kinetics / Ego-Exo checkpoint:
`--config.init_from="exo_backbone=runs/egoexo"` (that run's 'backbone').

Full size (LEMMA third-person clips, verb and noun sets, multi-label BCE):

  python main.py --config=configs/suml_exo.py --workdir=runs/suml_exo \
      --config.data.exo_records='/data/lemma_tpv/train.tfrecord-*' --config.init_from="exo_backbone=runs/egoexo"

Laptop / CPU size, on the shipped exo clips of data/suml/exo.csv (8 segments, 3 hand-declared classes):

  python main.py --config=configs/suml_exo.py:small --workdir=runs/suml_exo_small

Expected for `:small` (measured on a 2-core CPU shared with other jobs: 1 min 39 s with conversion and
compilation): the 3-class loss averages 1.00 over steps 1-10 and 0.045 over steps 51-60, accuracy 1.0.
The clips are not a real exo dataset (data/suml/README.md).
"""

from configs import common, suml

ARG = common.ArgSpec(default_recipe=suml.ARG.default_recipe)  # no baselines: stage (a) has no alignment


def get_config(arg: str = ""):
  """`arg`: '' or 'small', optionally ',paper' or ',released' (configs/recipe_suml.py: L_t's reduction)."""
  parsed = common.parse_arg(arg, "configs/suml_exo.py", ARG)
  small = parsed.small
  config = suml.build(parsed)
  config.stage = "exo"
  config.loss.weight_exo_task = 1.0  # stage (a) trains on L_t alone; the joint weights do not apply
  config.loss.weight_align = config.loss.weight_video_text = 0.0
  config.loss.alignment = "none"
  config.optimizer.schedule = "cosine"
  config.optimizer.base_learning_rate = 0.05 if small else 0.1
  config.num_train_steps = 60 if small else 20_000
  config.optimizer.warmup_steps = 10 if small else 1_000
  config.checkpoint_every_steps = 30 if small else 5_000
  return config
