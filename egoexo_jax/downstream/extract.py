"""Per-frame features from a trained EVGAP encoder, one .npy per recording and view.

    python -m egoexo_jax.downstream.extract --workdir=runs/evgap_group_small --manifest=data/evgap/views.csv \
        --output_dir=runs/evgap_features

The encoder's config is the one its run saved (<workdir>/config.json); --config is optional and must match it
(egoexo_jax/run_config.py); an export folder or a run from before configs were saved needs --config.
--step picks a checkpoint of the run (default: the newest). --checkpoint is a deprecated alias of --workdir.

Reads the view manifest of the pre-training data (feature_records.read_view_manifest: recording, view,
kind, path[, fps]) and writes `<output_dir>/<recording>/<view>.npy`, float32 (T, width), the layout the
segmentation and anticipation CLIs read. The encoder is the 'encoder' subtree of a checkpoint (a
workdir, its checkpoints/ folder, a step folder or an export folder of egoexo_jax.export), `--subtree`
naming it there: pre-training's encoder (frozen), or the encoder of any later run that trained one
further (fine-tuned). Modes:
  tokens  the recording cut into consecutive windows of `window_frames` (the last one padded and
          masked); each frame's feature is the last layer's token of that frame. T / w1 encoder calls.
  class   a window of `window_frames` centred on every frame (frames beyond the recording masked); each
          frame's feature is that window's class token after layer `layer`. T encoder calls.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from egoexo_jax import atomic_files, checkpointing, objectives, pretrained, progress, train
from egoexo_jax.input import feature_records
from egoexo_jax.models import evgap as evgap_model

MODES = ("tokens", "class")


def load_encoder(config, checkpoint: str, subtree: str = "encoder"):
  """(model, params) with the 'encoder' parameters from `checkpoint`'s `subtree` (shapes checked)."""
  if config.objective != "evgap":
    raise ValueError(f"config objective is '{config.objective}'; feature extraction needs the EVGAP model")
  objective = objectives.resolve(config)
  model = objective.model
  assert isinstance(model, evgap_model.Model)
  if pretrained.is_export(checkpoint):  # an export folder: its card must fit the config's encoder
    pretrained.check_config(pretrained.read_card(checkpoint), config, part="encoder", where=checkpoint)
  # Jitted: initialising the transformer op by op takes several times longer than compiling it.
  params = jax.jit(lambda rng: train.init_variables(objective, config, rng))(jax.random.key(0))["params"]
  params, _ = checkpointing.load_backbone(checkpoint, params, {}, subtree="encoder", source_subtree=subtree)
  return model, params


