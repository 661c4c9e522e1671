"""Anchor boxes of torchvision's ``AnchorGenerator`` (host-side NumPy; the model bakes them in).

Reproduced semantics (``torchvision.models.detection.anchor_utils.AnchorGenerator``):

* Base (cell) anchors per level: aspect ratio = h / w, ``h_ratio = sqrt(ar)``,
  ``w_ratio = 1 / h_ratio``, ``ws = w_ratio * size``, ``hs = h_ratio * size``, box
  ``[-ws, -hs, ws, hs] / 2`` then **rounded** (half to even, like ``torch.round``), all in
  float32. Order: aspect-ratio-major, then size.
* Grid: ``stride = padded_image_size // feature_size`` per axis (integer division), anchor
  centres at ``(y * stride_h, x * stride_w)`` with no half-stride offset; order y, then x, then
  the cell anchor. Levels are returned separately (torchvision concatenates them in level order).

Boxes are returned as ``(y0, x0, y1, x1)``, i.e. torchvision's xyxy with the axes swapped.
"""
from typing import List, Sequence, Tuple

import numpy as np

DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 5


def _as_float_tuple(values, name: str, where: str) -> Tuple[float, ...]:
  if isinstance(values, (int, float, np.integer, np.floating)):
    values = (values,)
  try:
    out = tuple(float(v) for v in values)
  except TypeError as e:
    raise TypeError(f"{where}: {name} must be a sequence of numbers, got {values!r}") from e
  if not out:
    raise ValueError(f"{where}: {name} must not be empty")
  if any(not v > 0 for v in out):
    raise ValueError(f"{where}: {name} must be positive, got {values!r}")
  return out


def base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """Zero-centred cell anchors of one level (``AnchorGenerator.generate_anchors``).

  Args:
    sizes: anchor sizes (sqrt of the area) of this level, e.g. (32,).
    aspect_ratios: h / w ratios of this level, e.g. (0.5, 1.0, 2.0).

  Returns:
    float32 [A, 4] (y0, x0, y1, x1) with A = len(aspect_ratios) * len(sizes), aspect-major.
  """
  scales = np.asarray(_as_float_tuple(sizes, "sizes", "base_anchors"), np.float32)
  ratios = np.asarray(_as_float_tuple(aspect_ratios, "aspect_ratios", "base_anchors"), np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  # np.round rounds half to even, as torch.round does.
  anchors = np.round(np.stack([-hs, -ws, hs, ws], axis=1) / np.float32(2))
  return anchors.astype(np.float32)


def _pair_of_ints(value, name: str, where: str) -> Tuple[int, int]:
  try:
    a, b = value
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {name} must be a pair (h, w), got {value!r}") from e
  if int(a) != a or int(b) != b or a <= 0 or b <= 0:
    raise ValueError(f"{where}: {name} must be positive integers, got {value!r}")
  return int(a), int(b)


def grid_anchors(image_size: Tuple[int, int], feature_sizes: Sequence[Tuple[int, int]],
                 sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
                 aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS
                 ) -> List[np.ndarray]:
  """All anchors of every level, for a (padded) image canvas (``AnchorGenerator.forward``).

  Args:
    image_size: (H, W) of the padded batch canvas.
    feature_sizes: [(h, w), ...] feature-map sizes, one per level (P2..P6 for Mask R-CNN).
    sizes: per-level anchor sizes, len == len(feature_sizes).
    aspect_ratios: per-level aspect ratios (h / w), len == len(feature_sizes).

  Returns:
    One float32 array [h * w * A, 4] (y0, x0, y1, x1) per level, ordered y, then x, then anchor.
  """
  where = "grid_anchors"
  img_h, img_w = _pair_of_ints(image_size, "image_size", where)
  feature_sizes = [_pair_of_ints(f, "feature_sizes entry", where) for f in feature_sizes]
  if len(sizes) != len(feature_sizes) or len(aspect_ratios) != len(feature_sizes):
    raise ValueError(f"{where}: need one sizes and aspect_ratios entry per feature level; got "
                     f"{len(feature_sizes)} levels, {len(sizes)} sizes, "
                     f"{len(aspect_ratios)} aspect_ratios")
  out = []
  for (fh, fw), level_sizes, level_ratios in zip(feature_sizes, sizes, aspect_ratios):
    cell = base_anchors(level_sizes, level_ratios)
    stride_h, stride_w = img_h // fh, img_w // fw
    shift_y = np.arange(fh, dtype=np.int64) * stride_h
    shift_x = np.arange(fw, dtype=np.int64) * stride_w
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
    sy = sy.reshape(-1).astype(np.float32)
    sx = sx.reshape(-1).astype(np.float32)
    shifts = np.stack([sy, sx, sy, sx], axis=1)
    out.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4).astype(np.float32))
  return out
