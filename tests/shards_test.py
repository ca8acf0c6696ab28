"""Resume after an interruption: a killed conversion's completed shards are kept, the result equals a
conversion that ran through (shards.py, convert.convert_manifest)."""

import csv
import os
import pathlib
import subprocess
import sys
import textwrap

from egoexo_jax.input import convert, shards

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLIPS = ROOT / "data" / "clips"
ROWS = [  # six short segments; with 3 shards, rows 0, 3 -> shard 0; 1, 4 -> shard 1; 2, 5 -> shard 2
    ("cup.mp4", "1", "cup_a", "0", "0.4"), ("bikes.mp4", "2", "bikes_a", "1", "1.4"),
    ("carphone_pristine.mp4", "3", "car_a", "0", "0.5"), ("box.mp4", "4", "box_a", "2", "2.3"),
    ("cup.mp4", "5", "cup_b", "1", "1.3"), ("carphone_pristine.mp4", "6", "car_b", "1", "1.5"),
]
SETTINGS = dict(short_side=48, num_shards=3, formats=("tfrecord", "array_record"), progress=False)

# Converts in this process (workers=1) and SIGKILLs itself when the first row of shard 2 starts: shards
# 0 and 1 are complete, shard 2 is a half-written temporary file. Nothing in the converter runs after.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from egoexo_jax.input import convert
    real = convert.convert_row
    def convert_row(task):
      if task.index % 3 == 2:
        os.kill(os.getpid(), signal.SIGKILL)
      return real(task)
    convert.convert_row = convert_row
    convert.convert_manifest(sys.argv[1], sys.argv[2], short_side=48, num_shards=3,
                             formats=("tfrecord", "array_record"), progress=False)
""")


def write_manifest(folder: pathlib.Path) -> str:
  path = folder / "manifest.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("path", "labels", "video_id", "start_sec", "end_sec"))
    writer.writerows((str(CLIPS / name), *rest) for name, *rest in ROWS)
  return str(path)


def files_of(folder: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_killed_conversion_resumes_keeping_completed_shards(tmp_path, monkeypatch):
  manifest = write_manifest(tmp_path)
  reference = convert.convert_manifest(manifest, str(tmp_path / "ref" / "t"), **SETTINGS)
  assert reference.written == 6 and reference.reused_shards == 0

  prefix = tmp_path / "out" / "t"
  killed = subprocess.run([sys.executable, "-c", KILLER, manifest, str(prefix)], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == -9, killed.stderr[-2000:]
  left = sorted(p.name for p in (tmp_path / "out").iterdir())
  assert not any(name.startswith("t.") for name in left), left  # no final name: nothing to glob yet
  complete = {}
  for fmt in SETTINGS["formats"]:
    for shard, path in enumerate(convert.shard_paths(str(prefix), fmt, 3)):
      hidden = pathlib.Path(shards.complete_path(path))
      assert hidden.exists() == (shard < 2), (fmt, shard)
      if shard < 2:
        complete[path] = (hidden.stat().st_mtime_ns, hidden.read_bytes())
  assert any(".partial-" in name for name in left), left  # shard 2 was being written

  converted = []  # the rerun converts only the rows of the unfinished shard
  real = convert.convert_row
  monkeypatch.setattr(convert, "convert_row", lambda task: converted.append(task.index) or real(task))
  report = convert.convert_manifest(manifest, str(prefix), **SETTINGS)
  assert converted == [2, 5]
  assert report.written == 6 and report.reused_shards == 2
  for path, (mtime, data) in complete.items():  # kept, not rewritten: same bytes, same modification time
    assert os.stat(path).st_mtime_ns == mtime and pathlib.Path(path).read_bytes() == data
  ours, theirs = files_of(tmp_path / "out"), files_of(tmp_path / "ref")
  assert sorted(ours) == sorted(theirs) == sorted([os.path.basename(p) for p in reference.output_files] + ["t.json"])
  for name in theirs:
    if name != "t.json":
      assert ours[name] == theirs[name], name
  with open(reference.summary_file) as f_ref, open(report.summary_file) as f_ours:
    assert f_ours.read().replace(str(tmp_path / "out"), "") == f_ref.read().replace(str(tmp_path / "ref"), "")


def test_other_settings_do_not_reuse_a_killed_runs_shards(tmp_path):
  """Resume is by fingerprint of inputs and settings: another short side converts every row again."""
  manifest = write_manifest(tmp_path)
  prefix = tmp_path / "out" / "t"
  killed = subprocess.run([sys.executable, "-c", KILLER, manifest, str(prefix)], cwd=ROOT, check=False,
                          capture_output=True, timeout=300)
  assert killed.returncode == -9
  other = {**SETTINGS, "short_side": 40, "num_shards": 3}
  report = convert.convert_manifest(manifest, str(prefix), **other)
  assert report.written == 6 and report.reused_shards == 0
  assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no marker, no temp
  reference = convert.convert_manifest(manifest, str(tmp_path / "ref" / "t"), **other)
  for ours, theirs in zip(report.output_files, reference.output_files):
    assert pathlib.Path(ours).read_bytes() == pathlib.Path(theirs).read_bytes()
