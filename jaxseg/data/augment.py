"""Geometric augmentation applied consistently to an image and all of its label kinds.

One geometry (scale to a size, place a crop window, optionally flip) maps each output pixel to a
source position: the image is sampled bilinearly, every label map (mask, scribble, instance
masks) with the nearest source pixel, so labels never blend. Output pixels that fall outside the
scaled image are padding: image 0, mask/scribble 255, instance masks 0, ``valid`` False.

Pixel centres follow the half-pixel convention: scaled pixel ``p`` of a side scaled from ``n`` to
``m`` pixels samples source coordinate ``(p + 0.5) * n / m - 0.5``; its nearest source pixel is
``floor((p + 0.5) * n / m)``.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import weak_labels



@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where an output window of ``out_size`` reads from an image scaled to ``scaled_size``.

  Output pixel (i, j) shows scaled pixel ``(i + offset[0], j' + offset[1])`` with
  ``j' = out_size[1] - 1 - j`` when ``flip`` else ``j``. Offsets may be negative (the window
  starts before the image: padding on top/left).
  """
  scaled_size: tuple[int, int]
  offset: tuple[int, int]
  out_size: tuple[int, int]
  flip: bool = False


def random_geometry(
    image_size: tuple[int, int], rng: np.random.Generator, *, crop_size: tuple[int, int] | None,
    scale_range: tuple[float, float] = (0.75, 1.5), hflip: bool = True,
) -> Geometry:
  """Random scale (uniform in ``scale_range``), crop window and horizontal flip.

  When the scaled image is larger than the crop, the window lies inside it; when smaller, the
  image lies inside the window at a random place and the rest is padding.
  """
  h, w = image_size
  ch, cw = crop_size if crop_size is not None else (h, w)
  lo, hi = scale_range
  if not 0 < lo <= hi:
    raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
  scale = rng.uniform(lo, hi)
  sh, sw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  oy = int(rng.integers(min(0, sh - ch), max(0, sh - ch) + 1))
  ox = int(rng.integers(min(0, sw - cw), max(0, sw - cw) + 1))
  flip = bool(hflip) and bool(rng.uniform() < 0.5)
  return Geometry((sh, sw), (oy, ox), (int(ch), int(cw)), flip)


def fit_geometry(image_size: tuple[int, int], out_size: tuple[int, int]) -> Geometry:
  """Shrinks (never enlarges) by one factor to fit ``out_size``, then pads bottom/right."""
  h, w = image_size
  oh, ow = out_size
  factor = min(1.0, oh / h, ow / w)
  scaled = (min(oh, max(1, int(round(h * factor)))), min(ow, max(1, int(round(w * factor)))))
  return Geometry(scaled, (0, 0), (int(oh), int(ow)), False)


