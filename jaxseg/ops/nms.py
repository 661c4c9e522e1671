"""Static-shape non-maximum suppression with exactly ``torchvision.ops.nms``'s result.

Reproduced semantics (torchvision's CPU kernel, ``nms_kernel.cpp``):

* Boxes are visited in descending score order; torchvision sorts with a **stable** descending
  sort, so among equal scores the lower input index comes first. Here: a stable ascending sort
  of ``-score``.
* A kept box suppresses every later box whose IoU with it is **strictly greater** than the
  threshold (TF Model Garden suppresses at ``>=``). IoU uses the same float32 formula
  ``inter / (area_i + area_j - inter)``; empty pairs (union 0, torch's NaN) never suppress. The
  kernel compares the float32 IoU with the threshold as a double; the threshold is rounded
  down to float32 so that the float32 comparison is the same test. One difference remains:
  XLA fuses ``area_i + area_j - w * h`` into a fused multiply-add, so an IoU may differ from
  the kernel's in the last bit and a pair within one float32 ulp of the threshold can be
  decided the other way (never for integer-valued boxes, whose IoU terms are exact).
* The output lists the kept boxes in the order they were kept (descending score).
* :func:`batched_nms` is ``torchvision.ops.batched_nms``'s coordinate-offset path: every box
  is shifted by ``idx * (max_coordinate + 1)`` so boxes of different categories never overlap.
  (torchvision switches to a per-category loop above 4000 box coordinates on CPU, which keeps
  the same set; this always uses the offset form.)

Static plan: sort, then a [K, K] bool matrix ``over[i, j] = IoU > threshold and i < j`` (in
sorted order), then the greedy recursion ``keep[j] = valid[j] and not any_i (keep[i] and
over[i, j])``, solved one of two exact ways:

* on CPU, a ``fori_loop`` over the K sorted boxes that clears the later boxes overlapping each
  still-kept one (K cheap sequential steps);
* on accelerators, the fixed-point iteration ``keep <- valid & ~any(over & keep[:, None], 0)``
  from ``keep = valid`` until nothing changes. After t rounds the first t entries are final
  (each depends only on earlier ones), and the recursion has a single fixed point, so it ends
  on the greedy answer, typically after a few tens of [K, K] rounds instead of K tiny steps.

Invalid inputs (``valid`` False) are never kept and suppress nothing. The result is padded to
``max_output`` with index 0 and ``valid`` False; when more than ``max_output`` boxes survive, the
highest-scoring ones are returned.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.ops.boxes import box_iou


def _float32_threshold(iou_threshold) -> np.float32:
  """Largest float32 <= the threshold, so ``iou32 > t32`` equals torch's ``iou32 > double(t)``."""
  t = np.float32(iou_threshold)
  if float(t) > float(iou_threshold):
    t = np.nextafter(t, np.float32(-np.inf))
  return t


def _check_inputs(boxes, scores, valid, max_output, iou_threshold, where):
  if not hasattr(boxes, "ndim") or boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"{where}: boxes must be [K, 4] (y0, x0, y1, x1), got "
                     f"{getattr(boxes, 'shape', type(boxes).__name__)}")
  k = boxes.shape[0]
  if not hasattr(scores, "ndim") or tuple(scores.shape) != (k,):
    raise ValueError(f"{where}: scores must be [K] = [{k}], got "
                     f"{getattr(scores, 'shape', type(scores).__name__)}")
  if valid is not None:
    if not hasattr(valid, "ndim") or tuple(valid.shape) != (k,):
      raise ValueError(f"{where}: valid must be bool [K] = [{k}], got "
                       f"{getattr(valid, 'shape', type(valid).__name__)}")
    if valid.dtype != jnp.bool_:
      raise TypeError(f"{where}: valid must be bool, got {valid.dtype}")
  if isinstance(max_output, bool) or not isinstance(max_output, (int, np.integer)) \
      or max_output < 1:
    raise ValueError(f"{where}: max_output must be a positive python int, got {max_output!r}")
  try:
    float(iou_threshold)
  except TypeError as e:
    raise TypeError(f"{where}: iou_threshold must be a python number, got "
                    f"{type(iou_threshold).__name__}") from e


def _greedy_sequential(over: jnp.ndarray, candidate: jnp.ndarray) -> jnp.ndarray:
  """Greedy NMS as K sequential row updates. over: bool [K, K] (upper triangle)."""

  def suppress(i, keep):
    return keep & ~(keep[i] & over[i])

  return jax.lax.fori_loop(0, over.shape[0], suppress, candidate)


