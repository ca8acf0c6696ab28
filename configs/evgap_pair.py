r"""EVGAP step 1: ego-exo pair alignment (CLIP loss) of a shared transformer over per-frame features.

Model: input projection 2048 -> 512, class token, learned positions, 6 post-norm layers (8 heads, MLP 2048,
ReLU, LayerNorm), a projection of every layer's class token. Batches: 200 synchronised ego-exo window
pairs, 10 per recording (hard negatives); windows of 20 frames every 100 frames, length x U[0.5, 2.0]
resampled back to 20. Loss: CLIP pair loss on the last layer + 0.2 x each earlier layer; logit scale
exp(s), s starting at 1 (the paper's "initialized to 1", read as s: see model.pair_log_scale_init below).
Adam, learning rate 5e-4 (not scaled with the batch).

Full size (Assembly101 TSM features; write a view manifest recording,view,kind,path[,fps] of .npy files,
convert it once, then train):

  python -m egoexo_jax.input.feature_records --manifest=/data/a101/views.csv \
      --output_prefix=/data/a101/records/train --num_shards=64 --chunk_frames=1000
  python main.py --config=configs/evgap_pair.py --workdir=runs/evgap_pair \
      --config.data.feature_records=/data/a101/records/train

CPU size, on the stand-in features shipped in data/evgap/ (converted into the workdir on first use):

  python main.py --config=configs/evgap_pair.py:small --workdir=runs/evgap_pair_small

Expected for `:small` on a 2-core CPU (measured, shared machine): about 30 s for 300 steps (batch 40 =
10 recordings x 4 windows of their first three quarters, a 3-layer width-64 encoder, Adam at 2e-3 so
that a few hundred steps show the trend); the last layer's CLIP loss falls from 3.00 (steps 1-20; ln 40
= 3.69 is chance) to 1.70 (steps 281-300), ego -> exo top-1 accuracy among the 40 pairs rises from 0.10
to 0.44 (chance 0.025) and the logit scale from e to 3.95. Ego -> exo group retrieval on the held-out
last quarter of every recording (26 scenes; objectives/evgap.py: evaluate) goes from 0.13 at step 20 to
0.27-0.33 from step 80 on (chance 0.038). With s starting at 0 (t = 1) instead, the loss fell only from
3.27 to 2.85 and the pair accuracy from 0.10 to 0.15 in 300 steps (measured before the hold-out). The
features are a fixed random projection of cropped frames (data/evgap/README.md): the numbers show the
machinery trains, nothing more. Then step 2: configs/evgap_group.py.
"""

import ml_collections

from configs import common

ARG = common.ArgSpec()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """`arg`: '' for the paper-size run, 'small' for a CPU run on data/evgap."""
  small = common.parse_arg(arg, "configs/evgap_pair.py", ARG).small
  config = common.trainer_defaults(ml_collections.ConfigDict(), objective="evgap",
                                   log_every_steps=20 if small else 100,
                                   checkpoint_every_steps=100 if small else 2_000)
  config.stage = "pair"  # 'group' is step 2, configs/evgap_group.py

  config.data = ml_collections.ConfigDict()
  # Prefix of converted feature records (<prefix>.json + shards). Empty: convert `view_manifest` into
  # <workdir>/feature_records on first use.
  config.data.feature_records = ""
  config.data.feature_format = ""  # 'tfrecord' or 'array_record' when both were written; '' = the first
  config.data.view_manifest = "data/evgap/views.csv"
  config.data.stored_dtype = "float16"
  config.data.chunk_frames = 0
  config.data.feature_dim = 128 if small else 2048
  config.data.window_frames = 8 if small else 20  # w1
  config.data.window_stride = 10 if small else 100  # w2
  config.data.min_window_scale = 0.5
  config.data.max_window_scale = 2.0
  config.data.windows_per_recording = 4 if small else 10  # G: pairs (step 1) or scenes (step 2) per recording in a batch
  # Held out of training and scored by ego -> exo group retrieval at every log step (objectives/evgap.py:
  # evaluate): the last heldout_fraction of every recording's frames, and whole recordings (comma-separated ids).
  config.data.heldout_fraction = 0.25 if small else 0.0
  config.data.heldout_recordings = ""
  config.data.ego_views_per_group = 4  # step 2: M
  config.data.exo_views_per_group = 8  # step 2: N
  config.data.batch_dtype = "float32" if small else "float16"  # host -> device transfer
  common.loader_defaults(config.data, num_workers=0 if small else 8)

  config.model = ml_collections.ConfigDict()
  config.model.width = 64 if small else 512
  config.model.num_layers = 3 if small else 6
  config.model.num_heads = 4 if small else 8
  config.model.mlp_dim = 128 if small else 2048
  config.model.embed_dim = 64 if small else 512
  config.model.max_length = 64  # >= window_frames
  config.model.dropout_rate = 0.1
  # Logit scales: the paper's stated values are read as the learnable parameter s, the scale being t = exp(s)
  # (CLIP's code holds log(1/0.07) in its parameter the same way): step 1 "initialized to 1" -> s = 1, t = e;
  # step 2 "log10(1/0.7)" -> s = 0.155, t = 1.17 (configs/evgap_group.py). Reading both as t instead would
  # start step 2 at t = 0.155, where no logit leaves [-0.155, 0.155].
  config.model.pair_log_scale_init = 1.0
  config.model.group_log_scale_init = 0.0  # step 2's (configs/evgap_group.py)
  config.model.group_bias_init = -10.0  # SigLIP's; only used with loss.use_group_bias
  config.model.dtype = "float32" if small else "bfloat16"

  config.loss = ml_collections.ConfigDict()
  config.loss.auxiliary_weight = 0.2
  # Step 2 (configs/evgap_group.py): EVGAP's Eq. 2 by default: per device ('local'), no bias, the mean over the
  # B^2 M N ego-exo pairs ('pairs'). SigLIP: use_group_bias True, normalization 'ego' (/ B M), scope 'global'.
  config.loss.group_scope = "local"
  config.loss.use_group_bias = False
  config.loss.group_normalization = "pairs"
  config.loss.tile_rows = 0

  config.global_batch_size = 40 if small else 200
  config.num_train_steps = 300 if small else 20_000
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"
  config.optimizer.schedule = "cosine"
  config.optimizer.base_learning_rate = 2e-3 if small else 5e-4  # :small: a few hundred steps show the trend
  config.optimizer.reference_batch_size = 0  # the rate as given, at any batch size
  config.optimizer.warmup_steps = 10 if small else 1_000
  config.optimizer.warmup_start_fraction = 0.01
  config.optimizer.weight_decay = 0.0
  config.optimizer.frozen = ()
  # config.mesh (common.trainer_defaults): the SigLIP ring of step 2 runs over both of its axes.
  return config
