"""Fine-tuning: model heads, clip labels and test views against hand-worked cases, the loss against NumPy,
and a pre-train -> fine-tune run on the shipped clips that carries the backbone over and not the heads."""

import io
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from conftest import model_grid, tiny_config
from testlib import load_config, tiny_finetune_config
from egoexo_jax import checkpointing, objectives, train
from egoexo_jax.input import convert, finetune_pipeline, records, stream
from egoexo_jax.objectives import egoexo as egoexo_objective
from egoexo_jax.objectives import finetune as finetune_objective

ROOT = pathlib.Path(__file__).resolve().parent.parent

@pytest.fixture(autouse=True, scope="module")
def rbg_keys():
  """The 'rbg' PRNG compiles several times faster on CPU than threefry (the trainer's keys come from
  jax.random.key); restored afterwards so other test modules keep the default."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


def png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")  # lossless, so pixel values survive decoding
  return buffer.getvalue()


def coded_record(num_frames=20, height=24, width=40, labels=(3,), fps=10.0, video_id="v"):
  """Frames whose red, green and blue channels are 5 x column, 10 x frame index and 5 x row (mod 256)."""
  frames = []
  for t in range(num_frames):
    frame = np.zeros((height, width, 3), np.int64)
    frame[..., 0], frame[..., 1], frame[..., 2] = 5 * np.arange(width)[None], 10 * t, 5 * np.arange(height)[:, None]
    frames.append(png((frame % 256).astype(np.uint8)))
  return records.VideoRecord(video_id=video_id, fps=fps, height=height, width=width, frames=frames,
                             labels=np.asarray(labels, np.int64))


# --------------------------------------------------------------------------- configs


def test_configs_carry_the_released_recipes():
  charades, epic100, epic55 = (load_config(n, "") for n in ("finetune_charades_ego", "finetune_epic100",
                                                             "finetune_epic55"))
  assert (charades.optimizer.schedule, charades.optimizer.base_learning_rate) == ("cosine", 0.25)
  assert charades.num_train_steps == int(np.ceil(60 * 3085 / 64)) and charades.eval.ensemble == "max"
  assert charades.data.label_kind == "multi_label" and dict(charades.model.num_classes) == {"action": 157}
  assert (epic100.optimizer.schedule, epic100.optimizer.base_learning_rate, epic100.optimizer.decay_factor) == (
      "steps", 0.02, 0.1)
  per_epoch = 67217 / 64
  assert epic100.optimizer.decay_steps == (int(np.ceil(20 * per_epoch)), int(np.ceil(25 * per_epoch)))
  assert epic100.num_train_steps == int(np.ceil(30 * per_epoch)) and epic100.eval.ensemble == "mean"
  assert tuple(epic100.data.label_layout) == ("verb", "noun") and dict(epic100.model.num_classes) == {
      "verb": 97, "noun": 300}
  assert dict(epic55.model.num_classes) == {"verb": 125, "noun": 352} and epic55.optimizer.base_learning_rate == 0.01
  for config in (charades, epic100, epic55):
    assert (config.data.clip_length, config.data.frame_stride, config.data.crop_size) == (8, 8, 224)
    assert (config.eval.num_clips, config.eval.num_crops, config.eval.short_side) == (10, 3, 256)
    assert not config.model.use_interaction_head and config.loss.weight_interaction == 0
  assert load_config("finetune_charades_ego", "star").loss.weight_interaction == 0.1
  star = load_config("finetune_epic100", "small,star")
  assert star.loss.weight_interaction == 3.0 and star.model.use_interaction_head
  assert star.optimizer.decay_steps == (66, 83) and star.num_train_steps == 100
  with pytest.raises(ValueError, match="unknown config argument 'small,tiny'"):
    load_config("finetune_epic55", "small,tiny")


# --------------------------------------------------------------------------- model


def test_model_has_one_head_per_label_set_and_an_optional_interaction_head():
  config = tiny_finetune_config(arg="small,star")
  model = objectives.resolve(config).model
  clips = jnp.zeros((2, 4, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), clips, train=False))
  outputs = jax.eval_shape(lambda v: model.apply(v, clips, train=False), variables)
  assert outputs["verb"].shape == (2, 97) and outputs["noun"].shape == (2, 300)
  assert outputs["interaction"].shape == (2, *egoexo_objective.interaction_grid(model, config), 2)
  assert sorted(variables["params"]) == ["backbone", "interaction_head", "noun_head", "verb_head"]
  charades = objectives.resolve(tiny_finetune_config("finetune_charades_ego")).model
  params = jax.eval_shape(lambda: charades.init(jax.random.key(0), clips, train=False))["params"]
  assert sorted(params) == ["action_head", "backbone"]  # Ego-Exo's names: init_from finds the backbone


def np_window_pool(maps, train_crop, input_size):
  """NumPy: each (B, t, h, w, C) map averaged over every (t, kh, kw) window, stride 1 (kh = h * crop // H)."""
  pooled = []
  for x in maps:
    _, t, h, w, _ = x.shape
    kh, kw = min(h, h * train_crop // input_size), min(w, w * train_crop // input_size)
    windows = [[x[:, :, i:i + kh, j:j + kw].mean(axis=(1, 2, 3)) for j in range(w - kw + 1)] for i in range(h - kh + 1)]
    pooled.append(np.stack([np.stack(row, 1) for row in windows], 1))  # (B, h', w', C)
  return np.concatenate(pooled, -1)


def test_fully_convolutional_test_forward_matches_numpy(name="finetune_epic100"):
  """evaluate's forward with window_crop against NumPy on the model's own res5 maps: window pooling,
  the linear head at every position, softmax there (sigmoid for multi-label: import_weights_test checks
  it against torch), the mean over positions; and its distance to global pooling then the head, on a
  real clip (printed)."""
  from conftest import decode_real_frames  # pylint: disable=g-import-not-at-top
  from egoexo_jax import evaluate, sharding  # pylint: disable=g-import-not-at-top
  from egoexo_jax.input import transforms  # pylint: disable=g-import-not-at-top

  config = tiny_finetune_config(name)
  model = objectives.resolve(config).model
  frames = np.stack(decode_real_frames("cup.mp4", 4, 96))
  views = np.stack([frames[:, :96, :96], frames[:, -96:, -96:]])  # a 96 test crop, training crop 64
  variables = model.init(jax.random.key(1), jnp.zeros((1, 4, 64, 64, 3)), train=False)
  variables = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), variables)
  heads = finetune_pipeline.head_sizes(config)
  multi_label = config.data.label_kind == "multi_label"
  mesh = sharding.make_mesh(1)
  on_mesh = jax.device_put(variables, sharding.replicated(mesh))
  got = evaluate.make_forward(model, on_mesh, mesh, jnp.float32, heads, multi_label, window_crop=64)(views)
  pooled = evaluate.make_forward(model, on_mesh, mesh, jnp.float32, heads, multi_label)(views)

  _, state = model.apply(variables, transforms.normalize_clips(views, jnp.float32), train=False,
                         capture_intermediates=lambda module, _: module.name == "backbone")
  maps = [np.asarray(m, np.float64) for m in state["intermediates"]["backbone"]["__call__"][0]]
  assert maps[0].shape[2:4] == (3, 3)  # 96 / 32: a 2 x 2 grid of 2 x 2 windows
  features = np_window_pool(maps, 64, 96)
  for head, _ in heads:
    linear = variables["params"][f"{head}_head"]["linear"]
    logits = features @ np.asarray(linear["kernel"], np.float64) + np.asarray(linear["bias"], np.float64)
    if multi_label:
      probabilities = 1 / (1 + np.exp(-logits))
    else:
      probabilities = np.exp(logits - logits.max(-1, keepdims=True))
      probabilities /= probabilities.sum(-1, keepdims=True)
    want = probabilities.mean(axis=(1, 2))
    np.testing.assert_allclose(got[head], want, rtol=1e-5, atol=1e-7)
    difference = np.linalg.norm(pooled[head] - want) / np.linalg.norm(want)
    print(f"{name} {head}: fully convolutional vs global pooling, relative L2 difference {difference:.4f}")
    assert difference > 1e-4


