"""RoI heads: training-time sampling and targets, inference post-processing (per image).

Each function handles one image and is vmapped by the model. They reproduce torchvision's
``RoIHeads.select_training_samples``, ``project_masks_on_boxes`` and
``postprocess_detections`` (torchvision 0.29) with fixed-size outputs and validity masks.
"""
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxseg import ops

ROI_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# torchvision's postprocess_detections drops boxes with a side below this.
MIN_DETECTION_SIZE = 1e-2
MASK_SIZE = 28
# Gt masks pasted per chunk when building mask targets (bounds the [chunk, H, W] gather).
MASK_TARGET_CHUNK = 16


class RoISamples(NamedTuple):
  """Sampled RoIs of one image; S = ``batch_size_per_image``."""
  boxes: jax.Array  # [S, 4] proposal (or gt) boxes
  labels: jax.Array  # int32 [S] gt class of positives, 0 for negatives and padding
  valid: jax.Array  # bool [S] sampled (not padding)
  matched: jax.Array  # int32 [S] matched gt index (0 where none)
  targets: jax.Array  # [S, 4] encode_boxes(matched gt, box), ROI weights; 0 off positives


def sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, key,
                sampler: Callable, *, fg_iou_thresh: float, bg_iou_thresh: float,
                batch_size_per_image: int, positive_fraction: float) -> RoISamples:
  """``select_training_samples`` for one image.

  The valid gt boxes are appended to the proposals (``add_gt_proposals``); every candidate is
  matched to the gt (IoU >= ``fg_iou_thresh`` positive with the gt's class, <
  ``bg_iou_thresh`` background, no low-quality matches); ``sampler`` draws
  ``batch_size_per_image`` with at most ``positive_fraction`` positives, and the sampled
  candidates are kept in candidate order (torchvision's ``where(pos | neg)``).

  Args:
    proposals: [R, 4] detached RPN proposals; proposal_valid: bool [R].
    gt_boxes: [M, 4] continuous gt boxes; gt_classes: int32 [M]; gt_valid: bool [M].
    key: PRNG key of the sampler.
    sampler: ``(labels, key, num_samples, positive_fraction) -> (pos, neg)``; labels are the
      gt class (>= 1) of positives, 0 for background, -1 for ignored candidates.

  Returns:
    ``RoISamples`` with S = ``batch_size_per_image`` slots.
  """
  boxes = jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)])
  valid = jnp.concatenate([proposal_valid, gt_valid])
  iou = ops.box_iou(gt_boxes, boxes)
  matched, match_labels = ops.match(iou, fg_iou_thresh, bg_iou_thresh, allow_low_quality=False,
                                    gt_valid=gt_valid)
  matched = jnp.maximum(matched, 0)
  labels = jnp.where(match_labels == 1, gt_classes[matched], match_labels)
  labels = jnp.where(valid, labels, -1).astype(jnp.int32)
  pos, neg = sampler(labels, key, batch_size_per_image, positive_fraction)
  idx, sampled = ops.sample_indices(pos, neg, batch_size_per_image)
  roi_boxes = boxes[idx]
  roi_labels = jnp.where(sampled, labels[idx], 0)
  roi_matched = jnp.where(sampled, matched[idx], 0)
  is_pos = (roi_labels > 0)[:, None]
  gt = jnp.where(is_pos, gt_boxes[roi_matched], roi_boxes)
  targets = jnp.where(is_pos, ops.encode_boxes(gt, roi_boxes, ROI_WEIGHTS), 0.0)
  return RoISamples(roi_boxes, roi_labels.astype(jnp.int32), sampled, roi_matched.astype(jnp.int32),
                    jax.lax.stop_gradient(targets))


def positive_slots(labels, valid, num_positive: int) -> Tuple[jax.Array, jax.Array]:
  """The first ``num_positive`` positive sampled RoIs in order (torchvision's mask RoIs).

  Args:
    labels: int32 [S]; valid: bool [S].

  Returns:
    indices int32 [P] into the S RoIs and valid bool [P].
  """
  is_pos = valid & (labels > 0)
  # top_k puts equal keys in index order, so this keeps the positives' order.
  _, idx = jax.lax.top_k(is_pos.astype(jnp.int32), num_positive)
  return idx, is_pos[idx]


def _project_on_boxes(mask_of, boxes, matched, valid):
  """``roi_align_adaptive`` of ``mask_of(matched[p])`` [1, H, W] on each box, 0 where invalid."""
  def one(args):
    box, index = args
    return ops.roi_align_adaptive(mask_of(index), box[None], MASK_SIZE,
                                  max_sampling_ratio=None)[0]

  # Chunked so at most MASK_TARGET_CHUNK full-size masks are materialised at once.
  out = jax.lax.map(one, (boxes, matched), batch_size=min(MASK_TARGET_CHUNK, boxes.shape[0]))
  return jax.lax.stop_gradient(jnp.where(valid[:, None, None], out, 0.0))


