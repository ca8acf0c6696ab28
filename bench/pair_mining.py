r"""SUM-L pair mining speed: egoexo_jax's chunked JAX top-k against a brute-force PyTorch peer, in one run.

  python bench/pair_mining.py                        # 20k ego x 20k exo x 384-d, k = 5 (~30 s on 2 CPU cores)
  python bench/pair_mining.py --size=large           # 100k x 100k (for a GPU: the peer then works in row blocks)
  python bench/pair_mining.py --num_ego=5000 --num_exo=50000 --peer=numpy

Both sides get the same random L2-normalised float32 embeddings (a stand-in for MiniLM narration
embeddings: the search does not depend on what the vectors mean) and return each ego row's k most
cosine-similar exo rows.
- egoexo_jax: `narration_pairs.top_k_pairs`, blocks of --chunk_size ego rows x --chunk_size exo columns
  on JAX's default device, each block's top k merged into a running top k; float32 products at
  Precision.HIGHEST. Timed from host arrays to host arrays (transfers included), after one untimed call
  on the first row block that compiles it.
- peer: what one writes without thinking about memory. torch (--peer=torch; on CUDA when torch has it):
  S = ego @ exo.T, then torch.topk(S, k). numpy (--peer=numpy): S = ego @ exo.T, np.argpartition, then
  a sort of the k. The whole N x M matrix at once, or --peer_rows ego rows at a time when that would not
  fit (`--size=large` sets 10000: a 100k x 100k float32 matrix is 40 GB).
Each side runs --repeats times; the median is reported. "pairs/s" counts ego-exo similarity pairs scored,
N * M / time. Memory: for egoexo_jax, XLA's own figures for the compiled block (arguments: the padded exo
embeddings and one ego block; temporaries: one similarity block and the top-k buffers); for the peer, the
similarity matrix (or row block) it holds. Embeddings on the host, shared by both, are not counted.
The two top-1 choices must agree: either the same exo row, or (float rounding on near-ties) two rows
whose similarities differ by at most 1e-5. The run fails otherwise.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import torch

from egoexo_jax.pseudo_labels import narration_pairs

SIZES = {"default": (20_000, 20_000, 0), "large": (100_000, 100_000, 10_000)}  # ego, exo, peer_rows
flags.DEFINE_enum("size", "default", list(SIZES), "default: 20k x 20k (CPU); large: 100k x 100k (GPU).")
flags.DEFINE_integer("num_ego", None, "Ego embeddings; overrides --size.")
flags.DEFINE_integer("num_exo", None, "Exo embeddings; overrides --size.")
flags.DEFINE_integer("dim", 384, "Embedding dimensions (all-MiniLM-L6-v2: 384).")
flags.DEFINE_integer("k", 5, "Pairs per ego row.")
flags.DEFINE_integer("chunk_size", 4096, "egoexo_jax block size (ego rows and exo columns).")
flags.DEFINE_enum("peer", "torch", ["torch", "numpy"], "Brute-force peer.")
flags.DEFINE_integer("peer_rows", None, "Peer's ego rows per matrix; 0 = all at once. Default from --size.")
flags.DEFINE_integer("repeats", 3, "Timed runs per side; the median is reported.")
flags.DEFINE_integer("seed", 0, "Seed of the random embeddings.")
FLAGS = flags.FLAGS
TIE_TOLERANCE = 1e-5


def random_embeddings(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
  x = rng.standard_normal((rows, dim), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def torch_top_k(ego: np.ndarray, exo: np.ndarray, k: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
  device = "cuda" if torch.cuda.is_available() else "cpu"
  exo_t = torch.from_numpy(exo).to(device)
  indices, values = [], []
  with torch.no_grad():
    for start in range(0, len(ego), rows):
      similarity = torch.from_numpy(ego[start:start + rows]).to(device) @ exo_t.T
      value, index = torch.topk(similarity, k, dim=1)
      values.append(value.cpu().numpy())
      indices.append(index.cpu().numpy())
      del similarity
  return np.concatenate(indices).astype(np.int32), np.concatenate(values)


def numpy_top_k(ego: np.ndarray, exo: np.ndarray, k: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
  indices, values = [], []
  for start in range(0, len(ego), rows):
    similarity = ego[start:start + rows] @ exo.T
    part = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    part_values = np.take_along_axis(similarity, part, axis=1)
    order = np.argsort(-part_values, axis=1, kind="stable")
    indices.append(np.take_along_axis(part, order, axis=1))
    values.append(np.take_along_axis(part_values, order, axis=1))
    del similarity
  return np.concatenate(indices).astype(np.int32), np.concatenate(values)


def timed(fn, repeats: int):
  times, result = [], None
  for _ in range(repeats):
    tick = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - tick)
  return statistics.median(times), times, result


def mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:,.0f} MiB"


def main(argv):
  del argv
  num_ego, num_exo, peer_rows = SIZES[FLAGS.size]
  num_ego = FLAGS.num_ego or num_ego
  num_exo = FLAGS.num_exo or num_exo
  peer_rows = FLAGS.peer_rows if FLAGS.peer_rows is not None else peer_rows
  peer_rows = peer_rows or num_ego
  k, chunk, dim = FLAGS.k, FLAGS.chunk_size, FLAGS.dim
  rng = np.random.default_rng(FLAGS.seed)
  ego, exo = random_embeddings(rng, num_ego, dim), random_embeddings(rng, num_exo, dim)
  device = jax.devices()[0]
  peer_device = ("cuda" if torch.cuda.is_available() else "cpu") if FLAGS.peer == "torch" else "cpu"
  print(f"{num_ego} ego x {num_exo} exo x {dim}-d float32, k = {k}; egoexo_jax on {device.platform} "
        f"({device.device_kind}), peer {FLAGS.peer} on {peer_device} with torch {torch.get_num_threads()} threads")

  # egoexo_jax: compile on the first row block (same shapes as the timed run), then time.
  row_block, column_block = min(chunk, num_ego), min(chunk, num_exo)
  tick = time.perf_counter()
  narration_pairs.top_k_pairs(ego[:row_block], exo, k, chunk)
  compile_s = time.perf_counter() - tick
  blocks = -(-num_exo // column_block)
  compiled = narration_pairs._block_row_top_k.lower(  # pylint: disable=protected-access
      jax.ShapeDtypeStruct((row_block, dim), jnp.float32), jax.ShapeDtypeStruct((blocks, column_block, dim), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.int32), k=k, precision=jax.lax.Precision.HIGHEST).compile()
  memory = compiled.memory_analysis()
  ours_bytes = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
  ours_s, ours_times, (ours_index, ours_value) = timed(
      lambda: narration_pairs.top_k_pairs(ego, exo, k, chunk), FLAGS.repeats)

  peer = torch_top_k if FLAGS.peer == "torch" else numpy_top_k
  peer_s, peer_times, (peer_index, peer_value) = timed(lambda: peer(ego, exo, k, peer_rows), FLAGS.repeats)
  peer_bytes = min(peer_rows, num_ego) * num_exo * 4 + num_exo * dim * 4

  same = ours_index[:, 0] == peer_index[:, 0]
  gap = np.abs(np.einsum("nd,nd->n", ego, exo[ours_index[:, 0]]) - np.einsum("nd,nd->n", ego, exo[peer_index[:, 0]]))
  value_error = float(np.abs(ours_value - peer_value).max())
  pairs = num_ego * num_exo
  rows = [
      ("egoexo_jax top_k_pairs", f"{device.platform}", ours_s, ours_times,
       f"{mib(ours_bytes)} (XLA: {mib(memory.argument_size_in_bytes)} args + {mib(memory.temp_size_in_bytes)} temp)"),
      (f"{FLAGS.peer} brute force", peer_device, peer_s, peer_times,
       f"{mib(peer_bytes)} ({min(peer_rows, num_ego)} x {num_exo} matrix + exo)"),
  ]
  print(f"\n| side | device | median time | runs | pairs/s | ego rows/s | peak memory (estimate) |")
  print("|---|---|---:|---|---:|---:|---|")
  for name, where, seconds, times, mem in rows:
    print(f"| {name} | {where} | {seconds:.2f} s | {', '.join(f'{t:.2f}' for t in times)} | "
          f"{pairs / seconds:.3g} | {num_ego / seconds:,.0f} | {mem} |")
  print(f"\nratio (peer time / egoexo_jax time): {peer_s / ours_s:.2f}; egoexo_jax compile + first block "
        f"{compile_s:.2f} s (untimed)")
  print(f"top-1 agreement: {same.sum()}/{num_ego} same exo row; largest similarity gap where they differ "
        f"{gap.max() if gap.size else 0:.2g}; largest top-{k} similarity difference {value_error:.2g}")
  if np.any(gap > TIE_TOLERANCE) or value_error > TIE_TOLERANCE:
    raise SystemExit("FAIL: egoexo_jax and the peer disagree beyond float rounding")


if __name__ == "__main__":
  app.run(main)
