"""The Ego-Exo recipe table (pre-training, the Ego-Score teacher, fine-tuning) as data; see common_recipe.py.

Sources: the paper (Li et al., CVPR 2021, and its supplement) and the release, github
facebookresearch/Ego-Exo at HEAD (checked 2026-11-30): `configs/ego-exo/**.yaml` on top of PySlowFast's
`slowfast/config/defaults.py` and `slowfast/config/custom_config.py`, `tools/handobj/train_net.py` (how the
loss terms add up), `slowfast/models/handobj_models.py` (interaction-map loss and targets),
`slowfast/models/optimizer.py`, `slowfast/utils/lr_policy.py`, `slowfast/datasets/decoder.py` (clip
sampling). Yaml names below are relative to `configs/ego-exo/`.

Paper column: the text gives Eq. 7's weights (no weight on L_act), EPIC-100's LR and batch, and the
teacher's recipe (supplement S1). Where the text is silent the paper recipe takes the released value,
and its source says so.
"""

from configs.common_recipe import Row

PRETRAIN = ("egoexo",)
TEACHER = ("ego_classifier",)
FINETUNE = ("finetune_charades_ego", "finetune_epic100", "finetune_epic55")
K400 = "k400/Ego_Exo_SLOW_8x8_R50.yaml"
K400_BASE = "k400/SLOW_8x8_R50.yaml (base of " + K400 + ")"
SILENT = "not stated; the released value"
CHARADES_YAMLS = "charades-ego/Ego_Exo_SLOW_8x8_R50.yaml"
EPIC_YAMLS = "epic-kitchen-{55,100}/Ego_Exo_SLOWFAST_8x8_R50.yaml"

