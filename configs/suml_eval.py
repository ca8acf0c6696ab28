r"""SUM-L stage (c): the ego encoder and head of a stage (b) run, evaluated on ego records.

  python -m egoexo_jax.suml_eval --config=configs/suml_eval.py --workdir=runs/suml \
      --config.eval.records='/data/epic100/val.tfrecord-*'

Laptop / CPU size, after the `:small` stages of configs/suml_exo.py and configs/suml.py:

  python -m egoexo_jax.suml_eval --config=configs/suml_eval.py:small --workdir=runs/suml_small

writes runs/suml_small/suml_eval.json (top-1 per head and all heads right; mAP for multi-label ego
labels). The shipped data has no held-out ego clips, so `:small` scores the 9 training clips: a check
that the ego side loads and predicts, not a result (data/suml/README.md). The model fields must match
the trained run (same argument as its config).
"""

import ml_collections

from configs import suml

ARG = suml.ARG  # the trained run's argument


def get_config(arg: str = ""):
  """`arg`: the argument of the trained run's configs/suml.py (its model fields must match)."""
  parsed = suml.parse_arg(arg, "configs/suml_eval.py")
  config = suml.build(parsed)
  config.eval = ml_collections.ConfigDict()
  config.eval.records = ""  # ego records to score; empty: the ego manifest converted into the workdir
  config.eval.checkpoint = ""  # workdir, checkpoints/ or step folder; empty: --workdir
  config.eval.batch_size = 8 if parsed.small else 32
  return config
