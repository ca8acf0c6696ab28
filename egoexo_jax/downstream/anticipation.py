"""Action anticipation on per-frame features: verb, object and action of the next segment, 1 s ahead.

    python -m egoexo_jax.downstream.anticipation --features_dir=runs/evgap_features \
        --segments=data/evgap/segments.csv --split=data/evgap/split.csv --output_dir=runs/anticipation --fps=30 \
        [--model=tempagg|conv] [--protocol=frozen|finetune --encoder_config=... --encoder_checkpoint=...]

--model=tempagg (the default of this CLI; EVGAP's and Assembly101's model): TempAgg (tempagg.py) on
recent and spanning snippets of the past, with Assembly101's released settings (Adam 1e-4, batch 32,
15 epochs, x0.1 after epoch 10). Protocols, two-view inputs ('ego_0+exo_0') and novel views as in
segmentation.py.

--model=conv, examples (annotations.anticipation_samples): for every segment, the `observed_frames` frames that end
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
from egoexo_jax.downstream import annotations, loop, metrics, segmentation, tempagg, views

HEADS = ("verb", "object", "action")
MODELS = ("tempagg", "conv")
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
  observed_frames: int = 60  # conv
  hidden: int = 256  # conv
  dropout_rate: float = 0.3
  batch_size: int = 64
  model: str = "conv"  # or 'tempagg' (the CLI's default)
  snippets: tempagg.SnippetSettings | None = None  # tempagg: None = the released ones at fps, anticipation_seconds
  latent: int = 512  # tempagg
  linear: int = 512  # tempagg
  past_attention: bool = False  # tempagg (Assembly101's release: off)

  def snippet_settings(self) -> tempagg.SnippetSettings:
    base = self.snippets or tempagg.SnippetSettings()
    return dataclasses.replace(base, fps=self.fps, anticipation_seconds=self.anticipation_seconds)


def examples(sequences: Sequence[annotations.ViewSequence], settings: AnticipationSettings) -> dict[str, np.ndarray]:
  """The model's inputs and 'labels' (S, 3): conv 'observed', 'mask'; tempagg 'window', 'mask', 'membership'."""
  if settings.model == "tempagg":
    parts = [tempagg.snippet_examples(s.features, s.segments, settings.snippet_settings()) for s in sequences]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  parts = [annotations.anticipation_samples(s, settings.fps, settings.anticipation_seconds, settings.observed_frames)
           for s in sequences]
  return {"observed": np.concatenate([p[0] for p in parts]), "mask": np.concatenate([p[1] for p in parts]),
          "labels": np.concatenate([p[2] for p in parts])}


def input_keys(settings: AnticipationSettings) -> tuple[str, ...]:
  return ("window", "mask", "membership") if settings.model == "tempagg" else ("observed", "mask")


def head_model(settings: AnticipationSettings, num_classes: dict[str, int]) -> nn.Module:
  if settings.model == "tempagg":
    snippets = settings.snippet_settings()
    return tempagg.TempAgg(num_classes, snippets.spanning_snippets, len(snippets.recent_seconds),
                           snippets.recent_snippets, settings.latent, settings.linear, settings.dropout_rate,
                           settings.past_attention)
  if settings.model == "conv":
    return AnticipationModel(num_classes, settings.hidden, settings.dropout_rate)
  raise ValueError(f"unknown anticipation model '{settings.model}': use one of {MODELS}")