def _axis(n: int, m: int, offset: int, count: int, flip: bool):
  """Per-output-index sampling along one axis: nearest index, bilinear pair/weight, validity."""
  p = np.arange(count)
  if flip:
    p = p[::-1]
  p = p + offset
  valid = (p >= 0) & (p < m)
  ratio = n / m
  # Integer arithmetic, so the box mapping below agrees exactly with this sampling.
  nearest = np.clip(((2 * p + 1) * n) // (2 * m), 0, n - 1)
  coord = np.clip((p + 0.5) * ratio - 0.5, 0, n - 1)
  low = np.floor(coord).astype(np.int64)
  high = np.minimum(low + 1, n - 1)
  weight = (coord - low).astype(np.float32)
  return nearest, low, high, weight, valid


def _transform_boxes(boxes, classes, image_size, geometry):
  """Maps inclusive pixel boxes through the geometry (the pixels whose nearest source is inside)."""
  h, w = image_size
  sh, sw = geometry.scaled_size
  oy, ox = geometry.offset
  ch, cw = geometry.out_size
  boxes = np.round(np.asarray(boxes, np.float64)).astype(np.int64)

  def first(a, n, m):  # smallest p with ((2p + 1) n) // (2m) >= a, i.e. ceil((2am - n) / 2n)
    return -((n - 2 * a * m) // (2 * n))

  # Source rows [a, b] are the nearest source of scaled rows [first(a), first(b + 1) - 1].
  y0 = first(boxes[:, 0], h, sh) - oy
  y1 = first(boxes[:, 2] + 1, h, sh) - 1 - oy
  x0 = first(boxes[:, 1], w, sw) - ox
  x1 = first(boxes[:, 3] + 1, w, sw) - 1 - ox
  y0, y1 = np.maximum(y0, max(0, -oy)), np.minimum(y1, min(ch, sh - oy) - 1)
  x0, x1 = np.maximum(x0, max(0, -ox)), np.minimum(x1, min(cw, sw - ox) - 1)
  if geometry.flip:
    x0, x1 = cw - 1 - x1, cw - 1 - x0
  keep = (np.asarray(classes) >= 0) & (y0 <= y1) & (x0 <= x1)
  out = np.stack([y0, x0, y1, x1], axis=1).astype(np.float32)
  out[~keep] = 0.0
  return out, np.where(keep, classes, -1).astype(np.int32)


def apply_geometry(example: Mapping[str, np.ndarray], geometry: Geometry) -> dict[str, np.ndarray]:
  """Resamples one example (no batch axis) through ``geometry``; see `apply_geometries`."""
  batch = {k: np.asarray(v)[None] for k, v in example.items()}
  return {k: v[0] for k, v in apply_geometries(batch, [geometry]).items()}


def apply_geometries(batch: Mapping[str, np.ndarray], geometries: Sequence[Geometry]) -> dict[str, np.ndarray]:
  """Resamples a batch of same-sized examples, example ``b`` through ``geometries[b]``.

  Args:
    batch: ``image`` uint8 or float [B,H,W,3] and any of ``mask``, ``scribble`` (int [B,H,W]),
      ``instance_masks`` [B,M,H,W], ``boxes`` [B,M,4] with ``box_classes`` [B,M], ``valid`` bool
      [B,H,W] (an existing padding mask is carried along); other keys are copied.
    geometries: one per example, all with the same ``out_size``.

  Returns:
    the same keys at ``out_size`` plus ``valid`` bool [B,h,w]; ``image`` float32 in [0,1]
    (uint8 input is divided by 255). Boxes of examples with ``instance_masks`` are recomputed
    from the resampled masks, so they stay tight; otherwise they are mapped geometrically.
    Boxes (and instances) that leave the window get class -1 and a zero box.
  """
  image = np.asarray(batch["image"])
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"image must be [B, H, W, 3], got shape {image.shape}")
  n, h, w = image.shape[:3]
  if len(geometries) != n:
    raise ValueError(f"got {len(geometries)} geometries for a batch of {n}")
  sizes = {g.out_size for g in geometries}
  if len(sizes) != 1:
    raise ValueError(f"geometries of one batch must share out_size, got {sorted(sizes)}")
  ch, cw = sizes.pop()
  # Per example, gathers along one axis at a time: contiguous takes are far cheaper than one
  # fancy-indexing gather with broadcast index arrays.
  valid = np.zeros((n, ch, cw), bool)
  out_image = np.zeros((n, ch, cw, 3), np.float32)
  labels = {k: np.full((n, ch, cw), IGNORE_INDEX, np.int32) for k in ("mask", "scribble") if k in batch}
  inst = np.asarray(batch["instance_masks"]) if "instance_masks" in batch else None
  out_inst = np.zeros((n, inst.shape[1], ch, cw), np.uint8) if inst is not None else None
  scale = np.float32(1.0 / 255.0) if image.dtype == np.uint8 else np.float32(1.0)
  for i, g in enumerate(geometries):
    ny, ly, hy, wy, vy = _axis(h, g.scaled_size[0], g.offset[0], ch, False)
    nx, lx, hx, wx, vx = _axis(w, g.scaled_size[1], g.offset[1], cw, g.flip)
    v = vy[:, None] & vx[None, :]
    if "valid" in batch:
      v &= np.asarray(batch["valid"][i], bool).take(ny, axis=0).take(nx, axis=1)
    valid[i] = v
    img = image[i].astype(np.float32)
    rows = img.take(ly, axis=0) * (1 - wy)[:, None, None] + img.take(hy, axis=0) * wy[:, None, None]
    cols = rows.take(lx, axis=1) * (1 - wx)[None, :, None] + rows.take(hx, axis=1) * wx[None, :, None]
    out_image[i] = cols * (scale * v[..., None])
    for key, dest in labels.items():
      label = np.asarray(batch[key][i]).take(ny, axis=0).take(nx, axis=1)
      dest[i] = np.where(v, label, IGNORE_INDEX)
    if inst is not None:
      out_inst[i] = inst[i].take(ny, axis=1).take(nx, axis=2) * v[None]
  if image.dtype == np.uint8:
    np.clip(out_image, 0.0, 1.0, out=out_image)  # float rounding can give 1 + 1 ulp
  out = {"image": out_image, "valid": valid, **labels}
  if inst is not None:
    out["instance_masks"] = out_inst
  if "box_classes" in batch:
    classes = np.asarray(batch["box_classes"], np.int32)
    if "instance_masks" in out:
      m = classes.shape[1]
      boxes, classes = weak_labels.boxes_from_instances(
          out["instance_masks"].reshape((n * m, ch, cw)), classes.reshape(-1))
      boxes, classes = boxes.reshape((n, m, 4)), classes.reshape((n, m))
    elif "boxes" in batch:
      pairs = [_transform_boxes(bx, cl, (h, w), g)
               for bx, cl, g in zip(np.asarray(batch["boxes"]), classes, geometries)]
      boxes = np.stack([p[0] for p in pairs])
      classes = np.stack([p[1] for p in pairs])
    else:
      raise ValueError("box_classes needs boxes or instance_masks to follow the geometry")
    out["box_classes"] = classes
    if "boxes" in batch:
      out["boxes"] = boxes
  for key in batch:
    if key not in out:
      out[key] = batch[key]
  return out
