"""The trainer: sharded step = single-device step; preempt + resume = uninterrupted; NaN stops."""

import glob
import os

import jax
import numpy as np
import pytest

from conftest import assert_trees_close, model_grid, tiny_config
from egoexo_jax import checkpointing, objectives, sharding, train
from egoexo_jax.input import egoexo_pipeline


def test_sharded_step_on_8_devices_equals_single_device_step(real_record_pattern):
  assert jax.device_count() == 8
  config = tiny_config(real_record_pattern)
  objective = objectives.resolve(config)
  optimizer, schedule = train.make_optimizer(config)
  iterator = iter(egoexo_pipeline.make_train_dataset(config, real_record_pattern, grid=model_grid(config)))
  batches = [next(iterator) for _ in range(2)]
  results = []
  for num_devices in (1, 8):
    mesh = sharding.make_mesh(num_devices)
    state, state_shardings = train.create_sharded_state(objective, optimizer, config, mesh)
    step_fn = train.make_step_fn(objective, optimizer, schedule, config, mesh, state_shardings)
    for batch in batches:
      global_batch = sharding.host_batch_to_global(batch, mesh)
      assert len(global_batch["clips"].addressable_shards) == num_devices
      state, _, terms = step_fn(state, global_batch)
    results.append(jax.device_get((state.params, state.batch_stats, state.opt_state, terms)))
  single, sharded = results
  assert np.isfinite(single[3]["loss"]) and single[3]["loss_interaction"] > 0
  # Same maths, different reduction order across devices: equal to float32 rounding.
  assert_trees_close(single, sharded, rtol=2e-4, atol=2e-6)


class Preempted(Exception):
  pass


def preempt_after_step_2(config, workdir: str, monkeypatch) -> None:
  """Trains in `workdir` until the checkpoint of step 2 is written, then dies (Preempted) as a killed run would."""
  real_save = checkpointing.save

  def save_then_die_at_step_2(manager, step, state, data_iterator=None):
    real_save(manager, step, state, data_iterator)
    if step == 2:
      manager.wait_until_finished()
      raise Preempted

  monkeypatch.setattr(checkpointing, "save", save_then_die_at_step_2)
  with pytest.raises(Preempted):
    train.train_and_evaluate(config, workdir)
  monkeypatch.undo()


def test_preempted_then_resumed_run_equals_uninterrupted_run(real_record_pattern, tmp_path, monkeypatch):
  config = tiny_config(real_record_pattern)
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "a"))

  preempt_after_step_2(config, str(tmp_path / "b"), monkeypatch)
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"))

  assert int(resumed.step) == int(uninterrupted.step) == 4
  assert_trees_close(jax.device_get((resumed.params, resumed.batch_stats, resumed.opt_state)),
                     jax.device_get((uninterrupted.params, uninterrupted.batch_stats, uninterrupted.opt_state)),
                     rtol=1e-6, atol=1e-7)
  # Both runs wrote Orbax checkpoints (steps 2 and 4) and TensorBoard event files.
  for run in ("a", "b"):
    assert sorted(os.listdir(tmp_path / run / "checkpoints")) == ["2", "4"]
    assert glob.glob(str(tmp_path / run / "events.out.tfevents.*"))


def test_non_finite_loss_stops_naming_the_step(real_record_pattern, tmp_path):
  config = tiny_config(real_record_pattern, **{"optimizer.base_learning_rate": 1e30})
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step \d+: loss=nan"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]  # nothing bad was saved


def test_optimizer_schedule_and_weight_decay_mask():
  config = tiny_config(**{"num_train_steps": 100, "optimizer.warmup_steps": 10, "global_batch_size": 128,
                          "optimizer.base_learning_rate": 0.1, "optimizer.lr_policy": ""})  # step-based schedule
  _, schedule = train.make_optimizer(config)
  peak = 0.1 * 128 / 64
  assert float(schedule(0)) == pytest.approx(0.1 * peak)
  assert float(schedule(10)) == pytest.approx(peak)
  assert float(schedule(55)) == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 45 / 90)), rel=1e-5)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match=r"warmup_steps \(100\) must be in \[0, num_train_steps\)"):
    train.make_optimizer(tiny_config(**{"num_train_steps": 100, "optimizer.warmup_steps": 100}))


