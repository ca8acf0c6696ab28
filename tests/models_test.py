"""ResNet-3D, heads and the Ego-Exo model: sizes by jax.eval_shape, behaviour on a tiny config."""

import functools

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from egoexo_jax.models import build_model, egoexo, resnet3d

TINY = dict(num_classes=5, num_object_classes=7, backbone_args=dict(stage_blocks=(1, 1, 1, 1), width=8),
            interaction_channels=16)
TINY_CLIPS_SHAPE = (2, 4, 64, 64, 3)


def init(module, x):
  """module.init under jit. The rbg PRNG compiles several times faster than threefry on CPU."""
  return jax.jit(lambda x: module.init(jax.random.key(0, impl="rbg"), x, train=False))(x)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def slow_resnet_param_count(stage_blocks, width, temporal_kernels, num_classes):
  """Conv weights + BN (gamma, beta) + linear head, counted by hand."""
  total = 7 * 7 * 3 * width + 2 * width  # stem
  in_width = width
  for stage, (num_blocks, kt) in enumerate(zip(stage_blocks, temporal_kernels)):
    inner = width * 2**stage
    out = 4 * inner
    for block in range(num_blocks):
      total += kt * in_width * inner + 9 * inner * inner + inner * out + 2 * (inner + inner + out)
      if block == 0:
        total += in_width * out + 2 * out
      in_width = out
  return total + in_width * num_classes + num_classes


def test_slow_r50_has_about_32_5m_parameters_and_res5_is_7x7x2048():
  clips = jax.ShapeDtypeStruct((1, 8, 224, 224, 3), jnp.float32)
  model = egoexo.Model(num_classes=400, use_ego_heads=False)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), clips)
  num_params = count(variables["params"])
  print(f"Slow-only R50 8x8 with a 400-way head: {num_params:,} parameters")
  expected = slow_resnet_param_count((3, 4, 6, 3), 64, (1, 1, 3, 3), 400)
  assert num_params == expected
  assert abs(num_params - 32.45e6) <= 0.005 * 32.45e6  # PySlowFast model zoo: 32.45M

  backbone = resnet3d.ResNet3D(**resnet3d.SLOW_R50)
  (res5,), _ = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x, train=False), clips)
  assert res5.shape == (1, 8, 7, 7, 2048)


@pytest.fixture(scope="module")
def tiny():
  """The tiny model, clips (2, 4, 64, 64, 3), its variables and a jitted apply(variables, x, dropout_key, train)."""
  model = egoexo.Model(**TINY)
  clips = jax.random.normal(jax.random.key(1), TINY_CLIPS_SHAPE)

  @functools.partial(jax.jit, static_argnames="train")
  def apply(variables, x, dropout_key, train):
    return model.apply(variables, x, train=train, mutable=["batch_stats"], rngs={"dropout": dropout_key})

  return model, clips, init(model, clips), apply


def test_tiny_model_output_shapes(tiny):
  _, clips, variables, apply = tiny
  outputs, _ = apply(variables, clips, jax.random.key(2), train=True)
  assert {k: v.shape for k, v in outputs.items()} == {
      "action": (2, 5), "ego_score": (2, 2), "object": (2, 7), "interaction": (2, 4, 2, 2, 2), "features": (2, 256)}
  assert all(v.dtype == jnp.float32 for v in outputs.values())

  action_only = egoexo.Model(**TINY, use_ego_heads=False)
  shapes = jax.eval_shape(lambda x: action_only.init_with_output(jax.random.key(0), x, train=False)[0], clips)
  assert set(shapes) == {"action", "features"}


def test_batch_stats_update_in_train_only(tiny):
  _, clips, variables, apply = tiny
  _, train_state = apply(variables, clips, jax.random.key(2), train=True)
  _, eval_state = apply(variables, clips, jax.random.key(2), train=False)
  old, trained, evaluated = (jax.tree.leaves(v["batch_stats"]) for v in (variables, train_state, eval_state))
  assert all(not np.allclose(a, b) for a, b in zip(old, trained))
  assert all(np.array_equal(a, b) for a, b in zip(old, evaluated))