ROWS = (
    # ------------------------------------------------------------------ pre-training loss (Eq. 7)
    Row("Action cross-entropy weight", PRETRAIN, "loss.weight_action",
        0.5, f"{K400} LOSS.CE_LOSS_WEIGHT (tools/handobj/train_net.py multiplies the CE by it)",
        1.0, "Eq. 7: L_act carries no weight"),
    Row("Ego-Score KD weight", PRETRAIN, "loss.weight_ego_score",
        0.1, f"{K400} KD.ALPHA_LIST[0]", 0.1, "Eq. 7"),
    Row("Object-Score KD weight", PRETRAIN, "loss.weight_object",
        0.5, f"{K400} KD.ALPHA_LIST[1]", 0.5, "Eq. 7"),
    Row("KD temperatures (ego, object)", PRETRAIN, "loss.temperature_ego",
        1.0, f"{K400} KD.T_LIST[0]", 1.0, SILENT),
    Row("KD temperatures (ego, object)", PRETRAIN, "loss.temperature_object",
        1.0, f"{K400} KD.T_LIST[1]", 1.0, SILENT),
    Row("Interaction-map weight (per map when summed)", PRETRAIN, "loss.weight_interaction",
        1.0, f"{K400} HANDOBJ.HAND_LOSS_WEIGHT = OBJ_LOSS_WEIGHT = 1.0 (x HANDOBJ.ALPHA 1.0)",
        1.0, "Eq. 7"),
    Row("L_int: BCE means of the hand and the object map", PRETRAIN + FINETUNE,
        "loss.interaction_reduction",
        "sum", "slowfast/models/handobj_models.py cal_handobj_loss: hand_loss + obj_loss, each a "
               "BCEWithLogits mean over the cells",
        "mean", "Eq. 6: one BCE over the map cells (read as one mean over both maps)",
        "Fine-tuning (Ego-Exo*) uses 'sum' under both recipes: its weights (0.1 Charades-Ego, 3.0 EPIC) are the "
        "release's per-map HANDOBJ weights and the text gives none."),
    Row("Head dropout (action, ego, object heads)", PRETRAIN, "model.dropout_rate",
        0.0, f"{K400} MODEL.DROPOUT_RATE (overrides the base yaml's 0.5)", 0.0, SILENT),
    # ------------------------------------------------------------------ pre-training input
    Row("Frames per clip", PRETRAIN, "data.clip_length", 8, f"{K400_BASE} DATA.NUM_FRAMES", 8, "Slow-only 8x8 (T)"),
    Row("Sampling rate (frames at target fps between samples)", PRETRAIN, "data.frame_stride",
        8, f"{K400_BASE} DATA.SAMPLING_RATE", 8, "Slow-only 8x8 (tau)"),
    Row("Clip sampling: resample to this fps, T frames by linspace over T x rate frames", PRETRAIN,
        "data.target_fps",
        30.0, "slowfast/config/defaults.py DATA.TARGET_FPS; slowfast/datasets/decoder.py temporal_sampling",
        30.0, SILENT),
    Row("SlowFast interaction targets: the slow pathway's frames of the fast clip", PRETRAIN + FINETUNE,
        "data.interaction_frames",
        "slow_frames", "slowfast/models/handobj_models.py cal_handobj_loss: torch.linspace(0, T - 1, "
                       "slow_T).long() (HSlow heads, pathway 0)",
        "slow_frames", SILENT),
    Row("Train crop", PRETRAIN, "data.crop_size", 224, f"{K400_BASE} DATA.TRAIN_CROP_SIZE", 224, SILENT,
        full_size_only=True),
    Row("Scale jitter (short side)", PRETRAIN, "data.min_short_side", 256, f"{K400_BASE} DATA.TRAIN_JITTER_SCALES",
        256, SILENT, full_size_only=True),
    Row("Scale jitter (short side)", PRETRAIN, "data.max_short_side", 320, f"{K400_BASE} DATA.TRAIN_JITTER_SCALES",
        320, SILENT, full_size_only=True),
    # ------------------------------------------------------------------ pre-training optimisation
    Row("LR policy (PySlowFast lr_policy; warm-up ends on the cosine curve)", PRETRAIN, "optimizer.lr_policy",
        "cosine", f"{K400_BASE} SOLVER.LR_POLICY; slowfast/utils/lr_policy.py", "cosine", SILENT),
    Row("Epochs", PRETRAIN, "epochs", 200.0, f"{K400_BASE} SOLVER.MAX_EPOCH", 200.0, SILENT,
        "Steps = ceil(epochs x records / global batch), from the record count at start.", full_size_only=True),
    Row("Warm-up epochs", PRETRAIN, "optimizer.warmup_epochs", 34.0, f"{K400_BASE} SOLVER.WARMUP_EPOCHS",
        34.0, SILENT, full_size_only=True),
    Row("Warm-up start, fraction of the peak LR", PRETRAIN, "optimizer.warmup_start_fraction",
        0.1, f"{K400_BASE} SOLVER.WARMUP_START_LR 0.08 / BASE_LR 0.8", 0.1, SILENT),
    Row("Base LR per reference batch", PRETRAIN, "optimizer.base_learning_rate",
        0.1, f"{K400_BASE} SOLVER.BASE_LR 0.8 '# 8-node' at TRAIN.BATCH_SIZE 64 per node = 512 clips",
        0.1, SILENT, "Scaled linearly with the global batch (0.1 per 64 = 0.8 per 512).", full_size_only=True),
    Row("Reference batch of the base LR", PRETRAIN + TEACHER, "optimizer.reference_batch_size",
        64, "0.8 per 512 clips = 0.1 per 64", 64, SILENT),
    Row("Global batch", PRETRAIN, "global_batch_size",
        64, f"{K400_BASE} TRAIN.BATCH_SIZE 64 per node x 8 nodes = 512", 64, SILENT,
        "64 here (one host), LR scaled linearly; the release's BatchNorm statistics are per 8-clip GPU batch, "
        "ours are the global batch's. Set global_batch_size=512 to match the release's batch.",
        full_size_only=True),
    Row("SGD momentum", PRETRAIN + TEACHER + FINETUNE, "optimizer.momentum", 0.9, "SOLVER.MOMENTUM", 0.9, SILENT),
    Row("Nesterov", PRETRAIN + TEACHER + FINETUNE, "optimizer.nesterov", True,
        "slowfast/config/defaults.py SOLVER.NESTEROV", True, SILENT),
    Row("Weight decay", PRETRAIN + TEACHER + FINETUNE, "optimizer.weight_decay", 1e-4, "SOLVER.WEIGHT_DECAY",
        1e-4, SILENT),
    Row("Weight decay applies to", PRETRAIN + TEACHER + FINETUNE, "optimizer.weight_decay_on",
        "all_but_batchnorm", "slowfast/models/optimizer.py: every parameter whose name lacks 'bn' (biases and "
                             "heads included) at SOLVER.WEIGHT_DECAY; BN at BN.WEIGHT_DECAY 0.0",
        "all_but_batchnorm", SILENT,
        "'kernels' (conv and dense kernels only) remains available."),
    # ------------------------------------------------------------------ Ego-Score teacher (supplement S1)
    Row("Teacher: action cross-entropy weight", TEACHER, "loss.weight_action", 1.0,
        "no released config for the teacher: the paper's value", 1.0, "supplement S1: plain 2-way classification"),
    Row("Teacher: base LR per 64 clips", TEACHER, "optimizer.base_learning_rate", 0.01,
        "no released config: the paper's value", 0.01, "supplement S1", full_size_only=True),
    Row("Teacher: LR policy", TEACHER, "optimizer.lr_policy", "cosine", "no released config: the paper's value",
        "cosine", "supplement S1"),
    Row("Teacher: epochs", TEACHER, "epochs", 100.0, "no released config: the paper's value", 100.0,
        "supplement S1", full_size_only=True),
    Row("Teacher: warm-up epochs", TEACHER, "optimizer.warmup_epochs", 0.0, "no released config: the paper's value",
        0.0, "supplement S1 names none", full_size_only=True),
    Row("Teacher: head dropout", TEACHER, "model.dropout_rate", 0.5,
        f"not released; PySlowFast's Slow-only default ({K400_BASE} MODEL.DROPOUT_RATE)", 0.5, SILENT),
    Row("Teacher: clip sampling (0: stride over stored frames)", TEACHER + FINETUNE, "data.target_fps", 0.0,
        "slowfast/datasets/charades.py, epic.py: frame folders, start + i x SAMPLING_RATE", 0.0, SILENT),
    # ------------------------------------------------------------------ fine-tuning
    Row("Fine-tuning head dropout", FINETUNE, "model.dropout_rate", 0.5,
        "charades-ego/*.yaml, epic-kitchen-*/*.yaml MODEL.DROPOUT_RATE", 0.5, SILENT),
    Row("EPIC-100: base LR", ("finetune_epic100",), "optimizer.base_learning_rate", 0.02,
        "epic-kitchen-100/Ego_Exo_SLOWFAST_8x8_R50.yaml SOLVER.BASE_LR", 0.02, "EPIC-100 implementation details: LR 0.02"),
    Row("EPIC-100: reference batch of the base LR", ("finetune_epic100",), "optimizer.reference_batch_size", 128,
        "epic-kitchen-100/Ego_Exo_SLOWFAST_8x8_R50.yaml BASE_LR '# 2-node' x TRAIN.BATCH_SIZE 64 per node",
        128, "EPIC-100 implementation details: 16 GPUs x 8 clips"),
    Row("EPIC-55: base LR", ("finetune_epic55",), "optimizer.base_learning_rate", 0.01,
        "epic-kitchen-55/Ego_Exo_SLOWFAST_8x8_R50.yaml SOLVER.BASE_LR", 0.01, SILENT),
    Row("EPIC-55: reference batch of the base LR", ("finetune_epic55",), "optimizer.reference_batch_size", 64,
        "epic-kitchen-55/Ego_Exo_SLOWFAST_8x8_R50.yaml TRAIN.BATCH_SIZE 64 (no node count given)", 64, SILENT,
        "Assumes one 8-GPU node, as the yaml states no node count (EPIC-100's says '2-node')."),
    Row("Charades-Ego: base LR per 64 clips", ("finetune_charades_ego",), "optimizer.base_learning_rate", 0.25,
        "charades-ego/Ego_Exo_SLOW_8x8_R50.yaml SOLVER.BASE_LR at TRAIN.BATCH_SIZE 64", 0.25, SILENT),
    Row("Charades-Ego: LR schedule (cosine, no warm-up)", ("finetune_charades_ego",), "optimizer.schedule",
        "cosine", "charades-ego/Ego_Exo_SLOW_8x8_R50.yaml SOLVER.LR_POLICY cosine, MAX_EPOCH 60", "cosine", SILENT,
        "Step-based, over ceil(60 x videos / batch) steps: equal to PySlowFast's lr_policy at every step "
        "(tests/recipes_test.py)."),
    Row("EPIC: LR steps x1, x0.1, x0.01 at epochs 0, 20, 25 of 30", ("finetune_epic100", "finetune_epic55"),
        "optimizer.schedule", "steps", "epic-kitchen-*/Ego_Exo_SLOWFAST_8x8_R50.yaml SOLVER.LR_POLICY "
                                       "steps_with_relative_lrs, STEPS [0, 20, 25], LRS [1, 0.1, 0.01]",
        "steps", SILENT,
        "Step-based (decay_steps = ceil(epoch x segments / batch), factor 0.1): equal to PySlowFast's "
        "steps_with_relative_lrs at every step (tests/recipes_test.py)."),
    # ------------------------------------------------------------------ fine-tuning: BN, periodic evaluation
    Row("Precise BatchNorm batches (0 = off) before each evaluation and at the end",
        ("finetune_epic100", "finetune_epic55"), "precise_bn.num_batches", 200, f"{EPIC_YAMLS} BN.USE_PRECISE_STATS True, NUM_BATCHES_PRECISE 200 "
                                       "(capped at one epoch, tools/epic/train_net.py)", 200, SILENT,
        "`:star` sets 0, as the Ego_Exo_star yamls (BN.USE_PRECISE_STATS False). Statistics of the global batch "
        "(the release: per 8-clip GPU batch).", full_size_only=True),
    Row("Precise BatchNorm batches (0 = off)", ("finetune_charades_ego",), "precise_bn.num_batches",
        0, f"{CHARADES_YAMLS} BN.USE_PRECISE_STATS False", 0, SILENT),
    Row("Periodic evaluation every N epochs (on data.eval_records)", FINETUNE, "train_eval.every_epochs",
        2.0, f"{CHARADES_YAMLS}, {EPIC_YAMLS} TRAIN.EVAL_PERIOD", 2.0, SILENT,
        "In steps as the LR policy counts epochs: ceil(N x records / global batch), records from "
        "data.num_train_examples or counted at start (egoexo_jax/lr_policy.py steps_for_epochs).",
        full_size_only=True),
    Row("Periodic evaluation views (clips x crops): one clip, one crop", FINETUNE, "train_eval.num_clips", 1,
        "slowfast/datasets/charades.py, epic.py: 'val' mode samples 1 clip x 1 crop", 1, SILENT),
    Row("Periodic evaluation views (clips x crops): one clip, one crop", FINETUNE, "train_eval.num_crops", 1,
        "slowfast/datasets/charades.py, epic.py: 'val' mode samples 1 clip x 1 crop", 1, SILENT),
    Row("Charades-Ego: best checkpoint by", ("finetune_charades_ego",), "train_eval.best_metric", "mAP",
        "tools/train_net.py: eval_epoch's is_best_epoch (validation mAP, DATA.MULTI_LABEL)", "mAP", SILENT),
    Row("EPIC: best checkpoint by (highest action top-1 = lowest action top-1 error)",
        ("finetune_epic100", "finetune_epic55"), "train_eval.best_metric", "action_top1",
        "tools/epic/train_net.py eval_epoch: ValMeter.log_epoch_stats's is_best_epoch on the action top-1 error",
        "action_top1", SILENT),
    # ------------------------------------------------------------------ fine-tuning: testing
    Row("Test views per video: clips", FINETUNE, "eval.num_clips", 10,
        "slowfast/config/defaults.py TEST.NUM_ENSEMBLE_VIEWS (the yamls keep it)", 10, SILENT),
    Row("Test views per video: spatial crops", FINETUNE, "eval.num_crops", 3,
        "slowfast/config/defaults.py TEST.NUM_SPATIAL_CROPS (the yamls keep it)", 3, SILENT),
    Row("Test crop", FINETUNE, "eval.crop_size", 256, f"{CHARADES_YAMLS}, {EPIC_YAMLS} DATA.TEST_CROP_SIZE",
        256, SILENT, full_size_only=True),
    Row("Test short side (the test crop's: PySlowFast's min_scale = max_scale = TEST_CROP_SIZE)", FINETUNE,
        "eval.short_side", 256, f"{CHARADES_YAMLS}, {EPIC_YAMLS} DATA.TEST_CROP_SIZE; slowfast/datasets/"
                                    "charades.py, epic.py 'test' mode", 256, SILENT, full_size_only=True),
    Row("Fully convolutional testing (head at each res5 position of a train-crop window, then the mean)", FINETUNE,
        "eval.fully_convolutional", True,
        "slowfast/models/head_helper.py ResNetBasicHead (eval: fully convolutional projection, act, mean over "
        "positions); Ego-Exo's MultiTaskHead likewise", True, SILENT),
    Row("Charades-Ego: view aggregation", ("finetune_charades_ego",), "eval.ensemble", "max",
        "charades-ego/Ego_Exo_SLOW_8x8_R50.yaml DATA.ENSEMBLE_METHOD", "max", SILENT),
    Row("EPIC: view aggregation", ("finetune_epic100", "finetune_epic55"), "eval.ensemble", "mean",
        "slowfast/config/defaults.py DATA.ENSEMBLE_METHOD 'sum' (the EPIC yamls keep it)", "mean", SILENT,
        "'mean' = 'sum' / 30 views: the same ranking, top-k and action scores' order."),
)
