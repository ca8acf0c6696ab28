"""egoexo_jax/console.py: which log records the quiet console keeps, and the banner / progress / summary text."""

import logging as std_logging
import os

import ml_collections
import pytest
from absl import logging

from egoexo_jax import console, optimizer


def record(pathname: str, level: int, msg: str) -> std_logging.LogRecord:
  return std_logging.LogRecord("absl", level, pathname, 1, msg, (), None)


def test_quiet_filter_keeps_ours_and_third_party_warnings_only():
  quiet = console.QuietFilter()
  ours = os.path.join(console.REPO_ROOT, "egoexo_jax", "train.py")
  orbax = "/usr/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert quiet.filter(record(ours, std_logging.INFO, "step 20/300  loss 1.2"))
  assert quiet.filter(record(ours, std_logging.WARNING, "Metadata file does not exist: ours is never dropped"))
  assert not quiet.filter(record(orbax, std_logging.INFO, "CheckpointManager created"))
  assert not quiet.filter(record(orbax, std_logging.WARNING, "Metadata file does not exist: /x/_CHECKPOINT_METADATA"))
  assert quiet.filter(record(orbax, std_logging.WARNING, "Something else went wrong"))
  assert quiet.filter(record(orbax, std_logging.ERROR, "failed"))
  # A site-packages copy under the repository (a virtualenv in the checkout) is third-party too.
  venv = os.path.join(console.REPO_ROOT, ".venv", "lib", "site-packages", "jax", "_src", "xla_bridge.py")
  assert not quiet.filter(record(venv, std_logging.INFO, "Unable to initialize backend 'tpu'"))


def test_configure_logging_installs_and_removes_the_filter():
  handler = logging.get_absl_handler()
  try:
    console.configure_logging("quiet")
    console.configure_logging("quiet")  # twice: still one filter
    assert sum(isinstance(f, console.QuietFilter) for f in handler.filters) == 1
    console.configure_logging("all")
    assert not any(isinstance(f, console.QuietFilter) for f in handler.filters)
  finally:
    console.configure_logging("all")
  with pytest.raises(ValueError, match="unknown log level 'loud'"):
    console.configure_logging("loud")


def test_banner_names_what_trains_where():
  text = console.banner(objective="egoexo", model="egoexo", num_params=1_700_000, mesh={"data": 2, "fsdp": 1},
                        num_devices=2, records="runs/x/records", num_records=17, global_batch_size=8, num_steps=300,
                        start_step=0, epochs=0.0, workdir="/abs/runs/x")
  assert "objective egoexo, model egoexo: 1.70M parameters" in text
  assert "mesh {'data': 2, 'fsdp': 1} over 2 devices; global batch 8" in text
  assert "records runs/x/records (17 records)" in text
  assert "length 141.2 epochs in 300 steps" in text  # 300 x 8 / 17
  assert "workdir /abs/runs/x" in text
  resumed = console.banner(objective="evgap", model="evgap", num_params=500, mesh={"data": 1}, num_devices=1,
                           records="r", num_records=None, global_batch_size=4, num_steps=100, start_step=40,
                           epochs=2.0, workdir="w")
  assert "length 2 epochs = 100 steps, resuming at step 41" in resumed and "500 parameters" in resumed


def test_eta_and_progress_line():
  assert console.eta_seconds(100, 20.0, 10) == 200.0  # 2 s per step
  assert console.eta_seconds(100, 0.0, 0) is None
  line = console.progress_line(20, 300, {"loss": 1.5, "loss_action": 1.25, "learning_rate": 0.01},
                               steps_per_sec=0.5, clips_per_sec=4.0, data_wait_fraction=0.03, eta=560.0,
                               extra={"skipped_records": 0})
  assert line == ("step 20/300  loss 1.5000  loss_action 1.2500  lr 0.01  0.50 steps/s  4.0 clips/s  data wait 3%  "
                  "ETA 9m20s  skipped_records 0")
  assert console.progress_line(1, 2, {"loss": 1.0}, steps_per_sec=1, clips_per_sec=1, data_wait_fraction=0,
                               eta=None).endswith("ETA after the next window")


def test_end_summary_and_already_complete(tmp_path):
  best_json = tmp_path / "best" / "best.json"
  assert console.read_best(str(best_json)) == (None, None)
  best_json.parent.mkdir()
  best_json.write_text('{"step": 20, "metric": "mAP", "value": 0.25, "metrics": {}}')
  best, metric = console.read_best(str(best_json))
  assert best == str(tmp_path / "best") and metric == ("mAP", 0.25)
  text = console.end_summary(final_metrics={"loss": 0.5, "accuracy": 0.75}, wall_seconds=3725, steps_run=260,
                             num_steps=300, last_checkpoint="/w/checkpoints/300", best_checkpoint=best,
                             best_metric=metric)
  assert "finished step 300/300: 260 steps this run in 1h02m05s" in text
  assert "final metrics accuracy 0.75  loss 0.5" in text
  assert "last checkpoint /w/checkpoints/300" in text and f"best checkpoint {best} (mAP 0.25)" in text
  assert console.already_complete(300, 300, "/w/checkpoints/300").startswith(
      "Run already complete: step 300 of 300 is done (/w/checkpoints/300)")


def test_schedule_without_warmup_is_the_main_schedule_and_logs_nothing(caplog):
  """The cause of optax's "non-positive transition_steps" line on fine-tunes: no zero-length warm-up."""
  config = ml_collections.ConfigDict({
      "num_train_steps": 10, "global_batch_size": 64,
      "optimizer": {"base_learning_rate": 0.1, "warmup_steps": 0, "warmup_start_fraction": 0.1,
                    "schedule": "steps", "decay_steps": (5,), "decay_factor": 0.1}})
  with caplog.at_level(std_logging.INFO):
    schedule = optimizer.make_schedule(config)
  assert not [r for r in caplog.records if "polynomial schedule" in r.getMessage()]
  assert [float(schedule(s)) for s in (0, 4, 5, 9)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
