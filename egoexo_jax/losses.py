"""Loss functions: pure jnp functions, computed in float32 whatever the dtype of the logits.

One module over 400 lines on purpose: every method's losses as plain functions, the one place the NumPy
references in tests/losses_test.py are checked against.

Weighting convention: `weights` is an optional (B,) 0/1 mask of the examples that carry the signal
(a teacher score, detector boxes). A loss is computed per example, then averaged over the weighted
examples: sum_i w_i l_i / max(sum_i w_i, 1e-8). Masked examples do not dilute the mean, and a batch in
which no example carries the signal gives 0 with zero gradient. Masked examples must still hold finite
values (the input pipeline fills a missing teacher signal with zeros). Without weights: plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools

import jax
import jax.numpy as jnp
import optax

EGO_TERMS = ("ego_score", "object", "interaction")


def _weighted_mean(per_example: jax.Array, weights: jax.Array | None) -> jax.Array:
  """(B,) per-example losses -> scalar, by the convention in the module docstring."""
  if weights is None:
    return jnp.mean(per_example)
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1e-8)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Cross-entropy of logits (B, K) against integer labels (B,), (weighted) mean over examples."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return _weighted_mean(per_example, weights)


def soft_target_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                   weights: jax.Array | None = None) -> jax.Array:
  """Distillation loss of Ego-Exo Eq. 2 and 4: beta^2 KL(softmax(teacher / beta) || softmax(student / beta)).

  Logits are (B, K); the KL is summed over the K classes, then (weighted) averaged over examples. The
  beta^2 factor keeps gradient magnitudes independent of the temperature beta. Teacher classes of
  probability exactly 0 (logit -inf) contribute 0.
  """
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
  teacher_probs = jnp.exp(teacher_log_probs)
  per_class = jnp.where(teacher_probs > 0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0)
  return _weighted_mean(jnp.sum(per_class, axis=-1) * temperature**2, weights)


def interaction_map_bce(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Interaction-map loss of Ego-Exo Eq. 6: sigmoid binary cross-entropy per cell.

  logits and targets are (B, t, h, w, 2) with targets soft scores in [0, 1]; the loss is averaged over
  the cells and both channels of each example, then (weighted) averaged over examples.
  """
  per_cell = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
  return _weighted_mean(per_cell.reshape(per_cell.shape[0], -1).mean(axis=1), weights)


INTERACTION_REDUCTIONS = {"mean": 1.0, "sum": 2.0}


def interaction_term_scale(reduction: str) -> float:
  """L_int / interaction_map_bce for a reduction of the (hand, object) maps: 'mean' 1 (one mean over both
  maps), 'sum' 2: the released code adds hand_loss and obj_loss, each a BCE mean over its map's cells
  (slowfast/models/handobj_models.py cal_handobj_loss), which is twice the mean over both maps."""
  if reduction not in INTERACTION_REDUCTIONS:
    raise ValueError(f"unknown interaction-map reduction '{reduction}': use one of {sorted(INTERACTION_REDUCTIONS)}")
  return INTERACTION_REDUCTIONS[reduction]


