"""The 3-D CNN backbones: parameter counts against published ones, shapes, SlowFast's frame choice and
lateral connections, TSM's shift against NumPy, and a tiny forward of every architecture."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from egoexo_jax.models import backbones, egoexo, resnet3d, slowfast

# Parameters of egoexo.Model(num_classes=400, use_ego_heads=False, backbone=...): measured, and the
# published count where there is one (PyTorchVideo model zoo; TSM paper, Table 1: 24.3M).
PARAMETER_COUNTS = {
    "slow_r50": (32_454_096, 32.45e6),
    "slow_r101": (60_359_120, None),  # not published: PySlowFast and PyTorchVideo release no Slow R101
    "slowfast_r50": (34_566_488, 34.57e6),
    "slowfast_r101": (62_826_968, 62.83e6),
    "i3d_r50": (28_043_472, 28.04e6),
    "r3d_50": (46_980_944, None),  # none found for this layout (3x7x7 stem, no temporal stride)
    "tsm_r50": (24_327_632, 24.3e6),
}
# res5 shapes per pathway at 224 x 224 for a clip of T frames: (T, [(t, h, w, C) per pathway]).
RES5_SHAPES = {
    "slow_r50": (8, [(8, 7, 7, 2048)]),
    "slow_r101": (8, [(8, 7, 7, 2048)]),
    "slowfast_r50": (32, [(8, 7, 7, 2048), (32, 7, 7, 256)]),
    "slowfast_r101": (32, [(8, 7, 7, 2048), (32, 7, 7, 256)]),
    "i3d_r50": (8, [(4, 7, 7, 2048)]),
    "r3d_50": (8, [(8, 7, 7, 2048)]),
    "tsm_r50": (8, [(8, 7, 7, 2048)]),
}


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_registry_has_every_cnn():
  assert set(PARAMETER_COUNTS) <= set(backbones.BACKBONES)


@pytest.mark.parametrize("arch", sorted(PARAMETER_COUNTS))
def test_parameter_count_and_res5_shapes(arch):
  num_frames, res5_shapes = RES5_SHAPES[arch]
  clips = jax.ShapeDtypeStruct((1, num_frames, 224, 224, 3), jnp.float32)
  model = egoexo.Model(num_classes=400, use_ego_heads=False, backbone=arch)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), clips)
  measured, published = PARAMETER_COUNTS[arch]
  print(f"{arch}: {count(variables['params']):,} parameters with a 400-way head"
        + (f" (published {published / 1e6:.2f}M)" if published else ""))
  assert count(variables["params"]) == measured
  if published:
    assert abs(measured - published) <= 0.005 * published

  backbone = backbones.build_backbone(arch, dtype=jnp.bfloat16)
  pathways = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x, train=False)[0], clips)
  assert [p.shape[1:] for p in pathways] == res5_shapes
  assert all(p.dtype == jnp.bfloat16 for p in pathways)


def conv_a_temporal_kernels(params, prefix=""):
  """{stage: [kt of conv_a of each block]} read from a backbone's parameter shapes."""
  kernels = {stage: [] for stage in range(2, 6)}
  for stage, block_kernels in kernels.items():
    while (block := f"{prefix}res{stage}_block{len(block_kernels)}") in params:
      block_kernels.append(params[block]["conv_a"]["kernel"].shape[0])
  return kernels


def abstract_backbone_params(arch, num_frames=8):
  backbone = backbones.build_backbone(arch, name=None)
  clips = jax.ShapeDtypeStruct((1, num_frames, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x, train=False), clips)["params"]


