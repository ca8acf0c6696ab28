"""Temporal action segmentation on per-frame features: MS-TCN (mstcn.py), C2F-TCN (c2ftcn.py), ASFormer
(asformer.py) or LTContext (ltcontext.py).

    python -m egoexo_jax.downstream.segmentation --features_dir=runs/evgap_features \
        --segments=data/evgap/segments.csv --split=data/evgap/split.csv --output_dir=runs/segmentation \
        [--model=c2ftcn|asformer|ltcontext|mstcn] [--protocol=frozen|finetune --encoder_checkpoint=runs/evgap_group_small]
    # novel view: train on four views, test on the held-out fifth
    python -m egoexo_jax.downstream.segmentation ... --train_views=ego_0,ego_1,exo_0,exo_1 --test_views=exo_2
    # two-view input (views.py): an ego and an exo view side by side
    python -m egoexo_jax.downstream.segmentation ... --train_views=ego_0+exo_0,ego_1+exo_1 --test_views=ego_0+exo_0

Protocols: 'frozen' trains the task model on the features in --features_dir (raw features: the
baseline; features written by downstream.extract: +EVGAP*); 'finetune' stacks the EVGAP encoder of
--encoder_checkpoint (its config --encoder_config) under the task model and trains both (+EVGAP,
encoder_stack.py); --features_dir then holds the raw features the encoder was pre-trained on.
C2F-TCN sees the features max-pooled over chunks of --chunk_size frames (Assembly101: 20) and its
ensembled prediction per chunk is repeated over the chunk's frames for scoring; the released
training augmentation (random chunk sizes 10-40) and test-time augmentation are not done here.

Trains on the train recordings (x train views) with Adam for `epochs` epochs, scores the validation
recordings (x train views) after every epoch and keeps the epoch with the best mean of F1@{10,25,50},
edit and accuracy (`<output_dir>/best.msgpack`); that model is scored once on the test recordings (x
test views). `<output_dir>/results.json` holds the settings, every epoch's validation scores, the best
epoch and the test scores (percent).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from egoexo_jax import pictures
from egoexo_jax.downstream import annotations, asformer, c2ftcn, encoder_stack, loop, ltcontext, metrics, mstcn, views

MODELS = ("mstcn", "c2ftcn", "asformer", "ltcontext")
MODEL_NAMES = {"mstcn": "MS-TCN", "c2ftcn": "C2F-TCN", "asformer": "ASFormer", "ltcontext": "LTContext"}
# The smoothing weight of each multi-stage model's loss (mstcn.mstcn_loss): MS-TCN's and ASFormer's released
# 0.15; LTContext's Assembly101 yaml 0.17.
SMOOTHING_WEIGHTS = {"mstcn": 0.15, "asformer": 0.15, "ltcontext": ltcontext.SMOOTHING_WEIGHT}
SELECTION = "mean"  # mean of F1@10, F1@25, F1@50, edit, accuracy


@dataclasses.dataclass(frozen=True)
class SegmentationSettings:
  model: str = "mstcn"
  num_stages: int = 4  # MS-TCN; ASFormer: the encoder and 3 decoders (released); LTContext: 4 (Assembly101 yaml)
  num_layers: int = 10  # MS-TCN and ASFormer (released); LTContext: ltc_num_layers
  features: int = 64  # MS-TCN, ASFormer and LTContext (released)
  dropout_rate: float = 0.5  # MS-TCN and ASFormer (released); LTContext: ltc_dropout_rate
  batch_size: int = 1
  length_multiple: int = 16  # sequences are zero-padded to one length, a multiple of this (one compilation)
  chunk_size: int = 20  # C2F-TCN: frames max-pooled into one input step (Assembly101's released chunk_size)
  c2f_encoder_widths: tuple[int, ...] = (256, 256, 256, 128, 128, 128, 128)  # released model.py
  c2f_decoder_width: int = 128
  channel_masking_rate: float = 0.3  # ASFormer and LTContext: input channels dropped whole (both releases)
  ltc_num_layers: int = 9  # LTContext (ltc/config/defaults.py MODEL.LTC.NUM_LAYERS)
  ltc_window: int = 64  # LTContext W (WINDOWED_ATTN_W)
  ltc_stride: int = 64  # LTContext G (LONG_TERM_ATTN_G)
  ltc_dropout_rate: float = 0.2  # LTContext (MODEL.LTC.DROPOUT_PROB; attention weights: MODEL.ATTENTION.DROPOUT)


@dataclasses.dataclass(frozen=True)
class ProtocolSettings:
  """'frozen': the task model on the given features; 'finetune': the EVGAP encoder under it (encoder_stack)."""

  protocol: str = "frozen"
  encoder_config: str = ""  # 'configs/evgap_group.py:small'; '': the run's saved <workdir>/config.json
  encoder_checkpoint: str = ""  # the pre-training run's workdir (or checkpoints/ or a step folder)
  window_frames: int = 0  # encoder window; 0: the config's data.window_frames (EVGAP's w1)

  def check(self) -> None:
    if self.protocol not in encoder_stack.PROTOCOLS:
      raise ValueError(f"unknown protocol '{self.protocol}': use one of {encoder_stack.PROTOCOLS}")
    if self.protocol == "finetune" and not self.encoder_checkpoint:
      raise ValueError("protocol 'finetune' needs encoder_checkpoint (the pre-training run; its saved config is "
                       "used, or encoder_config checked against it)")


def stack(head: nn.Module, protocol: ProtocolSettings, num_views: int) -> tuple[nn.Module, dict]:
  """The task model, under the EVGAP encoder for 'finetune'; and what results.json records about it."""
  protocol.check()
  if protocol.protocol == "frozen":
    return head, {"protocol": "frozen"}
  config = encoder_stack.run_config_of(protocol.encoder_checkpoint, protocol.encoder_config)
  window = protocol.window_frames or config.data.window_frames
  model = encoder_stack.EncoderStack(encoder_stack.encoder_from_config(config), head, window, num_views)
  config_source = protocol.encoder_config or "<encoder_checkpoint>/config.json"
  return model, {"protocol": "finetune", "encoder_config": config_source, "window_frames": window,
                 "encoder_checkpoint": os.path.abspath(protocol.encoder_checkpoint)}


def initialize(model: nn.Module, protocol: ProtocolSettings, seed: int, *inputs) -> tuple[dict, dict | None]:
  """(params, other collections or None); the encoder's parameters from the checkpoint under 'finetune'."""
  variables = jax.jit(lambda rng: model.init({"params": rng, "dropout": rng}, *inputs, train=False))(
      jax.random.key(seed))
  params = variables["params"]
  if protocol.protocol == "finetune":
    params = encoder_stack.load_pretrained(params, protocol.encoder_checkpoint)
  state = {k: v for k, v in variables.items() if k != "params"}
  return params, state or None


