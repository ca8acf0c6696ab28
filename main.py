r"""Trains an egoexo_jax model.

  python main.py --config=configs/egoexo.py:small --workdir=runs/egoexo_small

Multi-host (TPU pods, multi-node GPU): run the same command on every host with --multihost.
jax.distributed is initialised from the cluster (TPU metadata, SLURM, Open MPI) or from the flags
--coordinator_address (or JAX_COORDINATOR_ADDRESS), --num_processes and --process_id, e.g. two
processes on one machine:

  python main.py ... --multihost --coordinator_address=localhost:12355 --num_processes=2 --process_id=0
  python main.py ... --multihost --coordinator_address=localhost:12355 --num_processes=2 --process_id=1

The workdir must be on storage every host sees (checkpoints are written by all of them).

Exit status: 0 when num_train_steps are done; 143 after SIGTERM and 130 after SIGINT (128 + the signal
number, as a shell reports a process the signal ended), once the step in progress has finished and a
checkpoint of it is written: the same command resumes exactly there; 2 when the run cannot start or
continue for a reason stated in one logged line (another trainer holds the workdir, not enough disk for
a checkpoint, a checkpoint could not be written) or for a user mistake (a missing file, a misspelt config
override; egoexo_jax/cli.py; --debug shows the traceback); 1 for any other error (with its traceback).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from egoexo_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, records and TensorBoard files.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default: from the cluster or "
                    "JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: from the cluster).")
flags.DEFINE_integer("process_id", None, "This process's index (default: from the cluster).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_CANNOT_CONTINUE = 2  # the module docstring lists every exit status


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  if FLAGS.multihost:
    # Cross-process collectives of the CPU backend (tests, CPU clusters) go over Gloo; GPUs and TPUs
    # use their own (NCCL, ICI) whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  from egoexo_jax import checkpointing, processes, run_lock, train  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (run_lock.WorkdirLockedError, checkpointing.DiskSpaceError, checkpointing.CheckpointSaveError) as e:
    logging.error("%s", e)  # one line: what happened, where, what to do
    sys.exit(EXIT_CANNOT_CONTINUE)
  finally:
    processes.release_shared_memory()  # batches freed with train's frame: no leaked shared memory at exit


if __name__ == "__main__":
  cli.run(main)  # absl's app.run + one-line user errors (--debug: traceback), override suggestions