def test_temporal_kernels_follow_pyslowfast_and_the_papers():
  i3d = abstract_backbone_params("i3d_r50")  # PySlowFast _TEMPORAL_KERNEL_BASIS['i3d'], 5x7x7 stem
  assert i3d["stem"]["conv"]["kernel"].shape[:3] == (5, 7, 7)
  assert conv_a_temporal_kernels(i3d) == {2: [3, 3, 3], 3: [3, 1, 3, 1], 4: [3, 1, 3, 1, 3, 1], 5: [1, 3, 1]}

  slow = abstract_backbone_params("slow_r50")
  assert conv_a_temporal_kernels(slow) == {2: [1] * 3, 3: [1] * 4, 4: [3] * 6, 5: [3] * 3}

  r3d = abstract_backbone_params("r3d_50")  # 3x3x3 middle convs throughout, 3x7x7 stem
  assert r3d["stem"]["conv"]["kernel"].shape[:3] == (3, 7, 7)
  blocks = [b for b in r3d if "_block" in b]
  assert len(blocks) == 16 and all(r3d[b]["conv_b"]["kernel"].shape[:3] == (3, 3, 3) for b in blocks)
  assert all(r3d[b][c]["kernel"].shape[:3] == (1, 1, 1) for b in blocks for c in ("conv_a", "conv_c"))

  tsm = abstract_backbone_params("tsm_r50")  # a 2-D ResNet-50: every kernel has kt = 1
  assert {leaf.shape[0] for leaf in jax.tree.leaves(tsm) if leaf.ndim == 5} == {1}

  fast = abstract_backbone_params("slowfast_r50", num_frames=32)  # _TEMPORAL_KERNEL_BASIS['slowfast']
  assert fast["slow_stem"]["conv"]["kernel"].shape[:3] == (1, 7, 7)
  assert fast["fast_stem"]["conv"]["kernel"].shape[:3] == (5, 7, 7)
  assert conv_a_temporal_kernels(fast, "slow_") == {2: [1] * 3, 3: [1] * 4, 4: [3] * 6, 5: [3] * 3}
  assert conv_a_temporal_kernels(fast, "fast_") == {2: [3] * 3, 3: [3] * 4, 4: [3] * 6, 5: [3] * 3}


@pytest.mark.parametrize("alpha", [2, 4, 8])
def test_slow_frames_are_pyslowfasts_linspace_choice(alpha):
  for num_frames in range(alpha, 129, alpha):
    want = torch.linspace(0, num_frames - 1, num_frames // alpha).long().numpy()
    np.testing.assert_array_equal(slowfast.slow_frame_indices(num_frames, alpha), want, err_msg=f"T={num_frames}")
  np.testing.assert_array_equal(slowfast.slow_frame_indices(32, 4), [0, 4, 8, 13, 17, 22, 26, 31])


def test_slowfast_lateral_connections():
  """Each fusion: conv (7, 1, 1) with temporal stride 4 to 2x the Fast width, concatenated to Slow."""
  model = backbones.build_backbone("slowfast_r50")
  clips = jax.ShapeDtypeStruct((2, 32, 224, 224, 3), jnp.float32)
  capture = lambda module, _: isinstance(module, (slowfast.FastToSlowFusion, resnet3d.Conv3D)) and (
      isinstance(module, slowfast.FastToSlowFusion) or module.parent.name.startswith("fuse_"))
  _, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False, capture_intermediates=capture), clips)
  outputs = variables["intermediates"]
  # (fusion, fast input channels, slow channels before, spatial size)
  for name, fast_channels, slow_channels, size in (("fuse_stem", 8, 64, 56), ("fuse_res2", 32, 256, 56),
                                                   ("fuse_res3", 64, 512, 28), ("fuse_res4", 128, 1024, 14)):
    assert variables["params"][name]["conv"]["kernel"].shape == (7, 1, 1, fast_channels, 2 * fast_channels)
    assert outputs[name]["conv"]["__call__"][0].shape == (2, 8, size, size, 2 * fast_channels)
    assert outputs[name]["__call__"][0].shape == (2, 8, size, size, slow_channels + 2 * fast_channels)
  # The first Slow block of each stage takes the fused width: 64 + 16 = 80 into res2, 256 + 64 into res3, ...
  for stage, width in ((2, 80), (3, 320), (4, 640), (5, 1280)):
    assert variables["params"][f"slow_res{stage}_block0"]["conv_a"]["kernel"].shape[3] == width

  r101 = backbones.backbone_arguments("slowfast_r101")[1]
  assert (r101["fusion_kernel"], r101["stage_blocks"]) == (5, (3, 4, 23, 3))  # PySlowFast SLOWFAST_8x8_R101


def test_slowfast_rejects_a_clip_length_not_divisible_by_alpha():
  model = backbones.build_backbone("slowfast_r50", dict(stage_blocks=(1, 1, 1, 1), width=16))
  with pytest.raises(ValueError, match="multiple of alpha = 4, got 10"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 10, 64, 64, 3), jnp.float32))


