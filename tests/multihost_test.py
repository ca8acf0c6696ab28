"""Two JAX processes (CPU, Gloo collectives) train as one process does, and their checkpoint resumes in one.

main.py runs twice as two local processes of 2 CPU devices each (a 4-device `data` x `fsdp` mesh over
both), each reading its half of every global batch, on the real-clip records.
"""

import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import orbax.checkpoint as ocp

from conftest import assert_trees_close, tiny_config
from testlib import override_flags
from egoexo_jax import objectives, sharding, train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(config, workdir) -> None:
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  overrides = override_flags(config)
  processes = [subprocess.Popen(
      [sys.executable, "main.py", "--config=configs/egoexo.py:small", f"--workdir={workdir}", "--multihost",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}", "--alsologtostderr",
       *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for i, (p, out) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  assert "JAX process 1/2" in outputs[1] and "mesh {'data': 2, 'fsdp': 2}" in outputs[0], outputs[0][-3000:]


def saved_state(workdir, step, config):
  """The train state of a checkpoint, read onto 1 device of this process."""
  objective = objectives.resolve(config)
  optimizer, _ = train.make_optimizer(config)
  abstract, _ = train.abstract_state(objective, optimizer, config, sharding.make_mesh(1))
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"), abstract)
  return jax.device_get((state.params, state.batch_stats, state.opt_state))


def test_two_processes_train_as_one_and_resume_in_one(real_record_pattern, tmp_path, caplog):
  config = tiny_config(real_record_pattern, **{"mesh.fsdp": 2, "mesh.fsdp_min_size": 0})
  run_two_processes(config, tmp_path / "two")
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]
  assert sorted((tmp_path / "two" / "checkpoints" / "4" / "data_iterator").glob("*.json")) == [
      tmp_path / "two" / "checkpoints" / "4" / "data_iterator" / f"process_{i}-of-2.json" for i in range(2)]

  one_config = tiny_config(real_record_pattern, **{"mesh.num_devices": 1})
  one = train.train_and_evaluate(one_config, str(tmp_path / "one"))
  one = jax.device_get((one.params, one.batch_stats, one.opt_state))
  # The same global batches in the same order (host h holds rows [4h, 4h + 4)), the same dropout masks,
  # the same maths: equal to float32 rounding.
  assert_trees_close(saved_state(tmp_path / "two", 4, one_config), one, rtol=2e-4, atol=2e-6)

  # The 2-process checkpoint of step 2 resumes in 1 process (1 device): the data position moves over.
  shutil.copytree(tmp_path / "two", tmp_path / "moved")
  shutil.rmtree(tmp_path / "moved" / "checkpoints" / "4")
  caplog.set_level(logging.INFO)
  moved = train.train_and_evaluate(one_config, str(tmp_path / "moved"))
  assert int(moved.step) == 4
  assert "Data position moved from 2 process(es) x 0 workers to 1 x 0: 2 batches drawn per process." in caplog.text
  moved = jax.device_get((moved.params, moved.batch_stats, moved.opt_state))
  assert_trees_close(moved, one, rtol=2e-4, atol=2e-6)
