r"""Trains an egoexo_jax model.

  python main.py --config=configs/egoexo.py:small --workdir=runs/egoexo_small

Multi-host (TPU pods, multi-node GPU): run the same command on every host; jax.distributed is
initialised from the environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS/
JAX_NUM_PROCESSES/JAX_PROCESS_ID) when --multihost is set.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, records and TensorBoard files.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  if FLAGS.multihost:
    jax.distributed.initialize()
  from egoexo_jax import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
