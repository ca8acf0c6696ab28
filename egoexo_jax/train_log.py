"""What the trainer logs: the log window (LogWindow: metrics, speed and an ETA that leaves compilation out),
its TensorBoard scalars and progress line (write_summary), and the start banner of a run (banner).
Kept apart from train.py so that the loop stays readable on one screen."""

from __future__ import annotations

import os
import time

from absl import logging

from egoexo_jax import console


class LogWindow:
  """The steps since the last log line: merged CLU metrics, steps, seconds waiting for data, skipped
  records. `eta(step)` extrapolates from the windows after the first (which holds the compilation)."""

  def __init__(self, num_train_steps: int):
    self.num_train_steps, self.steady_steps, self.steady_seconds, self.first = num_train_steps, 0, 0.0, True
    self.reset()

  def reset(self) -> None:
    self.metrics, self.steps, self.data_wait, self.skipped, self.start = None, 0, 0.0, 0, time.perf_counter()

  def add(self, step_metrics, data_wait: float, skipped: int) -> None:
    self.metrics = step_metrics if self.metrics is None else self.metrics.merge(step_metrics)
    self.steps, self.data_wait, self.skipped = self.steps + 1, self.data_wait + data_wait, self.skipped + skipped

  def exclude_compilation(self) -> None:
    """Restarts the window's clock and step count after the run's first (compiling) step, so that this
    window's speed and the ETA leave the compilation out (its metrics stay in the window)."""
    self.steps, self.data_wait, self.start, self.first = 0, 0.0, time.perf_counter(), False

  def close(self) -> float:
    """Ends the window (call before writing it): its elapsed seconds, counted for the ETA unless first."""
    elapsed = time.perf_counter() - self.start
    if not self.first:
      self.steady_steps, self.steady_seconds = self.steady_steps + self.steps, self.steady_seconds + elapsed
    self.first = False
    return elapsed

  def eta(self, step: int) -> float | None:
    """Seconds to num_train_steps at the speed of the windows after the first; None before there is one."""
    if not self.steady_steps:
      return None
    return (self.num_train_steps - step) * self.steady_seconds / self.steady_steps


def write_summary(writer, step: int, config, window: LogWindow, extra: dict[str, float] | None = None) -> dict:
  """Writes the window's metrics, speed and `extra` scalars (skipped records, memory) to TensorBoard and
  logs one progress line (console.progress_line); returns the window's metrics."""
  elapsed = window.close()
  values = {k: float(v) for k, v in window.metrics.compute().items()}
  speed = {"steps_per_sec": window.steps / elapsed,
           "clips_per_sec": window.steps * config.global_batch_size / elapsed,
           "data_wait_fraction": window.data_wait / elapsed}
  writer.write_scalars(step, {f"train/{k}": v for k, v in {**values, **speed, **(extra or {})}.items()})
  logging.info("%s", console.progress_line(step, config.num_train_steps, values, eta=window.eta(step), extra=extra,
                                           **speed))
  return values


def banner(run) -> str:
  """The start banner (console.banner) of `run` (a train.Run)."""
  config = run.config
  return console.banner(
      objective=run.objective.name, model=type(run.objective.model).__module__.rsplit(".", 1)[-1],
      num_params=run.param_count, mesh=dict(run.mesh.shape), num_devices=run.mesh.size,
      records=config.data.get("train_records", "") or os.path.join(run.workdir, "records"),
      num_records=config.data.get("num_train_examples", 0), global_batch_size=config.global_batch_size,
      num_steps=config.num_train_steps, start_step=run.start_step, epochs=config.get("epochs", 0.0),
      workdir=run.workdir)
