"""Object-Score teacher (Ego-Exo Eq. 3-4): ImageNet-classifier logits averaged over T frames per video.

One module over 400 lines on purpose: the teacher's frame sampling, torchvision preprocessing, video-to-record
matching and CLI belong to one command.

    python -m egoexo_jax.pseudo_labels.object_score --records='/data/k400/train.tfrecord-*' \\
        --weights=/models/resnet152-394f9c45.pth --output=/data/k400/object_logits.pkl \\
        [--manifest=videos.csv] [--probabilities_output=/data/k400/object_scores.pkl --temperature=1]

For every record: T = `--num_frames` (64) frames picked uniformly over the video (`frame_indices`), each
decoded from JPEG, resized to short side 256 and centre-cropped to 224 x 224 (torchvision's ImageNet
evaluation transform), normalised by the ImageNet mean and std, classified by the teacher in jitted
batches of `--batch_size` frames, and the logits averaged over the frames (Eq. 3):

    o(v) = 1/T sum_t f(x_t)                  (K logits; stored)
    p_obj(v) = softmax(o(v) / beta)          (Eq. 4; the training loss computes this itself)

Outputs:
  --output                 pickle {key: float32 (K,) averaged logits}: the released format of
                           `k400_IN_predicts.pkl`. The key is the record's `video_id`, which
                           `egoexo_jax.input.convert --object_logits` accepts as well as a manifest path.
                           With `--manifest` the key is the manifest `path` of that video_id, exactly as
                           in the released file (for other tools that expect {manifest path: logits}).
  --probabilities_output   optional pickle {same key: float32 (K,) softmax(logits / --temperature)}.
                           Training needs only the logits: `losses.soft_target_kl` applies the
                           temperature (config.loss.temperature_object) to the stored logits.

Decisions worth knowing:
  * Frame choice: a video of n >= T frames gives the centres of T equal segments,
    floor((t + 0.5) n / T), t = 0..T-1 (distinct, symmetric about the middle); a video of n < T
    frames gives all n of them, and its average is over n frames.
  * Weights: there are no ImageNet weights offline in this environment. The CLI requires `--weights`, a
    torchvision ResNet state dict (the depth, width and class count are read from the file), and
    refuses to run without it: scores from random weights would look like labels and teach nothing. The
    library function `score_records` takes an explicit (model, variables), so tests can pass a small
    random teacher deliberately. torchvision's published ImageNet files (`TORCHVISION_WEIGHTS`) are
    listed in the refusal message; download one where there is a network. The V2 files were evaluated
    by torchvision at resize 232 (crop 224): pass `--resize_short_side=232` to match that exactly.
  * `--manifest` keys by manifest path, which must then name one record: if two manifest rows
    (segments of one video) share a path, this is an error before any scoring; score without
    `--manifest` (keys are video_ids) in that case.
  * Resumable: every `--save_every` newly scored videos (and on an error or Ctrl-C) the new scores are
    appended to `<output>.partial`, keyed by video_id after a header holding the settings (appending, not
    rewriting: 1000 logits x 240k Kinetics videos is about 1 GB). A restart with the same settings skips
    the video_ids found there; different settings are an error naming them; a save torn by a crash is
    dropped. The final files are written to a temporary name and renamed (atomic), then the `.partial`
    file is removed.
  * Frames are decoded, resized and cropped on the host in `--decode_threads` threads (Pillow releases
    the GIL), a few videos ahead of the classifier; they travel to the device as uint8 and are
    normalised there. Padding rows of the last batch are zeros and are dropped before averaging.
  * Duplicate video_ids among the records are an error (their scores would overwrite each other).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import pickle
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from egoexo_jax import atomic_files, progress
from egoexo_jax.input import records as records_lib

NUM_FRAMES = 64  # T of Eq. 3
RESIZE_SHORT_SIDE = 256
CROP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARTIAL_FORMAT = "egoexo_jax.object_score.partial/1"

# torchvision's published ImageNet-1k ResNet weights (state dicts for `--weights`); not downloaded here.
TORCHVISION_WEIGHTS = {
    "ResNet-50 IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "ResNet-50 IMAGENET1K_V2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "ResNet-152 IMAGENET1K_V1": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
    "ResNet-152 IMAGENET1K_V2": "https://download.pytorch.org/models/resnet152-f82ba261.pth",
}


class ObjectScoreError(ValueError):
  """Bad inputs or settings for Object-Score; the message names the file, record or setting at fault."""


# --------------------------------------------------------------------------- Eq. 3-4 pieces


def frame_indices(num_frames: int, count: int = NUM_FRAMES) -> np.ndarray:
  """Indices of the frames to classify: centres of `count` equal segments, or all frames if fewer."""
  if num_frames < 1 or count < 1:
    raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames} and {count}")
  if num_frames <= count:
    return np.arange(num_frames)
  return np.floor((np.arange(count) + 0.5) * num_frames / count).astype(np.int64)


def preprocess_frame(jpeg: bytes, resize_short_side: int = RESIZE_SHORT_SIDE,
                     crop_size: int = CROP_SIZE) -> np.ndarray:
  """JPEG -> (crop, crop, 3) uint8: torchvision's Resize(short side) (bilinear) then CenterCrop(crop).

  Sizes and offsets are computed as torchvision computes them: long side int(short_side * long / short),
  crop offset int(round((size - crop) / 2)).
  """
  image = Image.open(io.BytesIO(jpeg)).convert("RGB")
  width, height = image.size
  if width <= height:
    size = (resize_short_side, int(resize_short_side * height / width))
  else:
    size = (int(resize_short_side * width / height), resize_short_side)
  if size != (width, height):
    image = image.resize(size, Image.BILINEAR)
  if min(size) < crop_size:
    raise ValueError(f"resize_short_side {resize_short_side} is smaller than crop_size {crop_size}")
  left, top = int(round((size[0] - crop_size) / 2.0)), int(round((size[1] - crop_size) / 2.0))
  return np.asarray(image.crop((left, top, left + crop_size, top + crop_size)), np.uint8)


def normalize(images: jax.Array) -> jax.Array:
  """uint8 RGB (..., 3) -> float32 (x / 255 - ImageNet mean) / ImageNet std (torchvision's ToTensor, Normalize)."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def make_classifier(model: nn.Module, variables: Any) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 frames (B, H, W, 3) -> float32 logits (B, K): `model.apply(variables, normalize(frames))`, jitted.

  The model must map normalised NHWC images to logits in inference mode when called as
  `model.apply(variables, images)` (resnet2d.Model does). The variables are placed on the device once
  and passed as an argument, not baked into the compiled program. Each distinct B compiles once.
  """
  variables = jax.device_put(variables)
  apply = jax.jit(lambda v, x: model.apply(v, normalize(x)).astype(jnp.float32))
  return lambda frames: np.asarray(apply(variables, frames))


def average_logits(classify: Callable[[np.ndarray], np.ndarray], frames: np.ndarray, batch_size: int) -> np.ndarray:
  """Eq. 3: the mean over frames of the per-frame logits, run in fixed batches of `batch_size` frames.

  The last batch is padded with zero frames to `batch_size` (one compiled shape); padded rows are dropped.
  """
  if len(frames) == 0:
    raise ValueError("no frames to classify")
  outputs = []
  for start in range(0, len(frames), batch_size):
    batch = frames[start:start + batch_size]
    valid = len(batch)
    if valid < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - valid, *batch.shape[1:]), batch.dtype)])
    outputs.append(np.asarray(classify(batch), np.float32)[:valid])
  return np.mean(np.concatenate(outputs).astype(np.float64), axis=0).astype(np.float32)


def object_scores(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """Eq. 4: softmax(logits / temperature) over the last axis, float32."""
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  z = np.asarray(logits, np.float64) / temperature
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- files


def _atomic_pickle(path: str, content: Any) -> None:
  with atomic_files.atomic_write(path) as f:
    pickle.dump(content, f, protocol=pickle.HIGHEST_PROTOCOL)


def partial_path(output: str) -> str:
  return f"{output}.partial"


def load_partial(path: str, settings: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{video_id: logits} saved by an interrupted run with the same settings; {} when there is no file.

  The file is a sequence of pickles: a header {'format', 'settings'}, then one {video_id: logits} dict per
  save (appending keeps each save's cost independent of how much was scored before). A torn last chunk,
  left by a crash in the middle of a save, is dropped with a warning and cut off the file.
  """
  if not os.path.exists(path):
    return {}
  size = os.path.getsize(path)
  with open(path, "rb+") as f:
    try:
      header = pickle.load(f)
    except Exception as e:  # unpickling raises many kinds on a damaged file
      raise ObjectScoreError(f"{path}: cannot read the partial results ({e}); delete it to start over") from e
    if not isinstance(header, dict) or header.get("format") != PARTIAL_FORMAT:
      raise ObjectScoreError(f"{path}: not a partial Object-Score file of format {PARTIAL_FORMAT}; delete it "
                             f"to start over")
    changed = {key: (header["settings"].get(key), value) for key, value in settings.items()
               if header["settings"].get(key) != value}
    if changed:
      details = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in changed.items())
      raise ObjectScoreError(f"{path} was written with other settings ({details}); rerun with those settings "
                             f"or delete it to start over")
    logits = {}
    while (good := f.tell()) < size:
      try:
        chunk = pickle.load(f)
        if not isinstance(chunk, dict):
          raise ValueError(f"a {type(chunk).__name__}, not a dict")
      except Exception as e:  # a torn write: keep what came before it
        logging.warning("%s: dropping a damaged last save at byte %d (%s)", path, good, e)
        f.truncate(good)
        break
      logits.update((str(k), np.asarray(v, np.float32)) for k, v in chunk.items())
  return logits


