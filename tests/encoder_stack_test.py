"""The +EVGAP protocol: the encoder stacked under each task model encodes windows as the encoder applied by
hand, two-view inputs view by view, loads a pre-training checkpoint, and gradients reach the encoder."""

import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egoexo_jax import checkpointing, objectives, run_config, train
from egoexo_jax.downstream import (anticipation, asformer, c2ftcn, encoder_stack, loop, ltcontext, mstcn, segmentation,
                                   tempagg)
from egoexo_jax.models.transformer import SequenceEncoder

ENCODER = SequenceEncoder(width=8, num_layers=1, num_heads=2, mlp_dim=16, max_length=8, dropout_rate=0.1)


@pytest.fixture(autouse=True, scope="module")
def rbg_keys():
  """The 'rbg' PRNG (initialisation, dropout) compiles about twice as fast on CPU as threefry; nothing here
  depends on which random numbers are drawn. Restored afterwards, as finetune_test does."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


class Identity(nn.Module):
  @nn.compact
  def __call__(self, x, mask, *, train):
    return x


def test_windows_and_views_are_encoded_as_by_hand():
  rng = np.random.default_rng(0)
  frames = rng.normal(size=(1, 10, 2 * 5)).astype(np.float32)  # two views of 5 channels, 10 frames
  mask = np.array([[1] * 9 + [0]], np.float32)
  model = encoder_stack.EncoderStack(ENCODER, Identity(), window_frames=4, num_views=2)
  params = model.init(jax.random.key(0), frames, mask, train=False)["params"]
  out = model.apply({"params": params}, frames, mask, train=False)
  assert out.shape == (1, 10, 16)
  encode = lambda x, m: ENCODER.apply({"params": params["encoder"]}, x, m, train=False)["tokens"]
  for view in range(2):
    channels = slice(5 * view, 5 * view + 5)
    # Frames 4..7 are the second window; frames 8, 9 the third, padded to 4 with frames 8 real only.
    np.testing.assert_allclose(out[0, 4:8, 8 * view:8 * view + 8], encode(frames[:, 4:8, channels],
                                                                           np.ones((1, 4), bool))[0], atol=1e-5)
    last = encode(np.pad(frames[:, 8:, channels], ((0, 0), (0, 2), (0, 0))), np.array([[1, 0, 0, 0]], bool))[0]
    np.testing.assert_allclose(out[0, 8:, 8 * view:8 * view + 8], last[:2], atol=1e-5)
  with pytest.raises(ValueError, match="split into 3 views"):
    encoder_stack.EncoderStack(ENCODER, Identity(), 4, 3).init(jax.random.key(0), frames, mask, train=False)


def test_pretrained_encoder_is_loaded(tmp_path):
  model = encoder_stack.EncoderStack(ENCODER, Identity(), window_frames=4)
  frames, mask = np.zeros((1, 8, 5), np.float32), np.ones((1, 8), np.float32)
  params = model.init(jax.random.key(0), frames, mask, train=False)["params"]
  pretrained = ENCODER.init(jax.random.key(7), frames[:, :4], train=False)["params"]
  manager = checkpointing.make_manager(str(tmp_path / "run"), max_to_keep=1, async_save=False)
  checkpointing.save(manager, 1, {"params": {"encoder": pretrained, "heads": {}}, "batch_stats": {}})
  manager.close()
  loaded = encoder_stack.load_pretrained(params, str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, loaded["encoder"], pretrained)


def heads():
  """(head, inputs after frames and mask, loss of outputs) for each task model, tiny."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, (2, 384)).astype(np.int32)
  yield (mstcn.MultiStageTCN(3, num_stages=2, num_layers=2, features=4), 384, (),
         lambda out: mstcn.mstcn_loss(out, labels, jnp.ones((2, 384))))
  yield (c2ftcn.ChunkedC2FTCN(3, chunk_size=1, encoder_widths=(4,) * 7, decoder_width=4), 384, (),
         lambda out: c2ftcn.c2f_loss(c2ftcn.ensemble_probabilities(out), labels, jnp.ones((2, 384))))
  membership = np.zeros((2, 4, 12), bool)
  for row, (a, b) in enumerate([(0, 5), (6, 11), (8, 9), (10, 11)]):
    membership[:, row, a:b + 1] = True
  yield (tempagg.TempAgg({"verb": 2, "object": 2, "action": 3}, spanning_snippets=(2,), recent_scales=1,
                         latent=4, linear=4), 12, (membership,),
         lambda out: tempagg.tempagg_loss(out, labels[:, :3]))
  yield (asformer.ASFormer(3, num_layers=2, features=4, num_decoders=1), 384, (),
         lambda out: mstcn.mstcn_loss(out, labels, jnp.ones((2, 384))))
  # LTContext: its fine-tuned run below checks that the encoder moves.