def egoexo_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], weights: Mapping[str, float],
                temperature_ego: float, temperature_object: float, *, action_weight: float = 1.0,
                interaction_reduction: str = "mean") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Ego-Exo pre-training objective (Eq. 7): w_act L_act + w_ego L_ego + w_object L_object + w_interaction L_int.

  w_act is `action_weight` (the paper: 1; the release: LOSS.CE_LOSS_WEIGHT 0.5); L_int is
  interaction_term_scale(interaction_reduction) x interaction_map_bce: 'mean' of the two maps, or their
  'sum' as released. The reported 'interaction' term is interaction_map_bce (per cell, whatever the
  reduction), so it compares across recipes.

  outputs: egoexo.Model outputs 'action' (B, K_act), 'ego_score' (B, 2), 'object' (B, K_obj), 'interaction'
    (B, t, h, w, 2); a term's output is only read when its weight is non-zero.
  batch: 'labels' (B,) int; teacher signals 'ego_score_logits' (B, 2), 'object_logits' (B, K_obj),
    'interaction_map' (B, t, h, w, 2) in [0, 1]; 0/1 masks 'has_ego_score', 'has_object', 'has_interaction' (B,).
  weights: Python floats keyed by 'ego_score', 'object', 'interaction'. A missing key or a weight of 0 skips
    the term: it is not computed and is reported as 0. Any other key is an error.

  Returns (total, terms): terms holds the unweighted 'action', 'ego_score', 'object', 'interaction' losses and
  the weighted 'total', all float32 scalars.
  """
  unknown = set(weights) - set(EGO_TERMS)
  if unknown:
    raise ValueError(f"unknown loss weights {sorted(unknown)}; expected a subset of {EGO_TERMS}")
  compute_term = {
      "ego_score": lambda: soft_target_kl(outputs["ego_score"], batch["ego_score_logits"], temperature_ego,
                                          batch["has_ego_score"]),
      "object": lambda: soft_target_kl(outputs["object"], batch["object_logits"], temperature_object,
                                       batch["has_object"]),
      "interaction": lambda: interaction_map_bce(outputs["interaction"], batch["interaction_map"],
                                                 batch["has_interaction"]),
  }
  scale = {"ego_score": 1.0, "object": 1.0, "interaction": interaction_term_scale(interaction_reduction)}
  terms = {"action": softmax_cross_entropy(outputs["action"], batch["labels"])}
  total = action_weight * terms["action"]
  for name in EGO_TERMS:
    weight = weights.get(name, 0.0)
    if weight:
      terms[name] = compute_term[name]()
      total = total + weight * scale[name] * terms[name]
    else:
      terms[name] = jnp.zeros((), jnp.float32)
  terms["total"] = total
  return total, terms


# --------------------------------------------------------------------------- SUM-L (Wang et al., ICCV 2023)
#
# Embeddings are rows of (B, D) arrays, L2-normalised by the caller, so <a_i, b_j> is a cosine. `mask` is
# an optional (B,) 0/1 array of the rows that take part: a masked row is neither an anchor nor a negative.
# Math runs in float32, or in float64 when the inputs are float64 (the finite-difference tests).

SUML_MASKED_LOGIT = -1e30  # logit of a masked similarity: exp() underflows to 0, unlike -inf it keeps gradients finite


def _at_least_float32(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _row_mask(mask: jax.Array | None, size: int, dtype) -> jax.Array:
  return jnp.ones((size,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)


def info_nce(anchors: jax.Array, positives: jax.Array, temperature: float,
             mask: jax.Array | None = None) -> jax.Array:
  """InfoNCE of SUM-L Eq. 2-3, one direction (anchors -> positives):

    l_i = -log( exp(<a_i, p_i> / tau) / sum_j exp(<a_i, p_j> / tau) ),   j over the unmasked rows,

  averaged over the unmasked anchors (0 when there are none). Eq. 4 sums both directions:
  `info_nce(z_f, z_t) + info_nce(z_t, z_f)`.
  """
  a, p = _at_least_float32(anchors), _at_least_float32(positives)
  m = _row_mask(mask, a.shape[0], a.dtype)
  logits = jnp.where(m[None, :] > 0, a @ p.T / temperature, SUML_MASKED_LOGIT)
  per_anchor = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
  return jnp.sum(m * per_anchor) / jnp.maximum(jnp.sum(m), 1.0)


DCL_NEGATIVES = ("cross_view", "both_views")


def decoupled_info_nce(anchors: jax.Array, positives: jax.Array, temperature: float,
                       mask: jax.Array | None = None, positive_weights: jax.Array | None = None,
                       negatives: str = "both_views") -> jax.Array:
  """Decoupled InfoNCE of SUM-L Eq. 6 (the DCL loss of Yeh et al.), one direction, the positive removed
  from the denominator. `negatives` says which rows the denominator sums:

    'cross_view' (SUM-L Eq. 4/6 as written):  l_i = -w_i <a_i, p_i> / tau + log sum_{j != i} exp(<a_i, p_j> / tau)
    'both_views' (the released `DCL` class, slowfast/models/losses.py, and DCL itself):
        l_i = -w_i <a_i, p_i> / tau + log sum_{j != i} [ exp(<a_i, a_j> / tau) + exp(<a_i, p_j> / tau) ]

  j over the unmasked rows. w_i (`positive_weights`, default 1) weights the positive term (Eq. 8). The
  mean over the unmasked anchors that have at least one negative is returned (0 when none has). The
  default is the released form, which the SUM-L recipes pass explicitly (configs/recipe_suml.py).
  """
  if negatives not in DCL_NEGATIVES:
    raise ValueError(f"unknown decoupled InfoNCE negatives '{negatives}': use one of {DCL_NEGATIVES}")
  a, p = _at_least_float32(anchors), _at_least_float32(positives)
  size = a.shape[0]
  m = _row_mask(mask, size, a.dtype)
  w = jnp.ones((size,), a.dtype) if positive_weights is None else _at_least_float32(positive_weights)
  negative = (m[None, :] > 0) & ~jnp.eye(size, dtype=bool)
  logits = jnp.where(negative, a @ p.T / temperature, SUML_MASKED_LOGIT)
  if negatives == "both_views":
    logits = jnp.concatenate([jnp.where(negative, a @ a.T / temperature, SUML_MASKED_LOGIT), logits], axis=1)
  positive = jnp.sum(a * p, axis=1) / temperature
  per_anchor = -w * positive + jax.nn.logsumexp(logits, axis=1)
  counted = m * (jnp.sum(negative, axis=1) > 0)
  return jnp.sum(jnp.where(counted > 0, per_anchor, 0.0)) / jnp.maximum(jnp.sum(counted), 1.0)


def semantic_weights(ego_text: jax.Array, exo_text: jax.Array, sigma: float,
                     mask: jax.Array | None = None) -> jax.Array:
  """SUM-L Eq. 9-10: w_i = exp(<d_f_i, d_t_i> / sigma) / mean_j exp(<d_f_j, d_t_j> / sigma), the mean over
  the unmasked pairs. Inputs (B, D) narration embeddings (data: no gradient flows into them). Returns
  (B,); masked entries are 0. Computed as n * softmax, so large 1 / sigma cannot overflow."""
  d_f, d_t = _at_least_float32(ego_text), _at_least_float32(exo_text)
  m = _row_mask(mask, d_f.shape[0], d_f.dtype)
  scores = jnp.where(m > 0, jnp.sum(d_f * d_t, axis=1) / sigma, SUML_MASKED_LOGIT)
  weights = jnp.sum(m) * jnp.exp(scores - jax.nn.logsumexp(scores))
  return jax.lax.stop_gradient(m * weights)


def semantic_alignment_loss(ego_embeddings: jax.Array, exo_embeddings: jax.Array, ego_text: jax.Array,
                            exo_text: jax.Array, *, temperature: float, sigma: float, threshold: float,
                            min_pairs: int = 2, negatives: str = "both_views",
                            weighted: bool = True) -> tuple[jax.Array, jax.Array]:
  """L_aw of SUM-L Eq. 8: the weighted decoupled InfoNCE over the pseudo-pairs whose narrations agree.

  ego_embeddings z_f, exo_embeddings z_t: (B, D) L2-normalised projections of the ego clips and their
  pseudo-paired exo clips (row i of each is a pair); ego_text d_f, exo_text d_t: (B, D') their
  L2-normalised narration embeddings. The pairs with <d_f_i, d_t_i> > threshold are selected; with
  fewer than `min_pairs` of them the loss is 0. On the selected pairs, with w from `semantic_weights`:

    L_aw = DCL_w(z_f -> z_t) + DCL_w(z_t -> z_f)     (decoupled_info_nce, both directions)

  `negatives`: the denominators' rows (decoupled_info_nce). `weighted=False` sets every w_i to 1: the
  released `DCL_OS` defines the weight function but never applies it.
  Returns (L_aw, number of selected pairs as a float).
  """
  similarity = jnp.sum(_at_least_float32(ego_text) * _at_least_float32(exo_text), axis=1)
  selected = (similarity > threshold).astype(similarity.dtype)
  count = jnp.sum(selected)
  weights = semantic_weights(ego_text, exo_text, sigma, selected) if weighted else None
  loss = (decoupled_info_nce(ego_embeddings, exo_embeddings, temperature, selected, weights, negatives)
          + decoupled_info_nce(exo_embeddings, ego_embeddings, temperature, selected, weights, negatives))
  return jnp.where(count >= min_pairs, loss, 0.0), count


def video_text_loss(ego_embeddings: jax.Array, exo_embeddings: jax.Array, ego_text: jax.Array,
                    exo_text: jax.Array, temperature: float, negatives: str = "both_views") -> jax.Array:
  """L_m of SUM-L Eq. 11: every clip against its own narration, four decoupled terms over the batch,

    L_m = DCL(z_f -> d_f) + DCL(d_f -> z_f) + DCL(z_t -> d_t) + DCL(d_t -> z_t).

  Shapes as `semantic_alignment_loss`; the projections and narration embeddings share D. `negatives`:
  the denominators' rows (decoupled_info_nce; the release's `_get_ce_loss` uses both views).
  """
  dcl = functools.partial(decoupled_info_nce, temperature=temperature, negatives=negatives)
  return (dcl(ego_embeddings, ego_text) + dcl(ego_text, ego_embeddings)
          + dcl(exo_embeddings, exo_text) + dcl(exo_text, exo_embeddings))


def suml_total(terms: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """SUM-L Eq. 12: L = L_f + w_t L_t + w_aw L_aw + w_m L_m.

  terms: 'ego_task' (L_f), 'exo_task' (L_t), 'align' (L_aw, or a baseline's alignment term),
  'video_text' (L_m); weights: 'exo_task', 'align', 'video_text'. A term whose weight is 0 is not added
  (it need not be in `terms`).
  """
  total = terms["ego_task"]
  for name in ("exo_task", "align", "video_text"):
    if weights[name]:
      total = total + weights[name] * terms[name]
  return total


def triplet_margin_loss(anchors: jax.Array, positives: jax.Array, negatives: jax.Array,
                        margin: float) -> jax.Array:
  """mean_i max(||a_i - p_i|| - ||a_i - n_i|| + margin, 0), Euclidean distances of (B, D) rows (the
  Triplet and Joint-embedding baselines; margin 0.1 in SUM-L's comparison). A 1e-12 under the square
  root keeps the gradient finite when two rows coincide."""
  a, p, n = (_at_least_float32(x) for x in (anchors, positives, negatives))
  distance = lambda x, y: jnp.sqrt(jnp.sum((x - y) ** 2, axis=1) + 1e-12)
  return jnp.mean(jnp.maximum(distance(a, p) - distance(a, n) + margin, 0.0))


def multi_label_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Sigmoid binary cross-entropy of (B, K) logits against (B, K) 0/1 targets, averaged over classes and
  examples (multi-label sets: Charades 157-way, LEMMA verbs and nouns). SUM-L's released L_t is the sum
  of this over its two heads (verbs, nouns): objectives/suml.task_loss, loss.multi_label_reduction."""
  per_class = optax.sigmoid_binary_cross_entropy(_at_least_float32(logits), _at_least_float32(targets))
  return jnp.mean(per_class)


# --------------------------------------------------------------------------- EVGAP: CLIP pairs, SigLIP groups
#
# Embeddings are L2-normalised inside the losses. Logit scales are learnable parameters s with
# scale t = exp(s) (CLIP's and SigLIP's parameterisation); the models hold s, not t.

CLIP_MAX_LOG_SCALE = 4.605170185988092  # ln 100: CLIP clips its logit scale at 100


def l2_normalize(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
  """x / max(||x||, epsilon) along the last axis, in float32 (float64 stays float64).

  EVGAP's losses use the default 1e-6; SUM-L's projection heads (models/suml.py) pass 1e-12, the default of
  torch.nn.functional.normalize that the released SUM-L code calls. Both are far below the norm of any
  embedding a network produces, so they differ only for (near-)zero rows; each keeps its own."""
  x = _at_least_float32(x)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), epsilon)


def clip_pair_loss(ego: jax.Array, exo: jax.Array, log_scale: jax.Array) -> jax.Array:
  """EVGAP step 1: CLIP's symmetric InfoNCE over B synchronised ego-exo pairs.

  ego, exo: (B, D); row i of both is the same moment (a positive), every other row a negative.
  z_ij = t <e_i, x_j> with unit e, x and t = exp(min(s, ln 100)). Returns
      L = 1/2 [ 1/B sum_i -log softmax_j(z_ij)[i]  +  1/B sum_j -log softmax_i(z_ij)[j] ].
  """
  ego, exo = l2_normalize(ego), l2_normalize(exo)
  logits = jnp.exp(jnp.minimum(_at_least_float32(log_scale), CLIP_MAX_LOG_SCALE)) * ego @ exo.T
  labels = jnp.arange(ego.shape[0])
  return 0.5 * (softmax_cross_entropy(logits, labels) + softmax_cross_entropy(logits.T, labels))


def _sigmoid_block_sum(ego: jax.Array, ego_scene: jax.Array, exo: jax.Array, exo_scene: jax.Array,
                       scale: jax.Array, bias: jax.Array, tile_rows: int = 0) -> jax.Array:
  """sum_ij -log sigmoid(y_ij (scale <e_i, x_j> + bias)), y_ij = +1 if ego_scene_i == exo_scene_j else -1.

  ego (R, D), exo (C, D) unit rows; scene ids (R,), (C,). With 0 < tile_rows < R dividing R, the rows
  go through in tiles of `tile_rows`, each rematerialised in the backward pass, so at most
  tile_rows x C logits exist at once.
  """
  def tile(args):
    e, scenes = args
    logits = scale * e @ exo.T + bias
    signs = jnp.where(scenes[:, None] == exo_scene[None, :], 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits))

  rows = ego.shape[0]
  if 0 < tile_rows < rows and rows % tile_rows == 0:
    tiles = (ego.reshape(rows // tile_rows, tile_rows, -1), ego_scene.reshape(rows // tile_rows, tile_rows))
    return jnp.sum(jax.lax.map(jax.checkpoint(tile), tiles))
  return tile((ego, ego_scene))


def _flatten_group(ego: jax.Array, exo: jax.Array):
  """(S, M, D), (S, N, D) -> unit rows (S M, D), (S N, D) and their scene ids 0..S-1."""
  (scenes, m, dim), n = ego.shape, exo.shape[1]
  return (l2_normalize(ego.reshape(scenes * m, dim)), jnp.repeat(jnp.arange(scenes), m),
          l2_normalize(exo.reshape(scenes * n, dim)), jnp.repeat(jnp.arange(scenes), n))


GROUP_NORMALIZATIONS = ("pairs", "ego")  # Eq. 2's mean over all ego-exo pairs; SigLIP's sum per ego window


def _group_divisor(ego_rows: int, exo_rows: int, normalization: str) -> int:
  if normalization not in GROUP_NORMALIZATIONS:
    raise ValueError(f"unknown group loss normalization '{normalization}': use one of {GROUP_NORMALIZATIONS}")
  return ego_rows * exo_rows if normalization == "pairs" else ego_rows


def siglip_group_loss(ego: jax.Array, exo: jax.Array, log_scale: jax.Array, bias: jax.Array,
                      normalization: str = "ego") -> jax.Array:
  """EVGAP step 2: the sigmoid loss over groups, dense (the whole logit matrix at once).

  ego (B, M, D), exo (B, N, D): M ego and N exo windows of each of B scenes. Over all B M ego windows i
  and B N exo windows j, z_ij = t <e_i, x_j> + b with unit e, x, t = exp(s); y_ij = +1 when i and j
  are windows of the same scene (a block-diagonal label matrix), -1 otherwise. The sum
      S = -sum_i sum_j log sigmoid(y_ij z_ij)
  is divided by the number of ego windows B M with `normalization` 'ego' (SigLIP normalises by its
  number of images), or by the number of pairs B^2 M N with 'pairs' (EVGAP's Eq. 2, a mean over every
  ego-exo pair; see `evgap_group_loss`). SigLIP starts s = ln 10 (t = 10) and b = -10.
  """
  e, e_scene, x, x_scene = _flatten_group(ego, exo)
  total = _sigmoid_block_sum(e, e_scene, x, x_scene, jnp.exp(_at_least_float32(log_scale)), _at_least_float32(bias))
  return total / _group_divisor(e.shape[0], x.shape[0], normalization)


def evgap_group_loss(ego: jax.Array, exo: jax.Array, log_scale: jax.Array) -> jax.Array:
  """EVGAP's Eq. 2 on one device's scenes: the sigmoid loss without bias, a mean over all pairs,

      L = -1/(B^2 M N) sum_{i=1}^{B M} sum_{j=1}^{B N} log sigmoid(y_ij t <e_i, x_j>),   t = exp(s),

  with y_ij = +1 for windows of the same scene, -1 otherwise (shapes as `siglip_group_loss`). Over
  several devices the paper "ignores the device communication": each device takes this mean over its
  own B scenes and the devices' values are averaged (`siglip_group_loss_sharded`, scope 'local').
  """
  return siglip_group_loss(ego, exo, log_scale, jnp.zeros((), jnp.float32), normalization="pairs")


def siglip_group_loss_sharded(ego: jax.Array, exo: jax.Array, log_scale: jax.Array, bias: jax.Array, *, mesh,
                              scope: str = "global", axis_name: str | tuple[str, ...] = ("data", "fsdp"),
                              tile_rows: int = 0, normalization: str = "ego") -> jax.Array:
  """siglip_group_loss with the scenes split over the devices of `mesh` axes `axis_name` (jax.shard_map;
  the trainer's batch axes by default, sharding.BATCH_AXES).

  ego (B, M, D), exo (B, N, D) global arrays; B divisible by the number of devices n; each device holds
  b = B / n scenes. scale and bias are replicated. Returns the replicated scalar. `normalization` as
  siglip_group_loss: 'ego' divides the sum by the ego windows considered, 'pairs' by the pairs.
  scope 'global': the same value as siglip_group_loss on the whole batch. Each device scores its own
    ego windows against its own exo chunk (the positives), then n - 1 times passes its exo chunk to the
    next device of a ring (jax.lax.ppermute) and scores the chunk it received (negatives only), as
    SigLIP's chunked implementation. No device holds more than (b M) x (b N) logits at once (tile_rows x
    b N with tiling); blocks are recomputed in the backward pass, which keeps only the n received exo
    chunks, so memory grows linearly in B.
  scope 'local': each device computes siglip_group_loss over its own b scenes only (negatives from its
    own slice, no communication); the result is the mean over devices. With normalization 'pairs' and
    bias 0 this is EVGAP's Eq. 2 as the paper computes it (`evgap_group_loss` per device).
  """
  if scope not in ("global", "local"):
    raise ValueError(f"unknown SigLIP loss scope '{scope}': use 'global' or 'local'")
  _group_divisor(1, 1, normalization)  # checks the name before tracing
  axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  axes = tuple(a for a in axes if a in mesh.shape)  # a 1-D 'data' mesh has no 'fsdp' axis
  spec, replicated = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec()
  devices = 1
  for axis in axes:
    devices *= mesh.shape[axis]
  axis_name = axes

  # Each block's logits are recomputed in the backward pass rather than stored: the ring's backward
  # then keeps only the received chunks (b N x D each), not n blocks of (b M) x (b N) logits.
  block_sum = jax.checkpoint(lambda *args: _sigmoid_block_sum(*args, tile_rows=tile_rows))

  def per_device(ego, exo, log_scale, bias):
    e, e_scene, x, x_scene = _flatten_group(ego, exo)
    scale, bias = jnp.exp(_at_least_float32(log_scale)), _at_least_float32(bias)
    total = block_sum(e, e_scene, x, x_scene, scale, bias)
    if scope == "local":
      return jax.lax.pmean(total / _group_divisor(e.shape[0], x.shape[0], normalization), axis_name)
    others = jnp.full_like(x_scene, -1)  # chunks from other devices hold other scenes only
    ring = [(i, (i + 1) % devices) for i in range(devices)]

    def step(carry, _):
      chunk, total = carry
      chunk = jax.lax.ppermute(chunk, axis_name, ring)
      return (chunk, total + block_sum(e, e_scene, chunk, others, scale, bias)), None

    (_, total), _ = jax.lax.scan(step, (x, total), None, length=devices - 1)
    return jax.lax.psum(total, axis_name) / _group_divisor(e.shape[0] * devices, x.shape[0] * devices,
                                                           normalization)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, replicated, replicated),
                       out_specs=replicated)(ego, exo, log_scale, bias)


def with_auxiliary_layers(per_layer: jax.Array, auxiliary_weight: float) -> jax.Array:
  """EVGAP's deep supervision: per_layer (L,) losses of layers 1..L -> L_L + w sum_{l<L} L_l (w = 0.2)."""
  per_layer = _at_least_float32(per_layer)
  return per_layer[-1] + auxiliary_weight * jnp.sum(per_layer[:-1])
