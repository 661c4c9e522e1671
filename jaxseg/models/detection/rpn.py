"""Region proposal network: proposals and training targets, per image, static shapes.

Both functions work on one image; the model vmaps them over the batch. They reproduce
torchvision's ``RegionProposalNetwork.filter_proposals`` and ``assign_targets_to_anchors``
(torchvision 0.29); where torchvision returns variable-length lists, these return fixed-size
arrays with a validity mask.
"""
from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import ops

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# torchvision's RegionProposalNetwork.min_size.
MIN_PROPOSAL_SIZE = 1e-3


def num_proposals(level_sizes: Sequence[int], pre_nms_top_n: int, post_nms_top_n: int) -> int:
  """R, the static number of proposal slots per image."""
  per_level = [min(post_nms_top_n, pre_nms_top_n, n) for n in level_sizes]
  return min(post_nms_top_n, sum(per_level))


def proposals(logits, deltas, anchors: Sequence[np.ndarray], image_size: Tuple[int, int], *,
              pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
              score_thresh: float) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """RPN proposals of one image (``filter_proposals``); no gradient flows through them.

  Per level: the top ``min(pre_nms_top_n, level size)`` anchors by objectness, their decoded
  boxes clipped to the canvas, boxes with a side < 1e-3 or sigmoid(score) < ``score_thresh``
  dropped, NMS at ``nms_thresh`` within the level; then the best ``post_nms_top_n`` over all
  levels by score. NMS level by level (vmapped over the levels) is torchvision's
  ``batched_nms`` with the level as the group, without an IoU matrix across levels.

  Args:
    logits: [A] objectness logits of all levels (level, y, x, anchor order).
    deltas: [A, 4] (dy, dx, dh, dw) deltas, RPN weights (1, 1, 1, 1).
    anchors: per-level NumPy anchors [A_l, 4] (y0, x0, y1, x1), sum A_l = A.
    image_size: static (H, W) of the canvas.
    pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh: torchvision's RPN settings.

  Returns:
    boxes [R, 4] sorted by score (zeros where invalid), scores [R] (sigmoid, 0 where
    invalid) and valid bool [R], with R = ``num_proposals(...)``.
  """
  logits = jax.lax.stop_gradient(logits)
  deltas = jax.lax.stop_gradient(deltas)
  ks = [min(pre_nms_top_n, a.shape[0]) for a in anchors]
  k = max(ks)
  # Each level's top-k, padded to the largest k, so that one NMS vmapped over the levels
  # replaces a loop of per-level NMS (one compiled loop of k steps instead of five).
  top_logits, top_deltas, top_anchors, real = [], [], [], []
  start = 0
  for level_anchors, k_level in zip(anchors, ks):
    n = level_anchors.shape[0]
    top, idx = jax.lax.top_k(logits[start:start + n], k_level)
    pad = k - k_level
    top_logits.append(jnp.pad(top, (0, pad)))
    top_deltas.append(jnp.pad(deltas[start:start + n][idx], ((0, pad), (0, 0))))
    top_anchors.append(jnp.pad(jnp.asarray(level_anchors)[idx], ((0, pad), (0, 0))))
    real.append(np.arange(k) < k_level)
    start += n
  boxes = ops.decode_boxes(jnp.stack(top_deltas), jnp.stack(top_anchors), RPN_WEIGHTS)
  boxes = ops.clip_boxes(boxes, image_size)  # [L, k, 4]
  prob = jax.nn.sigmoid(jnp.stack(top_logits))  # [L, k]
  valid = (jnp.asarray(np.stack(real)) & ops.small_box_mask(boxes, MIN_PROPOSAL_SIZE)
           & (prob >= score_thresh))
  m = min(post_nms_top_n, k)
  keep, kept = jax.vmap(lambda b, s, v: ops.nms(b, s, nms_thresh, m, valid=v))(boxes, prob, valid)
  boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1).reshape(-1, 4)
  scores = jnp.where(kept, jnp.take_along_axis(prob, keep, axis=1), -jnp.inf).reshape(-1)
  valid = kept.reshape(-1)
  # Levels in order, each sorted by score: top_k breaks score ties towards the lower level,
  # as torchvision's stable sort of the concatenated levels does.
  r = num_proposals([a.shape[0] for a in anchors], pre_nms_top_n, post_nms_top_n)
  _, order = jax.lax.top_k(scores, r)
  valid = valid[order]
  boxes = jnp.where(valid[:, None], boxes[order], 0.0)
  scores = jnp.where(valid, scores[order], 0.0)
  return boxes, scores, valid


def anchor_targets(anchors, gt_boxes, gt_valid, key, sampler: Callable, *, fg_iou_thresh: float,
                   bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float
                   ) -> Tuple[jax.Array, jax.Array]:
  """Anchor labels and regression targets of one image (``assign_targets_to_anchors``).

  Anchors are matched to gt boxes at IoU >= ``fg_iou_thresh`` (positive), <
  ``bg_iou_thresh`` (negative), in between ignored, plus the low-quality matches (each gt's
  best anchors, ties included); padded gt boxes never match. ``sampler`` then draws
  ``batch_size_per_image`` anchors with at most ``positive_fraction`` positives.

  Args:
    anchors: [A, 4] anchors (y0, x0, y1, x1).
    gt_boxes: [M, 4] gt boxes in continuous coordinates (y0, x0, y1, x1).
    gt_valid: bool [M], False on padding.
    key: PRNG key of the sampler.
    sampler: ``(labels [A], key, num_samples, positive_fraction) -> (pos [A], neg [A])``.

  Returns:
    labels int32 [A] (1 sampled positive, 0 sampled negative, -1 not sampled) and targets
    [A, 4] (``encode_boxes(matched gt, anchor)``, weights (1, 1, 1, 1); 0 on anchors that
    matched no gt).
  """
  anchors = jnp.asarray(anchors)
  iou = ops.box_iou(gt_boxes, anchors)
  matched, match_labels = ops.match(iou, fg_iou_thresh, bg_iou_thresh, allow_low_quality=True,
                                    gt_valid=gt_valid)
  pos, neg = sampler(match_labels, key, batch_size_per_image, positive_fraction)
  labels = jnp.where(pos, 1, jnp.where(neg, 0, -1)).astype(jnp.int32)
  matched_boxes = gt_boxes[jnp.maximum(matched, 0)]
  is_fg = (match_labels == 1)[:, None]
  # Unmatched anchors pair with an arbitrary (maybe padding) gt box; zero them so a loss that
  # multiplies by a mask never sees log(0).
  safe_boxes = jnp.where(is_fg, matched_boxes, anchors)
  targets = jnp.where(is_fg, ops.encode_boxes(safe_boxes, anchors, RPN_WEIGHTS), 0.0)
  return labels, jax.lax.stop_gradient(targets)
