"""main.py end to end, as a user runs it: converts the shipped clips, trains, checkpoints, resumes."""

import io
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# configs/egoexo.py:small, shrunk to a few seconds of training.
TINY = ["--config.num_train_steps=2", "--config.optimizer.warmup_steps=1", "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
        "--config.data.convert_short_side=72", "--config.data.crop_size=64", "--config.data.min_short_side=64",
        "--config.data.max_short_side=72", "--config.data.clip_length=4", "--config.data.frame_stride=2",
        "--config.model.backbone_args.width=8", "--config.model.interaction_channels=16"]


MAX_CONSOLE_LINES = 40  # command 1's console for this 2-step run: 100 lines before issue 18, 25 after


def run_main(workdir):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "main.py", "--config=configs/egoexo.py:small", f"--workdir={workdir}",
                         "--alsologtostderr", *TINY], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_main_converts_the_shipped_data_trains_and_resumes(tmp_path):
  first = run_main(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "wrote 17 records, skipped 0 videos" in first.stderr
  assert "mesh {'data': 2, 'fsdp': 1}" in first.stderr
  assert "step 2/2  loss" in first.stderr and "clips/s" in first.stderr and "ETA" in first.stderr
  assert (tmp_path / "records" / "train.json").exists()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert list(tmp_path.glob("events.out.tfevents.*"))
  saved = json.loads((tmp_path / "config.json").read_text())  # the resolved config, for the readers
  assert saved["objective"] == "egoexo" and saved["num_train_steps"] == 2
  # A quiet console (issue 18): the banner, one line per log window, the summary, and no third-party INFO.
  assert len(first.stderr.splitlines()) <= MAX_CONSOLE_LINES, first.stderr
  assert "objective egoexo, model egoexo" in first.stderr and "finished step 2/2" in first.stderr
  assert "last checkpoint " + str(tmp_path / "checkpoints" / "2") in first.stderr
  assert "oneDNN" not in first.stderr and "checkpoint_manager.py" not in first.stderr
  assert "logging_writer.py" not in first.stderr  # each metric once: no copy from CLU's LoggingWriter
  images = event_images(tmp_path)  # the first step's input clips with their interaction maps
  assert list(images) == ["input/clips"] and images["input/clips"][0] == 1

  second = run_main(tmp_path)  # same workdir: resumes at the last step, converts nothing, trains nothing
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resumed from step 2" in second.stderr
  assert "Converting" not in second.stderr and "step 2/2  loss" not in second.stderr
  commands = (tmp_path / "commands.txt").read_text().splitlines()  # one line per start
  assert len(commands) == 2 and all("main.py --config=" in line for line in commands)
  assert "Run already complete: step 2 of 2" in second.stderr
  assert len(second.stderr.splitlines()) <= 10, second.stderr


def event_images(workdir) -> dict[str, tuple[int, int, int]]:
  """{tag: (step, height, width)} of the images in a workdir's TensorBoard event files."""
  from PIL import Image
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(str(workdir), size_guidance={"images": 0, "tensors": 0})
  accumulator.Reload()
  out = {}
  for tag in accumulator.Tags()["tensors"]:
    events = accumulator.Tensors(tag)
    if events and events[0].tensor_proto.dtype == 7 and len(events[0].tensor_proto.string_val) >= 3:  # an image
      width, height, png = events[0].tensor_proto.string_val[:3]
      with Image.open(io.BytesIO(png)) as image:
        assert image.size == (int(width), int(height))
      out[tag] = (events[0].step, int(height), int(width))
  return out
