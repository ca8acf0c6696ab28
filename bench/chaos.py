r"""Chaos run: the `:small` Ego-Exo trainer (main.py) against SIGTERM, SIGKILL, a corrupt shard, a full
disk and a second trainer on its workdir; a table of steps lost and whether the final parameters equal
those of an uninterrupted run (the peer, run first in the same invocation).

  python bench/chaos.py                 # ~10 min on 2 busy cores
  python bench/chaos.py --steps=40 --workers=2

The shipped clips are converted once into 4 shards (--short_side, untimed). Every run is main.py with
configs/egoexo.py:small shrunk by flags (64-pixel clips of 4 frames, width-8 backbone: seconds per
step on a CPU), checkpoints every --checkpoint_every steps and logs every step, with --workers Grain
worker processes, each run in its own session so that every process it leaves behind is found.

Scenarios (each from an empty workdir unless said):
- sigterm: SIGTERM to the whole process group (a preemption notice) after step --hit_step is logged;
  then the same command again, to the end.
- sigkill: SIGKILL to the trainer alone after step --hit_step (the out-of-memory killer); then again.
- corrupt_shard: one of the 4 shards truncated to half, the run pointed at all 4 (data.train_records).
- disk_full: the workdir on a tmpfs (`mount -t tmpfs`, needs root; else the row says not run) sized
  for about 1.5 checkpoints beside the TensorBoard files: the second save fails; then the workdir is
  copied to an ordinary disk and the same command resumes there.
- second_trainer: a second main.py on a workdir whose trainer runs: it must refuse at once.
Columns: exit statuses of the runs; steps lost (steps the killed run had logged minus the step the
next run resumed from); processes of the run still alive 10 s after it ended; whether the final
state (params, BatchNorm statistics, optimiser state) equals the uninterrupted run's, every leaf.
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOGS = tempfile.gettempdir()  # main() sets the run's temporary folder; every run's log is written there
sys.path.insert(0, str(ROOT))

SHRINK = ["--config.optimizer.warmup_steps=1", "--config.data.crop_size=64", "--config.data.min_short_side=64",
          "--config.data.max_short_side=72", "--config.data.clip_length=4", "--config.data.frame_stride=2",
          "--config.model.backbone_args.width=8", "--config.model.interaction_channels=16",
          "--config.log_every_steps=1", "--config.data.batch_timeout_s=120"]


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=24)
  parser.add_argument("--checkpoint_every", type=int, default=8)
  parser.add_argument("--hit_step", type=int, default=13, help="the signal goes out once this step is logged")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--short_side", type=int, default=72)
  parser.add_argument("--scenarios", default="sigterm,sigkill,corrupt_shard,disk_full,second_trainer")
  parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
  return parser.parse_args()


class Run:
  """main.py in its own session; its log (stderr) read line by line."""

  def __init__(self, workdir, records, args, *extra):
    self.workdir = workdir
    command = [sys.executable, "main.py", "--config=configs/egoexo.py:small", f"--workdir={workdir}",
               "--alsologtostderr", f"--config.num_train_steps={args.steps}",
               f"--config.checkpoint_every_steps={args.checkpoint_every}", f"--config.data.num_workers={args.workers}",
               f"--config.data.train_records={records}", *SHRINK, *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
    self.lines = []
    self.started = time.monotonic()

  def read_until(self, pattern: str | None = None):
    """Reads the log until a line matches `pattern` (None: to the end); returns the match or None."""
    for line in self.process.stderr:
      self.lines.append(line)
      if pattern and (match := re.search(pattern, line)):
        return match
    return None

  def finish(self, timeout=900) -> int:
    self.read_until(None)
    self.process.wait(timeout=timeout)
    self.seconds = time.monotonic() - self.started
    name = os.path.relpath(self.workdir, LOGS).replace(os.sep, "_")
    with open(os.path.join(LOGS, f"{name}-{int(self.started)}.log"), "w") as f:
      f.writelines(self.lines)  # in the temporary folder, for --keep
    return self.process.returncode

  def last(self, pattern: str) -> int | None:
    """The number in the last log line matching `pattern` (one group)."""
    found = [int(m.group(1)) for line in self.lines if (m := re.search(pattern, line))]
    return found[-1] if found else None

  def error_line(self) -> str:
    """main.py's one-line error, else the last exception line of a traceback, else the last line."""
    ours = [line for line in self.lines if re.match(r"E\d{4} .* main\.py:\d+\] ", line)]
    if ours:
      return ours[-1].split("] ", 1)[1].strip()[:260]
    raised = [line for line in self.lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", line)]
    tail = raised or [line for line in self.lines if line.strip()]
    return tail[-1].strip()[:260] if tail else ""

  def left_behind(self, wait_s: float = 10.0) -> int:
    """Processes of this run's session still alive `wait_s` seconds after it ended."""
    import psutil
    deadline = time.monotonic() + wait_s
    while True:
      alive = []
      for p in psutil.process_iter():
        try:
          if os.getsid(p.pid) == self.process.pid and p.status() != psutil.STATUS_ZOMBIE:
            alive.append(p)
        except (OSError, psutil.Error):
          pass
      if not alive or time.monotonic() > deadline:
        return len(alive)
      time.sleep(0.2)


def logged_step(run: Run) -> int:
  return run.last(r"\bstep (\d+)/\d+  loss") or 0


def final_state(workdir, step):
  from egoexo_jax import checkpointing
  import jax
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  if not os.path.isdir(path):
    return None
  state = checkpointing.restore_on_this_host(path)
  return jax.tree.map(lambda x: __import__("numpy").asarray(x), state)


def equal_trees(a, b) -> bool:
  import jax
  import numpy as np
  if a is None or b is None:
    return False
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  return tree_a == tree_b and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def interrupted(name, sig, base, records, args, reference):
  """Runs, sends `sig` after step --hit_step is logged, runs again to the end."""
  workdir = os.path.join(base, name)
  first = Run(workdir, records, args)
  if first.read_until(rf"\bstep {args.hit_step}/{args.steps}  loss"):
    if sig == signal.SIGTERM:
      os.killpg(first.process.pid, sig)
    else:
      os.kill(first.process.pid, sig)
  status = first.finish()
  left = first.left_behind()
  done = logged_step(first)
  second = Run(workdir, records, args)
  status2 = second.finish()
  resumed = second.last(r"Resumed from step (\d+)") or 0
  return dict(scenario=name, exits=f"{status} then {status2}", lost=done - resumed, left=left + second.left_behind(),
              equal=equal_trees(final_state(workdir, args.steps), reference),
              note=f"stopped after step {done}, resumed from {resumed}")


def corrupt_shard(base, records_dir, args, reference):
  shards = sorted(glob.glob(os.path.join(records_dir, "train.tfrecord-*")))
  bad = os.path.join(base, "corrupt_records")
  shutil.copytree(records_dir, bad)
  victim = os.path.join(bad, os.path.basename(shards[-1]))
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  workdir = os.path.join(base, "corrupt_shard")
  run = Run(workdir, os.path.join(bad, "train.tfrecord-*"), args)
  status = run.finish()
  done = logged_step(run)
  return dict(scenario="corrupt_shard", exits=str(status), lost="-", left=run.left_behind(),
              equal=equal_trees(final_state(workdir, args.steps), reference),
              note=(f"trained {done} steps (other data: not expected equal)" if done else "refused: ")
              + ("" if done else run.error_line()))


def disk_full(base, records, args, reference, state_mib):
  mount = os.path.join(base, "tmpfs")
  os.makedirs(mount)
  size_kib = int((1.5 * state_mib + 1.0) * 1024)  # 1.5 checkpoints + TensorBoard files
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", mount],
                           capture_output=True, text=True)
  if mounted.returncode:
    return dict(scenario="disk_full", exits="-", lost="-", left="-", equal="-",
                note=f"not run: cannot mount a tmpfs ({mounted.stderr.strip()[:80]})")
  try:
    workdir = os.path.join(mount, "run")
    first = Run(workdir, records, args)
    status = first.finish()
    done = logged_step(first)
    good = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    leftovers = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if not d.isdigit()]
    error = first.error_line()
    lines = sum(1 for line in first.lines if line.startswith(("E1", "Traceback", "  File")))
    stopped = first.last(r"checkpoint of step (\d+) could not be written")
    moved = os.path.join(base, "disk_full_moved")
    shutil.copytree(workdir, moved)
  finally:
    subprocess.run(["umount", mount], check=False)
  second = Run(moved, records, args)
  status2 = second.finish()
  resumed = second.last(r"Resumed from step (\d+)") or 0
  return dict(scenario="disk_full", exits=f"{status} then {status2}", lost=done - resumed,
              left=first.left_behind() + second.left_behind(),
              equal=equal_trees(final_state(moved, args.steps), reference),
              note=f"tmpfs {size_kib} KiB; save of step {stopped} failed, run stopped after step {done}; checkpoints "
                   f"left {good}, other entries {leftovers}; {lines} lines of Orbax's logged traceback, then: {error}")