def test_step_schedule_after_warmup():
  config = tiny_config(**{"num_train_steps": 30, "optimizer.warmup_steps": 5, "global_batch_size": 64,
                          "optimizer.base_learning_rate": 0.02, "optimizer.lr_policy": ""})
  config.optimizer.schedule = "steps"
  config.optimizer.decay_steps = (20, 25)
  config.optimizer.decay_factor = 0.1
  _, schedule = train.make_optimizer(config)
  assert float(schedule(0)) == pytest.approx(0.002)
  assert [float(schedule(s)) for s in (5, 19, 20, 24, 25, 29)] == pytest.approx(
      [0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002])
  config.optimizer.decay_steps = (3, 25)
  with pytest.raises(ValueError, match="must increase and come after warm-up"):
    train.make_optimizer(config)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_variants_and_frozen_subtrees(name):
  config = tiny_config(**{"optimizer.weight_decay": 0.1, "optimizer.lr_policy": "",
                          "optimizer.weight_decay_on": "kernels"})
  config.optimizer.name = name
  config.optimizer.reference_batch_size = 0  # the base rate as is
  config.optimizer.frozen = ("frozen_part",)
  optimizer, schedule = train.make_optimizer(config)
  assert float(schedule(1)) == pytest.approx(config.optimizer.base_learning_rate, rel=1e-6)
  params = {"frozen_part": {"kernel": np.ones((2, 2), np.float32)},
            "trained": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones((2,), np.float32)}}
  grads = jax.tree.map(np.zeros_like, params)  # zero gradient: only weight decay moves a parameter
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  assert np.all(updates["frozen_part"]["kernel"] == 0)
  assert np.all(updates["trained"]["kernel"] < 0) and np.all(updates["trained"]["bias"] == 0)
  config.optimizer.frozen = ("no_such_part",)
  optimizer, _ = train.make_optimizer(config)
  with pytest.raises(ValueError, match=r"optimizer.frozen names \['no_such_part'\]"):
    optimizer.init(params)


def test_init_from_maps_subtrees_between_runs(tmp_path):
  config = tiny_config()
  objective = objectives.resolve(config)
  optimizer, _ = train.make_optimizer(config)
  mesh = sharding.make_mesh(1)
  saved, _ = train.create_sharded_state(objective, optimizer, config, mesh)
  manager = checkpointing.make_manager(str(tmp_path / "source"), max_to_keep=1, async_save=False)
  checkpointing.save(manager, 7, saved)
  manager.close()
  fresh, shardings = train.create_sharded_state(objective, optimizer, tiny_config(seed=5), mesh)
  # The backbone comes from the other run; the heads stay new.
  config.init_from = f"backbone={tmp_path / 'source'}:backbone"
  loaded = train.initialize_from_checkpoints(fresh, config, shardings)
  assert_trees_close(loaded.params["backbone"], saved.params["backbone"], 0, 0)
  assert_trees_close(loaded.batch_stats["backbone"], saved.batch_stats["backbone"], 0, 0)
  assert_trees_close(loaded.params["action_head"], fresh.params["action_head"], 0, 0)
  assert not np.allclose(loaded.params["action_head"]["linear"]["kernel"], saved.params["action_head"]["linear"]["kernel"])
  config.init_from = f"backbone={tmp_path / 'source'}:ego_backbone"
  with pytest.raises(KeyError, match="has no 'params/ego_backbone'"):
    train.initialize_from_checkpoints(fresh, config, shardings)
  assert train.parse_init_from("runs/a") == {"backbone": ("runs/a", "backbone")}
  assert train.parse_init_from("ego_backbone=runs/k,exo_backbone=runs/x:exo_backbone") == {
      "ego_backbone": ("runs/k", "backbone"), "exo_backbone": ("runs/x", "exo_backbone")}
  with pytest.raises(ValueError, match="is not 'subtree=path"):
    train.parse_init_from("ego_backbone=runs/k,=runs/x")


# --------------------------------------------------------------------------- reliability at scale (issue 8)