def numpy_temporal_shift(x, fold_div=8):
  """TSM's reference shift, written with index loops: out[t, :f] = x[t + 1], out[t, f:2f] = x[t - 1]."""
  out = np.zeros_like(x)
  fold = x.shape[-1] // fold_div
  num_frames = x.shape[1]
  for t in range(num_frames):
    if t + 1 < num_frames:
      out[:, t, ..., :fold] = x[:, t + 1, ..., :fold]
    if t >= 1:
      out[:, t, ..., fold:2 * fold] = x[:, t - 1, ..., fold:2 * fold]
    out[:, t, ..., 2 * fold:] = x[:, t, ..., 2 * fold:]
  return out


@pytest.mark.parametrize("kernel,stride", [
    ((1, 3, 3), (1, 2, 2)),  # runs as a 2-D conv over B*T frames
    ((3, 1, 1), (1, 1, 1)),  # runs as a 2-D conv over a (T, H*W) image: Slow-only's temporal conv_a
    ((5, 1, 1), (4, 1, 1)),  # the same, time-strided: SlowFast's lateral fusion
    ((3, 3, 3), (1, 2, 2)),  # a true 3-D conv (R3D)
])
def test_conv3d_matches_torch_conv3d(kernel, stride):
  """Every path of Conv3D computes PyTorch's conv3d with padding k // 2."""
  x = np.random.default_rng(1).normal(size=(2, 8, 6, 5, 4)).astype(np.float32)
  conv = resnet3d.Conv3D(3, kernel, stride)
  variables = conv.init(jax.random.key(0), jnp.asarray(x))
  out = np.asarray(conv.apply(variables, jnp.asarray(x)))
  weight = torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(4, 3, 0, 1, 2).copy())
  expected = torch.nn.functional.conv3d(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()), weight,
                                        stride=stride, padding=tuple(k // 2 for k in kernel))
  np.testing.assert_allclose(out, expected.numpy().transpose(0, 2, 3, 4, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 3, 3, 16), (1, 1, 2, 2, 8), (1, 4, 1, 1, 20)])
def test_temporal_shift_matches_numpy(shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  np.testing.assert_array_equal(resnet3d.temporal_shift(jnp.asarray(x)), numpy_temporal_shift(x))


def test_tsm_shifts_the_residual_branch_only():
  block = resnet3d.Bottleneck(inner_width=4, out_width=16, temporal_shift=True)
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 4, 5, 5, 16)))
  variables = block.init(jax.random.key(1), x, train=False)
  conv_a_inputs = []

  def record(next_fun, args, kwargs, context):
    if context.module.name == "conv_a":
      conv_a_inputs.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    y = block.apply(variables, x, train=False)
  np.testing.assert_array_equal(conv_a_inputs[0], numpy_temporal_shift(np.asarray(x)))
  np.testing.assert_array_equal(y, x)  # bn_c starts at 0: the output is the unshifted identity shortcut


@pytest.mark.parametrize("arch", ["slow_r50", "slowfast_r50", "i3d_r50", "r3d_50", "tsm_r50"])  # R101 = R50 here
def test_tiny_forward_of_every_backbone(arch):
  tiny = dict(stage_blocks=(1, 1, 1, 1), width=16)
  num_frames = 8
  model = egoexo.Model(num_classes=5, num_object_classes=7, backbone=arch, backbone_args=tiny, interaction_channels=8)
  clips = jax.random.normal(jax.random.key(0), (2, num_frames, 64, 64, 3))
  # Random variables of the initialiser's shapes (tracing init is cheap, compiling its RNG is not).
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), clips)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) if len(s.shape) == 1
                           else (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32), shapes)
  outputs, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                    rngs={"dropout": jax.random.key(2, impl="rbg")}))(variables, clips)
  channels = 512 + (64 if arch.startswith("slowfast") else 0)  # 32 * width (+ the Fast pathway's 32 * 2)
  frames = num_frames // (4 if arch.startswith("slowfast") else 2 if arch == "i3d_r50" else 1)
  assert outputs["features"].shape == (2, channels) and outputs["action"].shape == (2, 5)
  assert outputs["interaction"].shape == (2, frames, 2, 2, 2)  # on pathway 0's grid
  assert all(np.isfinite(v).all() for v in outputs.values())
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  first_norm = "fuse_stem" if arch.startswith("slowfast") else "stem"
  moved, initial = (s["backbone"][first_norm]["bn"]["mean"] for s in (state["batch_stats"], variables["batch_stats"]))
  assert not np.allclose(moved, initial)  # train mode updates the running statistics