def mask_targets(gt_masks, boxes, matched, valid):
  """Soft 28x28 mask targets of one image (``project_masks_on_boxes``).

  ``roi_align(gt_mask[matched], box, 28, spatial_scale=1, sampling_ratio=-1, aligned=False)``,
  not thresholded. The adaptive sampling ratio is capped statically at the op's default,
  which is exact for every RoI inside the canvas (clipped proposals and gt boxes are).

  Args:
    gt_masks: uint8 [M, H, W] instance masks.
    boxes: [P, 4] positive RoIs; matched: int32 [P] their gt index; valid: bool [P].

  Returns:
    float32 [P, 28, 28], zero on invalid slots.
  """
  def mask_of(index):
    return jax.lax.dynamic_index_in_dim(gt_masks, index, keepdims=True).astype(jnp.float32)

  return _project_on_boxes(mask_of, boxes, matched, valid)


def box_mask_targets(gt_boxes, boxes, matched, valid, image_size: Tuple[int, int]):
  """28x28 box-footprint targets of one image (box-supervised mask heads, BoxInst).

  Each matched gt box is rasterised at canvas resolution (pixel (y, x) is inside iff
  ``y0 <= y <= y1`` and ``x0 <= x <= x1``, the data's inclusive convention) and projected on
  the RoI exactly as :func:`mask_targets` projects an instance mask, so the result is the
  box's soft footprint in the RoI's 28x28 frame.

  Args:
    gt_boxes: float [M, 4] INCLUSIVE pixel boxes (y0, x0, y1, x1), as in the batch.
    boxes: [P, 4] positive RoIs (continuous); matched: int32 [P] their gt index;
      valid: bool [P].
    image_size: static canvas (H, W).

  Returns:
    float32 [P, 28, 28], zero on invalid slots.
  """
  h, w = image_size
  ys = jnp.arange(h, dtype=jnp.float32)[:, None]
  xs = jnp.arange(w, dtype=jnp.float32)[None, :]
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)

  def mask_of(index):
    y0, x0, y1, x1 = jax.lax.dynamic_index_in_dim(gt_boxes, index, keepdims=False)
    inside = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)
    return inside.astype(jnp.float32)[None]

  return _project_on_boxes(mask_of, boxes, matched, valid)


class Detections(NamedTuple):
  """Final detections of one image; K = ``detections_per_img``."""
  boxes: jax.Array  # [K, 4]
  scores: jax.Array  # [K]
  classes: jax.Array  # int32 [K]
  valid: jax.Array  # bool [K]


def num_candidates(num_rois: int, num_classes: int, cap: Optional[int]) -> int:
  """Static number of (RoI, class) pairs that enter the per-class NMS."""
  total = num_rois * (num_classes - 1)
  return total if cap is None else min(cap, total)


def detections(class_logits, box_deltas, proposals, proposal_valid, image_size: Tuple[int, int],
               *, score_thresh: float, nms_thresh: float, detections_per_img: int,
               candidates: Optional[int]) -> Detections:
  """``postprocess_detections`` for one image.

  Softmax over classes, class-specific boxes decoded with weights (10, 10, 5, 5) and clipped,
  background dropped, (RoI, class) pairs with score > ``score_thresh`` and both sides >= 1e-2
  kept, per-class NMS at ``nms_thresh``, best ``detections_per_img`` by score. The pairs
  entering NMS are the ``candidates`` best-scoring ones (static cap; exact whenever at most
  that many pairs pass the score threshold, as torchvision has no cap).

  Args:
    class_logits: [R, C]; box_deltas: [R, C, 4]; proposals: [R, 4]; proposal_valid: bool [R].
    image_size: static (H, W).

  Returns:
    ``Detections`` sorted by score; invalid slots are zero (class 0).
  """
  r, c = class_logits.shape
  probs = jax.nn.softmax(class_logits, axis=-1)
  boxes = ops.decode_boxes(box_deltas, proposals[:, None, :], ROI_WEIGHTS)
  boxes = ops.clip_boxes(boxes, image_size)
  boxes = boxes[:, 1:].reshape(-1, 4)
  scores = probs[:, 1:].reshape(-1)
  classes = jnp.broadcast_to(jnp.arange(1, c, dtype=jnp.int32), (r, c - 1)).reshape(-1)
  valid = (jnp.repeat(proposal_valid, c - 1) & (scores > score_thresh)
           & ops.small_box_mask(boxes, MIN_DETECTION_SIZE))
  k = num_candidates(r, c, candidates)
  _, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
  boxes, scores, classes, valid = boxes[idx], scores[idx], classes[idx], valid[idx]
  keep, kept = ops.batched_nms(boxes, scores, classes, nms_thresh, min(detections_per_img, k),
                               valid=valid)
  pad = detections_per_img - keep.shape[0]
  if pad:
    keep = jnp.pad(keep, (0, pad))
    kept = jnp.pad(kept, (0, pad))
  return Detections(jnp.where(kept[:, None], boxes[keep], 0.0),
                    jnp.where(kept, scores[keep], 0.0),
                    jnp.where(kept, classes[keep], 0).astype(jnp.int32), kept)