def _greedy_fixed_point(over: jnp.ndarray, candidate: jnp.ndarray) -> jnp.ndarray:
  """Greedy NMS as the fixed point of ``keep = candidate & ~any(over & keep[:, None], 0)``."""

  def step(keep):
    return candidate & ~jnp.any(over & keep[:, None], axis=0)

  def body(state):
    keep, _ = state
    new = step(keep)
    return new, jnp.any(new != keep)

  keep, _ = jax.lax.while_loop(lambda state: state[1], body, (candidate, jnp.array(True)))
  return keep


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float, max_output: int, *,
        valid: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Non-maximum suppression, the same kept set and order as ``torchvision.ops.nms``.

  Args:
    boxes: [K, 4] (y0, x0, y1, x1).
    scores: [K] scores; higher is kept first, ties go to the lower index.
    iou_threshold: a box is suppressed by a kept box with IoU strictly greater than this.
    max_output: static output length.
    valid: optional bool [K]; False entries are never kept and suppress nothing.

  Returns:
    indices: int32 [max_output], kept box indices in descending score order, then 0 padding.
    valid: bool [max_output], False on padding.
  """
  where = "nms"
  _check_inputs(boxes, scores, valid, max_output, iou_threshold, where)
  boxes = jnp.asarray(boxes)
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  scores = jnp.asarray(scores)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  k = boxes.shape[0]
  if valid is None:
    valid = jnp.ones((k,), bool)
  max_output = int(max_output)
  if k == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)

  # Invalid boxes sort last; they are excluded through `keep` anyway.
  order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
  sorted_boxes = boxes[order]
  threshold = _float32_threshold(iou_threshold) if boxes.dtype == jnp.float32 else iou_threshold
  rank = jnp.arange(k)
  over = (box_iou(sorted_boxes, sorted_boxes) > threshold) & (rank[:, None] < rank[None, :])
  keep = jax.lax.platform_dependent(over, valid[order], cpu=_greedy_sequential,
                                    default=_greedy_fixed_point)
  (position,) = jnp.nonzero(keep, size=max_output, fill_value=0)
  out_valid = jnp.arange(max_output) < jnp.sum(keep, dtype=jnp.int32)
  indices = jnp.where(out_valid, order[position], 0).astype(jnp.int32)
  return indices, out_valid


def batched_nms(boxes: jnp.ndarray, scores: jnp.ndarray, idxs: jnp.ndarray,
                iou_threshold: float, max_output: int, *,
                valid: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """NMS within each category (``torchvision.ops.batched_nms``).

  Args:
    boxes: [K, 4] (y0, x0, y1, x1).
    scores: [K] scores.
    idxs: int [K] category of each box (class, or FPN level for the RPN); boxes of different
      categories never suppress each other.
    iou_threshold: suppression at IoU strictly greater than this.
    max_output: static output length.
    valid: optional bool [K]; False entries are never kept and do not enter ``max_coordinate``.

  Returns:
    indices: int32 [max_output], kept indices in descending score order, then 0 padding.
    valid: bool [max_output], False on padding.
  """
  where = "batched_nms"
  _check_inputs(boxes, scores, valid, max_output, iou_threshold, where)
  k = boxes.shape[0]
  if not hasattr(idxs, "ndim") or tuple(idxs.shape) != (k,):
    raise ValueError(f"{where}: idxs must be int [K] = [{k}], got "
                     f"{getattr(idxs, 'shape', type(idxs).__name__)}")
  if not jnp.issubdtype(idxs.dtype, jnp.integer):
    raise TypeError(f"{where}: idxs must be integer, got {idxs.dtype}")
  boxes = jnp.asarray(boxes)
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones((k,), bool)
  if k == 0:
    return nms(boxes, scores, iou_threshold, max_output, valid=valid)
  # torchvision: boxes.max() over the real boxes; padded rows must not change the offsets.
  max_coordinate = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf))
  max_coordinate = jnp.where(jnp.any(valid), max_coordinate, 0).astype(boxes.dtype)
  offsets = jnp.asarray(idxs).astype(boxes.dtype) * (max_coordinate + jnp.asarray(1, boxes.dtype))
  return nms(boxes + offsets[:, None], scores, iou_threshold, max_output, valid=valid)
