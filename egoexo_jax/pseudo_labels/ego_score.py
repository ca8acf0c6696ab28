r"""Ego-Score teacher outputs (Ego-Exo Eq. 1): score videos with a trained ego/exo view classifier.

  python -m egoexo_jax.pseudo_labels.ego_score --workdir=runs/ego_cls \
      --records='/data/k400/train.tfrecord-*' --output=/data/k400/ego_logits.pkl

The classifier's config is the one its run saved (<workdir>/config.json); --config is optional and must
match it (egoexo_jax/run_config.py). --step picks a checkpoint (default: the newest). --output stays a file
name: the teacher writes one pickle, the format the converter's --ego_logits reads.

For each record: N = --num_clips clips of T x tau frames placed as PySlowFast's test loader places
them, each centre-cropped at the config's crop size from the short side `data.min_short_side`;
the classifier's 2 logits (ego, exo) are averaged over the clips. The output is a pickle
{video_id: float32[2] logits}, the released `k400_ego_predicts.pkl` format keyed by the records'
video ids; the converter's --ego_logits reads it (it accepts manifest paths or video ids as keys).
Eq. 2's soft target softmax(logits / beta) is taken at training time from these logits;
--probabilities_output also writes softmax(logits / --temperature) for inspection.

Resumable: every --save_every videos the scores so far go to `<output>.partial`; a rerun skips the
ids found there. The final file is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from egoexo_jax import atomic_files, progress
from egoexo_jax.input import records, sources, transforms


def write_pickle(path: str, content) -> None:
  with atomic_files.atomic_write(path) as f:
    pickle.dump(content, f)


def test_clips(record: records.VideoRecord, config, num_clips: int) -> np.ndarray:
  """uint8 (num_clips, T, S, S, 3): evenly spaced clips, centre crop at the evaluation scale."""
  data = config.data
  window = transforms.sample_crop_window(record.height, record.width, data.crop_size, data.min_short_side,
                                         data.min_short_side, rng=None)
  indices = transforms.evenly_spaced_clips(record.num_frames, data.clip_length, data.frame_stride, num_clips,
                                           fps=record.fps, target_fps=data.get("target_fps", 0.0))
  return np.stack([transforms.decode_and_crop(record.frames, clip, window) for clip in indices])


def make_logits_fn(model, variables, dtype) -> Callable[[np.ndarray], np.ndarray]:
  """Jitted uint8 clips (B, T, S, S, 3) -> float32 action logits (B, K), inference mode."""

  @jax.jit
  def logits(clips):
    return model.apply(variables, transforms.normalize_clips(clips, dtype), train=False)["action"]

  return lambda clips: np.asarray(logits(clips))


def score_records(records_iter: Iterable[records.VideoRecord], logits_fn, config, *, num_clips: int,
                  batch_size: int, done: dict[str, np.ndarray] | None = None,
                  checkpoint: Callable[[dict], None] | None = None, save_every: int = 100) -> dict[str, np.ndarray]:
  """{video_id: mean over clips of the classifier's logits} for every record not already in `done`.

  Clips of several videos share fixed-size batches (the last one padded), so one compiled
  function serves the whole run. `checkpoint(scores)` is called every `save_every` videos.
  """
  scores = dict(done or {})
  pending_clips, pending_ids = [], []  # clips waiting for a batch, and the video each belongs to
  start, scored = time.perf_counter(), 0

  def flush(final: bool):
    nonlocal pending_clips, pending_ids, scored
    while len(pending_clips) >= batch_size or (final and pending_clips):
      batch = pending_clips[:batch_size]
      padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch[0].shape), np.uint8)]) \
          if len(batch) < batch_size else np.stack(batch)
      out = logits_fn(padded)[:len(batch)]
      for video_id, row in zip(pending_ids[:batch_size], out):
        partial = scores.setdefault(video_id, [])
        partial.append(row)
        if len(partial) == num_clips:
          scores[video_id] = np.mean(partial, axis=0).astype(np.float32)
          scored += 1
          if checkpoint is not None and scored % save_every == 0:
            checkpoint({k: v for k, v in scores.items() if isinstance(v, np.ndarray)})
            logging.info("scored %d videos, %.1f videos/s", scored, scored / (time.perf_counter() - start))
      pending_clips, pending_ids = pending_clips[batch_size:], pending_ids[batch_size:]

  for record in records_iter:
    if record.video_id in scores:
      continue
    pending_clips.extend(test_clips(record, config, num_clips))
    pending_ids.extend([record.video_id] * num_clips)
    flush(final=False)
  flush(final=True)
  return scores


def load_classifier(config, workdir: str, step: int | None = None):
  """The view classifier's model and inference variables from the newest checkpoint of `workdir` (or
  `step`), or from an export folder (python -m egoexo_jax.export) whose model card fits `config`."""
  from egoexo_jax import checkpointing, objectives, pretrained, sharding, train  # pylint: disable=g-import-not-at-top

  if step is not None:
    from egoexo_jax import evaluate  # pylint: disable=g-import-not-at-top
    model, variables, step = evaluate.restore_variables(config, workdir, sharding.make_mesh(1), step=step)
    logging.info("Ego/exo classifier from %s, step %d.", workdir, step)
    return model, variables
  if list(config.model.num_classes.values()) != [2]:
    raise ValueError(f"an ego/exo classifier has one head of 2 classes; the config says {config.model.num_classes}")
  if pretrained.is_export(workdir):
    model, variables, step = pretrained.load_for_config(workdir, config)
    logging.info("Ego/exo classifier from the export %s (step %d).", workdir, step)
    return model, variables
  objective = objectives.resolve(config)
  model = objective.model
  optimizer, _ = train.make_optimizer(config)
  abstract, _ = train.abstract_state(objective, optimizer, config, sharding.make_mesh(1))
  manager = checkpointing.make_manager(workdir, max_to_keep=config.max_checkpoints_to_keep, async_save=False)
  restored = checkpointing.restore_latest(manager, abstract)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.abspath(workdir)}/checkpoints: train the classifier "
                            "first (python main.py --config=configs/ego_classifier.py --workdir=...)")
  state, step = restored
  logging.info("Ego/exo classifier from %s, step %d.", workdir, step)
  return model, {"params": state.params, "batch_stats": state.batch_stats}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  from egoexo_jax import run_config  # pylint: disable=g-import-not-at-top
  config = run_config.resolve(f.workdir, f.config)  # the run's saved config, or --config checked against it
  model, variables = load_classifier(config, f.workdir, f.step)
  source = sources.open_records(f.records)
  partial_path = f.output + ".partial"
  done = {}
  if os.path.exists(partial_path):
    with open(partial_path, "rb") as fh:
      done = pickle.load(fh)
    logging.info("Resuming: %d videos already scored in %s.", len(done), partial_path)
  logits_fn = make_logits_fn(model, variables, jnp.dtype(config.model.dtype))
  records_iter = progress.track((source[i] for i in range(len(source))), total=len(source), what="videos",
                                desc="ego score")
  scores = score_records(records_iter, logits_fn, config, num_clips=f.num_clips,
                         batch_size=f.batch_size, done=done, save_every=f.save_every,
                         checkpoint=lambda s: write_pickle(partial_path, s))
  write_pickle(f.output, scores)
  if f.probabilities_output:
    write_pickle(f.probabilities_output,
                 {k: np.asarray(jax.nn.softmax(v / f.temperature)) for k, v in scores.items()})
  if os.path.exists(partial_path):
    os.remove(partial_path)
  ego_share = np.mean([v[0] > v[1] for v in scores.values()])
  print(f"scored {len(scores)} videos into {f.output}; {100 * ego_share:.1f}% look more ego than exo")


def _define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Required. The classifier's workdir (or an export folder of it).")
  config_flags.DEFINE_config_file("config", None, "Optional: the classifier's config (configs/ego_classifier.py"
                                  "[:small]); default <workdir>/config.json, which it must match.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_string("records", None, "Required. Glob of the record shards to score.")
  flags.DEFINE_string("output", None, "Required. Output pickle {video_id: 2 logits} (a file, as the converter's "
                      "--ego_logits takes).")
  flags.DEFINE_integer("num_clips", 2, "Clips per video whose logits are averaged (Ego-Exo: N = 2).")
  flags.DEFINE_integer("batch_size", 8, "Clips per forward pass.")
  flags.DEFINE_float("temperature", 1.0, "beta of Eq. 1, for --probabilities_output.")
  flags.DEFINE_string("probabilities_output", None, "Optional pickle {video_id: softmax(logits / beta)}.")
  flags.DEFINE_integer("save_every", 100, "Videos between writes of <output>.partial.")
  flags.mark_flags_as_required(["workdir", "records", "output"])


if __name__ == "__main__":
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(main)
