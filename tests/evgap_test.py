"""EVGAP: feature records, pair/group batches, model, configs, and step 1 -> step 2 through the trainer."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from egoexo_jax import checkpointing, objectives, run_config, train
from egoexo_jax.downstream import extract
from egoexo_jax.input import feature_pipeline, feature_records, records
from egoexo_jax.objectives import evgap as evgap_objective

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "evgap"


def load_config(name, arg="small"):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny(name, prefix, **overrides):
  """configs/<name>.py:small on the converted demo features, shrunk to a 2-layer width-8 encoder."""
  config = load_config(name)
  config.data.feature_records = prefix
  # No dropout: its random bits double the step's compile time on CPU; the :small runs keep it.
  config.model.update(width=8, num_layers=2, num_heads=2, mlp_dim=16, embed_dim=8, max_length=16, dropout_rate=0.0)
  config.update(global_batch_size=16 if config.stage == "pair" else 8, num_train_steps=4, log_every_steps=2,
                checkpoint_every_steps=4, async_checkpointing=False)
  config.optimizer.warmup_steps = 1
  config.init_from = ""
  for key, value in overrides.items():
    node, *path = key.split(".")
    (config[node] if path else config)[path[0] if path else node] = value
  return config


@pytest.fixture(scope="module")
def demo_prefix(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("evgap") / "demo")
  feature_records.convert_feature_manifest(str(DEMO / "views.csv"), prefix, num_shards=2,
                                           formats=("tfrecord", "array_record"))
  return prefix


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_records_hold_every_view_of_the_manifest(demo_prefix, fmt):
  source = feature_records.FeatureRecordSource(demo_prefix, fmt)
  assert len(source) == 10 and source.feature_dim == 128
  manifest = feature_records.read_view_manifest(str(DEMO / "views.csv"))
  for index in range(len(source)):
    recording = source[index]
    views = manifest[recording.recording_id]
    assert recording.view_names == [v.view for v in views] and recording.view_kinds == [v.kind for v in views]
    assert recording.features.dtype == np.float16 and recording.fps > 0
    for view, features in zip(views, recording.features):
      np.testing.assert_array_equal(features, np.load(view.file))


def test_chunked_float32_records_and_length_tolerance(tmp_path):
  rng = np.random.default_rng(0)
  rows = ["recording,view,kind,path"]
  for view, kind, frames in (("a", "ego", 25), ("b", "exo", 26), ("c", "exo", 25)):
    np.save(tmp_path / f"{view}.npy", rng.normal(size=(frames, 3)).astype(np.float32))
    rows.append(f"r0,{view},{kind},{view}.npy")
  (tmp_path / "views.csv").write_text("\n".join(rows) + "\n")
  index = feature_records.convert_feature_manifest(str(tmp_path / "views.csv"), str(tmp_path / "out"),
                                                   dtype="float32", chunk_frames=10, max_length_difference=1)
  assert [(e["first_frame"], e["num_frames"]) for e in index["records"]] == [(0, 10), (10, 10), (20, 5)]
  source = feature_records.FeatureRecordSource(str(tmp_path / "out"))
  whole = np.concatenate([source[i].features for i in range(3)], axis=1)
  np.testing.assert_array_equal(whole[1], np.load(tmp_path / "b.npy")[:25])  # cut to the shortest view
  with pytest.raises(feature_records.FeatureManifestError, match=r"b\.npy' \(26 frames\) and .* differ by more than 0"):
    feature_records.convert_feature_manifest(str(tmp_path / "views.csv"), str(tmp_path / "strict"),
                                             max_length_difference=0)


@pytest.mark.parametrize("rows,message", [
    (["r0,a,ego,a.npy"], r"views.csv:2: recording 'r0' has no exo view"),
    (["r0,a,ego,a.npy", "r0,b,side,b.npy"], r"views.csv:3: column 'kind' is 'side'"),
    (["r0,a,ego,a.npy", "r0,a,exo,b.npy"], r"views.csv:3: view 'a' of recording 'r0' is listed twice"),
    (["r0,a,ego,a.npy", "r0,b,exo,b.lmdb"], r"views.csv:3: 'b.lmdb' is not a .npy file; LMDB stores need"),
    (["r0,a,ego,a.npy", "r0,b,exo,missing.npy"], r"views.csv:3: cannot read .*missing.npy"),
])
def test_bad_manifests_are_named(tmp_path, rows, message):
  np.save(tmp_path / "a.npy", np.zeros((5, 2), np.float32))
  np.save(tmp_path / "b.npy", np.zeros((5, 2), np.float32))
  (tmp_path / "views.csv").write_text("\n".join(["recording,view,kind,path"] + rows) + "\n")
  with pytest.raises(feature_records.FeatureManifestError, match=message):
    feature_records.convert_feature_manifest(str(tmp_path / "views.csv"), str(tmp_path / "out"))
  assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_corrupt_record_is_named(demo_prefix):
  from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2  # pylint: disable=g-import-not-at-top
  example = example_pb2.Example.FromString(
      feature_records.encode_recording(feature_records.FeatureRecordSource(demo_prefix)[0]))
  example.features.feature["features"].bytes_list.value[0] = b"0123456789"
  with pytest.raises(records.RecordError, match="f#3: field 'features' of view 'ego_0' holds 10 bytes"):
    feature_records.decode_recording(example.SerializeToString(), "f#3")
  del example.features.feature["view_kinds"]
  with pytest.raises(records.RecordError, match="f#3: missing required field 'view_kinds'"):
    feature_records.decode_recording(example.SerializeToString(), "f#3")


# --------------------------------------------------------------------------- windows and batches


def test_window_resampling():
  ramp = np.arange(40, dtype=np.float32)[:, None] * np.array([[1.0, -2.0]], np.float32)
  np.testing.assert_array_equal(feature_pipeline.resample(ramp, 5, 8, 8), ramp[5:13])  # span = w1: the frames
  stretched = feature_pipeline.resample(ramp, 4, 16, 8)  # twice as long: every other frame, half-way
  np.testing.assert_allclose(stretched[:, 0], 4 + (np.arange(8) + 0.5) * 2 - 0.5)
  squeezed = feature_pipeline.resample(ramp, 10, 4, 8)  # half as long: interpolated between frames
  np.testing.assert_allclose(squeezed[:, 0], np.clip(10 + (np.arange(8) + 0.5) * 0.5 - 0.5, 10, 13))
  assert feature_pipeline.augment_window(0, 30, 8, 2.0) == (0, 16)  # kept inside at the start
  assert feature_pipeline.augment_window(20, 30, 8, 2.0) == (14, 16)  # and at the end
  assert feature_pipeline.augment_window(10, 30, 8, 0.5) == (12, 4)  # same centre
  assert feature_pipeline.augment_window(0, 10, 8, 2.0) == (0, 10)  # never longer than the record
  np.testing.assert_array_equal(feature_pipeline.window_starts(35, 8, 10), [0, 10, 20])


def check_window(recording, views, window_features, start, span, w1):
  """Each window equals the resampling of one of `views` of the recording at (start, span)."""
  local = int(start) - recording.first_frame
  candidates = [feature_pipeline.resample(recording.features[v], local, int(span), w1) for v in views]
  assert any(np.array_equal(window_features, c) for c in candidates)


def test_pair_batches_hold_whole_groups_of_one_recording(demo_prefix):
  config = tiny("evgap_pair", demo_prefix)
  source = feature_records.FeatureRecordSource(demo_prefix)
  group = config.data.windows_per_recording
  for batch in take(iter(feature_pipeline.make_dataset(config, source, "pair")), 3):
    assert batch["ego_features"].shape == (16, 8, 128) and batch["exo_features"].shape == (16, 8, 128)
    for g in range(16 // group):
      rows = slice(g * group, (g + 1) * group)
      assert len(set(batch["record_index"][rows])) == 1  # a group: windows of one recording
      windows = batch["window"][rows]
      np.testing.assert_array_equal(np.diff(windows), 1)  # consecutive, distinct windows: hard negatives
      recording = source[int(batch["record_index"][rows][0])]
      for i in range(g * group, (g + 1) * group):
        assert config.data.window_frames / 2 - 1 <= batch["span"][i] <= 2 * config.data.window_frames
        check_window(recording, recording.views_of_kind("ego"), batch["ego_features"][i], batch["start"][i], batch["span"][i], 8)
        check_window(recording, recording.views_of_kind("exo"), batch["exo_features"][i], batch["start"][i], batch["span"][i], 8)
    pairs = set(zip(batch["record_index"].tolist(), batch["window"].tolist()))
    assert len(pairs) == 16  # no window twice


def test_group_batches_share_timestamps_and_never_repeat_a_scene(demo_prefix):
  config = tiny("evgap_group", demo_prefix)
  source = feature_records.FeatureRecordSource(demo_prefix)
  iterator = iter(feature_pipeline.make_dataset(config, source, "group"))
  for batch in take(iterator, 6):
    assert batch["ego_features"].shape == (8, 4, 8, 128) and batch["exo_features"].shape == (8, 8, 8, 128)
    assert len(set(zip(batch["record_index"].tolist(), batch["window"].tolist()))) == 8  # 8 distinct scenes
    for s in range(8):
      recording = source[int(batch["record_index"][s])]
      ego, exo = batch["ego_views"][s], batch["exo_views"][s]
      assert {recording.view_kinds[v] for v in ego} == {"ego"} and {recording.view_kinds[v] for v in exo} == {"exo"}
      # The demo has 2 ego and 3 exo views: all are used, the rest drawn again (with replacement).
      assert set(ego) == set(recording.views_of_kind("ego")) and set(exo) == set(recording.views_of_kind("exo"))
      local = int(batch["start"][s]) - recording.first_frame
      for windows, views in ((batch["ego_features"][s], ego), (batch["exo_features"][s], exo)):
        for window, view in zip(windows, views):  # every window of the group: the same start and span
          np.testing.assert_array_equal(window, feature_pipeline.resample(recording.features[view], local,
                                                                          int(batch["span"][s]), 8))


def test_group_batches_hold_consecutive_scenes_of_one_recording_and_skip_held_out_ones(demo_prefix):
  config = tiny("evgap_group", demo_prefix, **{"data.windows_per_recording": 4, "data.heldout_fraction": 0.25})
  source = feature_records.FeatureRecordSource(demo_prefix)
  held_out = ("box_r3", "bikes_r1")
  held_out_indices = {i for i, e in enumerate(source.entries) if e["recording"] in held_out}
  iterator = iter(feature_pipeline.make_dataset(config, source, "group", exclude_recordings=held_out))
  seen = set()
  for batch in take(iterator, 8):  # an epoch of the 8 other recordings' first three quarters: 15 elements of 4
    assert batch["ego_features"].shape == (8, 4, 8, 128)
    for g in range(2):  # as step 1: G = 4 consecutive windows of one recording, hard negatives of each other
      rows = slice(4 * g, 4 * g + 4)
      assert len(set(batch["record_index"][rows])) == 1
      np.testing.assert_array_equal(np.diff(batch["window"][rows]), 1)
    for s in range(8):  # no frame of the held-out last quarter, even in a stretched window
      frames = source.entries[int(batch["record_index"][s])]["num_frames"]
      assert batch["start"][s] + batch["span"][s] <= feature_pipeline.training_frames(frames, 0.25) < frames
    seen.update(batch["record_index"].tolist())
  assert not seen & held_out_indices and len(seen) >= 7


def test_group_retrieval_top1_matches_numpy():
  rng = np.random.default_rng(4)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  exo_scene = np.array([0, 0, 1, 1, 1, 2, 3, 3])
  ego_scene = np.array([0, 1, 2, 3, 3, 2, 1])
  exo, ego = unit(rng.normal(size=(8, 5))), unit(rng.normal(size=(7, 5)))
  want = [int(np.argmax([np.mean([e @ exo[j] for j in np.flatnonzero(exo_scene == s)]) for s in range(4)]) == ego_scene[i])
          for i, e in enumerate(ego)]
  assert evgap_objective.group_retrieval_top1(ego, ego_scene, exo, exo_scene) == pytest.approx(np.mean(want))
  # When every exo window of a scene is the same unit vector, an ego window equal to it scores 1 there and
  # less anywhere else: all are matched.
  directions = unit(rng.normal(size=(4, 5)))
  assert evgap_objective.group_retrieval_top1(directions[ego_scene], ego_scene, directions[exo_scene], exo_scene) == 1.0


def test_heldout_evaluation_embeds_every_window_of_every_view(demo_prefix, tmp_path):
  config = tiny("evgap_group", demo_prefix, **{"data.heldout_recordings": "box_r3,bikes_r1",
                                               "data.heldout_fraction": 0.25})
  objective = objectives.resolve(config)
  model = objective.model
  params = train.init_variables(objective, config, jax.random.key(1))["params"]
  got = evgap_objective.evaluate(model, params, config, str(tmp_path))
  # By hand: the nominal windows (every 10 frames, 8 long) of box_r3 and bikes_r1, and of the last quarter
  # of every other recording, each view embedded alone.
  source = feature_records.FeatureRecordSource(demo_prefix)
  embed = jax.jit(lambda window: model.apply({"params": params}, window, train=False)["embeddings"][-1, 0])
  embeddings, scenes, kinds = [], [], []
  for index, entry in enumerate(source.entries):
    recording = source[index]
    first = 0 if entry["recording"] in ("box_r3", "bikes_r1") else recording.num_frames - round(recording.num_frames / 4)
    for start in range(first, recording.num_frames - 8 + 1, 10):
      scene = len(set(scenes))
      for view, kind in enumerate(recording.view_kinds):
        window = recording.features[view, start:start + 8].astype(np.float32)[None]
        embedding = np.asarray(embed(window))
        embeddings.append(embedding / np.linalg.norm(embedding))
        scenes.append(scene)
        kinds.append(kind)
  embeddings, scenes, ego = np.stack(embeddings), np.asarray(scenes), np.asarray(kinds) == "ego"
  want = evgap_objective.group_retrieval_top1(embeddings[ego], scenes[ego], embeddings[~ego], scenes[~ego])
  assert got["heldout_group_top1"] == pytest.approx(want, abs=1e-9)
  with Image.open(tmp_path / "pictures" / "evgap_heldout_similarity.png") as picture:  # ego rows x exo columns
    assert picture.size == (8 * min(64, int((~ego).sum())), 8 * min(64, int(ego.sum())))
  assert got["heldout_chance"] == pytest.approx(1 / (scenes.max() + 1)) and scenes.max() + 1 == 23 + 20  # 20: 1-3 windows in each other recording's last quarter
  assert evgap_objective.evaluate(model, params, tiny("evgap_group", demo_prefix, **{"data.heldout_fraction": 0.0}),
                                  str(tmp_path)) == {}


def test_epoch_plan_uses_each_element_once_per_epoch():
  plan = feature_pipeline.EpochPlan([5, 3, 0, 7], elements_per_batch=4, windows_per_element=2, seed=1)
  assert plan.elements_per_epoch == 2 + 1 + 0 + 3 and plan.batches_per_epoch == 1
  plan = feature_pipeline.EpochPlan([5, 3, 0, 7], elements_per_batch=3, windows_per_element=1, seed=1)
  assert plan.batches_per_epoch == 5
  for epoch in range(2):
    rows = np.concatenate([plan(epoch * 5 + b)[:, :2] for b in range(5)])
    assert sorted(map(tuple, rows.tolist())) == [(r, w) for r, n in enumerate([5, 3, 0, 7]) for w in range(n)]
  with pytest.raises(ValueError, match="fewer than the 20 one batch needs"):
    feature_pipeline.EpochPlan([5, 3], elements_per_batch=20, windows_per_element=1, seed=0)


def test_stream_is_deterministic_resumable_and_split_over_hosts(demo_prefix):
  config = tiny("evgap_group", demo_prefix)
  source = feature_records.FeatureRecordSource(demo_prefix, "array_record")
  iterator = iter(feature_pipeline.make_dataset(config, source, "group"))
  first = take(iterator, 2)
  state = iterator.get_state()
  expected = take(iterator, 2)
  resumed = iter(feature_pipeline.make_dataset(config, source, "group"))
  resumed.set_state(state)
  for a, b in zip(take(resumed, 2), expected):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  hosts = [next(iter(feature_pipeline.make_dataset(config, source, "group", process_index=p, process_count=2)))
           for p in range(2)]
  for key in first[0]:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in hosts]), first[0][key], err_msg=key)


# --------------------------------------------------------------------------- model, configs, objective


def test_model_outputs_and_parameters(demo_prefix):
  config = tiny("evgap_group", demo_prefix)
  objective = objectives.resolve(config)
  model = objective.model
  variables = jax.jit(lambda rng: train.init_variables(objective, config, rng))(jax.random.key(0))
  params = variables["params"]
  assert sorted(params) == ["encoder", "group_bias", "group_log_scale", "heads", "pair_log_scale"]
  assert sorted(params["heads"]) == ["projection_0", "projection_1"]
  np.testing.assert_allclose(params["group_log_scale"], np.log10(1 / 0.7), rtol=1e-6)
  assert float(params["pair_log_scale"]) == 1.0 and float(params["group_bias"]) == -10.0
  windows = np.random.default_rng(0).normal(size=(3, 5, 8, 128)).astype(np.float32)
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  out = apply(windows)
  assert out["embeddings"].shape == (2, 3, 5, 8) and out["class_tokens"].shape == (2, 3, 5, 8)
  assert out["tokens"].shape == (3, 5, 8, 8)
  # One shared encoder: a window's embedding does not depend on what it is batched with.
  alone = apply(windows[1, 2])["embeddings"]
  np.testing.assert_allclose(alone, out["embeddings"][:, 1, 2], rtol=1e-5, atol=1e-6)


def test_paper_settings_of_both_steps():
  pair, group = load_config("evgap_pair", ""), load_config("evgap_group", "")
  assert (pair.optimizer.name, pair.optimizer.base_learning_rate, pair.global_batch_size) == ("adam", 5e-4, 200)
  assert (group.optimizer.name, group.optimizer.base_learning_rate, group.global_batch_size) == ("adamw", 1e-4, 60)
  assert group.global_batch_size % group.data.windows_per_recording == 0  # step 2 batches as step 1's: G = 10
  assert pair.optimizer.reference_batch_size == 0 and group.optimizer.reference_batch_size == 0
  assert (pair.data.window_frames, pair.data.window_stride, pair.data.windows_per_recording) == (20, 100, 10)
  assert (pair.data.min_window_scale, pair.data.max_window_scale) == (0.5, 2.0)
  assert (group.data.ego_views_per_group, group.data.exo_views_per_group) == (4, 8)
  assert (pair.model.width, pair.model.num_layers, pair.model.num_heads, pair.model.mlp_dim) == (512, 6, 8, 2048)
  assert pair.data.feature_dim == 2048 and pair.loss.auxiliary_weight == group.loss.auxiliary_weight == 0.2
  assert (pair.stage, group.stage, group.loss.group_scope) == ("pair", "group", "local")
  # Eq. 2 by default: per device, no bias, the mean over pairs; both stated scale inits read as s (t = exp(s)).
  assert group.model.group_log_scale_init == pytest.approx(np.log10(1 / 0.7)) and not group.loss.use_group_bias
  assert group.loss.group_normalization == "pairs"
  assert group.model.group_bias_init == -10.0 and pair.model.pair_log_scale_init == 1.0
  siglip = load_config("evgap_group", "small,siglip")
  assert siglip.loss.use_group_bias and siglip.loss.group_normalization == "ego" and siglip.global_batch_size == 16
  assert siglip.model.group_log_scale_init == pytest.approx(np.log(10.0)) and siglip.model.group_bias_init == -10.0
  with pytest.raises(ValueError, match="unknown config argument 'small,sig'"):
    load_config("evgap_group", "small,sig")
  assert train.parse_init_from(group.init_from) == {"encoder": ("runs/evgap_pair", "encoder"),
                                                    "heads": ("runs/evgap_pair", "heads")}
  group.pair_workdir = "runs/another_pair"  # step 1's run is named by one field; init_from follows it
  assert train.parse_init_from(group.init_from)["encoder"] == ("runs/another_pair", "encoder")
  with pytest.raises(ValueError, match="unknown config argument 'tiny'"):
    load_config("evgap_pair", "tiny")


def test_similarity_gap_matches_numpy():
  rng = np.random.default_rng(0)
  ego, exo = rng.normal(size=(3, 2, 4)), rng.normal(size=(3, 5, 4))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cos = np.einsum("amd,bnd->abmn", unit(ego), unit(exo))
  same = np.mean([cos[a, a].mean() for a in range(3)])
  other = np.mean([cos[a, b].mean() for a in range(3) for b in range(3) if a != b])
  np.testing.assert_allclose(evgap_objective.similarity_gap(ego.astype(np.float32), exo.astype(np.float32)),
                             same - other, rtol=1e-5)


def test_step_1_then_step_2_through_the_trainer(demo_prefix, tmp_path):
  pair_config = tiny("evgap_pair", demo_prefix)
  pair_state = train.train_and_evaluate(pair_config, str(tmp_path / "pair"))
  assert int(pair_state.step) == 4
  # The ring, over a data x fsdp = 4 x 2 mesh of the 8 devices.
  group_config = tiny("evgap_group", demo_prefix, **{"loss.group_scope": "global", "mesh.fsdp": 2})
  group_config.init_from = f"encoder={tmp_path / 'pair'}:encoder,heads={tmp_path / 'pair'}:heads"
  group_state = train.train_and_evaluate(group_config, str(tmp_path / "group"))
  assert int(group_state.step) == 4
  # Step 2 started from step 1's encoder: 4 AdamW steps at <= 1e-3 move no weight by more than ~4e-3,
  # while the two runs' initialisations differ by ~0.1.
  pair_encoder, group_encoder = (jax.device_get(s.params["encoder"]) for s in (pair_state, group_state))
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(pair_encoder), jax.tree.leaves(group_encoder)))
  assert moved < 5e-3
  # Scale and bias start fresh in step 2 (SigLIP parameters), not copied from step 1.
  assert abs(float(group_state.params["group_log_scale"]) - np.log10(1 / 0.7)) < 5e-3
  saved = checkpointing.latest_step_dir(str(tmp_path / "group"))
  assert saved.endswith("4")
  # Extraction from the group run's workdir alone: the config it saved at start.
  manifest = tmp_path / "views.csv"
  rows = (DEMO / "views.csv").read_text().splitlines()
  manifest.write_text("\n".join(rows[:1] + [r.replace("features/", f"{DEMO}/features/") for r in rows[1:]
                                            if r.startswith(("tree_r0,ego_0", "tree_r0,exo_1"))]) + "\n")
  written = extract.extract_manifest(run_config.resolve(str(tmp_path / "group"), None), str(tmp_path / "group"),
                                     str(manifest), str(tmp_path / "features"))
  assert np.load(written[0]).shape[1] == 8  # the encoder's width, read back from <workdir>/config.json
