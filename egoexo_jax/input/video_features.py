"""Video records -> per-frame backbone features and a view manifest, the input of EVGAP's feature records.

    python -m egoexo_jax.input.video_features --records='/data/charades_ego/all.tfrecord-*' \
        --checkpoint=/models/tsm_r50_k400 --backbone=tsm_r50 --charades_ego_pairs \
        --output_dir=/data/charades_ego/tsm_features
    python -m egoexo_jax.input.feature_records --manifest=/data/charades_ego/tsm_features/views.csv \
        --output_prefix=/data/charades_ego/records/train --max_length_difference=100000

The EVGAP paper pre-trains step 1 on Assembly101's released TSM features (input/assembly101.py) and on
Charades-Ego ego-exo pairs passed through the same TSM with a window of 8 frames. This module does the
second part with any backbone of models/backbones.py ('tsm_r50' as the paper), its weights from a
checkpoint's 'backbone' subtree: an imported one (models/import_weights.py writes them) or a trained run.

Per frame t of a video of T frames, the window is the `window_frames` (8) frames t - w/2 .. t + w/2 - 1
(indices outside [0, T) clamped to the first / last frame); its frames are decoded, resized to
`short_side` and centre-cropped to `crop_size` (transforms.sample_crop_window, evaluation mode), scaled
as (x / 255 - mean) / std, and the backbone's feature maps are averaged over time and space (TSM's
average consensus; pathways concatenated): frame t's feature, float32 (C,) (2048 for TSM R50). With
`frame_stride` s > 1 only frames 0, s, 2s, ... get a feature (the output's frame rate is fps / s).

Outputs: `<output_dir>/<recording>/<view>.npy` (T', C) float32 and `<output_dir>/views.csv`
(recording,view,kind,path,fps), the view manifest feature_records converts. Which video is which view
of which recording: `--pairs` names a CSV `video_id,recording,view,kind`; `--charades_ego_pairs` pairs
Charades-Ego's ids (the egocentric video of third-person video 'X' is 'XEGO'; PyVideoResearch's
Charades-Ego loaders split the views the same way). Charades-Ego's two views were filmed one after the
other, not synchronised: their lengths differ, and the converter's --max_length_difference decides how
much may be cut from the longer one.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from egoexo_jax import atomic_files, checkpointing, progress
from egoexo_jax.input import csv_rows, sources, transforms
from egoexo_jax.models import backbones


class VideoFeatureError(ValueError):
  """Bad input to the extraction; the message names the file, line or video."""


@dataclasses.dataclass(frozen=True)
class ViewOf:
  recording: str
  view: str
  kind: str  # 'ego' or 'exo'


def charades_ego_view(video_id: str) -> ViewOf:
  """Charades-Ego: 'XEGO' is the ego view of recording 'X', 'X' its exo (third-person) view."""
  if video_id.endswith("EGO"):
    return ViewOf(video_id[:-3], "ego", "ego")
  return ViewOf(video_id, "exo", "exo")


def read_pairs(path: str) -> dict[str, ViewOf]:
  """{video_id: (recording, view, kind)} from a CSV `video_id,recording,view,kind`."""
  out = {}
  for _, where, fields in csv_rows.read_csv_rows(path, ("video_id", "recording", "view", "kind"), VideoFeatureError):
    video_id, recording, view, kind = (fields[k].strip() for k in ("video_id", "recording", "view", "kind"))
    if kind not in ("ego", "exo") or not (video_id and recording and view):
      raise VideoFeatureError(f"{where}: need non-empty video_id, recording, view and kind 'ego' or 'exo'")
    if video_id in out:
      raise VideoFeatureError(f"{where}: video '{video_id}' is listed twice")
    out[video_id] = ViewOf(recording, view, kind)
  return out


# --------------------------------------------------------------------------- backbone


def load_backbone(arch: str, checkpoint: str, backbone_args: dict | None = None, subtree: str = "backbone",
                  dtype=jnp.float32):
  """(backbone module, {'params', 'batch_stats'}) with the checkpoint's `subtree` (shapes checked)."""
  backbone_args = {k: tuple(v) if isinstance(v, list) else v for k, v in (backbone_args or {}).items()}  # hashable
  module = backbones.build_backbone(arch, backbone_args, dtype=dtype, name=None)
  clip = jnp.zeros((1, 8, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), clip, train=False))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  params, batch_stats = checkpointing.load_backbone(
      checkpoint, {"backbone": zeros["params"]}, {"backbone": zeros.get("batch_stats", {})}, subtree="backbone",
      source_subtree=subtree)
  return module, {"params": params["backbone"], "batch_stats": batch_stats.get("backbone", {})}