def second_trainer(base, records, args):
  workdir = os.path.join(base, "second_trainer")
  first = Run(workdir, records, args, "--config.num_train_steps=1000000")  # still running when the second starts
  first.read_until(r"\bstep 1/1000000  loss")
  second = Run(workdir, records, args)
  status2 = second.finish()
  running = first.process.poll() is None
  if running:
    os.killpg(first.process.pid, signal.SIGTERM)
  status = first.finish()
  first_note = "first, SIGTERM after the second ended" if running else "first, had already finished"
  return dict(scenario="second_trainer", exits=f"{status2} (second), {status} ({first_note})", lost="-",
              left=first.left_behind() + second.left_behind(), equal="-", note=second.error_line())


def main():
  args = parse_args()
  from egoexo_jax.input import convert
  global LOGS
  base = LOGS = tempfile.mkdtemp(prefix="chaos-")
  try:
    records_dir = os.path.join(base, "records")
    report = convert.convert_manifest(str(ROOT / "data" / "manifest.csv"), os.path.join(records_dir, "train"),
                                      short_side=args.short_side, num_shards=4,
                                      ego_logits=str(ROOT / "data/pseudo_labels/ego_logits.pkl"),
                                      object_logits=str(ROOT / "data/pseudo_labels/object_logits.pkl"),
                                      hand_object_dir=str(ROOT / "data/pseudo_labels/hand_object"))
    print(f"converted {report.written} videos into 4 shards under {records_dir}", flush=True)
    records = os.path.join(records_dir, "train.tfrecord-*")

    baseline = Run(os.path.join(base, "uninterrupted"), records, args)
    status = baseline.finish()
    reference = final_state(baseline.workdir, args.steps)
    state_mib = sum(x.nbytes for x in __import__("jax").tree.leaves(reference)) / 2**20 if reference else 1.0
    rows = [dict(scenario="uninterrupted", exits=str(status), lost=0, left=baseline.left_behind(),
                 equal=reference is not None, note=f"{args.steps} steps in {baseline.seconds:.0f} s; "
                 f"checkpoint {state_mib:.2f} MiB; leaked-shared-memory warnings: "
                 f"{sum('leaked shared_memory' in line for line in baseline.lines)}")]
    print(rows[-1], flush=True)
    for name in args.scenarios.split(","):
      if name == "sigterm":
        rows.append(interrupted("sigterm", signal.SIGTERM, base, records, args, reference))
      elif name == "sigkill":
        rows.append(interrupted("sigkill", signal.SIGKILL, base, records, args, reference))
      elif name == "corrupt_shard":
        rows.append(corrupt_shard(base, records_dir, args, reference))
      elif name == "disk_full":
        rows.append(disk_full(base, records, args, reference, state_mib))
      elif name == "second_trainer":
        rows.append(second_trainer(base, records, args))
      else:
        raise ValueError(f"unknown scenario '{name}'")
      print(rows[-1], flush=True)

    print(f"\n{args.steps} steps, checkpoint every {args.checkpoint_every}, signal after step {args.hit_step}, "
          f"{args.workers} Grain workers; peer: the uninterrupted run\n")
    print("| scenario | exit status | steps lost | processes left | final state = uninterrupted | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['scenario']} | {r['exits']} | {r['lost']} | {r['left']} | {r['equal']} | {r['note']} |")
  finally:
    if not args.keep:
      shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  main()
