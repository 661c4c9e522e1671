"""Target assignment for Mask R-CNN: torchvision's ``Matcher`` and balanced sampler, static-shape.

Reproduced semantics (``torchvision.models.detection._utils``):

* :func:`match` is ``Matcher(high, low, allow_low_quality_matches)``: each anchor / proposal
  takes the gt of highest IoU (``torch.max(dim=0)``, first index on ties, like ``argmax``);
  it is positive when that IoU is ``>= high``, background when ``< low`` and ignored in
  between. With ``allow_low_quality``, every anchor whose IoU with some gt equals that gt's
  highest IoU (ties included; also when that highest IoU is 0) becomes positive, and, as in
  torchvision's ``set_low_quality_matches_``, it keeps its own argmax gt, not necessarily the gt
  whose maximum it attains. The returned index is 0 for non-positives, which is what
  torchvision's ``matched_idxs.clamp(min=0)`` gives. Padded gt rows (``gt_valid`` False) never
  match and take no part in the low-quality rule; without any valid gt every label is 0
  (torchvision raises instead; the RPN and ROI heads then treat every element as background).
* :func:`balanced_sample` is ``BalancedPositiveNegativeSampler``: labels ``>= 1`` are positive
  and ``0`` negative (so class labels work too), ``num_pos = min(#pos, int(num_samples *
  positive_fraction))``, ``num_neg = min(#neg, num_samples - num_pos)``, each set chosen
  uniformly at random. ``torch.randperm`` cannot be reproduced, so the choice comes from random
  priorities of a jax key (the same distribution, different draws).
* :func:`sample_indices` gathers the sampled elements to a fixed size in increasing index
  order, the order of torchvision's ``torch.where(pos | neg)``.

All functions are jit-safe with static shapes; the samplers work on one image and vmap over a
batch.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def match(iou: jnp.ndarray, high: float, low: float, *, allow_low_quality: bool = False,
          gt_valid: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Assigns a gt to every anchor / proposal (torchvision ``Matcher``).

  Args:
    iou: [..., G, A] float IoU between gt boxes (rows, torch's convention) and anchors.
    high: IoU ``>= high`` is a match (label 1).
    low: IoU ``< low`` is background (label 0); in between is ignored (label -1).
    allow_low_quality: torchvision's ``allow_low_quality_matches`` (True for the RPN).
    gt_valid: bool [..., G], False on padded gt rows; None means all rows are valid.

  Returns:
    matched_idx: int32 [..., A], the matched gt row for label 1, else 0.
    labels: int32 [..., A], 1 matched, 0 background, -1 ignored.
  """
  if not hasattr(iou, "ndim") or iou.ndim < 2:
    raise ValueError(f"match: iou must be [..., G, A], got "
                     f"{getattr(iou, 'shape', type(iou).__name__)}")
  if not low <= high:
    raise ValueError(f"match: low ({low}) must be <= high ({high})")
  iou = jnp.asarray(iou)
  if not jnp.issubdtype(iou.dtype, jnp.floating):
    raise TypeError(f"match: iou must be floating point, got {iou.dtype}")
  if gt_valid is None:
    gt_valid = jnp.ones(iou.shape[:-1], bool)
  else:
    gt_valid = jnp.asarray(gt_valid)
    if gt_valid.dtype != jnp.bool_:
      raise TypeError(f"match: gt_valid must be bool, got {gt_valid.dtype}")
    if gt_valid.shape != iou.shape[:-1]:
      raise ValueError(f"match: gt_valid must be [..., G] = {tuple(iou.shape[:-1])}, got "
                       f"{tuple(gt_valid.shape)}")
  if iou.shape[-2] == 0:  # no gt rows at all: everything is background
    zeros = jnp.zeros(iou.shape[:-2] + iou.shape[-1:], jnp.int32)
    return zeros, zeros
  valid = gt_valid[..., :, None]
  masked = jnp.where(valid, iou, -jnp.inf)
  best_val = jnp.max(masked, axis=-2)
  best_gt = jnp.argmax(masked, axis=-2).astype(jnp.int32)
  # Written as torchvision's two "<" tests so that a NaN IoU falls through to a match as in torch.
  labels = jnp.where(best_val < low, 0, jnp.where(best_val < high, -1, 1)).astype(jnp.int32)
  if allow_low_quality:
    best_per_gt = jnp.max(masked, axis=-1, keepdims=True)
    is_best = (iou == best_per_gt) & valid
    labels = jnp.where(jnp.any(is_best, axis=-2), 1, labels)
  matched_idx = jnp.where(labels == 1, best_gt, 0).astype(jnp.int32)
  return matched_idx, labels