@functools.lru_cache(maxsize=4)
def _features_fn(module, mean: tuple[float, ...], std: tuple[float, ...]):
  def features(variables, clips):
    x = (clips.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
    maps = module.apply(variables, x.astype(module.dtype), train=False)
    return jnp.concatenate([m.astype(jnp.float32).mean(axis=(1, 2, 3)) for m in maps], axis=-1)
  return jax.jit(features)


def window_indices(num_frames: int, window_frames: int, frame_stride: int = 1) -> np.ndarray:
  """(T', window_frames) frame indices: frames t - w/2 .. t + w/2 - 1 for t = 0, s, 2s, ..., clamped."""
  centres = np.arange(0, num_frames, frame_stride)
  indices = centres[:, None] - window_frames // 2 + np.arange(window_frames)[None, :]
  return np.clip(indices, 0, num_frames - 1)


def extract_video(module, variables, jpeg_frames: Sequence[bytes], height: int, width: int, *, window_frames: int = 8,
                  frame_stride: int = 1, short_side: int = 256, crop_size: int = 224,
                  mean: Sequence[float] = (transforms.MEAN,) * 3, std: Sequence[float] = (transforms.STD,) * 3,
                  batch_windows: int = 16) -> np.ndarray:
  """One video's JPEG frames -> (T', C) float32 per-frame features (module docstring)."""
  window = transforms.sample_crop_window(height, width, crop_size, short_side, short_side, None)
  features_fn = _features_fn(module, tuple(float(m) for m in mean), tuple(float(s) for s in std))
  indices = window_indices(len(jpeg_frames), window_frames, frame_stride)
  out = []
  for first in range(0, len(indices), batch_windows):
    chunk = indices[first:first + batch_windows]
    real = len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_windows - real, axis=0)])  # one compiled shape
    needed = np.unique(chunk)
    frames = transforms.decode_and_crop(list(jpeg_frames), needed, window)  # each frame decoded once per chunk
    clips = frames[np.searchsorted(needed, chunk)]  # (batch_windows, w, crop, crop, 3) uint8
    out.append(np.asarray(features_fn(variables, clips))[:real])
  return np.concatenate(out)


# --------------------------------------------------------------------------- records -> files


