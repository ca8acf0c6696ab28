"""The fast clip decoder: JPEG frames -> the resampled crop window, with fewer CPU cycles per clip.

transforms.decode_and_crop(..., decoder='fast') lands here; decoder='exact' keeps the original Pillow
path (Image.open -> convert('RGB') -> resize(box, BILINEAR) -> np.asarray, per frame) for reproducing
runs made before this module. Where the CPU time of the exact path goes, per 341x256 frame of the
shipped clips (bench/input_pipeline.py measures the whole pipeline): about a third in libjpeg-turbo's
decode, a third in Pillow's resize (no SIMD), the rest in Image.open, the RGB -> RGBX -> RGB copies
and np.asarray. This path:

- decodes with simplejpeg (libjpeg-turbo's TurboJPEG API, SIMD, straight into a reused NumPy buffer,
  no RGBX round trip). Default decoding parameters (accurate integer IDCT, fancy chroma upsampling),
  so the decoded pixels are those Pillow decodes. A frame that is not a JPEG raises PIL's
  UnidentifiedImageError and a corrupt or truncated one an OSError, as the exact path does, so the
  pipeline's skip-unreadable-records handling sees the same errors.
- decodes at 1/2, 1/4 or 1/8 scale in the DCT domain when the crop window would still cover at least
  the output size at that scale (small clips from large frames; evaluation from records at a short
  side above the eval size), so no pixel the output needs is thrown away by the reduction itself.
- resamples the window with OpenCV's warpAffine (bilinear, SIMD), the window's sub-pixel origin and
  the horizontal flip folded into one affine map, writing straight into the output clip. For
  magnification (every training window of the R50 recipe on records at short side 256) this is the
  bilinear interpolation Pillow computes, with the same pixel-centre convention and edge handling
  (replicated border = Pillow's renormalised edge taps); values differ by rounding only (OpenCV
  quantises sample positions to 1/32 pixel and rounds once; Pillow rounds after each of its two
  passes). For minification Pillow's BILINEAR widens its filter (antialiasing); there this module
  keeps Pillow's resize, applied to the DCT-reduced frame (warpAffine would alias).

OpenCV runs single-threaded here: clips are decoded in parallel by Grain's worker processes and read
threads, and a thread pool per worker would only oversubscribe the cores.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import PIL
from PIL import Image
import simplejpeg

cv2.setNumThreads(1)

DCT_SCALES = (8, 4, 2)  # libjpeg-turbo's SIMD-accelerated reductions, largest first


def dct_reduction(height: int, width: int, window) -> int:
  """The largest k in 8, 4, 2 (else 1) with the window still at least window.size pixels wide and high
  after decoding the frame at 1/k scale."""
  crop_w, crop_h = window.x1 - window.x0, window.y1 - window.y0
  for k in DCT_SCALES:
    if crop_w / k >= window.size and crop_h / k >= window.size and height >= 8 * k and width >= 8 * k:
      return k
  return 1


def header(jpeg: bytes) -> tuple[int, int]:
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
  except ValueError as e:
    raise PIL.UnidentifiedImageError(f"cannot identify image file: not a JPEG ({e})") from e
  return height, width


def decode(jpeg: bytes, min_height: int, min_width: int, buffer: np.ndarray | None) -> np.ndarray:
  try:
    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_height=min_height, min_width=min_width,
                                  buffer=buffer)
  except ValueError as e:  # libjpeg-turbo's errors, strict: a truncated or corrupt stream is an error
    raise OSError(f"corrupt JPEG frame: {e}") from e


def _dct_scale(height: int, width: int, shape: tuple[int, ...]) -> float:
  """The scale M/8 libjpeg-turbo decoded at, from the decoded shape (its sizes are ceil(side * M / 8))."""
  for m in range(1, 17):
    if (math.ceil(height * m / 8), math.ceil(width * m / 8)) == tuple(shape[:2]):
      return m / 8
  raise OSError(f"JPEG frame of {width}x{height} decoded to {shape[1]}x{shape[0]}, no scale of libjpeg-turbo's")


def _affine(window, scale: float) -> np.ndarray:
  """Output pixel (x, y) -> decoded-frame position, pixel centres at integer + 0.5 in both (Pillow's
  convention); the horizontal flip mirrors the output column."""
  sx = (window.x1 - window.x0) * scale / window.size
  sy = (window.y1 - window.y0) * scale / window.size
  x0, y0 = window.x0 * scale, window.y0 * scale
  if window.flip:  # output column x reads the column size - 1 - x would have read
    row_x = [-sx, 0.0, x0 + (window.size - 0.5) * sx - 0.5]
  else:
    row_x = [sx, 0.0, x0 + 0.5 * sx - 0.5]
  return np.array([row_x, [0.0, sy, y0 + 0.5 * sy - 0.5]], np.float64)


def decode_and_crop(jpeg_frames: list[bytes], indices: np.ndarray, window) -> np.ndarray:
  """transforms.decode_and_crop's contract: uint8 (T, size, size, 3), the window of each chosen frame."""
  size = window.size
  out = np.empty((len(indices), size, size, 3), np.uint8)
  first = {}  # frame index -> the clip position already holding it (short videos repeat frames)
  geometry = buffer = matrix = box = None
  minify = False
  for t, index in enumerate(indices):
    index = int(index)
    if index in first:
      out[t] = out[first[index]]
      continue
    first[index] = t
    jpeg = jpeg_frames[index]
    height, width = header(jpeg)
    if (height, width) != geometry:  # the first frame (records hold frames of one size)
      reduction = dct_reduction(height, width, window)
      frame = decode(jpeg, math.ceil(height / reduction), math.ceil(width / reduction), None)
      geometry, buffer = (height, width), frame
      scale = _dct_scale(height, width, frame.shape)  # decoded pixels per stored pixel
      minify = (window.x1 - window.x0) * scale > size or (window.y1 - window.y0) * scale > size
      matrix = _affine(window, scale)
      box = (window.x0 * scale, window.y0 * scale, window.x1 * scale, window.y1 * scale)
    else:
      frame = decode(jpeg, buffer.shape[0], buffer.shape[1], buffer)
    if minify:
      resized = Image.fromarray(frame).resize((size, size), Image.BILINEAR, box=box)
      out[t] = np.asarray(resized)[:, ::-1] if window.flip else np.asarray(resized)
    else:
      cv2.warpAffine(frame, matrix, (size, size), dst=out[t], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                     borderMode=cv2.BORDER_REPLICATE)
  return out
