r"""Memory of EVGAP's SigLIP group loss (value and gradients): dense vs the ppermute ring, per device.

  python bench/siglip_memory.py                                  # 8 fake CPU devices, B = 64 ... 1024 scenes
  python bench/siglip_memory.py --scenes=64,256,1024,4096 --tile_rows=512

Nothing runs: each variant is compiled for ShapeDtypeStruct inputs and XLA's plan for it is read from
`compiled.memory_analysis()` (temporaries, i.e. everything but arguments and outputs, per device; the
figure XLA:CPU, GPU and TPU all give). Inputs: B scenes x (M = 4 ego + N = 8 exo) windows x 512-d
embeddings, float32, the paper's group shape. Variants, each `jax.value_and_grad` of the loss:
  dense 1 dev     losses.siglip_group_loss on one device: the (B M) x (B N) logit matrix and its gradient.
  dense 8 dev     the same formula under jax.jit with the scenes sharded over the devices: whatever
                  XLA's SPMD partitioner makes of it.
  ring 8 dev      losses.siglip_group_loss_sharded(scope='global'): per device (b M) x (b N) blocks,
                  b = B / 8, exo chunks passed around a ring; blocks recomputed in the backward pass.
  ring+tiles      the same with --tile_rows ego rows per block (at most tile_rows x b N logits at once).
  local 8 dev     scope='local' (the paper's): each device's own b scenes only.
The ratio column is each variant's memory at B over its memory at the smallest B: B^2 growth shows as
the square of the batch ratio, linear growth as the ratio itself.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from egoexo_jax import losses, sharding

flags.DEFINE_list("scenes", ["64", "128", "256", "512", "1024"], "Global batch sizes B (scenes).")
flags.DEFINE_integer("ego_views", 4, "M.")
flags.DEFINE_integer("exo_views", 8, "N.")
flags.DEFINE_integer("dim", 512, "Embedding size.")
flags.DEFINE_integer("devices", 8, "Devices of the mesh.")
flags.DEFINE_integer("tile_rows", 256, "Ego rows per tile for the tiled ring.")
FLAGS = flags.FLAGS


def temp_bytes(fn, shapes) -> int:
  return int(jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes)


def measure(scenes: int, mesh) -> dict[str, int]:
  m, n, dim = FLAGS.ego_views, FLAGS.exo_views, FLAGS.dim
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  grad = lambda fn: jax.value_and_grad(fn, argnums=(0, 1, 2, 3))

  def inputs(sharded: bool):
    spec = NamedSharding(mesh, P(sharding.DATA_AXIS)) if sharded else None
    return (jax.ShapeDtypeStruct((scenes, m, dim), jnp.float32, sharding=spec),
            jax.ShapeDtypeStruct((scenes, n, dim), jnp.float32, sharding=spec), scalar, scalar)

  def sharded(scope: str, tile_rows: int = 0):
    return grad(lambda e, x, s, b: losses.siglip_group_loss_sharded(e, x, s, b, mesh=mesh, scope=scope,
                                                                     tile_rows=tile_rows))

  return {
      "dense 1 dev": temp_bytes(grad(losses.siglip_group_loss), inputs(False)),
      "dense 8 dev": temp_bytes(grad(losses.siglip_group_loss), inputs(True)),
      "ring 8 dev": temp_bytes(sharded("global"), inputs(True)),
      "ring+tiles": temp_bytes(sharded("global", FLAGS.tile_rows), inputs(True)),
      "local 8 dev": temp_bytes(sharded("local"), inputs(True)),
  }


def main(argv):
  del argv
  mesh = sharding.make_mesh(FLAGS.devices)
  sizes = [int(s) for s in FLAGS.scenes]
  rows = {b: measure(b, mesh) for b in sizes}
  names = list(rows[sizes[0]])
  print(f"SigLIP group loss + gradients, M={FLAGS.ego_views} N={FLAGS.exo_views} D={FLAGS.dim} float32, "
        f"{FLAGS.devices} devices ({jax.devices()[0].platform}); XLA temporary memory per device, MiB "
        f"(x growth since B={sizes[0]}); ring+tiles: {FLAGS.tile_rows} ego rows per tile")
  print("| B | logits B M x B N | " + " | ".join(names) + " |")
  print("|---:|---:|" + "---:|" * len(names))
  for b in sizes:
    cells = [f"{rows[b][k] / 2**20:.1f} (x{rows[b][k] / max(rows[sizes[0]][k], 1):.1f})" for k in names]
    logits = b * FLAGS.ego_views * b * FLAGS.exo_views * 4 / 2**20
    print(f"| {b} | {logits:.0f} MiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
