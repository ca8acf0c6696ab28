"""Run-time guards and gauges of the training loop: a batch timeout, memory use, a profiler window.

- `next_batch` fetches the next batch in a helper thread and gives up after `timeout_s`, raising
  `BatchTimeoutError` naming the step and the state of each Grain worker process, so a run whose
  worker hangs (stuck I/O, a stopped process, a deadlock) fails instead of waiting forever. (A worker
  that dies is reported by Grain itself within a second: "Worker process was terminated unexpectedly".)
- `memory_metrics` reads the peak bytes the local accelerators have held (`Device.memory_stats()`, on
  GPU and TPU) or, where devices report none (CPU), this process's resident set size; the metric
  name says which.
- `ProfileWindow` captures a JAX profiler trace (TensorBoard's profile plugin, Perfetto) of the steps
  [start, stop] into `<workdir>/profile`.
- `StopSignals` turns SIGTERM (a preemption notice) and SIGINT (Ctrl-C) into a stop at a step boundary
  that every host agrees on; the trainer then writes a checkpoint of that step and raises `Stopped`,
  whose exit status is 128 + the signal number (143 for SIGTERM, 130 for SIGINT). A second signal
  acts as it would have without this (SIGINT raises KeyboardInterrupt, SIGTERM ends the process).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Iterator

import jax
import psutil
from absl import logging

GIB = 2.0**30


class BatchTimeoutError(TimeoutError):
  """No batch arrived within config.data.batch_timeout_s; the message names the step and the workers."""


def worker_report() -> str:
  """'pid 123 running, pid 124 stopped' for this process's child processes (Grain's workers)."""
  entries = []
  for child in psutil.Process().children(recursive=False):
    try:
      command = " ".join(child.cmdline())
      if "resource_tracker" in command:  # multiprocessing's shared-memory bookkeeper, not a worker
        continue
      entries.append(f"pid {child.pid} {child.status()} ({' '.join(child.cmdline()[-2:])[:60]})")
    except psutil.Error:
      entries.append(f"pid {child.pid} gone")
  return ", ".join(entries) if entries else "none (data.num_workers = 0: the batch is built in this process)"


def next_batch(iterator: Iterator[Any], timeout_s: float, step: int) -> Any:
  """next(iterator), or BatchTimeoutError after `timeout_s` seconds (0 or less: wait forever).

  The fetch runs in a daemon thread, so a hung fetch cannot keep the process alive after the error.
  Exceptions of the fetch (StopIteration, a worker's error) are raised here unchanged.
  """
  if timeout_s <= 0:
    return next(iterator)
  result = {}

  def fetch():
    try:
      result["batch"] = next(iterator)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the caller's thread)
      result["error"] = e

  thread = threading.Thread(target=fetch, name=f"fetch-batch-{step}", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise BatchTimeoutError(
        f"step {step}: no batch from the input pipeline within data.batch_timeout_s = {timeout_s:g} s. "
        f"Grain worker processes: {worker_report()}. Check for a stopped or hung worker (status 'stopped' or "
        "'disk-sleep' above; dmesg for the out-of-memory killer), unreachable record storage "
        "(data.train_records), or raise data.batch_timeout_s if the first batches legitimately take longer.")
  if "error" in result:
    raise result["error"]
  return result["batch"]


def memory_metrics() -> dict[str, float]:
  """{'device_peak_memory_gib': max over local devices} where devices report memory_stats() (GPU,
  TPU), else {'host_rss_gib': this process's resident set size} (CPU)."""
  peaks = []
  for device in jax.local_devices():
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  if peaks:
    return {"device_peak_memory_gib": max(peaks) / GIB}
  return {"host_rss_gib": psutil.Process().memory_info().rss / GIB}


class ProfileWindow:
  """Traces steps [start, stop] (config.profile_steps; () or None: never) into `<workdir>/profile`.

  Call `before_step(step)` before a step is dispatched and `after_step(step, state)` after it; the
  trace stops once step `stop`'s results are ready, so the window holds whole steps.
  """

  def __init__(self, steps, workdir: str):
    steps = tuple(steps or ())
    if steps and (len(steps) != 2 or not 0 < steps[0] <= steps[1]):
      raise ValueError(f"config profile_steps {steps} must be (start, stop) with 0 < start <= stop, or ()")
    self.start, self.stop = steps if steps else (None, None)
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def before_step(self, step: int) -> None:
    if step == self.start:
      logging.info("Profiling steps %d-%d into %s.", self.start, self.stop, self.directory)
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, outputs: Any) -> None:
    if self.active and step == self.stop:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Profile written to %s (tensorboard --logdir %s, Profile tab).", self.directory, self.directory)


class Stopped(SystemExit):
  """Raised once a stop signal's checkpoint is written; SystemExit with status 128 + signal number."""

  def __init__(self, signum: int, step: int):
    super().__init__(128 + signum)
    self.signum, self.step = signum, step


class StopSignals:
  """SIGTERM and SIGINT request a stop; `requested(step)`, called by every host after every step,
  says when to stop (context manager: handlers installed on entry, the previous ones back on exit).

  Agreement across hosts: with jax.distributed initialised and its preemption service on (the
  default), JAX's own SIGTERM notifier and `multihost_utils.reached_preemption_sync_point` choose the
  step (the largest step any host has reached, plus one); SIGTERM is left to that notifier and SIGINT
  is forwarded to it as SIGTERM. Otherwise (one process, or the service off) the handlers set a flag,
  which several processes combine at every step with a `process_allgather`.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}
    try:  # JAX has no public accessor for its preemption service
      from jax._src import distributed  # pylint: disable=g-import-not-at-top
      self._jax_sync = jax.distributed.is_initialized() and distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
      self._jax_sync = False

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():  # Python handles signals in the main thread only
      for signum in self.SIGNALS:
        if not (self._jax_sync and signum == signal.SIGTERM):
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    if self.signum is not None:  # the second signal: what it would have done without us
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
      return
    self.signum = signum
    if self._jax_sync:
      os.kill(os.getpid(), signal.SIGTERM)  # into JAX's preemption notice

  def requested(self, step: int) -> bool:
    """Whether to stop after `step` (every host gets the same answer at the same step)."""
    if self._jax_sync:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    if jax.process_count() > 1:
      import numpy as np  # pylint: disable=g-import-not-at-top
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
      if self.signum is None and np.any(flags):
        self.signum = int(np.max(flags))
    return self.signum is not None

  def stopped(self, step: int, checkpoint_dir: str) -> Stopped:
    """Logs the stop in one line; returns the exception that ends the run."""
    error = Stopped(self.signum, step)
    logging.warning("Stopped by %s after step %d: checkpoint of step %d (state and data position) written to %s; "
                    "exit status %d; the same command resumes from it.", signal.Signals(self.signum).name, step,
                    step, os.path.join(checkpoint_dir, str(step)), error.code)
    return error