def test_dropout_only_in_train(tiny):
  _, clips, variables, _ = tiny
  model = egoexo.Model(**{**TINY, "dropout_rate": 0.5})  # the pre-training recipe sets 0 (configs/recipe_egoexo.py)
  apply = jax.jit(lambda v, x, key, train: model.apply(v, x, train=train, mutable=["batch_stats"],
                                                       rngs={"dropout": key}), static_argnames="train")
  action = lambda key, train: apply(variables, clips, key, train=train)[0]["action"]
  np.testing.assert_array_equal(action(jax.random.key(3), False), action(jax.random.key(4), False))
  assert not np.allclose(action(jax.random.key(3), True), action(jax.random.key(4), True))


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_outputs(tiny):
  _, clips, variables, _ = tiny
  model = egoexo.Model(**TINY, dtype=jnp.bfloat16)
  bf16_variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), clips)
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16_variables)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.structure(bf16_variables) == jax.tree.structure(variables)

  outputs, state = jax.jit(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=lambda mdl, _: isinstance(mdl, resnet3d.ResNet3D)))(variables, clips)
  assert {v.dtype for v in outputs.values()} == {jnp.dtype(jnp.float32)}
  assert state["intermediates"]["backbone"]["__call__"][0][0].dtype == jnp.bfloat16  # res5 features


def test_final_batch_norm_zero_init_makes_each_block_its_shortcut(tiny):
  _, _, variables, _ = tiny
  backbone = variables["params"]["backbone"]
  blocks = [name for name in backbone if "_block" in name]
  assert len(blocks) == 4
  assert all(np.all(backbone[name]["bn_c"]["scale"] == 0) for name in blocks)

  block = resnet3d.Bottleneck(inner_width=4, out_width=16, temporal_kernel=3)
  x = jax.nn.relu(jax.random.normal(jax.random.key(5), (2, 4, 6, 6, 16)))  # a previous block's output
  y = block.apply(init(block, x), x, train=False)
  np.testing.assert_array_equal(y, x)  # identity shortcut, residual branch 0: relu(x) = x


def test_batch_sharded_over_8_devices_matches_one_device(tiny):
  _, _, variables, apply = tiny
  clips = jax.random.normal(jax.random.key(6), (8,) + TINY_CLIPS_SHAPE[1:])
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharded_clips = jax.device_put(clips, NamedSharding(mesh, PartitionSpec("data")))
  want = apply(variables, clips, jax.random.key(2), train=True)
  got = apply(variables, sharded_clips, jax.random.key(2), train=True)
  assert len(got[0]["action"].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_build_model_finds_the_module_by_name():
  config = ml_collections.ConfigDict(dict(name="egoexo", **TINY, dtype="bfloat16"))
  model = build_model(config)
  assert isinstance(model, egoexo.Model)
  assert model.dtype == jnp.bfloat16 and model.num_classes == 5 and model.backbone_args["stage_blocks"] == (1, 1, 1, 1)
  with pytest.raises(ModuleNotFoundError):
    build_model(ml_collections.ConfigDict(dict(name="no_such_model", num_classes=5)))


@pytest.mark.parametrize("kernel_size,strides", [((1, 3, 3), (1, 2, 2)), ((1, 7, 7), (1, 2, 2)),
                                                 ((3, 1, 1), (1, 1, 1)), ((1, 1, 1), (1, 1, 1))])
def test_conv3d_equals_a_3d_convolution_with_the_same_kernel(kernel_size, strides):
  # Convs with kt = 1 run as 2-D convs over B*T frames; the result must be the 3-D conv's.
  from egoexo_jax.models.resnet3d import Conv3D
  x = jax.random.normal(jax.random.key(0), (2, 4, 9, 10, 5))
  conv = Conv3D(6, kernel_size, strides)
  params = conv.init(jax.random.key(1), x)
  assert params["params"]["kernel"].shape == (*kernel_size, 5, 6)
  reference = nn.Conv(6, kernel_size, strides, padding=[(k // 2, k // 2) for k in kernel_size], use_bias=False)
  np.testing.assert_allclose(conv.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
