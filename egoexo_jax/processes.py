"""Grain worker processes end with their trainer, and leave no shared memory behind.

Grain 0.2 starts `mp_prefetch` workers with multiprocessing's spawn context as daemon processes: they
end when the trainer exits normally, but not when it is SIGKILLed (the out-of-memory killer, a
scheduler's hard kill), and then multiprocessing's resource tracker (which holds a pipe that the
workers inherit) stays too. `worker_init_fn()` is the `worker_init_fn` of every `mp_prefetch` here:
- each worker watches its parent's pid from a daemon thread and exits within `POLL_S` of the trainer's
  death, however it died; once the workers are gone the resource tracker sees its pipe close, unlinks
  the shared memory blocks still registered and exits too. (A watchdog thread, not
  prctl(PR_SET_PDEATHSIG): Linux sends that signal when the *thread* that started the child ends, and
  Grain starts workers from a thread pool; the thread also works on macOS.)
- workers ignore SIGINT and SIGTERM: a Ctrl-C in a terminal or a preemption notice sent to the whole
  process group (systemd, Slurm) reaches the trainer, which finishes its step, saves, and stops its
  workers itself (train.py); a worker killed by the signal first would fail that last step.

`release_shared_memory()` frees the shared-memory blocks of batches the trainer still holds when the
input pipeline is closed, so a normal end leaves none for the resource tracker to report as leaked.
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import threading
import time
from typing import Callable

POLL_S = 0.25


def _exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
  """Runs first in each Grain worker: ignores SIGINT/SIGTERM, exits when `parent_pid` is no longer
  the parent (the trainer died, even before this worker had started)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(POLL_S)
    os._exit(1)  # pylint: disable=protected-access  (no clean-up to run: the trainer is gone)

  if os.getppid() != parent_pid:
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()


def worker_init_fn() -> Callable[[int, int], None]:
  """The `worker_init_fn` for `mp_prefetch`: workers end with this process (module docstring)."""
  return functools.partial(_exit_with_parent, os.getpid())


def release_shared_memory() -> None:
  """Frees the shared memory of Grain batches no longer referenced (call after closing the pipeline).

  Grain unlinks a worker's shared-memory block when the array the trainer holds is garbage collected,
  through a thread pool; this collects now and waits for that pool, before interpreter exit drops it.
  """
  gc.collect()
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:  # another Grain layout: nothing to flush
    return
  pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
  if pool is not None:
    pool.close()
    pool.join()
    shared_memory_array.SharedMemoryArray._del_thread_pool = None  # pylint: disable=protected-access
