"""Resizing clips on the accelerator: the CPU decodes and cuts, the jitted step resamples (config data.resize).

With data.resize 'device' (what 'auto', the default, picks on a GPU or TPU: `resolve`) and the fast decoder, a
training clip leaves the host as a *patch*: the stored frames' pixels around the crop window, uncut and
unresized, uint8 (T, P, P, 3) with P = crop_size + 2, plus the window inside the patch, float32 (5,) = (x0,
y0, x1, y1, flip), under the batch key '<clips key>_window' (WINDOW_SUFFIX). The trainer's model application
calls `resize_batch` first, which resamples every such window to crop_size^2 inside the jitted step and drops
the window keys; the model, the losses and the interaction maps (drawn on the host from the same window) see
what the host path gives them.

Why: on the fast decoder's host path (jpeg_decode.py) OpenCV's warp is about a third of the CPU time per
training clip and libjpeg-turbo's decode most of the rest (bench/input_pipeline.py's breakdown). Here the
CPU decodes the chosen frames and copies one P x P slice of each; the resize, a few hundred MFLOP per batch,
rides on the accelerator. Bytes sent per clip grow by (P / crop_size)^2 (1.8% at 224).

Host side (`decode_patch`), in stored-frame pixels, pixel centres at integer + 0.5 (Pillow's convention):
output pixel i of the window [x0, x1) samples x0 + (i + 0.5) (x1 - x0) / S - 0.5, so bilinear interpolation
reads columns floor(x0 - 0.5) .. floor(x1 - 0.5) + 1: at most S + 2 columns for windows up to S wide, which
are the windows that magnify or keep the scale (every training window of the R50 recipe on records at short
side 256). The patch starts there, moved inside the frame where it would cross an edge, so the patch's border
is the frame's edge wherever taps fall outside it; the device resize drops taps outside its input and
renormalises the rest, which repeats the edge pixel as the host path's replicated border does. Frames smaller
than the patch repeat their last rows and columns into it. A window wider than S (records stored above the
training size) is minified on the host as before (Pillow's antialiased resize, jpeg_decode.py) and sent as the
patch's top-left S x S with the identity window, so one batch may mix both. Frames that are not JPEG take the
exact host path the same way.

Device side (`resize_clips`): jax.image.scale_and_translate, linear, per clip (vmap; window values are
traced, the shapes static), float32 at HIGHEST precision (no TF32), the flip applied to the output, then
rounded to uint8 as the host path rounds. It is the exact bilinear interpolation; the host path's OpenCV
warp quantises sample positions to 1/32 pixel, so the two differ by that rounding
(tests/device_resize_test.py).
"""

from __future__ import annotations

import math

import numpy as np

from egoexo_jax.input import jpeg_decode, transforms

WINDOW_SUFFIX = "_window"
RESIZES = ("auto", "device", "host")


def resolve(resize: str) -> str:
  """config data.resize -> 'device' or 'host'. 'auto' (the default) is 'device' where JAX's default backend is an
  accelerator and 'host' on a CPU-only machine, where the "device" is the same CPU and OpenCV's warp in the
  input workers costs less than the dense resize in the step. Call it in the main process (it starts JAX's
  backend), before the transform goes to the input workers."""
  if resize not in RESIZES:
    raise ValueError(f"unknown config data.resize '{resize}': use one of {RESIZES}")
  if resize != "auto":
    return resize
  import jax  # pylint: disable=g-import-not-at-top

  return "host" if jax.default_backend() == "cpu" else "device"


def patch_size(crop_size: int) -> int:
  """The side of the patch sent for a crop_size^2 clip (module docstring)."""
  return crop_size + 2


def window_key(clips_key: str) -> str:
  return clips_key + WINDOW_SUFFIX


def _origin(start: float, count: int, limit: int) -> int:
  """The first of `count` pixels along an axis of `limit` that cover the taps from floor(start): moved inside
  the frame where it fits, so the patch border is the frame's own edge exactly where the taps reach it."""
  return max(0, min(math.floor(start), limit - count))


