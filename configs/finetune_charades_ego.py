r"""Fine-tuning on Charades-Ego (first-person videos, 157 classes, multi-label), Ego-Exo's protocol.

Sigmoid BCE over 157 classes, SGD at base LR 0.25 (per 64 clips) with cosine decay, 60 epochs; a training
clip is labelled with the classes whose annotated interval it overlaps (data.label_intervals), the test
uses each video's label set, 10 clips x 3 crops combined by max, and reports mAP over the classes with a
positive. `:star` is Ego-Exo*: the interaction-map loss on the target videos, weight 0.1 per map (needs
the detector output, data.hand_object_dir).

  python -m egoexo_jax.input.annotations --dataset=charades_ego --csv=CharadesEgo_v1_train_only1st.csv \
      --video_root=/data/CharadesEgo_v1_480 --output=/data/charades_ego/train_manifest.csv
  python -m egoexo_jax.input.convert --manifest=/data/charades_ego/train_manifest.csv \
      --output_prefix=/data/charades_ego/train --num_shards=64 --workers=16     (likewise the test split)
  python main.py --config=configs/finetune_charades_ego.py --workdir=runs/charades_ego --config.init_from=runs/k400 \
      --config.data.train_records='/data/charades_ego/train.tfrecord-*' \
      --config.data.label_intervals=/data/charades_ego/train_manifest_intervals.json
  python -m egoexo_jax.evaluate --config=configs/finetune_charades_ego.py --workdir=runs/charades_ego \
      --records='/data/charades_ego/test.tfrecord-*' --output=runs/charades_ego/results.json

On the shipped clips (data/finetune/: 3 hand-labelled videos; test = the same videos), after
`python main.py --config=configs/egoexo.py:small --workdir=runs/egoexo_small`:

  python main.py --config=configs/finetune_charades_ego.py:small --workdir=runs/charades_ego_small \
      --config.init_from=runs/egoexo_small
  python -m egoexo_jax.evaluate --config=configs/finetune_charades_ego.py:small \
      --workdir=runs/charades_ego_small --output=runs/charades_ego_small/results.json

Measured for `:small` (2-core CPU shared with other jobs): conversion, compilation and 100 steps in 3 min;
the BCE averages 0.63 over steps 1-10 (ln 2 = 0.69 at the start) and 0.117 over steps 91-100, most of
the 157 classes never being positive. The test mAP (1.0 here) is over 3 classes of the 3 videos seen in
training: a check of the pipeline, not a benchmark.
"""

from configs import finetune_common

ARG = finetune_common.ARG  # small, star (Ego-Exo*), a recipe

NUM_TRAIN_VIDEOS = 3_085  # CharadesEgo_v1_train_only1st.csv; set data.num_train_examples for another split


def get_config(arg: str = ""):
  parsed = finetune_common.parse_arg(arg, "configs/finetune_charades_ego.py")
  small, star = parsed.small, "star" in parsed.options
  config = finetune_common.base_config(small=small, star=star)
  config.data.manifest = "data/finetune/charades_ego_train_manifest.csv"
  config.data.label_intervals = "data/finetune/charades_ego_train_manifest_intervals.json" if small else ""
  config.data.label_kind = "multi_label"
  config.data.label_layout = ("action",)
  config.model.num_classes.action = 157
  config.eval.manifest = "data/finetune/charades_ego_test_manifest.csv"
  config.eval.ensemble = "max"
  config.optimizer.schedule = "cosine"
  config.optimizer.base_learning_rate = 0.25
  config.epochs = 60.0
  if small:
    config.num_train_steps = 100
  else:
    config.data.num_train_examples = NUM_TRAIN_VIDEOS
    config.num_train_steps = finetune_common.steps_for_epochs(config.epochs, NUM_TRAIN_VIDEOS,
                                                              config.global_batch_size)
  if star:
    config.loss.weight_interaction = 0.1
    # The shipped manifest's paths are '../clips/<file>' (relative to data/finetune/); from this folder
    # they lead to the stand-in detector files data/pseudo_labels/hand_object/clips/<file>.npy.
    config.data.hand_object_dir = "data/pseudo_labels/hand_object/clips"
  return finetune_common.apply_recipe(config, parsed, "finetune_charades_ego")
