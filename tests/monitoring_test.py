"""Batch timeout (a blocked iterator, a stopped Grain worker), memory metrics, the profiler window."""

import glob
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import psutil
import pytest
from absl import flags

from egoexo_jax import monitoring


class BlockingIterator:
  """Yields `ready` items, then blocks until `release` is set."""

  def __init__(self, ready: int):
    self.ready, self.release = ready, threading.Event()

  def __next__(self):
    if self.ready == 0:
      self.release.wait()
      raise StopIteration
    self.ready -= 1
    return {"x": self.ready}


def test_next_batch_times_out_naming_the_step_and_passes_errors_through():
  iterator = BlockingIterator(ready=1)
  try:
    assert monitoring.next_batch(iterator, 5.0, step=1) == {"x": 0}
    tick = time.perf_counter()
    with pytest.raises(monitoring.BatchTimeoutError, match=r"step 2: no batch from the input pipeline within "
                       r"data.batch_timeout_s = 0.5 s\. Grain worker processes: none"):
      monitoring.next_batch(iterator, 0.5, step=2)
    assert 0.5 <= time.perf_counter() - tick < 5
  finally:
    iterator.release.set()

  def failing():
    raise ValueError("record x is bad")
    yield  # pylint: disable=unreachable
  with pytest.raises(ValueError, match="record x is bad"):
    monitoring.next_batch(failing(), 5.0, step=3)
  assert monitoring.next_batch(iter([7]), 0, step=4) == 7  # 0: no timeout, no thread


def test_a_stopped_grain_worker_times_out_and_is_named():
  import grain
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  dataset = grain.MapDataset.range(10**6).batch(2).to_iter_dataset().mp_prefetch(
      grain.MultiprocessingOptions(num_workers=1, per_worker_buffer_size=1))
  iterator = iter(dataset)
  try:
    next(iterator)  # the worker is up
    worker, = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
    os.kill(worker.pid, signal.SIGSTOP)  # hung: alive, making nothing
    with pytest.raises(monitoring.BatchTimeoutError, match=rf"step \d+: .*pid {worker.pid} stopped"):
      for step in range(2, 50):  # the buffered batches drain first
        monitoring.next_batch(iterator, 2.0, step)
    os.kill(worker.pid, signal.SIGCONT)
  finally:
    iterator.close()


def test_memory_metrics_name_their_source():
  values = monitoring.memory_metrics()
  if any(d.memory_stats() for d in jax.local_devices()):  # GPU / TPU
    assert set(values) == {"device_peak_memory_gib"} and values["device_peak_memory_gib"] > 0
  else:  # CPU: this process's resident set, as /proc reports it
    with open("/proc/self/status") as f:
      rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert set(values) == {"host_rss_gib"}
    assert values["host_rss_gib"] == pytest.approx(rss_kib / 2**20, rel=0.05)


def test_profile_window_traces_the_chosen_steps(tmp_path):
  window = monitoring.ProfileWindow((2, 3), str(tmp_path))
  step_fn = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  for step in range(1, 5):
    window.before_step(step)
    assert window.active == (step in (2, 3))
    x = step_fn(x) / 64
    window.after_step(step, x)
  assert not window.active
  traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with pytest.raises(ValueError, match=r"profile_steps \(3, 2\) must be \(start, stop\)"):
    monitoring.ProfileWindow((3, 2), str(tmp_path))
  assert monitoring.ProfileWindow((), str(tmp_path)).start is None