def manifest_paths(manifest: str) -> dict[str, str]:
  """{video_id: manifest path} of a converter manifest; a path shared by several rows is an error."""
  from egoexo_jax.input import convert  # pylint: disable=g-import-not-at-top  (PyAV is only needed here)

  rows = convert.read_manifest(manifest)
  by_path: dict[str, list] = collections.defaultdict(list)
  for row in rows:
    by_path[row.path].append(row)
  shared = {path: rows_ for path, rows_ in by_path.items() if len(rows_) > 1}
  if shared:
    path, rows_ = next(iter(shared.items()))
    raise ObjectScoreError(
        f"{manifest}: {len(shared)} paths are shared by several rows (segments of one video), e.g. '{path}' on "
        f"lines {[r.line for r in rows_]} (video_ids {[r.video_id for r in rows_]}); keyed by path, their scores "
        f"would collide. Run without --manifest to key the output by video_id instead")
  return {row.video_id: row.path for row in rows}


# --------------------------------------------------------------------------- scoring


def _prepare(record: records_lib.VideoRecord, where: str, num_frames: int, resize_short_side: int,
             crop_size: int, executor: concurrent.futures.Executor) -> list[concurrent.futures.Future]:
  def one(i):
    try:
      return preprocess_frame(record.frames[i], resize_short_side, crop_size)
    except Exception as e:
      raise ObjectScoreError(f"{where} ('{record.video_id}'): frame {i}: cannot decode ({e})") from e
  return [executor.submit(one, int(i)) for i in frame_indices(record.num_frames, num_frames)]


