"""Temporal action segmentation on per-frame features with MS-TCN (downstream/mstcn.py).

    python -m egoexo_jax.downstream.segmentation --features_dir=runs/evgap_features \
        --segments=data/evgap/segments.csv --split=data/evgap/split.csv --output_dir=runs/segmentation
    # novel view: train on four views, test on the held-out fifth
    python -m egoexo_jax.downstream.segmentation ... --train_views=ego_0,ego_1,exo_0,exo_1 --test_views=exo_2

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

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from egoexo_jax.downstream import annotations, loop, metrics, mstcn

SELECTION = "mean"  # mean of F1@10, F1@25, F1@50, edit, accuracy


@dataclasses.dataclass(frozen=True)
class SegmentationSettings:
  num_stages: int = 4
  num_layers: int = 10
  features: int = 64
  dropout_rate: float = 0.5
  batch_size: int = 1
  length_multiple: int = 16  # sequences are zero-padded to one length, a multiple of this (one compilation)


def pad(sequences: Sequence[annotations.ViewSequence], length: int) -> dict[str, np.ndarray]:
  """Sequences -> 'features' (B, length, C), 'mask' (B, length) float32, 'labels' (B, length) int32 (-1 pad)."""
  dim = sequences[0].features.shape[1]
  batch = {"features": np.zeros((len(sequences), length, dim), np.float32),
           "mask": np.zeros((len(sequences), length), np.float32),
           "labels": np.full((len(sequences), length), -1, np.int32)}
  for i, sequence in enumerate(sequences):
    frames = len(sequence.features)
    batch["features"][i, :frames] = sequence.features
    batch["mask"][i, :frames] = 1
    batch["labels"][i, :frames] = annotations.frame_labels(sequence.segments, frames)
  return batch


def run(features_dir: str, segments_path: str, split_path: str, output_dir: str, *, train_views: Sequence[str] = (),
        test_views: Sequence[str] = (), settings: SegmentationSettings = SegmentationSettings(),
        loop_settings: loop.LoopSettings = loop.LoopSettings()) -> dict:
  """Trains, selects and tests a segmentation model; returns (and writes) the results dictionary."""
  segments, split = annotations.read_segments(segments_path), annotations.read_split(split_path)
  for name in ("train", "val", "test"):
    if not split[name]:
      raise annotations.AnnotationError(f"{split_path}: no '{name}' recordings")
  train = annotations.load_sequences(features_dir, segments, split["train"], train_views)
  val = annotations.load_sequences(features_dir, segments, split["val"], train_views)
  test = annotations.load_sequences(features_dir, segments, split["test"], test_views or train_views)
  num_classes = annotations.num_classes(segments, "action")
  longest = max(len(s.features) for s in train + val + test)
  length = -(-longest // settings.length_multiple) * settings.length_multiple
  dim = train[0].features.shape[1]

  model = mstcn.MultiStageTCN(num_classes, settings.num_stages, settings.num_layers, settings.features,
                              settings.dropout_rate)
  params = model.init(jax.random.key(loop_settings.seed), jnp.zeros((1, length, dim)), jnp.ones((1, length)),
                      train=False)["params"]

  def loss_fn(params, batch, rng):
    logits = model.apply({"params": params}, batch["features"], batch["mask"], train=True, rngs={"dropout": rng})
    return mstcn.mstcn_loss(logits, batch["labels"], batch["mask"])

  predict = jax.jit(lambda params, features, mask: jnp.argmax(
      model.apply({"params": params}, features, mask, train=False)[-1], axis=-1))

  def score(params, sequences):
    predictions, truths = [], []
    for sequence in sequences:
      batch = pad([sequence], length)
      frames = len(sequence.features)
      predictions.append(np.asarray(predict(params, batch["features"], batch["mask"]))[0, :frames])
      truths.append(batch["labels"][0, :frames])
    scores = metrics.segmentation_scores(predictions, truths)
    scores[SELECTION] = float(np.mean(list(scores.values())))
    return scores

  def epoch_batches(epoch):
    order = np.random.default_rng((loop_settings.seed, epoch)).permutation(len(train))
    for first in range(0, len(order), settings.batch_size):
      yield pad([train[i] for i in order[first:first + settings.batch_size]], length)

  best, history = loop.fit(params, loss_fn, epoch_batches, lambda p: score(p, val), SELECTION, loop_settings,
                           output_dir)
  test_scores = score(best, test)
  results = {
      "task": "temporal action segmentation", "model": "MS-TCN", "features_dir": os.path.abspath(features_dir),
      "settings": dataclasses.asdict(settings), "loop": dataclasses.asdict(loop_settings),
      "num_classes": num_classes, "feature_dim": dim,
      "train_views": sorted({s.view for s in train}), "test_views": sorted({s.view for s in test}),
      "sequences": {"train": len(train), "val": len(val), "test": len(test)},
  }
  return loop.write_results(output_dir, results, history, test_scores)


def _define_flags() -> None:
  loop.define_data_flags()
  flags.DEFINE_integer("epochs", 50, "Training epochs.")
  flags.DEFINE_float("learning_rate", 5e-4, "Adam learning rate (MS-TCN: 5e-4).")
  flags.DEFINE_integer("batch_size", 1, "Sequences per batch (MS-TCN: 1).")
  flags.DEFINE_integer("num_stages", 4, "MS-TCN stages.")
  flags.DEFINE_integer("num_layers", 10, "Dilated layers per stage.")
  flags.DEFINE_integer("num_features", 64, "Channels per layer.")
  flags.DEFINE_float("dropout", 0.5, "Dropout rate.")
  flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and dropout.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  results = run(f.features_dir, f.segments, f.split, f.output_dir, train_views=f.train_views, test_views=f.test_views,
                settings=SegmentationSettings(f.num_stages, f.num_layers, f.num_features, f.dropout, f.batch_size),
                loop_settings=loop.LoopSettings(f.epochs, f.learning_rate, seed=f.seed))
  print(f"best epoch {results['best_epoch']}; test " + ", ".join(f"{k} {v:.2f}" for k, v in results["test"].items()))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