def _check_sampler_args(num_samples, positive_fraction, where):
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"{where}: num_samples must be a positive python int, got {num_samples!r}")
  if positive_fraction is not None and not 0.0 <= positive_fraction <= 1.0:
    raise ValueError(f"{where}: positive_fraction must be in [0, 1], got {positive_fraction!r}")


def _first_n_of_top(priority: jnp.ndarray, k: int, n: jnp.ndarray) -> jnp.ndarray:
  """Mask of the ``n`` (traced, <= k) largest priorities; entries with priority -1 are excluded."""
  size = priority.shape[0]
  k = min(k, size)
  if k == 0:
    return jnp.zeros((size,), bool)
  _, idx = jax.lax.top_k(priority, k)
  chosen = jnp.arange(k) < n
  return jnp.zeros((size,), bool).at[idx].set(chosen, unique_indices=True)


def balanced_sample(labels: jnp.ndarray, key: jax.Array, num_samples: int,
                    positive_fraction: float) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Samples positives and negatives (torchvision ``BalancedPositiveNegativeSampler``).

  Args:
    labels: int [K]; ``>= 1`` positive, 0 negative, ``< 0`` ignored.
    key: jax PRNG key.
    num_samples: ``batch_size_per_image`` (256 for the RPN, 512 for the ROI heads).
    positive_fraction: at most ``int(num_samples * positive_fraction)`` positives.

  Returns:
    pos: bool [K], the sampled positives (``min(#pos, int(num_samples * positive_fraction))``).
    neg: bool [K], the sampled negatives (``min(#neg, num_samples - #sampled positives)``).
  """
  where = "balanced_sample"
  _check_sampler_args(num_samples, positive_fraction, where)
  if not hasattr(labels, "ndim") or labels.ndim != 1:
    raise ValueError(f"{where}: labels must be [K] (vmap over a batch), got shape "
                     f"{getattr(labels, 'shape', type(labels).__name__)}")
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{where}: labels must be integer, got {labels.dtype}")
  is_pos = labels >= 1
  is_neg = labels == 0
  max_pos = int(num_samples * positive_fraction)
  num_pos = jnp.minimum(jnp.sum(is_pos, dtype=jnp.int32), max_pos)
  num_neg = jnp.minimum(jnp.sum(is_neg, dtype=jnp.int32), num_samples - num_pos)
  # 31 random bits: far fewer priority ties than uniform float32 (2**23 values) on ~200k
  # anchors, and -1 stays free to mark the elements that are not candidates.
  bits = jax.random.bits(key, labels.shape, jnp.uint32)
  priority = (bits >> 1).astype(jnp.int32)
  pos = _first_n_of_top(jnp.where(is_pos, priority, -1), max_pos, num_pos) & is_pos
  neg = _first_n_of_top(jnp.where(is_neg, priority, -1), num_samples, num_neg) & is_neg
  return pos, neg


def sample_indices(pos: jnp.ndarray, neg: jnp.ndarray,
                   num_samples: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """The sampled elements as a fixed-size index list, in increasing index order.

  Args:
    pos: bool [K] sampled positives.
    neg: bool [K] sampled negatives.
    num_samples: output size (the sampler's ``num_samples``).

  Returns:
    indices: int32 [num_samples], the sampled elements in increasing order, then 0 padding
      (only the first num_samples if more were sampled).
    valid: bool [num_samples], False on padding.
  """
  where = "sample_indices"
  _check_sampler_args(num_samples, None, where)
  for name, m in (("pos", pos), ("neg", neg)):
    if not hasattr(m, "ndim") or m.ndim != 1:
      raise ValueError(f"{where}: {name} must be bool [K], got "
                       f"{getattr(m, 'shape', type(m).__name__)}")
    if m.dtype != jnp.bool_:
      raise TypeError(f"{where}: {name} must be bool, got {m.dtype}")
  if pos.shape != neg.shape:
    raise ValueError(f"{where}: pos and neg must have the same shape, got {tuple(pos.shape)} "
                     f"and {tuple(neg.shape)}")
  chosen = jnp.asarray(pos) | jnp.asarray(neg)
  (indices,) = jnp.nonzero(chosen, size=num_samples, fill_value=0)
  valid = jnp.arange(num_samples) < jnp.sum(chosen, dtype=jnp.int32)
  return indices.astype(jnp.int32), valid