# --------------------------------------------------------------------------- labels and views


def test_clip_labels_come_from_the_intervals_the_clip_overlaps():
  config = tiny_finetune_config("finetune_charades_ego")
  intervals = {"v": np.array([[3, 0.0, 1.0], [7, 2.0, 4.0], [9, 4.5, 5.0]])}
  record = coded_record(num_frames=50, labels=(3, 7, 9))  # 10 frames/s: frame i at i / 10 s
  heads = finetune_pipeline.head_sizes(config)
  with_intervals = finetune_pipeline.FinetuneTrainTransform(heads, "multi_label", label_intervals=intervals)
  without = finetune_pipeline.FinetuneTrainTransform(heads, "multi_label")
  cases = {(0, 9): [3], (10, 19): [3], (11, 19): [], (15, 35): [7], (38, 44): [7], (40, 46): [7, 9],
           (0, 49): [3, 7, 9]}
  for (first, last), expected in cases.items():
    target = with_intervals.clip_labels(record, np.array([first, last]))
    assert target.shape == (157,) and target.dtype == np.float32
    assert list(np.flatnonzero(target)) == expected, (first, last)
  assert list(np.flatnonzero(without.clip_labels(record, np.array([0, 9])))) == [3, 7, 9]  # the video's set
  with pytest.raises(stream.ConfigMismatchError, match="record 'w' has no entry"):
    with_intervals.clip_labels(coded_record(video_id="w"), np.array([0, 1]))