def pad(sequences: Sequence[annotations.ViewSequence], length: int, chunk_size: int = 0) -> dict[str, np.ndarray]:
  """Sequences -> 'features' (B, length, C), 'mask' (B, length) float32, 'labels' (B, length) int32 (-1 pad);
  with chunk_size, also 'chunk_labels' (B, length / chunk_size) (c2ftcn.chunk_labels)."""
  dim = sequences[0].features.shape[1]
  batch = {"features": np.zeros((len(sequences), length, dim), np.float32),
           "mask": np.zeros((len(sequences), length), np.float32),
           "labels": np.full((len(sequences), length), -1, np.int32)}
  for i, sequence in enumerate(sequences):
    frames = len(sequence.features)
    batch["features"][i, :frames] = sequence.features
    batch["mask"][i, :frames] = 1
    batch["labels"][i, :frames] = annotations.frame_labels(sequence.segments, frames)
  if chunk_size:
    batch["chunk_labels"] = c2ftcn.chunk_labels(batch["labels"], chunk_size)
  return batch


def padded_length(longest: int, settings: SegmentationSettings) -> int:
  if settings.model == "c2ftcn":
    chunks = max(-(-longest // settings.chunk_size), c2ftcn.MIN_LENGTH)
    return chunks * settings.chunk_size
  return -(-longest // settings.length_multiple) * settings.length_multiple


def head_model(settings: SegmentationSettings, num_classes: int) -> nn.Module:
  if settings.model == "mstcn":
    return mstcn.MultiStageTCN(num_classes, settings.num_stages, settings.num_layers, settings.features,
                               settings.dropout_rate)
  if settings.model == "c2ftcn":
    return c2ftcn.ChunkedC2FTCN(num_classes, settings.chunk_size, settings.c2f_encoder_widths,
                                settings.c2f_decoder_width)
  if settings.model == "asformer":
    return asformer.ASFormer(num_classes, settings.num_layers, settings.features, settings.num_stages - 1,
                             channel_masking_rate=settings.channel_masking_rate, dropout_rate=settings.dropout_rate)
  if settings.model == "ltcontext":
    return ltcontext.LTContext(num_classes, settings.num_stages, settings.ltc_num_layers, settings.features,
                               window=settings.ltc_window, stride=settings.ltc_stride,
                               channel_masking_rate=settings.channel_masking_rate,
                               dropout_rate=settings.ltc_dropout_rate, attention_dropout_rate=settings.ltc_dropout_rate)
  raise ValueError(f"unknown segmentation model '{settings.model}': use one of {MODELS}")


def task_loss(settings: SegmentationSettings, outputs, batch) -> jax.Array:
  if settings.model == "c2ftcn":
    chunk_mask = batch["mask"].reshape(batch["mask"].shape[0], -1, settings.chunk_size).max(axis=-1)
    return c2ftcn.c2f_loss(c2ftcn.ensemble_probabilities(outputs), batch["chunk_labels"], chunk_mask)
  return mstcn.mstcn_loss(outputs, batch["labels"], batch["mask"], SMOOTHING_WEIGHTS[settings.model])


def frame_predictions(settings: SegmentationSettings, outputs) -> jax.Array:
  """(B, T) predicted class per frame."""
  if settings.model == "c2ftcn":
    chunks = jnp.argmax(c2ftcn.ensemble_probabilities(outputs), axis=-1)
    return jnp.repeat(chunks, settings.chunk_size, axis=1)
  return jnp.argmax(outputs[-1], axis=-1)


def run(features_dir: str, segments_path: str, split_path: str, output_dir: str, *, train_views: Sequence[str] = (),
        test_views: Sequence[str] = (), settings: SegmentationSettings = SegmentationSettings(),
        loop_settings: loop.LoopSettings = loop.LoopSettings(),
        protocol: ProtocolSettings = ProtocolSettings(), label: str = "") -> dict:
  """Trains, selects and tests a segmentation model; returns (and writes) the results dictionary."""
  segments, split = annotations.read_segments(segments_path), annotations.read_split(split_path)
  for name in ("train", "val", "test"):
    if not split[name]:
      raise annotations.AnnotationError(f"{split_path}: no '{name}' recordings")
  num_views = views.num_views(list(train_views) + list(test_views))
  train = views.load(features_dir, segments, split["train"], train_views)
  val = views.load(features_dir, segments, split["val"], train_views)
  test = views.load(features_dir, segments, split["test"], test_views or train_views)
  num_classes = annotations.num_classes(segments, "action")
  length = padded_length(max(len(s.features) for s in train + val + test), settings)
  dim = train[0].features.shape[1]
  chunk_size = settings.chunk_size if settings.model == "c2ftcn" else 0

  model, protocol_record = stack(head_model(settings, num_classes), protocol, num_views)
  params, state = initialize(model, protocol, loop_settings.seed, jnp.zeros((1, length, dim)), jnp.ones((1, length)))

  def train_loss(params, state, batch, rng):
    variables = {"params": params, **(state or {})}
    kwargs = dict(train=True, rngs={"dropout": rng})
    if state is None:
      return task_loss(settings, model.apply(variables, batch["features"], batch["mask"], **kwargs), batch), None
    outputs, state = model.apply(variables, batch["features"], batch["mask"], mutable=list(state), **kwargs)
    return task_loss(settings, outputs, batch), state

  state_given = state is not None
  loss_fn = train_loss if state_given else lambda params, batch, rng: train_loss(params, None, batch, rng)[0]
  predict = jax.jit(lambda variables, features, mask: frame_predictions(
      settings, model.apply(variables, features, mask, train=False)))

  def score(trained, sequences, keep: list | None = None):
    """Scores; with `keep`, appends (recording__view, truth, prediction) per sequence to it."""
    variables = {"params": trained[0], **trained[1]} if state_given else {"params": trained}
    predictions, truths = [], []
    for sequence in sequences:
      batch = pad([sequence], length)
      frames = len(sequence.features)
      predictions.append(np.asarray(predict(variables, batch["features"], batch["mask"]))[0, :frames])
      truths.append(batch["labels"][0, :frames])
      if keep is not None:
        keep.append((f"{sequence.recording}__{sequence.view}", truths[-1], predictions[-1]))
    scores = metrics.segmentation_scores(predictions, truths)
    scores[SELECTION] = float(np.mean(list(scores.values())))
    return scores

  def epoch_batches(epoch):
    order = np.random.default_rng((loop_settings.seed, epoch)).permutation(len(train))
    for first in range(0, len(order), settings.batch_size):
      yield pad([train[i] for i in order[first:first + settings.batch_size]], length, chunk_size)

  best, history = loop.fit(params, loss_fn, epoch_batches, lambda p: score(p, val), SELECTION, loop_settings,
                           output_dir, model_state=state)
  test_predictions = []
  test_scores = score(best, test, test_predictions)
  timelines = pictures.save_segmentation(output_dir, test_predictions, num_classes)  # predictions/*.npy too
  logging.info("test predictions in %s, timelines (ground truth above prediction) in %s",
               os.path.join(output_dir, "predictions"), os.path.dirname(timelines[0]) if timelines else "-")
  model_name = MODEL_NAMES[settings.model]
  results = {
      "task": "temporal action segmentation", "model": model_name, "features_dir": os.path.abspath(features_dir),
      "label": label, **protocol_record,
      "settings": dataclasses.asdict(settings), "loop": dataclasses.asdict(loop_settings),
      "num_classes": num_classes, "feature_dim": dim, "num_views": num_views,
      "train_views": sorted({s.view for s in train}), "test_views": sorted({s.view for s in test}),
      "sequences": {"train": len(train), "val": len(val), "test": len(test)},
  }
  return loop.write_results(output_dir, results, history, test_scores)


def define_protocol_flags() -> None:
  """--protocol, --encoder_config, --encoder_checkpoint, --window_frames, --label (both CLIs)."""
  flags.DEFINE_enum("protocol", "frozen", encoder_stack.PROTOCOLS,
                    "frozen: train on --features_dir; finetune: the EVGAP encoder under the task model.")
  flags.DEFINE_string("encoder_config", "", "finetune, optional: the pre-training config, e.g. "
                      "configs/evgap_group.py:small (default: <encoder_checkpoint>/config.json, which it must match).")
  flags.DEFINE_string("encoder_checkpoint", "", "finetune: the pre-training run (workdir or checkpoint folder).")
  flags.DEFINE_integer("window_frames", 0, "finetune: encoder window (0: the config's data.window_frames).")
  flags.DEFINE_string("label", "", "Row name in the results table (default: from protocol and features).")


def protocol_from_flags() -> ProtocolSettings:
  f = flags.FLAGS
  return ProtocolSettings(f.protocol, f.encoder_config, f.encoder_checkpoint, f.window_frames)


def _define_flags() -> None:
  loop.define_data_flags()
  flags.adopt_module_key_flags(loop)  # --help lists the required data flags defined there
  define_protocol_flags()
  flags.DEFINE_enum("model", "mstcn", MODELS, "Segmentation model.")
  flags.DEFINE_integer("epochs", 50, "Training epochs.")
  flags.DEFINE_float("learning_rate", 5e-4, "Adam learning rate (MS-TCN and ASFormer: 5e-4; C2F-TCN on "
                     "Assembly101: 1e-4; LTContext on Assembly101: 2.5e-4).")
  flags.DEFINE_float("weight_decay", 0.0, "Adam L2 weight decay (C2F-TCN on Assembly101: 1e-4; ASFormer: 1e-5; "
                     "LTContext on Assembly101: 1e-3).")
  flags.DEFINE_integer("batch_size", 1, "Sequences per batch (MS-TCN: 1; C2F-TCN on Assembly101: 20).")
  flags.DEFINE_integer("num_stages", 4, "Stages: MS-TCN and LTContext; ASFormer: encoder + decoders.")
  flags.DEFINE_integer("num_layers", 10, "Dilated layers per stage (MS-TCN, ASFormer).")
  flags.DEFINE_integer("num_features", 64, "Channels per layer (MS-TCN, ASFormer, LTContext's first stage).")
  flags.DEFINE_float("dropout", 0.5, "Dropout rate (MS-TCN, ASFormer).")
  flags.DEFINE_integer("chunk_size", 20, "C2F-TCN: frames max-pooled into one input step.")
  flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and dropout.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  settings = SegmentationSettings(f.model, f.num_stages, f.num_layers, f.num_features, f.dropout, f.batch_size,
                                  chunk_size=f.chunk_size)
  results = run(f.features_dir, f.segments, f.split, f.output_dir, train_views=f.train_views, test_views=f.test_views,
                settings=settings, protocol=protocol_from_flags(), label=f.label,
                loop_settings=loop.LoopSettings(f.epochs, f.learning_rate, f.weight_decay, seed=f.seed))
  print(f"best epoch {results['best_epoch']}; test " + ", ".join(f"{k} {v:.2f}" for k, v in results["test"].items()))


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