def window_plan(num_frames: int, window_frames: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Frame indices (W, window_frames) and masks (W, window_frames) of the windows that cover a recording.

  tokens: consecutive windows, the last one's missing frames masked; class: one window per frame t,
  frames t - w1 // 2 ... t - w1 // 2 + w1 - 1, those outside [0, T) masked. Masked indices point at frame 0.
  """
  if mode == "tokens":
    count = -(-num_frames // window_frames)
    indices = np.arange(count * window_frames).reshape(count, window_frames)
  elif mode == "class":
    indices = np.arange(num_frames)[:, None] - window_frames // 2 + np.arange(window_frames)[None, :]
  else:
    raise ValueError(f"unknown extraction mode '{mode}': use one of {MODES}")
  mask = (indices >= 0) & (indices < num_frames)
  return np.where(mask, indices, 0), mask


def extract(model, params, features: np.ndarray, window_frames: int, *, mode: str = "tokens", layer: int = -1,
            batch_windows: int = 256) -> np.ndarray:
  """features (T, C) -> per-frame encoder features (T, width), float32."""
  indices, mask = window_plan(len(features), window_frames, mode)
  encode = _encoder(model)
  outputs = []
  for first in range(0, len(indices), batch_windows):
    chunk, chunk_mask = indices[first:first + batch_windows], mask[first:first + batch_windows]
    real = len(chunk)
    pad = min(batch_windows, 1 << (real - 1).bit_length()) - real  # power-of-two shapes: few compilations
    chunk = np.pad(chunk, ((0, pad), (0, 0)))
    chunk_mask = np.pad(chunk_mask, ((0, pad), (0, 0)), constant_values=True)
    windows = np.where(chunk_mask[..., None], features[chunk], 0).astype(np.float32)
    out = encode(params, windows, chunk_mask)
    if mode == "tokens":
      outputs.append(np.asarray(out["tokens"][:real]).reshape(-1, out["tokens"].shape[-1]))
    else:
      outputs.append(np.asarray(out["class_tokens"][layer, :real]))
  return np.concatenate(outputs)[:len(features)]


@functools.lru_cache(maxsize=4)
def _encoder(model):
  return jax.jit(lambda params, windows, mask: model.apply({"params": params}, jnp.asarray(windows), jnp.asarray(mask),
                                                           train=False, method=evgap_model.Model.encode))


def extract_manifest(config, checkpoint: str, manifest: str, output_dir: str, *, subtree: str = "encoder",
                     mode: str = "tokens", layer: int = -1, batch_windows: int = 256) -> list[str]:
  """Writes `<output_dir>/<recording>/<view>.npy` for every row of the view manifest; returns the paths."""
  model, params = load_encoder(config, checkpoint, subtree)
  written = []
  recordings = feature_records.read_view_manifest(manifest)
  for recording, views in progress.track(recordings.items(), total=len(recordings), what="recordings",
                                         desc="extract"):
    features = feature_records.load_views(views, max_length_difference=config.data.get("max_length_difference", 2))
    if features.shape[2] != config.data.feature_dim:
      raise ValueError(f"{views[0].where}: features are {features.shape[2]}-d, config data.feature_dim is "
                       f"{config.data.feature_dim}")
    for view, view_features in zip(views, features):
      out = extract(model, params, view_features.astype(np.float32), config.data.window_frames, mode=mode,
                    layer=layer, batch_windows=batch_windows)
      path = os.path.join(output_dir, recording, f"{view.view}.npy")
      with atomic_files.atomic_write(path) as f:
        np.save(f, out.astype(np.float32))
      written.append(path)
    logging.info("%s: %d views, %d frames", recording, len(views), features.shape[1])
  return written


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Required. The run holding the encoder: a workdir, its checkpoints/ folder, "
                      "a step folder or an export folder.")
  config_flags.DEFINE_config_file("config", None, "Optional: the pre-training config (path[:arg]); default "
                                  "<workdir>/config.json, which it must match.")
  flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the newest).")
  flags.DEFINE_string("checkpoint", None, "Deprecated alias of --workdir.")
  flags.DEFINE_string("subtree", "encoder", "Name of the encoder's parameter subtree in the checkpoint.")
  flags.DEFINE_string("manifest", None, "Required. View manifest CSV (recording,view,kind,path[,fps]) of the input "
                      "features.")
  flags.DEFINE_string("output_dir", None, "Required. Output folder: <recording>/<view>.npy.")
  flags.DEFINE_enum("mode", "tokens", MODES,
                    "Per-frame tokens of consecutive windows, or centred windows' class tokens.")
  flags.DEFINE_integer("layer", -1, "Layer whose class token is used in 'class' mode.")
  flags.DEFINE_integer("batch_windows", 256, "Windows per encoder call.")
  flags.mark_flags_as_required(["manifest", "output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from egoexo_jax import run_config  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if bool(f.workdir) == bool(f.checkpoint):
    raise app.UsageError("name the run holding the encoder with --workdir (once; --checkpoint is its old name)")
  if f.checkpoint:
    logging.warning("--checkpoint is deprecated: use --workdir.")
  workdir = f.workdir or f.checkpoint
  config = run_config.resolve(workdir, f.config)
  source = workdir if f.step is None else os.path.join(workdir, "checkpoints", str(f.step))
  if not os.path.exists(source):
    raise FileNotFoundError(f"no checkpoint at {source}")
  written = extract_manifest(config, source, f.manifest, f.output_dir, subtree=f.subtree, mode=f.mode,
                             layer=f.layer, batch_windows=f.batch_windows)
  print(f"wrote {len(written)} feature files under {f.output_dir}")


if __name__ == "__main__":
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(main)