def test_per_head_labels_remove_the_concatenated_space_offsets():
  heads = (("verb", 97), ("noun", 300))
  record = coded_record(labels=(5, 97 + 12))
  np.testing.assert_array_equal(finetune_pipeline.record_labels(record, heads, "single"), [5, 12])
  with pytest.raises(stream.ConfigMismatchError, match=r"label 97 of head 0 is outside \[0, 97\), the 'verb' classes"):
    finetune_pipeline.record_labels(coded_record(labels=(97, 100)), heads, "single")
  with pytest.raises(stream.ConfigMismatchError, match=r"label 5 of head 1 is outside \[97, 397\), the 'noun' classes"):
    finetune_pipeline.record_labels(coded_record(labels=(3, 5)), heads, "single")
  with pytest.raises(stream.ConfigMismatchError, match="config has 2 heads"):
    finetune_pipeline.record_labels(coded_record(labels=(3,)), heads, "single")
  with pytest.raises(stream.ConfigMismatchError, match=r"not all in \[0, 157\)"):
    finetune_pipeline.record_labels(coded_record(labels=(157,)), (("action", 157),), "multi_label")


def test_train_examples_have_fixed_shapes_and_maps_in_star_mode():
  config = tiny_finetune_config(arg="small,star")
  grid = model_grid(config)
  transform = finetune_pipeline.finetune_transform(config, grid)
  record = coded_record(num_frames=12, height=72, width=96, labels=(23, 97 + 13))
  record.hand_boxes = np.array([[f, 0.1, 0.1, 0.9, 0.9, 0.8] for f in range(12)], np.float32)
  example = transform.random_map(record, np.random.default_rng(0))
  assert example["clips"].shape == (4, 64, 64, 3) and example["clips"].dtype == np.uint8
  np.testing.assert_array_equal(example["labels"], [23, 13])
  assert example["interaction_map"].shape == (*grid, 2)
  assert example["has_interaction"] == 1 and example["interaction_map"][..., 0].max() == pytest.approx(0.8)
  with pytest.raises(ValueError, match="model.use_interaction_head draws interaction maps"):
    finetune_pipeline.finetune_transform(config, None)


def test_views_follow_pyslowfast_crops_and_both_clip_placements():
  record = coded_record(num_frames=20, height=24, width=40)  # landscape: left / centre / right
  views = finetune_pipeline.multi_view_clips(record, clip_length=3, frame_stride=2, num_clips=4, num_crops=3,
                                             short_side=24, crop_size=24, placement="spread")
  assert views.shape == (12, 3, 24, 24, 3)
  # span 5, delta 15: 'spread' starts round(15 i / 3) = 0, 5, 10, 15; crops at x = 0, ceil(16 / 2) = 8, 16.
  for clip, start in enumerate([0, 5, 10, 15]):
    for crop, x in enumerate([0, 8, 16]):
      view = views[clip * 3 + crop]
      np.testing.assert_array_equal(view[:, 0, 0, 1], 10 * (start + 2 * np.arange(3)))
      np.testing.assert_array_equal(view[0, 0, :, 0], 5 * (x + np.arange(24)))
  kinetics = finetune_pipeline.multi_view_clips(record, clip_length=3, frame_stride=2, num_clips=4, num_crops=1,
                                                short_side=24, crop_size=24, placement="kinetics")
  np.testing.assert_array_equal(kinetics[:, 0, 0, 0, 1], 10 * np.array([0, 3, 7, 11]))  # floor(15 i / 4)
  np.testing.assert_array_equal(kinetics[0, 0, 0, :, 0], 5 * (8 + np.arange(24)))  # one crop: the centre
  portrait = finetune_pipeline.multi_view_clips(coded_record(height=40, width=24), clip_length=1, frame_stride=1,
                                                num_clips=1, num_crops=3, short_side=24, crop_size=24)
  np.testing.assert_array_equal(portrait[:, 0, :, 0, 2], 5 * (np.array([0, 8, 16])[:, None] + np.arange(24)))
  assert finetune_pipeline.scaled_size(480, 640, 256) == (256, 341)  # long side floor(640 / 480 * 256)
  assert finetune_pipeline.scaled_size(640, 480, 256) == (341, 256)


# --------------------------------------------------------------------------- loss


