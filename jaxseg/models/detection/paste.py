"""Pasting box-relative Mask R-CNN masks into the image, torchvision's way.

torchvision's ``paste_masks_in_image`` pads each 28x28 mask by one zero pixel (30x30),
scales its box about the centre by 30/28, truncates the box to integers
(``int64`` cast, towards zero), resizes the padded mask bilinearly
(``align_corners=False``) to ``(y1 - y0 + 1, x1 - x0 + 1)`` and writes it at
``[y0, y1] x [x0, x1]`` clipped to the image. Along each axis that is a linear map from
the 30 padded mask samples to the image pixels, so the paste of one mask is
``Wy [H,30] @ m [30,30] @ Wx [W,30]^T``; the zero padding only drops the first and
last columns of ``Wy``/``Wx``. Every shape is static, so the same code runs in a
jitted model (``paste_masks_jax``) and on the host in NumPy (``paste_masks``).
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

MASK_PADDING = 1


def _axis_weights(xp, lo, hi, length: int, mask_size: int):
  """Interpolation matrix of one axis, [..., length, mask_size] (float32).

  Args:
    xp: ``numpy`` or ``jax.numpy``.
    lo, hi: integer (truncated) low / high box coordinates, shape [...]; the paste covers
      pixels ``lo..hi`` inclusive.
    length: image size along the axis.
    mask_size: unpadded mask size (28).
  """
  padded = mask_size + 2 * MASK_PADDING
  size = xp.maximum(hi - lo + 1, 1)
  pixel = xp.arange(length, dtype=np.int32)
  rel = pixel - lo[..., None]
  inside = (pixel >= lo[..., None]) & (pixel <= hi[..., None])
  # PyTorch's bilinear source index (align_corners=False) in float32, clamped at 0.
  scale = (np.float32(padded) / size.astype(np.float32))[..., None]
  src = xp.maximum((rel.astype(np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                   np.float32(0.0))
  i0 = xp.minimum(xp.floor(src).astype(np.int32), padded - 1)
  i1 = xp.minimum(i0 + 1, padded - 1)
  lam = xp.clip(src - i0.astype(np.float32), 0.0, 1.0)
  # Only the 28 unpadded samples carry mass; the padding ring is zero.
  col = xp.arange(MASK_PADDING, MASK_PADDING + mask_size, dtype=np.int32)
  w = ((1 - lam)[..., None] * (i0[..., None] == col)
       + lam[..., None] * (i1[..., None] == col))
  return xp.where(inside[..., None], w, 0).astype(np.float32)


def _paste(xp, masks, boxes, image_size: Tuple[int, int]):
  m = masks.shape[-1]
  if masks.shape[-2] != m:
    raise ValueError(f"paste_masks: masks must be square [..., M, M], got {masks.shape}")
  if boxes.shape[-1] != 4 or boxes.shape[:-1] != masks.shape[:-2]:
    raise ValueError(f"paste_masks: boxes must be [..., 4] matching masks [..., M, M]; got "
                     f"boxes {boxes.shape}, masks {masks.shape}")
  boxes = boxes.astype(np.float32)
  scale = np.float32((m + 2 * MASK_PADDING) / m)
  y0, x0, y1, x1 = (boxes[..., i] for i in range(4))
  # torchvision's expand_boxes, in float32, then the int64 cast (truncation towards zero).
  h_half = (y1 - y0) * np.float32(0.5) * scale
  w_half = (x1 - x0) * np.float32(0.5) * scale
  yc = (y1 + y0) * np.float32(0.5)
  xc = (x1 + x0) * np.float32(0.5)
  iy0, iy1 = (xp.trunc(v).astype(np.int32) for v in (yc - h_half, yc + h_half))
  ix0, ix1 = (xp.trunc(v).astype(np.int32) for v in (xc - w_half, xc + w_half))
  wy = _axis_weights(xp, iy0, iy1, image_size[0], m)
  wx = _axis_weights(xp, ix0, ix1, image_size[1], m)
  # Full float32 products on accelerators too (no TF32 / bf16 passes), as torch computes.
  kwargs = {"precision": jax.lax.Precision.HIGHEST} if xp is jnp else {}
  return xp.einsum("...hp,...pq,...wq->...hw", wy, masks.astype(np.float32), wx, **kwargs)


def _check_size(image_size: Sequence[int]) -> Tuple[int, int]:
  size = tuple(int(s) for s in image_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"paste_masks: image_size must be (H, W) >= 1, got {image_size!r}")
  return size


def paste_masks_jax(masks, boxes, image_size: Sequence[int]):
  """Pastes box-relative masks at image resolution, in JAX (jit/vmap safe).

  Args:
    masks: float [..., M, M] mask probabilities (M = 28 for Mask R-CNN).
    boxes: float [..., 4] (y0, x0, y1, x1) boxes in image pixels.
    image_size: static (H, W).

  Returns:
    float32 [..., H, W]: torchvision's ``paste_masks_in_image`` per mask.
  """
  return _paste(jnp, jnp.asarray(masks), jnp.asarray(boxes), _check_size(image_size))


def paste_masks(mask_probs, boxes, image_size: Sequence[int]) -> np.ndarray:
  """Host-side (NumPy) paste of the ``mask_probs`` a model built with ``paste_masks=False``
  returns.

  Args:
    mask_probs: [N,K,M,M] (or [K,M,M]) mask probabilities.
    boxes: [N,K,4] (or [K,4]) (y0, x0, y1, x1) boxes in image pixels.
    image_size: (H, W) of the canvas.

  Returns:
    float32 NumPy [N,K,H,W] (or [K,H,W]), equal to torchvision's
    ``paste_masks_in_image`` for each mask.
  """
  size = _check_size(image_size)
  mask_probs = np.asarray(mask_probs, np.float32)
  boxes = np.asarray(boxes, np.float32)
  if mask_probs.ndim not in (3, 4):
    raise ValueError(f"paste_masks: mask_probs must be [N,K,M,M] or [K,M,M], got "
                     f"{mask_probs.shape}")
  flat_m = mask_probs.reshape((-1,) + mask_probs.shape[-2:])
  if boxes.shape[:-1] != mask_probs.shape[:-2]:
    raise ValueError(f"paste_masks: boxes must be [..., 4] matching mask_probs [..., M, M]; "
                     f"got boxes {boxes.shape}, mask_probs {mask_probs.shape}")
  flat_b = boxes.reshape(-1, 4)
  out = np.zeros((flat_m.shape[0],) + size, np.float32)
  # One mask at a time keeps the host memory at one [H,30] + [W,30] pair per mask.
  for k in range(flat_m.shape[0]):
    out[k] = _paste(np, flat_m[k], flat_b[k], size)
  return out.reshape(mask_probs.shape[:-2] + size)
