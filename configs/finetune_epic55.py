r"""Fine-tuning on EPIC-Kitchens-55 action recognition: verb (125) and noun (352) heads.

As configs/finetune_epic100.py (summed cross-entropy, steps x0.1 at epochs 20 and 25, 30 epochs, 10 x 3
views averaged), with the released EPIC-55 config's base LR 0.01 (per 64 clips). Ego-Exo evaluates
EPIC-55 on the TBN train/validation split of EPIC_train_action_labels; convert each part with
`python -m egoexo_jax.input.annotations --dataset=epic55 --csv=<part>.csv ...` and point
data.train_records / --records at them (set data.num_train_examples to the training part's size).

  python main.py --config=configs/finetune_epic55.py --workdir=runs/epic55 --config.init_from=runs/k400 \
      --config.data.train_records='/data/epic55/train.tfrecord-*' --config.data.num_train_examples=<N>

On the shipped clips (the EPIC-100 segments of data/finetune/ with EPIC-55 class ids):

  python main.py --config=configs/finetune_epic55.py:small --workdir=runs/epic55_small \
      --config.init_from=runs/egoexo_small
  python -m egoexo_jax.evaluate --config=configs/finetune_epic55.py:small --workdir=runs/epic55_small \
      --output=runs/epic55_small/results.json
"""

from configs import finetune_epic100

ARG = finetune_epic100.ARG  # small, star (Ego-Exo*), a recipe

NUM_TRAIN_SEGMENTS = 28_472  # all of EPIC_train_action_labels.csv; the TBN training part is smaller


def get_config(arg: str = ""):
  config = finetune_epic100.epic_config(
      arg, "configs/finetune_epic55.py", verbs=125, nouns=352, num_segments=NUM_TRAIN_SEGMENTS,
      learning_rate=0.01,
      manifests=("data/finetune/epic55_train_manifest.csv", "data/finetune/epic55_val_manifest.csv"))
  return config
