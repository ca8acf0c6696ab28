"""Writes the hand-labelled annotation files of data/finetune/ in the official formats, then their manifests.

    python data/finetune/make_annotations.py

The labels are declared by hand, by looking at the clips (data/README.md); class ids are real ids of
each dataset's class list. EPIC segments: every hand-labelled action is cut in two halves, the first
half going to the training file and the second to the validation file. Charades-Ego is per video, so its
test file lists the same videos as its training file. Deterministic; rerun after changing the tables.
"""

import csv
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FPS = {"box": 456000 / 15217, "cup": 26777 / 1000}  # the clips' average frame rates

# Charades_v1_classes.txt: c019 Talking on a phone/camera, c040 Holding a box,
# c107 Holding a cup/glass/bottle of something. bikes.mp4 has no Charades action (skipped on conversion).
CHARADES = [
    ("box", "Living room", "A person holds a box above a table and moves it around.", "box;table",
     "c040 0.00 15.10", "15.18", "Yes"),
    ("cup", "", "A person holds a black cup and tilts it left and right.", "cup", "c107 0.00 8.10", "8.10", "Yes"),
    ("carphone_pristine", "Car", "A man sitting in a car talks to the camera.", "", "c019 0.00 4.00", "4.00", "No"),
    ("bikes", "Street", "A street with parked cars and bicycles.", "bicycle", "", "10.00", "No"),
]
CHARADES_HEADER = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                   "descriptions", "actions", "length", "egocentric", "charades_video"]

# (video, start, end, verb, noun, EPIC-100 (verb, noun) ids, EPIC-55 (verb, noun) ids)
ACTIONS = [
    ("box", 0.00, 3.50, "hold", "box", (34, 23), (34, 39)),
    ("box", 3.50, 7.00, "move", "box", (11, 23), (9, 39)),
    ("box", 7.00, 11.00, "turn", "box", (23, 23), (13, 39)),
    ("box", 11.00, 15.10, "lower", "box", (73, 23), (81, 39)),
    ("cup", 0.00, 2.00, "hold", "cup", (34, 13), (34, 23)),
    ("cup", 2.00, 4.20, "turn", "cup", (23, 13), (13, 23)),
    ("cup", 4.20, 6.00, "turn", "cup", (23, 13), (13, 23)),
    ("cup", 6.00, 8.00, "hold", "cup", (34, 13), (34, 23)),
]
EPIC100_HEADER = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                  "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
                  "noun_class", "all_nouns", "all_noun_classes"]
EPIC55_HEADER = ["uid", "participant_id", "video_id", "narration", "start_timestamp", "stop_timestamp",
                 "start_frame", "stop_frame", "verb", "verb_class", "noun", "noun_class", "all_nouns",
                 "all_noun_classes"]


def timestamp(seconds: float) -> str:
  minutes, seconds = divmod(round(seconds * 100) / 100, 60)
  return f"00:{int(minutes):02d}:{seconds:05.2f}"


def halves():
  """(split, video, start, end, verb, noun, ids100, ids55) with each action cut into train/val halves."""
  for video, start, end, verb, noun, ids100, ids55 in ACTIONS:
    middle = round((start + end) / 2, 2)
    yield "train", video, start, middle, verb, noun, ids100, ids55
    yield "validation", video, middle, end, verb, noun, ids100, ids55


def write(name, header, rows):
  with open(os.path.join(HERE, name), "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def main():
  for split in ("train", "test"):
    write(f"CharadesEgo_v1_{split}_only1st.csv", CHARADES_HEADER,
          [[v, "P00", scene, "", "", "Yes", script, objects, script, actions, length, ego, ""]
           for v, scene, script, objects, actions, length, ego in CHARADES])
  rows100, rows55 = {"train": [], "validation": []}, {"train": [], "validation": []}
  counters = {}
  for uid, (split, video, start, end, verb, noun, ids100, ids55) in enumerate(halves()):
    first, last = int(start * FPS[video]) + 1, int(end * FPS[video])
    index = counters[video] = counters.get(video, -1) + 1
    times = [timestamp(start), timestamp(end), first, last]
    rows100[split].append([f"{video}_{index}", "P00", video, timestamp(start), *times, f"{verb} {noun}", verb,
                           ids100[0], noun, ids100[1], f"['{noun}']", f"[{ids100[1]}]"])
    rows55[split].append([uid, "P00", video, f"{verb} {noun}", *times, verb, ids55[0], noun, ids55[1],
                          f"['{noun}']", f"[{ids55[1]}]"])
  for split in ("train", "validation"):
    write(f"EPIC_100_{split}.csv", EPIC100_HEADER, rows100[split])
  write("EPIC_train_action_labels.csv", EPIC55_HEADER, rows55["train"])
  write("EPIC_val_action_labels.csv", EPIC55_HEADER, rows55["validation"])

  runs = [("charades_ego", "CharadesEgo_v1_train_only1st.csv", "charades_ego_train"),
          ("charades_ego", "CharadesEgo_v1_test_only1st.csv", "charades_ego_test"),
          ("epic100", "EPIC_100_train.csv", "epic100_train"),
          ("epic100", "EPIC_100_validation.csv", "epic100_validation"),
          ("epic55", "EPIC_train_action_labels.csv", "epic55_train"),
          ("epic55", "EPIC_val_action_labels.csv", "epic55_val")]
  for dataset, source, output in runs:
    template = "{id}.mp4" if dataset == "charades_ego" else "{video_id}.mp4"
    subprocess.run([sys.executable, "-m", "egoexo_jax.input.annotations", f"--dataset={dataset}",
                    f"--csv=data/finetune/{source}", "--video_root=data/clips", f"--video_template={template}",
                    f"--output=data/finetune/{output}_manifest.csv"], cwd=ROOT, check=True)


if __name__ == "__main__":
  main()