def test_corrupt_records_are_counted_the_step_profiled_and_a_nan_batch_named(real_record_pattern, tmp_path,
                                                                              monkeypatch):
  """One run over real records plus a garbage-JPEG and a bad-CRC record: step 1 logs how many records
  were skipped (train/skipped_records), the host memory and a profiler trace; step 2's loss is NaN
  (learning rate 1e30) and the error names the records of step 2's batch."""
  from testlib import expected_positions, write_records_with_corrupt_ones
  pattern = str(tmp_path / "mixed.tfrecord-00000-of-00001")
  unreadable = write_records_with_corrupt_ones(real_record_pattern, pattern)
  # A seed whose first batch meets an unreadable record, by the skipping rule (pipelines_test).
  seed = next(s for s in range(100) if sum(k for _, k in expected_positions(8, unreadable, s, 8)) > 0)
  expected = expected_positions(8, unreadable, seed, 16)
  config = tiny_config(pattern, seed=seed, log_every_steps=1, profile_steps=(1, 1),
                       **{"optimizer.base_learning_rate": 1e30})
  logged = []
  real_write_summary = train.write_summary
  monkeypatch.setattr(train, "write_summary", lambda *args: logged.append(args) or real_write_summary(*args))
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step 2: loss=nan") as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  (_, step, *_, extra), = logged  # (writer, step, ..., extra) of step 1 only
  assert step == 1 and extra["skipped_records"] == sum(k for _, k in expected[:8]) > 0
  assert set(extra) == {"skipped_records", "host_rss_gib"} and 0.1 < extra["host_rss_gib"] < 64
  assert glob.glob(str(tmp_path / "run" / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  step2_records = sorted(i for i, _ in expected[8:16])
  assert f"the batch's records (index into the sorted record shards): {step2_records}" in str(error.value)
  # ... and names each by file, record number and video id.
  assert "; files and video ids: " + ", ".join(f"{pattern}#{i} (id 'real_{i}')" for i in dict.fromkeys(step2_records)) \
      in str(error.value)


def test_a_hung_input_pipeline_stops_the_run_naming_the_step(real_record_pattern, tmp_path, monkeypatch):
  import threading
  from egoexo_jax.input import sources
  release = threading.Event()

  class HangingSource:  # a source on storage that stopped answering
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, index):
      release.wait()
      return self.source[index]

  real_open = sources.open_records
  monkeypatch.setattr(sources, "open_records", lambda pattern, **kw: HangingSource(real_open(pattern, **kw)))
  config = tiny_config(real_record_pattern, **{"data.batch_timeout_s": 1.0})
  try:
    with pytest.raises(TimeoutError, match=r"step 1: no batch from the input pipeline within data.batch_timeout_s = 1 s"):
      train.train_and_evaluate(config, str(tmp_path))
  finally:
    release.set()


# --------------------------------------------------------------------------- records that do not fit (issue 15)


def test_a_resumed_run_skips_records_that_do_not_fit_instead_of_dying(real_record_pattern, tmp_path, monkeypatch):
  """Records with a label out of range, a NaN box, short object logits and an inverted box: a run
  preempted at step 2 and resumed passes over those it meets after the resume (steps 3-4), counts them
  in train/skipped_records and finishes."""
  from testlib import expected_positions, write_records_with_bad_content
  pattern = str(tmp_path / "content.tfrecord-00000-of-00001")
  bad = write_records_with_bad_content(real_record_pattern, pattern)
  seed = next(s for s in range(100) if sum(k for _, k in expected_positions(10, bad, s, 32)[16:]) > 0)
  expected = expected_positions(10, bad, seed, 32)
  config = tiny_config(pattern, seed=seed)
  preempt_after_step_2(config, str(tmp_path / "run"), monkeypatch)
  logged = []
  real_write_summary = train.write_summary
  monkeypatch.setattr(train, "write_summary", lambda *args: logged.append(args) or real_write_summary(*args))
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == 4
  (_, step, *_, extra), = logged  # the resumed run logs step 4 only
  assert step == 4 and extra["skipped_records"] == sum(k for _, k in expected[16:]) > 0


# --------------------------------------------------------------------------- the real world (issue 15)

import errno
import signal

import psutil

from testlib import start_main, wait_until_gone
from egoexo_jax import monitoring, run_lock


def trained_params(state):
  return jax.device_get((state.params, state.batch_stats, state.opt_state))


@pytest.fixture(scope="module")
def uninterrupted_6_steps(real_record_pattern, tmp_path_factory):
  """Params, BatchNorm statistics and optimiser state of an uninterrupted 6-step run."""
  config = tiny_config(real_record_pattern, num_train_steps=6)
  return trained_params(train.train_and_evaluate(config, str(tmp_path_factory.mktemp("uninterrupted"))))


def test_sigint_finishes_the_step_saves_it_and_the_resumed_run_is_bit_identical(real_record_pattern, tmp_path,
                                                                                monkeypatch, uninterrupted_6_steps,
                                                                                caplog):
  config = tiny_config(real_record_pattern, num_train_steps=6)
  real_next_batch = monitoring.next_batch

  def interrupt_at_step_3(iterator, timeout_s, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 3 fetches its batch
    return real_next_batch(iterator, timeout_s, step)

  monkeypatch.setattr(monitoring, "next_batch", interrupt_at_step_3)
  with pytest.raises(monitoring.Stopped) as stopped:
    train.train_and_evaluate(config, str(tmp_path))
  assert stopped.value.code == 130 and stopped.value.step == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]  # step 3: not a periodic checkpoint step
  assert f"Stopped by SIGINT after step 3: checkpoint of step 3 (state and data position) written to " \
         f"{tmp_path}/checkpoints/3; exit status 130" in caplog.text
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
  assert not os.path.exists(tmp_path / run_lock.LOCK_NAME)
  monkeypatch.undo()
  resumed = train.train_and_evaluate(config, str(tmp_path))
  assert int(resumed.step) == 6
  assert_trees_close(trained_params(resumed), uninterrupted_6_steps, rtol=0, atol=0)


def test_sigterm_to_the_process_group_saves_exits_143_leaves_no_process_and_resumes_bit_identical(
    real_record_pattern, tmp_path, uninterrupted_6_steps):
  """A preemption notice to every process of the run (systemd, Slurm): Grain's 2 workers ignore it, the
  trainer finishes its step, saves it, stops its workers and exits 143; the resumed run (here with 0
  workers: the data position carries over) ends equal to the uninterrupted one, every leaf."""
  config = tiny_config(real_record_pattern, num_train_steps=6, log_every_steps=1,
                       **{"data.num_workers": 2, "async_checkpointing": True})
  child = start_main(config, tmp_path)
  log = []
  try:
    for line in child.stderr:
      log.append(line)
      if "step 2/6  loss" in line:
        os.killpg(child.pid, signal.SIGTERM)
    child.wait(timeout=120)
  finally:
    child.kill()
  log = "".join(log)
  assert child.returncode == 143, log[-3000:]
  stops = [line for line in log.splitlines() if "Stopped by SIGTERM after step" in line]
  assert len(stops) == 1, log[-3000:]
  step = int(stops[0].split("after step ")[1].split(":")[0])
  assert 2 <= step < 6 and str(step) in os.listdir(tmp_path / "checkpoints")
  assert "leaked shared_memory" not in log and "Traceback" not in log
  assert not wait_until_gone(child.pid)
  resumed = train.train_and_evaluate(tiny_config(real_record_pattern, num_train_steps=6), str(tmp_path))
  assert_trees_close(trained_params(resumed), uninterrupted_6_steps, rtol=0, atol=0)


def test_a_failed_save_stops_the_run_at_once_keeping_the_last_good_checkpoint(real_record_pattern, tmp_path,
                                                                            monkeypatch):
  """The disk fills up while step 6 is written in the background: the run stops at once (before the
  next save, step 9) with one line naming the folder, the cause and the free space; step 3 stays the
  newest checkpoint and no temporary folder is left."""
  from orbax.checkpoint._src.serialization import serialization
  real_write, real_save, real_check_finite = serialization.async_serialize_from_host, checkpointing.save, \
      train.check_finite
  saving, steps_run = [], []

  async def disk_full_from_step_6(*args, **kwargs):
    if saving[-1] >= 6:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "checkpoints"))
    return await real_write(*args, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host", disk_full_from_step_6)
  monkeypatch.setattr(checkpointing, "save", lambda manager, step, *a: saving.append(step) or real_save(manager, step, *a))
  monkeypatch.setattr(train, "check_finite", lambda step, *a: steps_run.append(step) or real_check_finite(step, *a))
  config = tiny_config(real_record_pattern, num_train_steps=9, checkpoint_every_steps=3, async_checkpointing=True)
  with pytest.raises(checkpointing.CheckpointSaveError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint of step 6 could not be written to {tmp_path}/checkpoints: ")
  assert "No space left on device" in message and " MiB free there; the last good checkpoint, step 3, is kept" in message
  assert saving == [3, 6] and max(steps_run) < 9  # stopped before the next save
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # no *.orbax-checkpoint-tmp folder
  assert not os.path.exists(tmp_path / run_lock.LOCK_NAME)


def test_too_little_disk_for_one_checkpoint_refuses_to_start_and_a_locked_workdir_too(real_record_pattern,
                                                                                      tmp_path, monkeypatch):
  config = tiny_config(real_record_pattern)
  objective = objectives.resolve(config)
  optimizer, _ = train.make_optimizer(config)
  abstract, _ = train.abstract_state(objective, optimizer, config, sharding.make_mesh(1))
  state, _ = train.create_sharded_state(objective, optimizer, config, sharding.make_mesh(1))
  needed = checkpointing.state_bytes(abstract)
  assert needed == sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)) > 100_000
  import shutil
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed // 2))
  with pytest.raises(checkpointing.DiskSpaceError,
                     match=rf"not enough free space for one checkpoint in {tmp_path}/checkpoints: the train state "
                           rf"needs about {needed / 2**20:,.1f} MiB, the disk has {needed / 2 ** 21:,.1f} MiB free"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  monkeypatch.undo()
  # Another live trainer (here: this test's parent process) holds the workdir: refused before anything else.
  parent = psutil.Process().parent()
  with open(tmp_path / run_lock.LOCK_NAME, "w") as f:
    f.write(f'{{"host": "{__import__("socket").gethostname()}", "pid": {parent.pid}, '
            f'"process_start": {parent.create_time()}}}')
  with pytest.raises(run_lock.WorkdirLockedError, match=f"pid {parent.pid}"):
    train.train_and_evaluate(config, str(tmp_path))


# --------------------------------------------------------------------------- checkpoint compatibility (issue 14)


@pytest.mark.parametrize("entry", ["egoexo:small", "finetune_charades_ego:small,star", "suml:small", "evgap_group:small"])
def test_state_tree_is_the_one_checkpoints_of_c06fec5_hold(entry):
  """The TrainState's key paths, shapes and dtypes per method equal those the trainer of commit c06fec5 (before
  the Objective) computed (tests/testdata/state_trees_c06fec5.json), so its checkpoints restore unchanged."""
  import importlib
  import json
  with open(os.path.join(os.path.dirname(__file__), "testdata", "state_trees_c06fec5.json")) as f:
    want = json.load(f)["states"][entry]
  name, arg = entry.split(":")
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  objective = objectives.resolve(config)
  optimizer, _ = train.make_optimizer(config)
  abstract, _ = train.abstract_state(objective, optimizer, config, sharding.make_mesh(1))
  got = {jax.tree_util.keystr(k): [list(v.shape), str(v.dtype)] for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  assert got == want


def test_log_window_eta_leaves_out_the_first_window_which_compiles(monkeypatch):
  class Merged:  # stands in for the CLU metrics of a step
    def merge(self, other):
      return self

  clock = iter([0.0, 100.0, 100.0, 110.0])  # window 1: one step in 100 s (compiling); window 2: ten steps in 10 s
  monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
  window = train.LogWindow(num_train_steps=111)
  window.add(Merged(), 0.5, 2)
  assert (window.steps, window.data_wait, window.skipped) == (1, 0.5, 2)
  assert window.close() == 100.0 and window.eta(1) is None
  window.reset()
  for _ in range(10):
    window.add(Merged(), 0.0, 0)
  assert window.close() == 10.0 and window.eta(11) == 100.0  # 100 steps left at 1 s per step, not 10 s
