"""One trainer per workdir: `<workdir>/trainer.lock` names the host and pid of the trainer writing there.

A second trainer on the same workdir refuses to start with a one-line `WorkdirLockedError` naming the
holder. A lock whose trainer is gone (on this host: no process with that pid, or a different process
that reused the pid, told apart by its start time) is stale and is taken over with a warning. A lock
held from another host cannot be checked from here: the error says to delete the file once that
trainer is known to be gone.

The lock file is created whole (written beside it, then hard-linked into place, which fails if the
name exists), so a reader never sees a half-written lock. Two trainers taking over the same stale
lock in the same instant are not told apart (the window is a few system calls).
"""

from __future__ import annotations

import json
import os
import socket
import time

import psutil
from absl import logging

LOCK_NAME = "trainer.lock"


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir's lock."""


def _this_process() -> dict:
  me = psutil.Process()
  return {"host": socket.gethostname(), "pid": me.pid, "process_start": me.create_time(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _alive_on_this_host(owner: dict) -> bool:
  """Whether the process the lock names still runs (same pid and the same start time)."""
  try:
    process = psutil.Process(int(owner["pid"]))
    return abs(process.create_time() - float(owner["process_start"])) < 0.5
  except (psutil.NoSuchProcess, ValueError, KeyError, TypeError):
    return False
  except psutil.AccessDenied:  # a process of another user: alive
    return True


def _describe(owner: dict) -> str:
  return f"host {owner.get('host', '?')} pid {owner.get('pid', '?')} (since {owner.get('started', '?')})"


class RunLock:
  """`<workdir>/trainer.lock` held from `acquire()` to `release()` (or the `with` block)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.owner = None  # this process's entry once acquired

  def _read(self) -> dict | None:
    """The lock's owner entry; None when there is no lock; {} when the file is not a lock we wrote."""
    try:
      with open(self.path) as f:
        owner = json.load(f)
      return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _create(self, entry: dict) -> bool:
    """Creates the lock file holding `entry`; False if it already exists."""
    temp = f"{self.path}.{entry['pid']}.partial"
    with open(temp, "w") as f:
      json.dump(entry, f)
    try:
      os.link(temp, self.path)  # atomic, and fails when the name exists
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(temp)

  def acquire(self) -> "RunLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    entry = _this_process()
    for _ in range(3):  # a lock removed or taken over between our steps: look again
      if self._create(entry):
        self.owner = entry
        return self
      owner = self._read()
      if owner is None:
        continue
      if owner.get("host") != entry["host"] and owner:
        raise WorkdirLockedError(
            f"workdir {os.path.dirname(self.path)} is in use by the trainer on {_describe(owner)} "
            f"({self.path}); it cannot be checked from host {entry['host']}: stop that trainer, or delete the "
            "file if it is gone")
      if owner and _alive_on_this_host(owner):
        raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)} is in use by the trainer on "
                                 f"{_describe(owner)} ({self.path}); stop it first, or use another workdir")
      logging.warning("Taking over the stale lock %s of %s: %s.", self.path,
                      _describe(owner) if owner else "an unreadable lock file",
                      "that process is gone" if owner else "it names no trainer")
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    raise WorkdirLockedError(f"{self.path}: could not take the workdir's lock (another trainer is starting?)")

  def release(self) -> None:
    """Removes the lock if it is still this process's."""
    if self.owner is None:
      return
    owner = self._read()
    if owner and owner.get("host") == self.owner["host"] and owner.get("pid") == self.owner["pid"]:
      os.remove(self.path)
    self.owner = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
