"""Box arithmetic for Mask R-CNN, reproducing ``torchvision.ops.boxes`` and the detection BoxCoder.

Convention: every box here is ``(y0, x0, y1, x1)`` in continuous input-pixel coordinates, i.e.
torchvision's ``(x1, y1, x2, y2)`` with the two axes swapped (a box covering pixel rows 0..9 has
``y0 = 0, y1 = 10``). :func:`to_xyxy` / :func:`from_xyxy` convert to and from torch's order.

Reproduced semantics (torchvision 0.29):

* :func:`box_area` is ``torchvision.ops.box_area``: ``(y1 - y0) * (x1 - x0)``, no ``+1``.
* :func:`box_iou` is ``torchvision.ops.box_iou`` (intersection clamped at 0, union =
  ``area_a + area_b - inter``, same float32 operation order; XLA may fuse that multiply-add, so
  the last bit can differ) except that a pair whose union is not positive (two empty boxes)
  gets IoU 0 where torchvision gives ``0/0 = NaN``. NMS behaves the same either way
  (``NaN > t`` and ``0 > t`` are both false).
* :func:`encode_boxes` / :func:`decode_boxes` are ``det_utils.BoxCoder.encode_single`` /
  ``decode_single`` with the deltas reordered to ``(dy, dx, dh, dw)`` and the weights to
  ``(wy, wx, wh, ww)``: widths are ``x1 - x0`` (no ``+1``), centres ``x0 + 0.5 * w``, and decoding
  clamps ``dh, dw`` (after dividing by the weights) to at most ``log(1000 / 16)``.
* :func:`clip_boxes` is ``clip_boxes_to_image`` and :func:`small_box_mask` is the mask that
  ``remove_small_boxes`` keeps.

Every function is elementwise over leading axes, so it is jit- and vmap-safe with static shapes.
"""
import math
from typing import Sequence, Tuple, Union

import jax.numpy as jnp

# Deltas are clamped before exp() so a wild regression cannot overflow (torchvision's default).
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)

_YXYX_FROM_XYXY = (1, 0, 3, 2)


def _check_boxes(boxes, name: str, where: str):
  if not hasattr(boxes, "shape") or not hasattr(boxes, "dtype"):
    raise TypeError(f"{where}: {name} must be an array, got {type(boxes).__name__}")
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{where}: {name} must have a last axis of size 4 (y0, x0, y1, x1), "
                     f"got shape {tuple(boxes.shape)}")


def _check_weights(weights, where: str) -> Tuple[float, float, float, float]:
  try:
    w = tuple(float(v) for v in weights)
  except TypeError as e:
    raise TypeError(f"{where}: weights must be 4 numbers (wy, wx, wh, ww), got {weights!r}") from e
  if len(w) != 4:
    raise ValueError(f"{where}: weights must be 4 numbers (wy, wx, wh, ww), got {weights!r}")
  if any(v == 0 for v in w):
    raise ValueError(f"{where}: weights must be non-zero, got {weights!r}")
  return w


def to_xyxy(boxes):
  """Reorders ``(y0, x0, y1, x1)`` boxes to torch's ``(x0, y0, x1, y1)``.

  Args:
    boxes: [..., 4] NumPy or jax array.

  Returns:
    [..., 4] array of the same kind (the permutation is its own inverse).
  """
  _check_boxes(boxes, "boxes", "to_xyxy")
  return boxes[..., list(_YXYX_FROM_XYXY)]


