"""PNG grids of image / ground truth / prediction for a person to look at."""
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
