"""Detection ops for Mask R-CNN with torchvision semantics, in static-shape JAX.

Boxes are always (y0, x0, y1, x1) in continuous input-pixel coordinates (torchvision's xyxy
with the axes swapped). ``boxes``: IoU, box coder, clipping; ``anchors``: host-side anchor grids;
``sampling``: matcher and balanced sampler; ``nms``: static NMS; ``roi_align``: RoIAlign,
adaptive mask-target RoIAlign and multi-scale (FPN) RoIAlign.
"""
from jaxseg.ops.anchors import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES, base_anchors, grid_anchors
from jaxseg.ops.boxes import (DEFAULT_BBOX_XFORM_CLIP, box_area, box_iou, clip_boxes,
                              decode_boxes, encode_boxes, from_xyxy, small_box_mask, to_xyxy)
from jaxseg.ops.nms import batched_nms, nms
from jaxseg.ops.roi_align import (default_max_sampling_ratio, level_scales, multiscale_roi_align,
                                  roi_align, roi_align_adaptive, roi_levels)
from jaxseg.ops.sampling import balanced_sample, match, sample_indices

__all__ = [
    "DEFAULT_ASPECT_RATIOS", "DEFAULT_SIZES", "base_anchors", "grid_anchors",
    "DEFAULT_BBOX_XFORM_CLIP", "box_area", "box_iou", "clip_boxes", "decode_boxes",
    "encode_boxes", "from_xyxy", "small_box_mask", "to_xyxy",
    "balanced_sample", "match", "sample_indices",
    "batched_nms", "nms",
    "default_max_sampling_ratio", "level_scales", "multiscale_roi_align", "roi_align",
    "roi_align_adaptive", "roi_levels",
]
