"""Grain workers end with their trainer: after a SIGKILL of the trainer no process of the run remains."""

import os
import signal

import psutil

from conftest import tiny_config
from egoexo_jax import processes
from testlib import session_processes, start_main, wait_until_gone


def test_workers_and_the_resource_tracker_end_after_the_trainer_is_sigkilled(real_record_pattern, tmp_path):
  config = tiny_config(real_record_pattern, num_train_steps=1000, log_every_steps=1, **{"data.num_workers": 2})
  child = start_main(config, tmp_path)
  try:
    for line in child.stderr:
      if "step 2/1000  loss" in line:
        break
    trainer = psutil.Process(child.pid)
    children = trainer.children(recursive=True)
    commands = [" ".join(c.cmdline()) for c in children]
    # Two Grain workers and multiprocessing's resource tracker, all in the run's session.
    assert sum("resource_tracker" in c for c in commands) == 1 and len(children) >= 3, commands
    assert {c.pid for c in children} <= {p.pid for p in session_processes(child.pid)}
    os.kill(child.pid, signal.SIGKILL)  # the out-of-memory killer, a scheduler's hard kill
    child.wait(timeout=60)
  finally:
    child.kill()
  assert child.returncode == -signal.SIGKILL
  left = wait_until_gone(child.pid, timeout_s=10 + 4 * processes.POLL_S)
  assert not left, [" ".join(p.cmdline()) for p in left]


def test_release_shared_memory_frees_a_batch_held_in_a_reference_cycle():
  import gc
  import numpy as np
  from grain._src.python.ipc import shared_memory_array
  shared_memory_array.SharedMemoryArray.enable_async_del(1)
  gc.disable()  # no automatic collection between the steps below
  try:
    array = shared_memory_array.SharedMemoryArray((1000,), np.float32)  # as a Grain worker's batch arrives
    array.unlink_on_del()
    name = array.shm.name
    holder = {"batch": array}
    holder["self"] = holder  # freed only by the garbage collector
    del array, holder
    assert os.path.exists(f"/dev/shm/{name}")
    processes.release_shared_memory()
    assert not os.path.exists(f"/dev/shm/{name}")  # collected and unlinked now, before interpreter exit
    assert shared_memory_array.SharedMemoryArray._del_thread_pool is None  # pylint: disable=protected-access
  finally:
    gc.enable()