def run(features_dir: str, segments_path: str, split_path: str, output_dir: str, *, train_views: Sequence[str] = (),
        test_views: Sequence[str] = (), settings: AnticipationSettings = AnticipationSettings(),
        loop_settings: loop.LoopSettings = loop.LoopSettings(epochs=30, learning_rate=1e-3),
        protocol: segmentation.ProtocolSettings = segmentation.ProtocolSettings(), label: str = "") -> dict:
  """Trains, selects and tests an anticipation model; returns (and writes) the results dictionary."""
  segments, split = annotations.read_segments(segments_path), annotations.read_split(split_path)
  num_views = views.num_views(list(train_views) + list(test_views))
  sets, loaded_views = {}, {}
  for name, specs in (("train", train_views), ("val", train_views), ("test", test_views or train_views)):
    sequences = views.load(features_dir, segments, split[name], specs)
    loaded_views[name] = sorted({s.view for s in sequences})
    sets[name] = examples(sequences, settings)
    if not len(sets[name]["labels"]):
      raise annotations.AnnotationError(f"no anticipation examples in the '{name}' recordings: every segment starts "
                                        f"within {settings.anticipation_seconds} s of its recording's start "
                                        "(tempagg: plus min_observed_seconds)")
  num_classes = {head: annotations.num_classes(segments, head) for head in HEADS}
  keys = input_keys(settings)
  model, protocol_record = segmentation.stack(head_model(settings, num_classes), protocol, num_views)
  train = sets["train"]
  params, _ = segmentation.initialize(model, protocol, loop_settings.seed, *(train[k][:1] for k in keys))

  def loss_fn(params, batch, rng):
    logits = model.apply({"params": params}, *(batch[k] for k in keys), train=True, rngs={"dropout": rng})
    if settings.model == "tempagg":
      return tempagg.tempagg_loss(logits, batch["labels"])
    return sum(losses.softmax_cross_entropy(logits[head], batch["labels"][:, i]) for i, head in enumerate(HEADS))

  def scores_of(params, *inputs):
    logits = model.apply({"params": params}, *inputs, train=False)
    return tempagg.scores(logits) if settings.model == "tempagg" else logits

  predict = jax.jit(scores_of)

  def score(params, data):
    outputs = {head: [] for head in HEADS}
    for first in range(0, len(data["labels"]), settings.batch_size):
      logits = predict(params, *(data[k][first:first + settings.batch_size] for k in keys))
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
      "task": "action anticipation", "model": {"tempagg": "TempAgg", "conv": "conv"}[settings.model],
      "features_dir": os.path.abspath(features_dir), "label": label, **protocol_record,
      "settings": dataclasses.asdict(settings), "loop": dataclasses.asdict(loop_settings), "num_classes": num_classes,
      "num_views": num_views, "train_views": loaded_views["train"], "test_views": loaded_views["test"],
      "examples": {name: int(len(data["labels"])) for name, data in sets.items()},
  }
  return loop.write_results(output_dir, results, history, test_scores)


def _define_flags() -> None:
  loop.define_data_flags()
  flags.adopt_module_key_flags(loop)  # --help lists the required data flags defined there
  segmentation.define_protocol_flags()
  flags.DEFINE_enum("model", "tempagg", MODELS, "Anticipation model (tempagg: EVGAP's and Assembly101's).")
  flags.DEFINE_float("fps", 30.0, "Frames per second of the features.")
  flags.DEFINE_float("anticipation_seconds", 1.0, "Gap tau_a between the observed frames and the segment.")
  flags.DEFINE_integer("observed_frames", 60, "conv: frames observed before the gap.")
  flags.DEFINE_float("spanning_seconds", 6.0, "tempagg: length of the spanning past.")
  flags.DEFINE_list("recent_seconds", ["1.6", "1.2", "0.8", "0.4"], "tempagg: lengths of the recent pasts.")
  flags.DEFINE_float("min_observed_seconds", 2.0, "tempagg: segments observed for less are left out (released: 2).")
  flags.DEFINE_integer("epochs", 15, "Training epochs (TempAgg on Assembly101: 15).")
  flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate (TempAgg on Assembly101: 1e-4).")
  flags.DEFINE_list("lr_decay_epochs", ["10"], "Epochs after which the learning rate is multiplied by 0.1.")
  flags.DEFINE_integer("batch_size", 32, "Examples per batch (TempAgg on Assembly101: 32).")
  flags.DEFINE_integer("hidden", 256, "conv: channels of the temporal layers.")
  flags.DEFINE_integer("latent", 512, "tempagg: non-local latent width.")
  flags.DEFINE_integer("linear", 512, "tempagg: coupling block width.")
  flags.DEFINE_bool("past_attention", False, "tempagg: non-local attention within the spanning snippets.")
  flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and dropout.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  snippets = tempagg.SnippetSettings(spanning_seconds=f.spanning_seconds,
                                     recent_seconds=tuple(float(r) for r in f.recent_seconds),
                                     min_observed_seconds=f.min_observed_seconds)
  settings = AnticipationSettings(f.fps, f.anticipation_seconds, f.observed_frames, f.hidden, batch_size=f.batch_size,
                                  model=f.model, snippets=snippets, latent=f.latent, linear=f.linear,
                                  past_attention=f.past_attention)
  loop_settings = loop.LoopSettings(f.epochs, f.learning_rate, seed=f.seed,
                                    lr_decay_epochs=tuple(int(e) for e in f.lr_decay_epochs))
  results = run(f.features_dir, f.segments, f.split, f.output_dir, train_views=f.train_views, test_views=f.test_views,
                settings=settings, loop_settings=loop_settings, protocol=segmentation.protocol_from_flags(),
                label=f.label)
  print(f"best epoch {results['best_epoch']}; test " + ", ".join(f"{k} {v:.2f}" for k, v in results["test"].items()))


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