@pytest.mark.parametrize("index", range(4), ids=["mstcn", "c2ftcn", "tempagg", "asformer"])
def test_gradients_reach_the_encoder(index):
  head, length, rest, loss_of = list(heads())[index]
  model = encoder_stack.EncoderStack(ENCODER, head, window_frames=4)
  frames = np.random.default_rng(2).normal(size=(2, length, 5)).astype(np.float32)
  mask = np.ones((2, length), np.float32)
  variables = jax.jit(lambda r: model.init(r, frames, mask, *rest, train=False))(jax.random.key(0))
  others = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(params):
    kwargs = {"mutable": list(others)} if others else {}
    out = model.apply({"params": params, **others}, frames, mask, *rest, train=True,
                      rngs={"dropout": jax.random.key(1)}, **kwargs)
    return loss_of(out[0] if others else out)

  grads = jax.jit(jax.grad(loss_fn))(variables["params"])
  for name in ("encoder", "head"):
    norm = sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(grads[name]))
    assert np.isfinite(norm) and norm > 0, name
  assert float(jnp.sum(grads["encoder"]["input_projection"]["kernel"] ** 2)) > 0


def test_protocol_settings_are_checked():
  with pytest.raises(ValueError, match="unknown protocol"):
    segmentation.ProtocolSettings("linear").check()
  with pytest.raises(ValueError, match="needs encoder_checkpoint"):
    segmentation.ProtocolSettings("finetune").check()


# --------------------------------------------------------------------------- the CLIs' run(), end to end

DEMO = pathlib.Path(__file__).resolve().parent.parent / "data" / "evgap"


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  """A checkpoint of the `:small` EVGAP model (initial weights), as a pre-training run leaves one."""
  config = encoder_stack.load_config(str(DEMO.parent.parent / "configs" / "evgap_pair.py") + ":small")
  objective = objectives.resolve(config)
  model = objective.model
  params = jax.jit(lambda r: train.init_variables(objective, config, r))(jax.random.key(3))["params"]
  workdir = tmp_path_factory.mktemp("pretrained")
  manager = checkpointing.make_manager(str(workdir), max_to_keep=1, async_save=False)
  checkpointing.save(manager, 1, {"params": params, "batch_stats": {}})
  manager.close()
  run_config.save(config, str(workdir), argv=["main.py"], process_index=0)  # as the trainer does at start
  return str(workdir), params["encoder"]