def np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_classification_loss_matches_numpy():
  rng = np.random.default_rng(0)
  verb, noun = rng.normal(size=(6, 5)), rng.normal(size=(6, 7))
  labels = np.stack([rng.integers(0, 5, 6), rng.integers(0, 7, 6)], axis=1)
  total, scalars = finetune_objective.classification_loss(
      {"verb": jnp.asarray(verb), "noun": jnp.asarray(noun)}, jnp.asarray(labels), (("verb", 5), ("noun", 7)), "single")
  rows = np.arange(6)
  expected_verb = -np_log_softmax(verb)[rows, labels[:, 0]].mean()
  expected_noun = -np_log_softmax(noun)[rows, labels[:, 1]].mean()
  assert float(total) == pytest.approx(expected_verb + expected_noun, rel=1e-5)
  both = (verb.argmax(1) == labels[:, 0]) & (noun.argmax(1) == labels[:, 1])
  assert float(scalars["accuracy_action"]) == pytest.approx(both.mean())
  logits, targets = rng.normal(size=(4, 9)), (rng.uniform(size=(4, 9)) < 0.3).astype(np.float32)
  bce, scalars = finetune_objective.classification_loss({"action": jnp.asarray(logits)}, jnp.asarray(targets),
                                                        (("action", 9),), "multi_label")
  p = 1 / (1 + np.exp(-logits))
  assert float(bce) == pytest.approx(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(), rel=1e-5)
  assert float(scalars["top1_precision"]) == pytest.approx(targets[np.arange(4), logits.argmax(1)].mean())


# --------------------------------------------------------------------------- pre-train -> fine-tune


@pytest.fixture(scope="module")
def pretrained_workdir(real_record_pattern, tmp_path_factory):
  """A tiny Ego-Exo pre-training run (2 steps, one device: a quicker compile) on real-clip records."""
  workdir = tmp_path_factory.mktemp("pretrain")
  config = tiny_config(real_record_pattern, num_train_steps=2, **{"mesh.num_devices": 1})
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def epic_records(tmp_path_factory):
  """The shipped EPIC-100-format training segments, converted with the stand-in detector boxes."""
  prefix = tmp_path_factory.mktemp("epic") / "train"
  report = convert.convert_manifest(str(ROOT / "data/finetune/epic100_train_manifest.csv"), str(prefix),
                                    short_side=72, hand_object_dir=str(ROOT / "data/pseudo_labels/hand_object/clips"))
  assert report.written == 8 and not report.without_boxes
  return f"{prefix}.tfrecord-*"


def test_finetune_starts_from_the_pretrained_backbone_with_new_heads(pretrained_workdir, epic_records, tmp_path,
                                                                    monkeypatch):
  config = tiny_finetune_config(arg="small,star", **{"data.train_records": epic_records})
  config.init_from = f"backbone={pretrained_workdir},interaction_head={pretrained_workdir}:interaction_head"
  seen = {"terms": []}

  def record_initialization(state, *args):
    seen["fresh"] = jax.device_get(state)
    seen["loaded"] = jax.device_get(real_initialize(state, *args))
    return real_initialize(state, *args)

  def record_terms(step, terms, *args):
    seen["terms"].append({k: float(v) for k, v in jax.device_get(terms).items()})
    real_check_finite(step, terms, *args)

  real_initialize, real_check_finite = train.initialize_from_checkpoints, train.check_finite
  monkeypatch.setattr(train, "initialize_from_checkpoints", record_initialization)
  monkeypatch.setattr(train, "check_finite", record_terms)
  final = train.train_and_evaluate(config, str(tmp_path))  # 3 steps through the one trainer

  saved = ocp.StandardCheckpointer().restore(checkpointing.latest_step_dir(str(pretrained_workdir)) + "/state")
  same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))
  fresh, loaded = seen["fresh"], seen["loaded"]
  assert same(loaded.params["backbone"], saved["params"]["backbone"])
  assert same(loaded.batch_stats["backbone"], saved["batch_stats"]["backbone"])
  assert same(loaded.params["interaction_head"], saved["params"]["interaction_head"])
  assert not same(fresh.params["backbone"], saved["params"]["backbone"])
  for head in ("verb_head", "noun_head"):  # new heads: as initialised, not from the checkpoint
    assert same(loaded.params[head], fresh.params[head]) and head not in saved["params"]
  assert int(final.step) == 3
  assert not same(jax.device_get(final.params["verb_head"]), fresh.params["verb_head"])

  terms = seen["terms"][-1]
  assert all(np.isfinite(v) for v in terms.values()) and terms["loss_interaction"] > 0
  assert terms["loss"] == pytest.approx(terms["loss_verb"] + terms["loss_noun"] + 2 * 3.0 * terms["loss_interaction"],
                                        rel=1e-5)
  assert seen["terms"][0]["loss_verb"] == pytest.approx(np.log(97), rel=0.05)  # new heads start near uniform
  batch = next(iter(finetune_pipeline.make_train_dataset(config, epic_records, grid=model_grid(config))))
  assert batch["labels"].shape == (8, 2) and batch["labels"][:, 0].max() < 97 and batch["labels"][:, 1].max() < 300
  assert batch["has_interaction"].min() == 1 and batch["interaction_map"].max() > 0