def from_xyxy(boxes):
  """Reorders torch's ``(x0, y0, x1, y1)`` boxes to ``(y0, x0, y1, x1)``.

  Args:
    boxes: [..., 4] NumPy or jax array.

  Returns:
    [..., 4] array of the same kind.
  """
  _check_boxes(boxes, "boxes", "from_xyxy")
  return boxes[..., list(_YXYX_FROM_XYXY)]


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Area ``(y1 - y0) * (x1 - x0)`` (torchvision ``box_area``; no ``+1``).

  Args:
    boxes: [..., 4] (y0, x0, y1, x1).

  Returns:
    [...] areas, in the boxes' dtype.
  """
  _check_boxes(boxes, "boxes", "box_area")
  boxes = jnp.asarray(boxes)
  # torch multiplies width * height; the product commutes, so the bits are the same.
  return (boxes[..., 3] - boxes[..., 1]) * (boxes[..., 2] - boxes[..., 0])


def box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Pairwise IoU of two box sets (torchvision ``box_iou``), batch axes broadcast.

  Args:
    a: [..., K, 4] (y0, x0, y1, x1).
    b: [..., M, 4] (y0, x0, y1, x1); leading axes broadcast against ``a``'s.

  Returns:
    [..., K, M] float IoU; 0 (not NaN) where the union is not positive.
  """
  _check_boxes(a, "a", "box_iou")
  _check_boxes(b, "b", "box_iou")
  if a.ndim < 2 or b.ndim < 2:
    raise ValueError(f"box_iou: a and b must be [..., K, 4] and [..., M, 4], got shapes "
                     f"{tuple(a.shape)} and {tuple(b.shape)}")
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    a = a.astype(jnp.float32)
  if not jnp.issubdtype(b.dtype, jnp.floating):
    b = b.astype(jnp.float32)
  area_a = box_area(a)
  area_b = box_area(b)
  lo = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  hi = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.maximum(hi - lo, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = (area_a[..., :, None] + area_b[..., None, :]) - inter
  positive = union > 0
  # The inner where keeps the gradient finite for empty pairs.
  return jnp.where(positive, inter / jnp.where(positive, union, 1), 0)


def _coder_inputs(x, x_name: str, ref, weights, where: str):
  """Checked box-coder inputs: ``x`` as a float array (float32 if integer), ``ref`` in its
  dtype, and the four weights."""
  _check_boxes(x, x_name, where)
  _check_boxes(ref, "ref", where)
  weights = _check_weights(weights, where)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x, jnp.asarray(ref).astype(x.dtype), weights


def _size_and_centre(boxes):
  """(height, width, centre y, centre x) of (y0, x0, y1, x1) boxes, torchvision's arithmetic
  (size = x1 - x0 without +1, centre = x0 + 0.5 * size)."""
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  return h, w, boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w


def encode_boxes(gt: jnp.ndarray, ref: jnp.ndarray,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
  """Regression targets of ``gt`` relative to ``ref`` (torchvision ``BoxCoder.encode``).

  Args:
    gt: [..., 4] target boxes (y0, x0, y1, x1).
    ref: [..., 4] reference boxes (anchors or proposals), broadcast against ``gt``.
    weights: (wy, wx, wh, ww); (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the ROI heads.

  Returns:
    [..., 4] deltas (dy, dx, dh, dw) with ``dy = wy * (gcy - rcy) / rh`` and
    ``dh = wh * log(gh / rh)``.
  """
  gt, ref, (wy, wx, wh, ww) = _coder_inputs(gt, "gt", ref, weights, "encode_boxes")
  ref_h, ref_w, ref_cy, ref_cx = _size_and_centre(ref)
  gt_h, gt_w, gt_cy, gt_cx = _size_and_centre(gt)
  # Same association as torchvision: (w * diff) / size.
  dy = wy * (gt_cy - ref_cy) / ref_h
  dx = wx * (gt_cx - ref_cx) / ref_w
  dh = wh * jnp.log(gt_h / ref_h)
  dw = ww * jnp.log(gt_w / ref_w)
  return jnp.stack([dy, dx, dh, dw], axis=-1)


def decode_boxes(deltas: jnp.ndarray, ref: jnp.ndarray,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = DEFAULT_BBOX_XFORM_CLIP) -> jnp.ndarray:
  """Applies deltas to reference boxes (torchvision ``BoxCoder.decode_single``).

  Args:
    deltas: [..., 4] (dy, dx, dh, dw).
    ref: [..., 4] reference boxes (y0, x0, y1, x1), broadcast against ``deltas`` (e.g.
      [N, K, 1, 4] against class-specific deltas [N, K, C, 4]).
    weights: (wy, wx, wh, ww), as in :func:`encode_boxes`.
    clip: upper bound on ``dh / wh`` and ``dw / ww`` before ``exp``.

  Returns:
    [..., 4] decoded boxes (y0, x0, y1, x1), not clipped to the image.
  """
  deltas, ref, (wy, wx, wh, ww) = _coder_inputs(deltas, "deltas", ref, weights, "decode_boxes")
  h, w, cy, cx = _size_and_centre(ref)
  dy = deltas[..., 0] / wy
  dx = deltas[..., 1] / wx
  dh = jnp.minimum(deltas[..., 2] / wh, clip)
  dw = jnp.minimum(deltas[..., 3] / ww, clip)
  pcy = dy * h + cy
  pcx = dx * w + cx
  half_h = 0.5 * (jnp.exp(dh) * h)
  half_w = 0.5 * (jnp.exp(dw) * w)
  return jnp.stack([pcy - half_h, pcx - half_w, pcy + half_h, pcx + half_w], axis=-1)


def clip_boxes(boxes: jnp.ndarray, size: Union[Tuple[int, int], jnp.ndarray]) -> jnp.ndarray:
  """Clamps boxes to the image (torchvision ``clip_boxes_to_image``).

  Args:
    boxes: [..., 4] (y0, x0, y1, x1).
    size: (h, w) python numbers, or an array [..., 2] of (h, w) whose leading axes are a prefix
      of ``boxes.shape[:-1]`` (broadcastable), e.g. per-image sizes [N, 2] for boxes [N, K, 4].

  Returns:
    [..., 4] boxes with y in [0, h] and x in [0, w].
  """
  _check_boxes(boxes, "boxes", "clip_boxes")
  boxes = jnp.asarray(boxes)
  if isinstance(size, (tuple, list)):
    if len(size) != 2:
      raise ValueError(f"clip_boxes: size must be (h, w), got {size!r}")
    h, w = size
  else:
    size = jnp.asarray(size)
    if size.ndim < 1 or size.shape[-1] != 2:
      raise ValueError(f"clip_boxes: size must be (h, w) or an array [..., 2], got shape "
                       f"{tuple(size.shape)}")
    lead = size.ndim - 1
    if lead > boxes.ndim - 1:
      raise ValueError(f"clip_boxes: size has more leading axes ({tuple(size.shape)}) than boxes "
                       f"({tuple(boxes.shape)})")
    # Leading axes of `size` index the batch, so extra box axes (K, ...) go after them.
    size = size.reshape(size.shape[:-1] + (1,) * (boxes.ndim - 1 - lead) + (2,))
    size = size.astype(boxes.dtype)
    h, w = size[..., 0], size[..., 1]
  h = jnp.asarray(h, boxes.dtype)
  w = jnp.asarray(w, boxes.dtype)
  return jnp.stack([jnp.clip(boxes[..., 0], 0, h), jnp.clip(boxes[..., 1], 0, w),
                    jnp.clip(boxes[..., 2], 0, h), jnp.clip(boxes[..., 3], 0, w)], axis=-1)


def small_box_mask(boxes: jnp.ndarray, min_size: float) -> jnp.ndarray:
  """Boxes that ``torchvision.ops.remove_small_boxes`` keeps.

  Args:
    boxes: [..., 4] (y0, x0, y1, x1).
    min_size: minimum height and width.

  Returns:
    bool [...], True where ``y1 - y0 >= min_size`` and ``x1 - x0 >= min_size``.
  """
  _check_boxes(boxes, "boxes", "small_box_mask")
  boxes = jnp.asarray(boxes)
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  return (h >= min_size) & (w >= min_size)

