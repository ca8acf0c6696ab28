"""Action anticipation on per-frame features: verb, object and action of the next segment, 1 s ahead.

    python -m egoexo_jax.downstream.anticipation --features_dir=runs/evgap_features \
        --segments=data/evgap/segments.csv --split=data/evgap/split.csv --output_dir=runs/anticipation --fps=30

Examples (annotations.anticipation_samples): for every segment, the `observed_frames` frames that end
tau_a = `anticipation_seconds` (1 s, EPIC-Kitchens' and Assembly101's) before it starts. Model: a Dense
layer to `hidden` channels, two masked residual temporal convolutions (kernel 3, ReLU), the masked
mean and the last observed frame concatenated, dropout, and three linear heads (verb, object, action;
the action has its own head, as Assembly101's baselines). Loss: the sum of the three cross-entropies.
Metric: class-mean top-5 recall of each head (metrics.class_mean_top_k_recall), in percent; the
validation action recall picks the epoch. Novel views: --train_views / --test_views as segmentation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from egoexo_jax import losses
from egoexo_jax.downstream import annotations, loop, metrics

HEADS = ("verb", "object", "action")
SELECTION = "action_recall@5"


class AnticipationModel(nn.Module):
  """observed (B, L, C), mask (B, L) -> {'verb': (B, Kv), 'object': (B, Ko), 'action': (B, Ka)} logits."""

  num_classes: dict[str, int]
  hidden: int = 256
  dropout_rate: float = 0.3

  @nn.compact
  def __call__(self, observed: jax.Array, mask: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    mask = mask[..., None]
    x = nn.relu(nn.Dense(self.hidden, name="input")(observed)) * mask
    for layer in range(2):
      x = (x + nn.Conv(self.hidden, (3,), padding="SAME", name=f"temporal_{layer}")(nn.relu(x))) * mask
    mean = jnp.sum(x, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(jnp.concatenate([mean, x[:, -1]], axis=-1))
    return {head: nn.Dense(self.num_classes[head], name=head)(pooled) for head in HEADS}


@dataclasses.dataclass(frozen=True)
class AnticipationSettings:
  fps: float = 30.0
  anticipation_seconds: float = 1.0
  observed_frames: int = 60
  hidden: int = 256
  dropout_rate: float = 0.3
  batch_size: int = 64


def examples(sequences: Sequence[annotations.ViewSequence], settings: AnticipationSettings) -> dict[str, np.ndarray]:
  parts = [annotations.anticipation_samples(s, settings.fps, settings.anticipation_seconds, settings.observed_frames)
           for s in sequences]
  return {"observed": np.concatenate([p[0] for p in parts]), "mask": np.concatenate([p[1] for p in parts]),
          "labels": np.concatenate([p[2] for p in parts])}


def run(features_dir: str, segments_path: str, split_path: str, output_dir: str, *, train_views: Sequence[str] = (),
        test_views: Sequence[str] = (), settings: AnticipationSettings = AnticipationSettings(),
        loop_settings: loop.LoopSettings = loop.LoopSettings(epochs=30, learning_rate=1e-3)) -> dict:
  """Trains, selects and tests an anticipation model; returns (and writes) the results dictionary."""
  segments, split = annotations.read_segments(segments_path), annotations.read_split(split_path)
  sets = {}
  for name, views in (("train", train_views), ("val", train_views), ("test", test_views or train_views)):
    sets[name] = examples(annotations.load_sequences(features_dir, segments, split[name], views), settings)
    if not len(sets[name]["labels"]):
      raise annotations.AnnotationError(f"no anticipation examples in the '{name}' recordings: every segment starts "
                                        f"within {settings.anticipation_seconds} s of its recording's start")
  num_classes = {head: annotations.num_classes(segments, head) for head in HEADS}
  model = AnticipationModel(num_classes, settings.hidden, settings.dropout_rate)
  train = sets["train"]
  params = model.init(jax.random.key(loop_settings.seed), train["observed"][:1], train["mask"][:1],
                      train=False)["params"]

  def loss_fn(params, batch, rng):
    logits = model.apply({"params": params}, batch["observed"], batch["mask"], train=True, rngs={"dropout": rng})
    return sum(losses.softmax_cross_entropy(logits[head], batch["labels"][:, i]) for i, head in enumerate(HEADS))

  predict = jax.jit(lambda params, observed, mask: model.apply({"params": params}, observed, mask, train=False))

  def score(params, data):
    outputs = {head: [] for head in HEADS}
    for first in range(0, len(data["labels"]), settings.batch_size):
      logits = predict(params, data["observed"][first:first + settings.batch_size],
                       data["mask"][first:first + settings.batch_size])
      for head in HEADS:
        outputs[head].append(np.asarray(logits[head]))
    return {f"{head}_recall@5": metrics.class_mean_top_k_recall(np.concatenate(outputs[head]), data["labels"][:, i], 5)
            for i, head in enumerate(HEADS)}

  def epoch_batches(epoch):
    order = np.random.default_rng((loop_settings.seed, epoch)).permutation(len(train["labels"]))
    batches = len(order) // settings.batch_size or 1  # whole batches (one compilation); a small set: all of it
    for b in range(batches):
      chosen = order[b * settings.batch_size:(b + 1) * settings.batch_size]
      yield {k: v[chosen] for k, v in train.items()}

  best, history = loop.fit(params, loss_fn, epoch_batches, lambda p: score(p, sets["val"]), SELECTION, loop_settings,
                           output_dir)
  test_scores = score(best, sets["test"])
  results = {
      "task": "action anticipation", "features_dir": os.path.abspath(features_dir),
      "settings": dataclasses.asdict(settings), "loop": dataclasses.asdict(loop_settings), "num_classes": num_classes,
      "examples": {name: int(len(data["labels"])) for name, data in sets.items()},
  }
  return loop.write_results(output_dir, results, history, test_scores)


def _define_flags() -> None:
  loop.define_data_flags()
  flags.DEFINE_float("fps", 30.0, "Frames per second of the features.")
  flags.DEFINE_float("anticipation_seconds", 1.0, "Gap tau_a between the observed frames and the segment.")
  flags.DEFINE_integer("observed_frames", 60, "Frames observed before the gap.")
  flags.DEFINE_integer("epochs", 30, "Training epochs.")
  flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
  flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
  flags.DEFINE_integer("hidden", 256, "Channels of the temporal layers.")
  flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and dropout.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  settings = AnticipationSettings(f.fps, f.anticipation_seconds, f.observed_frames, f.hidden, batch_size=f.batch_size)
  results = run(f.features_dir, f.segments, f.split, f.output_dir, train_views=f.train_views, test_views=f.test_views,
                settings=settings, loop_settings=loop.LoopSettings(f.epochs, f.learning_rate, seed=f.seed))
  print(f"best epoch {results['best_epoch']}; test " + ", ".join(f"{k} {v:.2f}" for k, v in results["test"].items()))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
