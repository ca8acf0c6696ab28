"""Records to read, or convert once: the one rule every method and the evaluator follow.

A config names its records by a glob (`data.train_records`, `data.<view>_records`,
`data.feature_records`); when that is empty, a manifest is converted into the workdir on first use and
the converted records are read from then on. Process 0 converts (once: a finished conversion leaves
`<prefix>.json`, so a rerun or a resumed run does not convert again); the other processes wait for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from absl import logging


def records_or_convert(pattern: str, prefix: str, convert: Callable[[str], None], *,
                       suffix: str = ".tfrecord-*") -> str:
  """`pattern` when set; else `convert(prefix)` unless `<prefix>.json` exists, then `prefix + suffix`."""
  if pattern:
    return pattern
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0 and not os.path.exists(prefix + ".json"):
    convert(prefix)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"records_or_convert:{prefix}")
  return prefix + suffix


def _convert_videos(config, manifest: str, **teachers) -> Callable[[str], None]:
  def convert(prefix: str) -> None:
    from egoexo_jax.input import convert as converter  # pylint: disable=g-import-not-at-top  (PyAV when converting)

    quality = config.data.get("convert_jpeg_quality", converter.DEFAULT_JPEG_QUALITY)
    logging.info("Converting %s into %s (short side %d, JPEG quality %d).", manifest, prefix,
                 config.data.convert_short_side, quality)
    report = converter.convert_manifest(manifest, prefix, short_side=config.data.convert_short_side,
                                        jpeg_quality=quality, workers=max(1, config.data.num_workers), **teachers)
    logging.info("Converted %d videos of %s (%d skipped).", report.written, manifest, len(report.skipped))
  return convert


def train_records(config, workdir: str) -> str:
  """Ego-Exo and fine-tuning: `data.train_records`, or `data.manifest` with its teacher signals
  (`data.ego_logits`, `data.object_logits`, `data.hand_object_dir`) converted into <workdir>/records/train."""
  data = config.data
  return records_or_convert(data.train_records, os.path.join(workdir, "records", "train"), _convert_videos(
      config, data.manifest, ego_logits=data.ego_logits or None, object_logits=data.object_logits or None,
      hand_object_dir=data.hand_object_dir or None))


def view_records(config, workdir: str, view: str) -> str:
  """SUM-L: `data.<view>_records` ('ego' or 'exo'), or `data.<view>_manifest` converted into
  <workdir>/records/<view>."""
  pattern, manifest = config.data.get(f"{view}_records", ""), config.data.get(f"{view}_manifest", "")
  if not pattern and not manifest:
    raise ValueError(f"config data.{view}_records and data.{view}_manifest are both empty")
  return records_or_convert(pattern, os.path.join(workdir, "records", view), _convert_videos(config, manifest))


def eval_records(config, workdir: str, manifest: str) -> str:
  """The evaluator's records when --records is not given: `manifest` converted into
  <workdir>/records/eval (an absolute path)."""
  if not manifest:
    raise ValueError("no records to evaluate: pass --records or set config eval.manifest")
  prefix = os.path.join(os.path.abspath(workdir), "records", "eval")
  return records_or_convert("", prefix, _convert_videos(config, manifest))


def feature_records(config, workdir: str) -> str:
  """EVGAP: the feature record prefix `data.feature_records`, or `data.view_manifest` converted into
  <workdir>/feature_records/train."""
  data = config.data

  def convert(prefix: str) -> None:
    from egoexo_jax.input import feature_records as store  # pylint: disable=g-import-not-at-top

    store.convert_feature_manifest(data.view_manifest, prefix, dtype=data.stored_dtype,
                                   chunk_frames=data.chunk_frames)
  return records_or_convert(data.feature_records, os.path.join(workdir, "feature_records", "train"), convert,
                            suffix="")