def extract_records(records: str, output_dir: str, *, arch: str, checkpoint: str, views: dict[str, ViewOf] | None = None,
                    charades_ego_pairs: bool = False, backbone_args: dict | None = None, subtree: str = "backbone",
                    **kwargs) -> str:
  """Features of every video of `records` that has a view (`views` or Charades-Ego naming); writes the
  .npy files and `<output_dir>/views.csv` (only recordings with both an ego and an exo view); returns the
  manifest's path."""
  if (views is None) == (not charades_ego_pairs):
    raise ValueError("give exactly one of `views` (a pairs CSV) and charades_ego_pairs")
  module, variables = load_backbone(arch, checkpoint, backbone_args, subtree)
  source = sources.open_records(records)
  rows: dict[str, list[tuple[str, str, str, float]]] = {}
  for index in progress.track(range(len(source)), what="videos", desc="video features"):
    record = source[index]
    view = charades_ego_view(record.video_id) if charades_ego_pairs else views.get(record.video_id)
    if view is None:
      logging.info("%s: not in the pairs CSV; skipped", record.video_id)
      continue
    if any(v == view.view for v, *_ in rows.get(view.recording, [])):
      raise VideoFeatureError(f"{source.where(index)}: recording '{view.recording}' has view '{view.view}' twice")
    features = extract_video(module, variables, record.frames, record.height, record.width, **kwargs)
    relative = os.path.join(view.recording, f"{view.view}.npy")
    with atomic_files.atomic_write(os.path.join(output_dir, relative)) as f:
      np.save(f, features)
    fps = record.fps / kwargs.get("frame_stride", 1)
    rows.setdefault(view.recording, []).append((view.view, view.kind, relative, fps))
    logging.info("%s -> %s: %d frames, %d features", record.video_id, relative, record.num_frames, len(features))
  manifest = os.path.join(output_dir, "views.csv")
  complete = {r: v for r, v in rows.items() if {kind for _, kind, *_ in v} == {"ego", "exo"}}
  for recording in sorted(set(rows) - set(complete)):
    logging.warning("recording '%s' has only %s views; left out of %s", recording, rows[recording][0][1], manifest)
  if not complete:
    raise VideoFeatureError(f"'{records}': no recording has both an ego and an exo view")
  with atomic_files.atomic_write(manifest, "w") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["recording", "view", "kind", "path", "fps"])
    for recording in sorted(complete):
      fps = complete[recording][0][3]  # one frame rate per recording (feature_records requires it): the first view's
      for view, kind, path, _ in complete[recording]:
        writer.writerow([recording, view, kind, path, f"{fps:.6g}"])
  return manifest


def _define_flags() -> None:
  flags.DEFINE_string("records", None, "Video record shards (glob), as input/convert.py writes them.")
  flags.DEFINE_string("output_dir", None, "Output: <recording>/<view>.npy and views.csv.")
  flags.DEFINE_string("checkpoint", None, "Checkpoint (import_weights output, workdir or step folder).")
  flags.DEFINE_string("backbone", "tsm_r50", "Backbone architecture (models/backbones.py).")
  flags.DEFINE_string("backbone_args", "", "JSON overrides of the backbone preset.")
  flags.DEFINE_string("subtree", "backbone", "The backbone's parameter subtree in the checkpoint.")
  flags.DEFINE_string("pairs", "", "CSV video_id,recording,view,kind naming each video's view.")
  flags.DEFINE_bool("charades_ego_pairs", False, "Pair Charades-Ego videos by id ('X' exo, 'XEGO' ego).")
  flags.DEFINE_integer("window_frames", 8, "Frames per window (8: the EVGAP paper's TSM window).")
  flags.DEFINE_integer("frame_stride", 1, "A feature every this many frames.")
  flags.DEFINE_integer("short_side", 256, "Frames resized to this short side, then centre-cropped.")
  flags.DEFINE_integer("crop_size", 224, "Square crop fed to the backbone.")
  flags.DEFINE_list("mean", [str(transforms.MEAN)] * 3, "Per-channel mean of x / 255 (TSM: 0.485,0.456,0.406).")
  flags.DEFINE_list("std", [str(transforms.STD)] * 3, "Per-channel std of x / 255 (TSM: 0.229,0.224,0.225).")
  flags.DEFINE_integer("batch_windows", 16, "Windows per backbone call.")
  flags.mark_flags_as_required(["records", "output_dir", "checkpoint"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  manifest = extract_records(
      f.records, f.output_dir, arch=f.backbone, checkpoint=f.checkpoint, views=read_pairs(f.pairs) if f.pairs else None,
      charades_ego_pairs=f.charades_ego_pairs, backbone_args=json.loads(f.backbone_args) if f.backbone_args else None,
      subtree=f.subtree, window_frames=f.window_frames, frame_stride=f.frame_stride, short_side=f.short_side,
      crop_size=f.crop_size, mean=[float(m) for m in f.mean], std=[float(s) for s in f.std],
      batch_windows=f.batch_windows)
  print(f"wrote per-frame features and the view manifest {manifest}")


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
