"""One trainer per workdir: a held lock refuses a second process, a stale one is taken over."""

import json
import logging
import os
import socket
import subprocess
import sys

import psutil
import pytest

from conftest import ROOT
from egoexo_jax import run_lock

TRY_LOCK = r"""
import sys
sys.path.insert(0, sys.argv[1])
from egoexo_jax import run_lock
try:
  with run_lock.RunLock(sys.argv[2]):
    print("ACQUIRED")
except run_lock.WorkdirLockedError as e:
  print("REFUSED", e)
"""


def try_lock_in_another_process(workdir) -> str:
  return subprocess.run([sys.executable, "-c", TRY_LOCK, str(ROOT), str(workdir)], capture_output=True, text=True,
                        timeout=60, check=True).stdout.strip()


def write_lock(workdir, **entry) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, run_lock.LOCK_NAME), "w") as f:
    json.dump(entry, f)


def test_a_held_lock_refuses_a_second_trainer_naming_host_and_pid(tmp_path):
  with run_lock.RunLock(str(tmp_path)) as lock:
    with open(lock.path) as f:
      entry = json.load(f)
    assert entry["host"] == socket.gethostname() and entry["pid"] == os.getpid()
    answer = try_lock_in_another_process(tmp_path)
    assert answer.startswith("REFUSED") and "\n" not in answer
    assert f"in use by the trainer on host {socket.gethostname()} pid {os.getpid()}" in answer
    assert not [n for n in os.listdir(tmp_path) if n != run_lock.LOCK_NAME]  # no temporary files left
  assert not os.path.exists(tmp_path / run_lock.LOCK_NAME)  # released
  assert try_lock_in_another_process(tmp_path) == "ACQUIRED"  # and free again


def test_a_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  assert not psutil.pid_exists(gone.pid)
  write_lock(tmp_path, host=socket.gethostname(), pid=gone.pid, process_start=1.0, started="earlier")
  with caplog.at_level(logging.WARNING):
    with run_lock.RunLock(str(tmp_path)):
      with open(tmp_path / run_lock.LOCK_NAME) as f:
        assert json.load(f)["pid"] == os.getpid()
  assert f"Taking over the stale lock {tmp_path / run_lock.LOCK_NAME} of host {socket.gethostname()} pid {gone.pid}" \
      in caplog.text


def test_a_reused_pid_or_an_unreadable_file_is_stale_and_another_host_is_refused(tmp_path, caplog):
  # Our own pid, but a process that started at another time (a restarted container's pid 1): stale.
  me = psutil.Process()
  write_lock(tmp_path, host=socket.gethostname(), pid=me.pid, process_start=me.create_time() - 100)
  with caplog.at_level(logging.WARNING):
    run_lock.RunLock(str(tmp_path)).acquire().release()
  assert "Taking over the stale lock" in caplog.text
  with open(tmp_path / run_lock.LOCK_NAME, "w") as f:
    f.write("{not json")
  run_lock.RunLock(str(tmp_path)).acquire().release()
  assert "an unreadable lock file" in caplog.text
  # A live process of this host (our parent) holds it: refused.
  parent = psutil.Process().parent()
  write_lock(tmp_path, host=socket.gethostname(), pid=parent.pid, process_start=parent.create_time())
  with pytest.raises(run_lock.WorkdirLockedError, match=f"in use by the trainer on host .* pid {parent.pid} "):
    run_lock.RunLock(str(tmp_path)).acquire()
  # Another host's trainer cannot be checked from here: refused, saying how to clear it.
  write_lock(tmp_path, host="tpu-vm-7", pid=123, process_start=1.0, started="2026-01-01 00:00:00 UTC")
  with pytest.raises(run_lock.WorkdirLockedError, match=r"host tpu-vm-7 pid 123 .*delete the file if it is gone"):
    run_lock.RunLock(str(tmp_path)).acquire()
  # Releasing a lock that another trainer has since taken leaves that trainer's lock alone.
  lock = run_lock.RunLock(str(tmp_path / "b")).acquire()
  write_lock(tmp_path / "b", host="tpu-vm-7", pid=123, process_start=1.0)
  lock.release()
  assert os.path.exists(tmp_path / "b" / run_lock.LOCK_NAME)
