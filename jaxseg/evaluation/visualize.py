"""PNG grids of image / ground truth / prediction for a person to look at: semantic label
overlays and instances (translucent masks, box outlines)."""
from typing import Optional

import numpy as np
from PIL import Image

IGNORE_COLOR = (255, 255, 255)


def palette(num_classes: int) -> np.ndarray:
  """The PASCAL VOC colour map: distinct, stable colours per class id. uint8 [C,3]."""
  cmap = np.zeros((max(num_classes, 1), 3), np.uint8)
  for i in range(num_classes):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Class ids [H,W] -> RGB uint8 [H,W,3]; 255 (ignore) is white."""
  labels = np.asarray(labels)
  out = np.empty(labels.shape + (3,), np.uint8)
  out[...] = IGNORE_COLOR
  known = (labels >= 0) & (labels < num_classes)
  out[known] = palette(num_classes)[labels[known]]
  return out


def overlay_grid(images: np.ndarray, masks: Optional[np.ndarray], predictions: np.ndarray,
                 num_classes: int, *, alpha: float = 0.7, gap: int = 2) -> np.ndarray:
  """One row per example: image | ground truth over image | prediction over image.

  Args:
    images: float [N,H,W,3] in [0, 1] (or uint8).
    masks: int [N,H,W] or None (the column is left out).
    predictions: int [N,H,W].

  Returns:
    uint8 RGB grid.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
  n, h, w = images.shape[:3]
  cols = 3 if masks is not None else 2
  grid = np.full((n * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)

  def blend(img, lab):
    col = colorize(lab, num_classes).astype(np.float32)
    return (alpha * col + (1 - alpha) * img.astype(np.float32)).round().astype(np.uint8)

  for i in range(n):
    panels = [images[i]]
    if masks is not None:
      panels.append(blend(images[i], masks[i]))
    panels.append(blend(images[i], predictions[i]))
    for j, p in enumerate(panels):
      grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = p
  return grid


def save_overlay_grid(path: str, images, masks, predictions, num_classes: int, *,
                      min_size: int = 256) -> None:
  """Write :func:`overlay_grid` as a PNG, upscaled (nearest) so small images stay visible."""
  grid = overlay_grid(images, masks, predictions, num_classes)
  scale = max(1, int(np.ceil(min_size / max(1, np.asarray(images).shape[2]))))
  img = Image.fromarray(grid)
  if scale > 1:
    img = img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  img.save(path)


# ----------------------------------------------------------------------------------------------
# Instances: translucent masks and box outlines in the class colour (no text, so no font).


def _as_uint8_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
  return images


def _box_pixels(box, inclusive: bool) -> tuple[int, int, int, int]:
  """The first and last pixel row / column (r0, c0, r1, c1) a box covers."""
  y0, x0, y1, x1 = (float(v) for v in box)
  if inclusive:  # the library's data boxes: rows y0..y1
    return tuple(int(np.floor(v + 0.5)) for v in (y0, x0, y1, x1))
  # continuous edges: pixel r covers [r, r + 1), so [0, 10) is rows 0..9
  return (int(np.floor(y0)), int(np.floor(x0)), int(np.ceil(y1)) - 1, int(np.ceil(x1)) - 1)


def draw_instances(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray,
                   scores: Optional[np.ndarray] = None, masks: Optional[np.ndarray] = None,
                   valid: Optional[np.ndarray] = None, class_names=None, *,
                   inclusive: bool = False, score_threshold: float = 0.5, alpha: float = 0.5,
                   mask_threshold: float = 0.5) -> np.ndarray:
  """Instances drawn over an image: each mask tinted and each box outlined (1 px) in its
  class's `palette` colour; no labels. Higher scores are drawn on top.

  Args:
    image: uint8 [H,W,3] (float [0, 1] is converted).
    boxes: [K,4] (y0, x0, y1, x1): continuous pixels (model outputs) or, with
      ``inclusive=True``, inclusive pixel boxes (dataset batches).
    classes: int [K]; negative classes (padding) are not drawn.
    scores: [K] or None (ground truth: everything is drawn).
    masks: [K,H,W] probabilities or 0/1 masks, or None (boxes only).
    valid: bool [K] or None (all valid); invalid entries are not drawn.
    class_names: the label space (its length sizes the palette); None: max class + 1.
    inclusive: the boxes' convention (see ``boxes``).
    score_threshold: entries scoring below it are not drawn.
    alpha: opacity of the mask tint.
    mask_threshold: a mask pixel is inside when above it.

  Returns:
    uint8 [H,W,3].
  """
  out = _as_uint8_images(image).copy()
  if out.ndim != 3 or out.shape[-1] != 3:
    raise ValueError(f"image must be [H,W,3], got shape {out.shape}")
  h, w = out.shape[:2]
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
  classes = np.asarray(classes).reshape(-1)
  k = len(classes)
  if boxes.shape[0] != k:
    raise ValueError(f"boxes {boxes.shape} and classes {classes.shape} differ in length")
  keep = classes >= 0
  if valid is not None:
    valid = np.asarray(valid, bool).reshape(-1)
    if valid.shape != (k,):
      raise ValueError(f"valid must be [{k}], got shape {valid.shape}")
    keep &= valid
  order = np.arange(k)
  if scores is not None:
    scores = np.asarray(scores, np.float64).reshape(-1)
    if scores.shape != (k,):
      raise ValueError(f"scores must be [{k}], got shape {scores.shape}")
    keep &= scores >= score_threshold
    order = np.argsort(scores, kind="stable")  # lowest first, so the best end on top
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape != (k, h, w):
      raise ValueError(f"masks must be [{k},{h},{w}] (image resolution), got {masks.shape}")
  num_colors = len(class_names) if class_names is not None else int(classes.max(initial=0)) + 1
  if keep.any() and classes[keep].max() >= num_colors:
    raise ValueError(f"class {classes[keep].max()} is outside the {num_colors} class names")
  colors = palette(num_colors).astype(np.float32)
  for i in order[keep[order]]:
    color = colors[classes[i]]
    if masks is not None:
      inside = masks[i] > mask_threshold
      out[inside] = (alpha * color + (1 - alpha) * out[inside]).round().astype(np.uint8)
    r0, c0, r1, c1 = _box_pixels(boxes[i], inclusive)
    if r1 < 0 or c1 < 0 or r0 >= h or c0 >= w or r1 < r0 or c1 < c0:
      continue
    rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h - 1), min(c1, w - 1)
    for r in {r0, r1} & set(range(h)):  # an edge outside the image is not drawn
      out[r, cc0:cc1 + 1] = color
    for c in {c0, c1} & set(range(w)):
      out[rr0:rr1 + 1, c] = color
  return out


