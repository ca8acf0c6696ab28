r"""EVGAP step 2: ego-exo group alignment (SigLIP loss), initialised from step 1 (configs/evgap_pair.py).

Batches: 64 scenes, each seen by M = 4 ego and N = 8 exo synchronised windows (a recording with fewer
views of a kind repeats some, drawn with replacement). Loss: SigLIP sigmoid loss over the B M ego x B N
exo windows with block-diagonal positives, on the last layer + 0.2 x each earlier layer, over each
device's own scenes (loss.group_scope 'local', the paper's; 'global' runs a ppermute ring over all
scenes). Scale t = exp(s), s initialised to log10(1/0.7) = 0.155 (t = 1.17) as the brief states the
paper does; SigLIP's own start is s = ln 10 (t = 10). Bias b initialised to -10 (SigLIP). AdamW,
learning rate 1e-4, decoupled weight decay 0.01 (PyTorch's AdamW default). The encoder and the
projections come from step 1's run (`init_from`); scale and bias start fresh.

  python main.py --config=configs/evgap_group.py --workdir=runs/evgap_group \
      --config.data.feature_records=/data/a101/records/train
  # init_from defaults to runs/evgap_pair (the step-1 workdir of configs/evgap_pair.py's docstring)

CPU size, after `python main.py --config=configs/evgap_pair.py:small --workdir=runs/evgap_pair_small`:

  python main.py --config=configs/evgap_group.py:small --workdir=runs/evgap_group_small

Expected for `:small` (measured on a 2-core CPU): about a minute; the loss falls steadily as the bias
moves up from -10 (see the README). Stand-in features: this shows the machinery, not accuracy.
"""

import math

from configs import evgap_pair


def get_config(arg: str = ""):
  config = evgap_pair.get_config(arg)
  small = arg == "small"
  config.loss.step = "group"
  config.model.group_log_scale_init = math.log10(1 / 0.7)
  config.model.group_bias_init = -10.0
  config.global_batch_size = 16 if small else 64
  config.num_train_steps = 200 if small else 10_000
  config.optimizer.name = "adamw"
  config.optimizer.base_learning_rate = 1e-3 if small else 1e-4
  config.optimizer.weight_decay = 0.01
  pair_workdir = "runs/evgap_pair_small" if small else "runs/evgap_pair"
  config.init_from = f"encoder={pair_workdir}:encoder,heads={pair_workdir}:heads"
  return config