def score_records(source: Sequence[records_lib.VideoRecord], model: nn.Module, variables: Any, *,
                  num_frames: int = NUM_FRAMES, batch_size: int = NUM_FRAMES,
                  resize_short_side: int = RESIZE_SHORT_SIDE, crop_size: int = CROP_SIZE,
                  partial_output: str | None = None, save_every: int = 100, log_every: int = 10,
                  decode_threads: int = 4, prefetch_videos: int = 2,
                  settings: Mapping[str, Any] | None = None,
                  known_ids: Collection[str] | None = None) -> dict[str, np.ndarray]:
  """{video_id: float32 (K,) frame-averaged logits} (Eq. 3) for every record of `source`.

  source: indexable records (sources.open_records(pattern)); `source.where(i)` names a record in errors
    when present. model, variables: the teacher, used as `model.apply(variables, images)` on normalised
    (B, crop, crop, 3) images; nothing here checks that the weights are trained.
  partial_output: when given, results already there (same settings) are reused and their video_ids
    skipped, and the results so far are saved there every `save_every` newly scored videos and at the end.
  settings: extra entries (e.g. the teacher's weights) that a partial file must match to be reused.
  known_ids: when given (a manifest's video_ids), a record whose video_id is not among them is an error,
    raised when the record is read, before any time is spent on it.
  Returns the records' video_ids in record order; ids of a partial file that are not among the records
  are left out.
  """
  if batch_size < 1 or save_every < 1 or log_every < 1 or decode_threads < 1:
    raise ValueError(f"bad settings: batch_size={batch_size}, save_every={save_every}, log_every={log_every}, "
                     f"decode_threads={decode_threads}")
  settings = dict(settings or {}, num_frames=num_frames, resize_short_side=resize_short_side, crop_size=crop_size)
  done = load_partial(partial_output, settings) if partial_output else {}
  if done:
    logging.info("%s: reusing %d scored videos", partial_output, len(done))
  results = dict(done)
  unsaved: dict[str, np.ndarray] = {}
  if partial_output and not os.path.exists(partial_output):
    _atomic_pickle(partial_output, {"format": PARTIAL_FORMAT, "settings": settings})
  classify = make_classifier(model, variables)
  where = getattr(source, "where", lambda i: f"record {i}")

  def save():
    nonlocal unsaved
    if partial_output and unsaved:
      with open(partial_output, "ab") as f:
        pickle.dump(unsaved, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    unsaved = {}

  seen: dict[str, int] = {}
  pending: collections.deque = collections.deque()
  scored = skipped = 0
  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(decode_threads) as executor, \
      progress.Progress(len(source), what="videos", desc="object score") as bar:

    def upcoming() -> Iterator[tuple[int, str, list]]:
      nonlocal skipped
      for index in range(len(source)):
        record = source[index]
        if record.video_id in seen:
          raise ObjectScoreError(f"{where(index)}: video_id '{record.video_id}' was already used by "
                                 f"{where(seen[record.video_id])}; video_ids must be unique")
        if known_ids is not None and record.video_id not in known_ids:
          raise ObjectScoreError(f"{where(index)}: video_id '{record.video_id}' is not in the manifest")
        seen[record.video_id] = index
        if record.video_id in done:
          skipped += 1
          bar.update()
          continue
        yield index, record.video_id, _prepare(record, where(index), num_frames, resize_short_side, crop_size,
                                               executor)

    videos = upcoming()
    try:
      while True:
        while len(pending) <= prefetch_videos:  # keep the decode threads a few videos ahead
          item = next(videos, None)
          if item is None:
            break
          pending.append(item)
        if not pending:
          break
        index, video_id, futures = pending.popleft()
        frames = np.stack([future.result() for future in futures])
        results[video_id] = unsaved[video_id] = average_logits(classify, frames, batch_size)
        scored += 1
        bar.update()
        if scored % save_every == 0:
          save()
        if scored % log_every == 0:
          elapsed = time.monotonic() - start
          logging.info("scored %d videos (up to record %d of %d, %d skipped as already scored): %.2f videos/s",
                       scored, index + 1, len(source), skipped, scored / max(elapsed, 1e-9))
    except BaseException:
      for *_, futures in pending:  # do not wait for frames that will not be used
        for future in futures:
          future.cancel()
      save()  # keep what was scored (an error in one record, or Ctrl-C) for the restart
      raise
  save()
  elapsed = time.monotonic() - start
  logging.info("scored %d videos in %.1f s (%.2f videos/s); %d reused from %s", scored, elapsed,
               scored / max(elapsed, 1e-9), skipped, partial_output)
  return {video_id: results[video_id] for video_id in seen}


def write_outputs(logits: Mapping[str, np.ndarray], output: str, *, probabilities_output: str | None = None,
                  temperature: float = 1.0, key_of: Mapping[str, str] | None = None) -> None:
  """Writes {key: logits} (released format) and optionally {key: softmax(logits / temperature)}, atomically.

  key_of maps video_id -> output key (a manifest path); every video_id must be in it.
  """
  if key_of is not None:
    missing = [video_id for video_id in logits if video_id not in key_of]
    if missing:
      raise ObjectScoreError(f"{len(missing)} scored video_ids are not in the manifest, e.g. '{missing[0]}'")
    keyed = {key_of[video_id]: value for video_id, value in logits.items()}
  else:
    keyed = dict(logits)
  keyed = {key: np.asarray(value, np.float32) for key, value in keyed.items()}
  _atomic_pickle(output, keyed)
  if probabilities_output:
    _atomic_pickle(probabilities_output, {key: object_scores(value, temperature) for key, value in keyed.items()})


# --------------------------------------------------------------------------- command line


def no_weights_message(reason: str) -> str:
  urls = "\n".join(f"  {name}: {url}" for name, url in TORCHVISION_WEIGHTS.items())
  return (f"object_score: {reason}. No ImageNet classifier weights are available offline in this environment, "
          f"and this tool refuses to produce Object-Scores from random weights (they would look like teacher "
          f"labels and teach nothing). Download a torchvision ResNet state dict on a machine with network access, "
          f"for example one of torchvision's published files:\n{urls}\n"
          f"then pass it with --weights=/path/to/resnet152-394f9c45.pth (the depth is read from the file).")


def _define_flags() -> None:
  """Command-line flags; defined only when run as a script, so importing this module defines none."""
  flags.DEFINE_string("records", None, "Record shards (glob, comma-separated), as written by input.convert.")
  flags.DEFINE_string("output", None, "Pickle {video_id (or manifest path): float32 K averaged logits}.")
  flags.DEFINE_string("weights", None, "torchvision ResNet state dict (.pth) with ImageNet weights. Required.")
  flags.DEFINE_string("manifest", None, "Converter manifest: key the output by manifest path instead of video_id.")
  flags.DEFINE_string("probabilities_output", None, "Also write {key: softmax(logits / temperature)} here.")
  flags.DEFINE_float("temperature", 1.0, "beta of Eq. 4, for --probabilities_output only.")
  flags.DEFINE_integer("num_frames", NUM_FRAMES, "T: frames per video (all frames of a shorter video).")
  flags.DEFINE_integer("batch_size", NUM_FRAMES, "Frames per classifier call (the last batch is padded).")
  flags.DEFINE_integer("resize_short_side", RESIZE_SHORT_SIDE, "Resize frames to this short side (232 for V2).")
  flags.DEFINE_integer("crop_size", CROP_SIZE, "Centre crop size.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the classifier.")
  flags.DEFINE_integer("save_every", 200, "Save <output>.partial every this many newly scored videos.")
  flags.DEFINE_integer("log_every", 20, "Log progress every this many videos.")
  flags.DEFINE_integer("decode_threads", max(1, min(16, os.cpu_count() or 1)), "JPEG decoding threads.")
  flags.mark_flags_as_required(["records", "output"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  # Refuse before reading anything else: no weights, no scores.
  if not f.weights:
    raise SystemExit(no_weights_message("no ImageNet weights given (--weights)"))
  if not os.path.isfile(f.weights):
    raise SystemExit(no_weights_message(f"--weights={f.weights} is not a file"))

  from egoexo_jax.input import sources  # pylint: disable=g-import-not-at-top
  from egoexo_jax.models import resnet2d  # pylint: disable=g-import-not-at-top

  key_of = manifest_paths(f.manifest) if f.manifest else None  # fail on a bad manifest before scoring
  state_dict = resnet2d.load_torch_state_dict(f.weights)
  config = resnet2d.infer_torchvision_config(state_dict)
  variables = resnet2d.convert_torchvision_resnet(state_dict, **config)
  del state_dict
  model = resnet2d.Model(**config, dtype=jnp.dtype(f.dtype))
  depth = 2 + 3 * sum(config["stage_blocks"])
  logging.info("teacher: ResNet-%d %s from %s", depth, config, f.weights)

  source = sources.open_records(f.records)
  logging.info("%s: %d records", f.records, len(source))
  teacher = f"{os.path.abspath(f.weights)} ({os.path.getsize(f.weights)} bytes) {config} {f.dtype}"
  logits = score_records(
      source, model, variables, num_frames=f.num_frames, batch_size=f.batch_size,
      resize_short_side=f.resize_short_side, crop_size=f.crop_size, partial_output=partial_path(f.output),
      save_every=f.save_every, log_every=f.log_every, decode_threads=f.decode_threads,
      settings={"teacher": teacher}, known_ids=key_of)
  write_outputs(logits, f.output, probabilities_output=f.probabilities_output, temperature=f.temperature,
                key_of=key_of)
  if os.path.exists(partial_path(f.output)):
    os.remove(partial_path(f.output))
  print(f"wrote {len(logits)} videos' averaged logits ({config['num_classes']} classes) to {f.output}"
        + (f" and probabilities (temperature {f.temperature:g}) to {f.probabilities_output}"
           if f.probabilities_output else ""))


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
