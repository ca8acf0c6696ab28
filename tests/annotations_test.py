"""Annotation files -> manifests: the official formats (samples with the official headers in testdata/),
errors naming file and line, frame folders through the converter, the CLI, and the shipped manifests."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from egoexo_jax.input import annotations, convert, sources
from egoexo_jax.input.annotations import AnnotationError

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = pathlib.Path(__file__).resolve().parent / "testdata"


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_timestamps_parse_to_seconds_and_bad_ones_name_the_place():
  assert annotations.parse_timestamp("00:01:02.50", "f:2", "start_timestamp") == pytest.approx(62.5)
  assert annotations.parse_timestamp("00:04:17.87", "f:2", "x") == pytest.approx(257.87)
  assert annotations.parse_timestamp("01:02.5", "f:2", "x") == pytest.approx(62.5)
  assert annotations.parse_timestamp("1:00:00", "f:2", "x") == 3600
  for bad in ("00:61:00", "1:2:3:4", "ab:cd", "", "00:00:-1", "00:00:nan"):
    with pytest.raises(AnnotationError, match=r"f:7: column 'stop_timestamp' is '.*', not a timestamp"):
      annotations.parse_timestamp(bad, "f:7", "stop_timestamp")


def test_charades_ego_one_record_per_video_with_all_its_classes():
  result = annotations.read_annotations("charades_ego", str(DATA / "CharadesEgo_v1_train_only1st_sample.csv"))
  assert [r.video_id for r in result.records] == ["AB12CEGO", "CD34EEGO", "GH78IEGO"]
  assert [r.labels for r in result.records] == [(106, 110, 143), (26, 32, 134), (123, 132)]
  assert result.records[0].path == "AB12CEGO.mp4" and result.records[0].start_sec is None
  assert result.multi_label and result.num_classes == {"action": 157}
  assert result.intervals["CD34EEGO"] == [[134, 0.0, 20.1], [26, 2.4, 18.0], [32, 2.4, 18.0], [26, 19.0, 20.0]]
  assert len(result.skipped) == 1 and "_sample.csv:4: video 'EF56GEGO' has no actions" in result.skipped[0]
  frames = annotations.read_annotations("charades_ego", str(DATA / "CharadesEgo_v1_train_only1st_sample.csv"),
                                        video_template="{id}/{id}-%06d.jpg", frame_rate=24)
  assert frames.records[0].path == "AB12CEGO/AB12CEGO-%06d.jpg"
  assert frames.intervals["AB12CEGO"][0] == [143, 0.0, pytest.approx(4.5 * 24 / 25)]  # image2 time: 25 frames/s
  with pytest.raises(AnnotationError, match="give --frame_rate"):
    annotations.read_annotations("charades_ego", str(DATA / "CharadesEgo_v1_train_only1st_sample.csv"),
                                 video_template="{id}/{id}-%06d.jpg")


@pytest.mark.parametrize("actions,message", [
    ("c157 0.0 1.0", r"bad.csv:3: column 'actions' has class c157, outside the 157 classes"),
    ("x012 0.0 1.0", r"bad.csv:3: column 'actions' has class 'x012', not c<integer>"),
    ("c012 0.0", r"bad.csv:3: column 'actions' has 'c012 0.0'; expected 'c<class> <start> <end>'"),
    ("c012 2.0 1.0", r"bad.csv:3: .* times must satisfy 0 <= start <= end"),
    ("c012 a 1.0", r"bad.csv:3: .* its times are not numbers"),
])
def test_charades_ego_malformed_rows_name_file_and_line(tmp_path, actions, message):
  path = write(tmp_path, "bad.csv", f"id,actions,length\nA,c001 0.0 1.0,5\nB,{actions},5\n")
  with pytest.raises(AnnotationError, match=message):
    annotations.read_annotations("charades_ego", path)
  path = write(tmp_path, "no_actions.csv", "id,length\nA,5\n")
  with pytest.raises(AnnotationError, match=r"no_actions.csv:1: the header \['id', 'length'\] has no 'actions'"):
    annotations.read_annotations("charades_ego", path)
  path = write(tmp_path, "twice.csv", "id,actions\nA,c001 0 1\nA,c002 0 1\n")
  with pytest.raises(AnnotationError, match="twice.csv:3: video 'A' is listed twice"):
    annotations.read_annotations("charades_ego", path)


def test_epic100_one_record_per_segment_with_verb_and_offset_noun():
  result = annotations.read_annotations("epic100", str(DATA / "EPIC_100_train_sample.csv"))
  first, pour, turn = result.records[0], result.records[3], result.records[4]
  assert (first.video_id, first.path, first.labels) == ("P01_01_0", "P01/videos/P01_01.MP4", (3, 97 + 3))
  assert (first.start_sec, first.end_sec) == pytest.approx((0.14, 3.37))
  assert (pour.start_sec, pour.end_sec, pour.labels) == (pytest.approx(250.05), pytest.approx(257.87), (9, 97 + 121))
  assert turn.labels == (23, 97 + 23)  # equal verb and noun ids stay distinct in the concatenated space
  assert result.num_classes == {"verb": 97, "noun": 300} and not result.multi_label
  frames = annotations.read_annotations("epic100", str(DATA / "EPIC_100_train_sample.csv"),
                                        video_template="{participant_id}/rgb_frames/{video_id}/frame_%010d.jpg")
  assert frames.records[0].path == "P01/rgb_frames/P01_01/frame_%010d.jpg"
  assert (frames.records[0].start_sec, frames.records[0].end_sec) == pytest.approx((7 / 25, 202 / 25))


def test_epic55_video_ids_and_class_counts():
  result = annotations.read_annotations("epic55", str(DATA / "EPIC_train_action_labels_sample.csv"))
  assert [r.video_id for r in result.records] == ["P01_01_0", "P01_01_1", "P01_01_45"]
  assert [r.labels for r in result.records] == [(2, 125 + 8), (12, 125 + 113), (7, 125 + 69)]
  assert result.records[0].path == "P01/P01_01.MP4"
  with pytest.raises(AnnotationError, match=r"_sample.csv:2: column 'noun_class' has class 8, outside the 8"):
    annotations.read_annotations("epic55", str(DATA / "EPIC_train_action_labels_sample.csv"), num_classes=[125, 8])


@pytest.mark.parametrize("field,value,message", [
    ("stop_timestamp", "00:00:0x.37", r"bad.csv:2: column 'stop_timestamp' is '00:00:0x.37', not a timestamp"),
    ("stop_timestamp", "00:00:00.10", r"bad.csv:2: stop_timestamp 00:00:00.10 is not after start_timestamp"),
    ("verb_class", "97", r"bad.csv:2: column 'verb_class' has class 97, outside the 97 classes"),
    ("noun_class", "-3", r"bad.csv:2: column 'noun_class' has class '-3', not <integer>"),
])
def test_epic_malformed_rows_name_file_and_line(tmp_path, field, value, message):
  header, row = (DATA / "EPIC_100_train_sample.csv").read_text().splitlines()[:2]
  fields = dict(zip(header.split(","), row.split(",")))
  fields[field] = value
  path = write(tmp_path, "bad.csv", header + "\n" + ",".join(fields.values()) + "\n")
  with pytest.raises(AnnotationError, match=message):
    annotations.read_annotations("epic100", path)
  path = write(tmp_path, "short.csv", header.replace(",noun_class", "") + "\n")
  with pytest.raises(AnnotationError, match=r"short.csv:1: the header .* has no 'noun_class' column"):
    annotations.read_annotations("epic100", path)


def test_kinetics_csv_and_path_label_lists(tmp_path):
  result = annotations.read_annotations("kinetics", str(DATA / "kinetics400_sample.csv"))
  assert result.class_names == ["abseiling", "playing guitar"]
  assert [(r.video_id, r.labels) for r in result.records] == [
      ("aB3dE5fG7hI_000014_000024", (1,)), ("Zy9xW8vU7tS_000000_000010", (0,)), ("Qr5sT6uV7wX_000102_000112", (1,))]
  assert result.records[0].path == "playing guitar/aB3dE5fG7hI_000014_000024.mp4"
  named = annotations.read_annotations("kinetics", str(DATA / "kinetics400_sample.csv"),
                                       class_names=["playing guitar", "abseiling", "zumba"])
  assert [r.labels for r in named.records] == [(0,), (1,), (0,)] and named.num_classes == {"action": 3}
  with pytest.raises(AnnotationError, match=r"_sample.csv:3: label 'abseiling' is not in the class list"):
    annotations.read_annotations("kinetics", str(DATA / "kinetics400_sample.csv"), class_names=["playing guitar"])
  simple = annotations.read_annotations("kinetics", str(DATA / "kinetics_path_label_sample.txt"))
  assert [(r.path, r.labels) for r in simple.records] == [
      ("abseiling/Zy9xW8vU7tS_000000_000010.mp4", (0,)), ("playing_guitar/aB3dE5fG7hI_000014_000024.mp4", (1,))]
  bad = write(tmp_path, "bad.txt", "a.mp4 1\nb.mp4 x\n")
  with pytest.raises(AnnotationError, match=r"bad.txt:2: expected 'path label'"):
    annotations.read_annotations("kinetics", bad)


def test_frame_folder_segments_convert_to_exactly_their_frames(tmp_path):
  folder = tmp_path / "frames" / "P09_01"
  folder.mkdir(parents=True)
  for f in range(1, 13):  # frame_0000000001.jpg ... frame_0000000012.jpg, grey level 20 f
    Image.fromarray(np.full((32, 48, 3), 20 * f, np.uint8)).save(folder / f"frame_{f:010d}.jpg", quality=95)
  header = (DATA / "EPIC_100_train_sample.csv").read_text().splitlines()[0]
  csv_path = write(tmp_path, "epic.csv", header + "\nP09_01_0,P09,P09_01,00:00:00.00,00:00:00.00,00:00:00.30,3,8,"
                   "take cup,take,0,cup,13,['cup'],[13]\n")
  result = annotations.read_annotations("epic100", csv_path, video_template="{video_id}/frame_%010d.jpg")
  manifest = str(tmp_path / "manifests" / "train.csv")
  summary = annotations.write_outputs(result, csv_path, str(tmp_path / "frames"), manifest)
  assert summary["num_records"] == 1 and summary["videos_not_found"] == 0
  assert summary["label_layout"]["label_offsets"] == {"verb": 0, "noun": 97}
  convert.convert_manifest(manifest, str(tmp_path / "rec" / "train"), strict=True)
  record = sources.open_records(str(tmp_path / "rec" / "train.tfrecord-*"))[0]
  grey = [int(np.asarray(Image.open(io.BytesIO(f)))[..., 0].mean().round()) for f in record.frames]
  assert grey == [20 * f for f in range(3, 9)]  # start_frame 3 .. stop_frame 8, inclusive
  assert record.video_id == "P09_01_0" and list(record.labels) == [0, 97 + 13]


def run_cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "egoexo_jax.input.annotations", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_manifest_summary_and_intervals_and_fails_naming_the_line(tmp_path):
  output = tmp_path / "out" / "charades_train.csv"
  # Manifests made before the videos are downloaded: none exists, so the flag is needed.
  result = run_cli("--dataset=charades_ego", f"--csv={DATA / 'CharadesEgo_v1_train_only1st_sample.csv'}",
                   "--video_root=/videos", f"--output={output}", "--allow_missing_videos")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "wrote 3 records (1 rows skipped, 3 videos not found)" in result.stdout
  lines = output.read_text().splitlines()
  assert lines[0] == "path,labels,video_id,start_sec,end_sec"
  assert lines[1] == "/videos/AB12CEGO.mp4,106 110 143,AB12CEGO,,"
  rows = convert.read_manifest(str(output))  # the converter accepts it
  assert [row.labels for row in rows] == [(106, 110, 143), (26, 32, 134), (123, 132)]
  summary = json.loads((tmp_path / "out" / "charades_train.json").read_text())
  assert summary["records_per_class"]["action"]["26"] == 1 and summary["videos_not_found"] == 3
  intervals = json.loads((tmp_path / "out" / "charades_train_intervals.json").read_text())
  assert intervals["GH78IEGO"] == [[123, 0.0, 30.0], [132, 1.0, 30.0]]
  bad = write(tmp_path, "bad.csv", "id,actions\nA,c001 0 1\nB,c999 0 1\n")
  result = run_cli("--dataset=charades_ego", f"--csv={bad}", "--video_root=v", f"--output={tmp_path / 'x.csv'}")
  assert result.returncode != 0 and "bad.csv:3: column 'actions' has class c999" in result.stderr
  assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("dataset,source,manifest", [
    ("charades_ego", "CharadesEgo_v1_train_only1st.csv", "charades_ego_train_manifest.csv"),
    ("epic100", "EPIC_100_validation.csv", "epic100_validation_manifest.csv"),
    ("epic55", "EPIC_train_action_labels.csv", "epic55_train_manifest.csv"),
])
def test_shipped_manifests_are_their_annotation_files(dataset, source, manifest):
  folder = ROOT / "data" / "finetune"
  template = "{id}.mp4" if dataset == "charades_ego" else "{video_id}.mp4"
  expected = annotations.read_annotations(dataset, str(folder / source), video_template=template).records
  shipped = convert.read_manifest(str(folder / manifest))
  assert [(r.video_id, r.labels, r.start_sec, r.end_sec) for r in shipped] == [
      (r.video_id, r.labels, r.start_sec, r.end_sec) for r in expected]
  assert all(os.path.exists(row.file) and row.file.startswith(str(folder / "..")) for row in shipped)


def test_cli_fails_writing_nothing_when_none_of_the_videos_exists(tmp_path):
  csv_path = DATA / "CharadesEgo_v1_train_only1st_sample.csv"
  output = tmp_path / "out" / "charades_train.csv"
  result = run_cli("--dataset=charades_ego", f"--csv={csv_path}", f"--video_root={tmp_path / 'nowhere'}",
                   f"--output={output}")
  assert result.returncode == 1
  assert f"none of the 3 videos of {csv_path} exists under --video_root={tmp_path / 'nowhere'}" in result.stderr
  assert not output.exists() and not (tmp_path / "out" / "charades_train.json").exists()
  # One video present is enough: the others are reported as not found, as before.
  (tmp_path / "videos").mkdir()
  (tmp_path / "videos" / "AB12CEGO.mp4").write_bytes(b"")
  result = run_cli("--dataset=charades_ego", f"--csv={csv_path}", f"--video_root={tmp_path / 'videos'}",
                   f"--output={output}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "2 videos not found" in result.stdout
