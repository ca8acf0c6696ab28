"""The converter as an Apache Beam pipeline (DirectRunner): the same shards and summary as convert.py.

apache-beam conflicts with the pinned Pillow/protobuf/pyarrow (requirements-beam.txt), so it is installed
apart; without it this test is skipped."""

import csv
import json
import pathlib

import pytest

from egoexo_jax.input import convert

beam = pytest.importorskip("apache_beam")
from egoexo_jax.input import convert_beam  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
ROWS = [  # a missing file is skipped by both; 4 shards for 4 rows leaves shard 3 with the missing row only
    (DATA / "clips" / "cup.mp4", "1 6", "cup_mid", "3", "3.6"),
    (DATA / "clips" / "bikes.mp4", "3", "bikes_mid", "5", "5.5"),
    (DATA / "clips" / "carphone_pristine.mp4", "5", "", "", ""),
    (DATA / "clips" / "gone.mp4", "2", "gone", "", ""),
]


def test_beam_pipeline_writes_the_local_converters_shards(tmp_path):
  manifest = tmp_path / "manifest.csv"
  with open(manifest, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("path", "labels", "video_id", "start_sec", "end_sec"))
    writer.writerows((str(path), *rest) for path, *rest in ROWS)
  settings = dict(short_side=48, num_shards=5, formats=("tfrecord", "array_record"),
                  object_logits=str(DATA / "pseudo_labels" / "object_logits.pkl"), allow_missing_pseudo_labels=True)
  local = convert.convert_manifest(str(manifest), str(tmp_path / "local" / "t"), progress=False, **settings)
  ours = convert_beam.convert_manifest_beam(str(manifest), str(tmp_path / "beam" / "t"),
                                            pipeline_args=["--runner=DirectRunner"], **settings)
  assert ours.written == local.written == 3
  assert ours.skipped == local.skipped and [path for path, _ in ours.skipped] == [str(ROWS[3][0])]
  assert len(ours.output_files) == len(local.output_files) == 10
  for a, b in zip(ours.output_files, local.output_files):
    assert pathlib.Path(a).name == pathlib.Path(b).name
    assert pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes(), a
  with open(ours.summary_file) as f_ours, open(local.summary_file) as f_local:
    assert json.load(f_ours) == json.load(f_local)
  assert sorted(p.name for p in (tmp_path / "beam").iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
