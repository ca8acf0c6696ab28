"""What a run prints: quiet third-party logs, a start banner, one progress line per log window, an end summary.

- `quiet_environment()` (before TensorFlow is imported: main.py calls it first) and `configure_logging(level)`
  (after absl has installed its handler) keep the console to this project's lines: at 'quiet' (main.py's
  default `--log_level`) INFO and DEBUG records of third-party code (Orbax internals, JAX's "Unable to
  initialize backend 'tpu'", CLU, Grain, optax) and a short list of known harmless warnings are dropped;
  warnings and errors of every library still show. `--log_level=all` brings everything back.
- `banner`, `progress_line`, `end_summary`, `already_complete` are pure functions of values: the trainer
  decides when to call them, this module only says what the text is.
- `eta_seconds`: the remaining time from a window's speed; the trainer passes a window that excludes the
  first step (compilation), so the first ETA is not inflated by it.
- `tensorboard_writer`: CLU's default writer without its LoggingWriter, which printed every metric line a
  second time.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
from typing import Mapping

from absl import logging

LEVELS = ("quiet", "all")

# Our code: records from files under this repository are ours and always shown.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Warnings of libraries that say nothing a user can act on (message starts); dropped at 'quiet'.
HARMLESS_WARNINGS = (
    "Metadata file does not exist",  # Orbax, on the first save into an empty checkpoint folder
    "A polynomial schedule was set with a non-positive",  # optax, a constant schedule (e.g. no warm-up)
    "Unable to initialize backend",  # JAX probing for TPUs and GPUs on a CPU machine
    "Platform 'tpu' is experimental",
)

# Environment for libraries that log from C++ before Python can filter them. TensorFlow (imported by CLU's
# writers, for event files only: it computes nothing here) prints its oneDNN notice unless oneDNN is off
# (TF_ENABLE_ONEDNN_OPTS=0), and its CPU-feature notice below TF_CPP_MIN_LOG_LEVEL=2 (errors still show).
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0", "GRPC_VERBOSITY": "ERROR"}


def quiet_environment(level: str = "quiet") -> None:
  """Sets QUIET_ENVIRONMENT (values already set by the user win). Call before TensorFlow is imported
  (clu.metric_writers imports it); a no-op at level 'all'."""
  _check_level(level)
  if level == "quiet":
    for key, value in QUIET_ENVIRONMENT.items():
      os.environ.setdefault(key, value)


class QuietFilter(std_logging.Filter):
  """Keeps every record of our code and every third-party warning or error, except HARMLESS_WARNINGS."""

  def __init__(self, root: str = REPO_ROOT):
    super().__init__()
    self.root = os.path.join(root, "")

  def filter(self, record: std_logging.LogRecord) -> bool:
    ours = os.path.abspath(record.pathname or "").startswith(self.root) and "site-packages" not in record.pathname
    if ours:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    return not str(record.msg).startswith(HARMLESS_WARNINGS)


def _check_level(level: str) -> None:
  if level not in LEVELS:
    raise ValueError(f"unknown log level '{level}': use one of {', '.join(LEVELS)}")


def configure_logging(level: str = "quiet") -> None:
  """Installs (level 'quiet') or removes (level 'all') QuietFilter on absl's handler and on the root
  logger's other handlers, and sets INFO as absl's level (the progress lines are INFO)."""
  _check_level(level)
  quiet_environment(level)
  logging.set_verbosity(logging.INFO)
  handlers = [logging.get_absl_handler(), *std_logging.getLogger().handlers]
  for handler in dict.fromkeys(handlers):
    for old in [f for f in handler.filters if isinstance(f, QuietFilter)]:
      handler.removeFilter(old)
    if level == "quiet":
      handler.addFilter(QuietFilter())


# --------------------------------------------------------------------------- text


def _count(n: float) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def banner(*, objective: str, model: str, num_params: int, mesh: Mapping[str, int], num_devices: int,
           records: str, num_records: int | None, global_batch_size: int, num_steps: int, start_step: int,
           epochs: float, workdir: str) -> str:
  """The start-of-run block: what trains, on what, for how long, where its files go."""
  record_text = records + (f" ({num_records:,} records)" if num_records else "")
  epoch_text = f"{epochs:g} epochs = " if epochs else ""
  if not epoch_text and num_records:
    epoch_text = f"{num_steps * global_batch_size / num_records:.1f} epochs in "
  start = f", resuming at step {start_step + 1}" if start_step else ""
  lines = [
      f"objective {objective}, model {model}: {_count(num_params)} parameters",
      f"mesh {dict(mesh)} over {num_devices} device{'s' if num_devices != 1 else ''}; global batch "
      f"{global_batch_size}",
      f"records {record_text}",
      f"length {epoch_text}{num_steps:,} steps{start}",
      f"workdir {workdir}",
  ]
  return "\n".join(["=" * 72, *lines, "=" * 72])


def eta_seconds(remaining_steps: int, window_seconds: float, window_steps: int) -> float | None:
  """Seconds left at the speed of a window (None when the window has no steps or no time)."""
  if window_steps <= 0 or window_seconds <= 0:
    return None
  return max(remaining_steps, 0) * window_seconds / window_steps


def progress_line(step: int, num_steps: int, values: Mapping[str, float], *, steps_per_sec: float,
                  clips_per_sec: float, data_wait_fraction: float, eta: float | None,
                  extra: Mapping[str, float] | None = None) -> str:
  """One log window: 'step 40/300  loss 1.2  <terms>  lr 0.01  2.1 steps/s  17 clips/s  data wait 3%  ETA 2m04s'."""
  terms = "  ".join(f"{k} {values[k]:.4f}" for k in sorted(values) if k not in ("loss", "learning_rate"))
  parts = [f"step {step}/{num_steps}", f"loss {values['loss']:.4f}"] + ([terms] if terms else [])
  if "learning_rate" in values:
    parts.append(f"lr {values['learning_rate']:.4g}")
  parts += [f"{steps_per_sec:.2f} steps/s", f"{clips_per_sec:.1f} clips/s", f"data wait {100 * data_wait_fraction:.0f}%",
            "ETA " + (_duration(eta) if eta is not None else "after the next window")]
  parts += [f"{k} {v:.4g}" for k, v in sorted((extra or {}).items())]
  return "  ".join(parts)


def end_summary(*, final_metrics: Mapping[str, float], wall_seconds: float, steps_run: int, num_steps: int,
                last_checkpoint: str | None, best_checkpoint: str | None = None,
                best_metric: tuple[str, float] | None = None) -> str:
  """The end-of-run block: the last window's metrics, wall time, where the checkpoints are."""
  metric_text = "  ".join(f"{k} {v:.4g}" for k, v in sorted(final_metrics.items())) or "(no log window this run)"
  lines = [
      f"finished step {num_steps}/{num_steps}: {steps_run} steps this run in {_duration(wall_seconds)}",
      f"final metrics {metric_text}",
      f"last checkpoint {last_checkpoint or '(none written)'}",
  ]
  if best_checkpoint:
    what = f" ({best_metric[0]} {best_metric[1]:.4g})" if best_metric else ""
    lines.append(f"best checkpoint {best_checkpoint}{what}")
  return "\n".join(["=" * 72, *lines, "=" * 72])


def read_best(best_json: str) -> tuple[str | None, tuple[str, float] | None]:
  """(the best checkpoint's folder, (metric, value)) from train_eval's best.json; (None, None) without one."""
  if not os.path.exists(best_json):
    return None, None
  with open(best_json) as f:
    best = json.load(f)
  return os.path.dirname(best_json), (str(best.get("metric", "")), float(best.get("value", float("nan"))))


def already_complete(step: int, num_steps: int, checkpoint: str) -> str:
  """The one line of a rerun of a finished run."""
  return (f"Run already complete: step {step} of {num_steps} is done ({checkpoint}); nothing to train (raise "
          "--config.num_train_steps to continue it, or use another --workdir).")


def tensorboard_writer(workdir: str, process_index: int):
  """CLU writer of TensorBoard event files in `workdir` (process 0; others write nothing), with no
  LoggingWriter: the progress line is the console's one copy of the metrics."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  if process_index > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])

