"""Segmentation metrics computed on device: confusion matrix, IoU, pixel accuracy."""
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np



def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int,
                     valid: Optional[jax.Array] = None) -> jax.Array:
  """Confusion matrix ``cm[true, pred]`` over labelled (and valid) pixels.

  Args:
    predictions: int [N,H,W] predicted classes.
    labels: int [N,H,W] ground truth; 255 (or any value outside [0, C)) is ignored.
    num_classes: C.
    valid: optional bool [N,H,W]; False pixels are ignored.

  Returns:
    int32 [C,C]. Under jit with a sharded batch the sum is global across devices.
  """
  keep = (labels >= 0) & (labels < num_classes)
  if valid is not None:
    keep = keep & valid
  flat = jnp.where(keep, labels * num_classes + predictions, num_classes * num_classes)
  counts = jnp.bincount(flat.reshape(-1).astype(jnp.int32), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def iou_from_confusion(cm) -> np.ndarray:
  """Per-class IoU; NaN for classes absent from both ground truth and predictions."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / union, np.nan)


def summarize(cm, class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
  """mIoU (over classes present in GT or predictions), pixel accuracy and per-class IoU."""
  cm = np.asarray(cm, np.float64)
  iou = iou_from_confusion(cm)
  names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
  out = {
      "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
      "pixel_accuracy": float(np.trace(cm) / max(cm.sum(), 1.0)),
  }
  for name, v in zip(names, iou):
    out[f"iou/{name}"] = float(v)
  return out


def format_iou_table(cm, class_names: Optional[Sequence[str]] = None) -> str:
  """A per-class IoU table with mIoU and pixel accuracy, ready to print."""
  s = summarize(cm, class_names)
  names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
  width = max(12, max(len(n) for n in names) + 2)
  lines = [f"{'class':<{width}} {'IoU':>7}", "-" * (width + 8)]
  for n in names:
    v = s[f"iou/{n}"]
    lines.append(f"{n:<{width}} {'   n/a' if np.isnan(v) else f'{100 * v:6.2f}':>7}")
  lines.append("-" * (width + 8))
  lines.append(f"{'mIoU':<{width}} {100 * s['miou']:6.2f}")
  lines.append(f"{'pixel acc.':<{width}} {100 * s['pixel_accuracy']:6.2f}")
  return "\n".join(lines)