def decode_patch(jpeg_frames, indices: np.ndarray, window) -> tuple[np.ndarray, np.ndarray]:
  """(patch uint8 (T, P, P, 3), window in the patch float32 (5,) = (x0, y0, x1, y1, flip)) of the chosen
  frames (module docstring). Same errors as transforms.decode_and_crop for unreadable frames."""
  size = window.size
  side = patch_size(size)
  wide = window.x1 - window.x0 > size or window.y1 - window.y0 > size
  if wide or jpeg_frames[int(indices[0])][:2] != b"\xff\xd8":  # minified or not JPEG: resized on the host
    patch = np.zeros((len(indices), side, side, 3), np.uint8)
    patch[:, :size, :size] = transforms.decode_and_crop(jpeg_frames, indices, window, "fast")
    return patch, np.array([0, 0, size, size, 0], np.float32)
  patch = np.empty((len(indices), side, side, 3), np.uint8)
  first, buffer, origin_x, origin_y = {}, None, 0, 0
  for t, index in enumerate(indices):
    index = int(index)
    if index in first:  # short videos repeat frames
      patch[t] = patch[first[index]]
      continue
    first[index] = t
    jpeg = jpeg_frames[index]
    height, width = jpeg_decode.header(jpeg)
    if buffer is None or buffer.shape[:2] != (height, width):
      buffer = jpeg_decode.decode(jpeg, height, width, None)
      origin_x, origin_y = _origin(window.x0 - 0.5, side, width), _origin(window.y0 - 0.5, side, height)
      rows, cols = min(side, height), min(side, width)  # frames under P fill the patch from their edge
    else:
      jpeg_decode.decode(jpeg, height, width, buffer)
    # rows of cols x 3 contiguous bytes: NumPy copies them whole (a (.., .., 3) view copies pixel by pixel)
    flat_patch, flat_frame = patch[t].reshape(side, side * 3), buffer.reshape(height, width * 3)
    flat_patch[:rows, :3 * cols] = flat_frame[origin_y:origin_y + rows, 3 * origin_x:3 * (origin_x + cols)]
    if rows < side:
      patch[t, rows:, :cols] = patch[t, rows - 1:rows, :cols]
    if cols < side:
      patch[t, :, cols:] = patch[t, :, cols - 1:cols]
  geometry = [window.x0 - origin_x, window.y0 - origin_y, window.x1 - origin_x, window.y1 - origin_y,
              float(window.flip)]
  return patch, np.array(geometry, np.float32)


def resize_clips(patches, windows, crop_size: int | None):
  """uint8 (B, T, P, P, 3) patches and float32 (B, 5) windows -> uint8 (B, T, S, S, 3) clips, S = crop_size,
  inside jit (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if crop_size is None:
    raise ValueError("the batch holds clip patches to resize on the device (config data.resize='device'), but "
                     "the config has no data.crop_size")
  if patches.shape[2:4] != (patch_size(crop_size),) * 2:
    raise ValueError(f"clip patches of {patches.shape[2]}x{patches.shape[3]} pixels, but config data.crop_size "
                     f"{crop_size} sends {patch_size(crop_size)}x{patch_size(crop_size)}")
  num_frames = patches.shape[1]

  def one(patch, window):
    x0, y0, x1, y1, flip = (window[i] for i in range(5))
    scale = jnp.stack([crop_size / (y1 - y0), crop_size / (x1 - x0)])
    translation = -jnp.stack([y0, x0]) * scale
    out = jax.image.scale_and_translate(patch.astype(jnp.float32), (num_frames, crop_size, crop_size, 3), (1, 2),
                                        scale, translation, method="linear", antialias=False,
                                        precision=jax.lax.Precision.HIGHEST)
    return jnp.where(flip > 0.5, out[:, :, ::-1], out)

  clips = jax.vmap(one)(patches, windows.astype(jnp.float32))
  return jnp.clip(jnp.round(clips), 0, 255).astype(jnp.uint8)


def resize_batch(batch: dict, crop_size: int | None) -> dict:
  """`batch` with every clips key that has a '<key>_window' resized (resize_clips) and the window keys
  dropped; a batch without window keys is returned as it is."""
  windows = [key for key in batch if key.endswith(WINDOW_SUFFIX) and key[:-len(WINDOW_SUFFIX)] in batch]
  if not windows:
    return batch
  out = {key: value for key, value in batch.items() if key not in windows}
  for key in windows:
    clips_key = key[:-len(WINDOW_SUFFIX)]
    out[clips_key] = resize_clips(batch[clips_key], batch[key], crop_size)
  return out