def test_c2ftcn_finetuned_two_view_segmentation_run(tmp_path, pretrained_run):
  workdir, encoder = pretrained_run
  # A config that does not fit the run is refused naming the field; none: the run's saved config.
  with pytest.raises(run_config.ConfigMismatchError, match=r"in 13 field\(s\): .*model.embed_dim: saved 64, given 512"):
    encoder_stack.run_config_of(workdir, "configs/evgap_pair.py")
  config = ""
  results = segmentation.run(
      str(DEMO / "features"), str(DEMO / "segments.csv"), str(DEMO / "split.csv"), str(tmp_path),
      train_views=["ego_0+exo_0"], test_views=["ego_1+exo_2"],
      settings=segmentation.SegmentationSettings(model="c2ftcn", chunk_size=2, batch_size=6,
                                                 c2f_encoder_widths=(4,) * 7, c2f_decoder_width=4),
      loop_settings=loop.LoopSettings(epochs=1, learning_rate=1e-3),
      protocol=segmentation.ProtocolSettings("finetune", config, workdir), label="+EVGAP")
  assert results["model"] == "C2F-TCN" and results["protocol"] == "finetune" and results["num_views"] == 2
  assert results["window_frames"] == 8 and results["test_views"] == ["ego_1+exo_2"]
  assert set(results["test"]) == {"f1@10", "f1@25", "f1@50", "edit", "accuracy", "mean"}
  saved = flax.serialization.msgpack_restore((tmp_path / loop.BEST_CHECKPOINT).read_bytes())
  params, state = saved["0"], saved["1"]  # (params, model_state): C2F-TCN's BatchNorm statistics travel along
  assert "batch_stats" in state and set(params) == {"encoder", "head"}
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), params["encoder"], encoder)
  assert max(jax.tree_util.tree_leaves(moved)) > 0  # started from the checkpoint and was fine-tuned


@pytest.mark.parametrize("model, protocol, train_views, test_views", [
    ("asformer", "frozen", ["ego_0"], ["ego_0"]),
    ("ltcontext", "finetune", ["ego_0+exo_0"], ["ego_1+exo_1"])])
def test_attention_models_segmentation_runs(tmp_path, pretrained_run, model, protocol, train_views, test_views):
  """ASFormer and LTContext (EVGAP Table 2) as the other task models: frozen features (+EVGAP*) and the
  fine-tuned encoder under them (+EVGAP), single- and two-view."""
  workdir, encoder = pretrained_run
  config = str(DEMO.parent.parent / "configs" / "evgap_pair.py") + ":small"
  results = segmentation.run(
      str(DEMO / "features"), str(DEMO / "segments.csv"), str(DEMO / "split.csv"), str(tmp_path),
      train_views=train_views, test_views=test_views,
      settings=segmentation.SegmentationSettings(model=model, num_stages=2, num_layers=2, features=4, batch_size=6,
                                                 ltc_num_layers=2, ltc_window=16, ltc_stride=16),
      loop_settings=loop.LoopSettings(epochs=1, learning_rate=1e-3),
      protocol=segmentation.ProtocolSettings(protocol, config if protocol == "finetune" else "", workdir))
  assert results["model"] == segmentation.MODEL_NAMES[model] and results["protocol"] == protocol
  assert results["num_views"] == len(train_views[0].split("+")) and results["test_views"] == test_views
  assert set(results["test"]) == {"f1@10", "f1@25", "f1@50", "edit", "accuracy", "mean"}
  params = flax.serialization.msgpack_restore((tmp_path / loop.BEST_CHECKPOINT).read_bytes())
  if protocol == "finetune":
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), params["encoder"], encoder)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
  else:
    assert "encoder" not in params and "stage_0" in params


def test_tempagg_novel_view_anticipation_run(tmp_path):
  snippets = tempagg.SnippetSettings(spanning_seconds=1.2, spanning_snippets=(3, 2), recent_seconds=(0.6, 0.3),
                                     min_observed_seconds=0.3)
  results = anticipation.run(
      str(DEMO / "features"), str(DEMO / "segments.csv"), str(DEMO / "split.csv"), str(tmp_path),
      train_views=["ego_0", "exo_0"], test_views=["exo_2"],
      settings=anticipation.AnticipationSettings(fps=29.97, anticipation_seconds=0.3, model="tempagg", snippets=snippets,
                                                 latent=8, linear=8, batch_size=16),
      loop_settings=loop.LoopSettings(epochs=2, learning_rate=1e-3, lr_decay_epochs=(1,)))
  assert results["model"] == "TempAgg" and results["protocol"] == "frozen"
  assert results["train_views"] == ["ego_0", "exo_0"] and results["test_views"] == ["exo_2"]
  assert results["examples"]["test"] > 0 and len(results["history"]) == 2
  assert results["test"]["verb_recall@5"] == 100.0  # 3 verbs: always in the top 5