def instance_grid(images: np.ndarray, gt, preds, class_names, *,
                  score_threshold: float = 0.5, alpha: float = 0.5, gap: int = 2) -> np.ndarray:
  """One row per example: image | ground truth instances | predicted instances.

  Args:
    images: float [N,H,W,3] in [0, 1] (or uint8).
    gt: a batch's ``boxes`` [N,M,4] (inclusive), ``box_classes`` [N,M] and optionally
      ``instance_masks`` [N,M,H,W], or a list of N such dicts without the batch axis; or None
      (the column is left out).
    preds: model outputs ``boxes`` [N,K,4] (continuous), ``classes`` [N,K], and optionally
      ``scores``, ``masks`` [N,K,H,W] probabilities, ``valid``; or a list of N such dicts.
    class_names: the label space (sizes the palette).

  Returns:
    uint8 RGB grid.
  """
  images = _as_uint8_images(images)
  n, h, w = images.shape[:3]
  cols = 3 if gt is not None else 2
  grid = np.full((n * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)

  def pick(d, key, i):
    if isinstance(d, (list, tuple)):  # one dict per example
      return None if d[i].get(key) is None else np.asarray(d[i][key])
    return None if d.get(key) is None else np.asarray(d[key])[i]

  for name, d in (("gt", gt), ("preds", preds)):
    if isinstance(d, (list, tuple)) and len(d) != n:
      raise ValueError(f"{name} holds {len(d)} examples for {n} images")

  for i in range(n):
    panels = [images[i]]
    if gt is not None:
      panels.append(draw_instances(images[i], pick(gt, "boxes", i), pick(gt, "box_classes", i),
                                   None, pick(gt, "instance_masks", i), None, class_names,
                                   inclusive=True, alpha=alpha))
    panels.append(draw_instances(images[i], pick(preds, "boxes", i), pick(preds, "classes", i),
                                 pick(preds, "scores", i), pick(preds, "masks", i),
                                 pick(preds, "valid", i), class_names,
                                 score_threshold=score_threshold, alpha=alpha))
    for j, p in enumerate(panels):
      grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = p
  return grid


def save_instance_grid(path: str, images, gt, preds, class_names, *, min_size: int = 256,
                       score_threshold: float = 0.5) -> None:
  """Write :func:`instance_grid` as a PNG, upscaled (nearest) so small images stay visible."""
  grid = instance_grid(images, gt, preds, class_names, score_threshold=score_threshold)
  scale = max(1, int(np.ceil(min_size / max(1, np.asarray(images).shape[2]))))
  img = Image.fromarray(grid)
  if scale > 1:
    img = img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  img.save(path)
