"""The +EVGAP protocol: the pre-trained EVGAP encoder stacked under a downstream model, trained end to end.

EVGAP reports two uses of its encoder downstream: frozen features (+EVGAP*, downstream.extract writes
them and the task models train on them) and fine-tuning (+EVGAP, Table 1 (a)-(d)): the encoder,
initialised from a pre-training checkpoint, sits under the task model and both train jointly. Here
the encoder sees the raw per-frame features exactly as in pre-training and as extract.py's 'tokens'
mode: consecutive windows of `window_frames` frames (the last one padded and masked), each frame
represented by the last layer's token of that frame; those per-frame tokens feed the task model.

Two-view inputs (views.py) carry `num_views` views' features side by side on the channel axis; each
view goes through the same (shared) encoder and the tokens are concatenated again, so a fused input
is the concatenation of the two views' encodings, as for frozen features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from egoexo_jax import checkpointing
from egoexo_jax.models.transformer import SequenceEncoder

PROTOCOLS = ("frozen", "finetune")


def encoder_from_config(model_config: ml_collections.ConfigDict) -> SequenceEncoder:
  """The SequenceEncoder of an EVGAP pre-training config's `model` (models/evgap.py's fields)."""
  if model_config.get("name", "evgap") != "evgap":  # configs before config.objective alone named the model
    raise ValueError(f"the encoder config's model.name is '{model_config.get('name')}', not 'evgap'")
  return SequenceEncoder(width=model_config.width, num_layers=model_config.num_layers,
                         num_heads=model_config.num_heads, mlp_dim=model_config.mlp_dim,
                         max_length=model_config.max_length, dropout_rate=model_config.dropout_rate,
                         norm_first=model_config.get("norm_first", False))


class EncoderStack(nn.Module):
  """frames (B, T, V x C), mask (B, T), *rest -> head(encoded frames (B, T, V x width), mask, *rest)."""

  encoder: SequenceEncoder
  head: nn.Module
  window_frames: int
  num_views: int = 1

  def encode(self, frames: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    batch, length, channels = frames.shape
    if channels % self.num_views:
      raise ValueError(f"{channels} input channels do not split into {self.num_views} views")
    pad = -length % self.window_frames
    frames = jnp.pad(frames, ((0, 0), (0, pad), (0, 0)))
    real = jnp.pad(mask > 0, ((0, 0), (0, pad)))
    windows = (length + pad) // self.window_frames
    per_view = frames.reshape(batch, windows, self.window_frames, self.num_views, channels // self.num_views)
    per_view = jnp.moveaxis(per_view, 3, 0).reshape(-1, self.window_frames, channels // self.num_views)
    window_mask = jnp.broadcast_to(real.reshape(1, batch, windows, self.window_frames),
                                   (self.num_views, batch, windows, self.window_frames))
    tokens = self.encoder(per_view, window_mask.reshape(-1, self.window_frames), train=train)["tokens"]
    tokens = tokens.reshape(self.num_views, batch, windows * self.window_frames, -1)[:, :, :length]
    return jnp.concatenate(list(tokens), axis=-1)

  def __call__(self, frames: jax.Array, mask: jax.Array, *rest: Any, train: bool):
    return self.head(self.encode(frames, mask, train=train), mask, *rest, train=train)


def load_pretrained(params: Any, checkpoint: str) -> Any:
  """`params` of an EncoderStack with its 'encoder' replaced by the checkpoint's (shapes checked)."""
  params, _ = checkpointing.load_backbone(checkpoint, params, {}, subtree="encoder", source_subtree="encoder")
  return params


def load_config(config_path: str) -> ml_collections.ConfigDict:
  """A pre-training config from 'path/to/config.py[:arg]' (configs' get_config(arg))."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = config_path.partition(":")
  spec = importlib.util.spec_from_file_location("encoder_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"cannot load config '{path}'")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
