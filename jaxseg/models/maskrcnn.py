"""Mask R-CNN (He et al. 2017) with torchvision's ``maskrcnn_resnet50_fpn`` semantics.

``jaxseg.models.build("maskrcnn", num_classes=91, backbone="resnet50")`` builds
:class:`MaskRCNN`: ResNet (frozen BatchNorm) + FPN, an RPN over five pyramid levels, a box
branch (MultiScaleRoIAlign 7x7 -> two 1024-wide fc layers -> class scores and
class-specific boxes) and a mask branch (RoIAlign 14x14 -> four 3x3 convs -> 2x2 transposed
conv -> 28x28 mask logits per class). Every shape is static: proposals, sampled RoIs and
detections live in fixed-size arrays with validity masks, so the whole model jits, and
changing numbers of gt boxes never recompile (only the padded size M does).

Conventions:
- Images: float32 [N,H,W,3] RGB in [0,1], H and W multiples of 32, one fixed canvas (no
  resizing inside; the canvas is the image). The model normalises with the ImageNet
  mean/std. A torchvision model built with ``min_size``/``max_size`` equal to the canvas
  sees the same input.
- Boxes in and out of the model are (y0, x0, y1, x1) in continuous canvas pixels. The gt
  boxes of a batch are inclusive pixel boxes (the data convention): the model adds 1 to
  y1/x1 when it reads them.
- Class 0 is background; ``num_classes`` counts it (torchvision's 91 for COCO).

``mask_supervision="boxes"`` trains the mask head from the boxes alone (BoxInst, Tian et al.
2021, on Mask R-CNN's RoI masks): the model needs no ``instance_masks``, returns the gt boxes'
28x28 footprints as ``mask_targets`` and the RoIs' colours as ``mask_colors``, and
``jaxseg.losses.maskrcnn_loss(..., mask_loss="boxinst")`` turns them into BoxInst's
projection and pairwise terms. The RPN and the box head train from the boxes as usual.

Differences from torchvision that cannot be removed with static shapes: the inference
per-class NMS sees at most ``box_candidates`` (RoI, class) pairs (the best-scoring ones),
which is exact whenever no more pairs pass ``box_score_thresh``; random sampling draws
from JAX's PRNG (inject ``sampler`` for bit-exact training parity).
"""
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import ops
from jaxseg.models import layers
from jaxseg.models.detection import roi_heads, rpn
from jaxseg.models.detection.fpn import RESNETS, ResNetFPN
from jaxseg.models.detection.heads import (FastRCNNPredictor, MaskRCNNHeads, MaskRCNNPredictor,
                                           RPNHead, TwoMLPHead)
from jaxseg.models.detection.paste import paste_masks, paste_masks_jax
from jaxseg.models.registry import register

__all__ = ["MaskRCNN", "maskrcnn", "check_target_values", "paste_masks", "paste_masks_jax",
           "TINY", "maskrcnn_tiny",
           "maskrcnn_resnet18_fpn", "maskrcnn_resnet34_fpn", "maskrcnn_resnet50_fpn",
           "maskrcnn_resnet101_fpn", "maskrcnn_resnet50_fpn_coco_v1"]

BOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14
MASK_SIZE = roi_heads.MASK_SIZE
CANVAS_MULTIPLE = 32
TARGET_KEYS = ("boxes", "box_classes", "instance_masks")
MASK_SUPERVISION = ("masks", "boxes")


def _concrete(x) -> bool:
  """Whether ``x``'s values can be read on this host (not a tracer, every shard local)."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_target_values(targets, image_size: Tuple[int, int], num_classes: int, *,
                        where: str = "maskrcnn") -> None:
  """Host-side check of the values of a batch's gt boxes and classes (NumPy).

  Every slot with ``box_classes >= 0`` is a real object: its class must be in 1..C-1 (0 is the
  background) and its box an inclusive pixel box (the data convention, module docstring)
  inside the canvas: ``0 <= y0 <= y1 <= H-1`` and ``0 <= x0 <= x1 <= W-1``. Padding slots
  hold -1 and any box. The model calls this from ``__call__`` when the targets are concrete;
  under ``jit`` they are tracers, so the trainer calls it on the host batch.

  Args:
    targets: dict with ``boxes`` float [N,M,4] (y0, x0, y1, x1) and ``box_classes`` int
      [N,M] (-1 = padding); NumPy arrays or fully addressable ``jax.Array``s.
    image_size: (H, W) of the canvas.
    num_classes: C, background included.
    where: prefix of the error messages.

  Raises:
    ValueError: a class below -1, equal to 0 or >= C; a non-finite, inverted or out-of-image
      box of a real slot; ``box_classes`` not shaped like ``boxes[..., 0]``.
  """
  boxes = np.asarray(targets["boxes"], np.float64)
  classes = np.asarray(targets["box_classes"]).astype(np.int64)
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or classes.shape != boxes.shape[:2]:
    raise ValueError(f"{where}: targets['boxes'] must be [N,M,4] and targets['box_classes'] "
                     f"[N,M], got {boxes.shape} and {classes.shape}")
  h, w = image_size
  classes_help = (f"object classes are 1..{num_classes - 1} (num_classes={num_classes} counts "
                  "the background), -1 pads")

  def first(mask):
    i, j = np.argwhere(mask)[0]
    return f"{int(np.count_nonzero(mask))} slot(s), the first at image {i}, slot {j}"

  below = classes < -1
  if below.any():
    raise ValueError(f"{where}: targets['box_classes'] has {np.unique(classes[below])[:8].tolist()}"
                     f" ({first(below)}); {classes_help}")
  if (classes == 0).any():
    raise ValueError(f"{where}: targets['box_classes'] 0 is the background class "
                     f"({first(classes == 0)}); {classes_help}")
  above = classes >= num_classes
  if above.any():
    raise ValueError(f"{where}: targets['box_classes'] has {np.unique(classes[above])[:8].tolist()}"
                     f" >= num_classes ({first(above)}); {classes_help}")
  real = classes >= 0
  y0, x0, y1, x1 = (boxes[..., k] for k in range(4))

  def box_at(mask):
    i, j = np.argwhere(mask)[0]
    return (f"{tuple(float(v) for v in boxes[i, j])} at image {i}, slot {j} "
            f"({int(np.count_nonzero(mask))} such box(es))")

  nonfinite = real & ~np.isfinite(boxes).all(-1)
  if nonfinite.any():
    raise ValueError(f"{where}: targets['boxes'] has a non-finite box {box_at(nonfinite)}")
  inverted = real & ((y0 > y1) | (x0 > x1))
  if inverted.any():
    raise ValueError(f"{where}: targets['boxes'] has an inverted box {box_at(inverted)}: boxes "
                     "are (y0, x0, y1, x1) with y0 <= y1 and x0 <= x1 (not (x0, y0, x1, y1), "
                     "not (y, x, height, width))")
  outside = real & ((y0 < 0) | (x0 < 0) | (y1 > h - 1) | (x1 > w - 1))
  if outside.any():
    raise ValueError(f"{where}: targets['boxes'] has a box outside the {h}x{w} image "
                     f"{box_at(outside)}: boxes are inclusive pixel boxes (y0, x0, y1, x1) with "
                     f"0 <= y0 <= y1 <= {h - 1} and 0 <= x0 <= x1 <= {w - 1}; clip them to the "
                     "image (an exclusive end y1 = H becomes H - 1)")


class MaskRCNN(nn.Module):
  """Mask R-CNN, static shapes. See the module docstring for the conventions.

  Attributes:
    num_classes: classes including the background (>= 2).
    backbone_name: resnet18, resnet34, resnet50 or resnet101 (``build(..., backbone=)``).
    width_multiplier: scales the ResNet widths (thin variants for tests).
    frozen_bn_eps: epsilon of the backbone's frozen BatchNorms (1e-5; torchvision's legacy
      ``*_COCO_V1`` weights need 0.0).
    fpn_channels: FPN / RPN / RoI feature channels (256).
    representation_size: width of ``box_head`` fc6/fc7 (1024).
    mask_head_channels: channels of the mask head convs and ``conv5_mask`` (256).
    anchor_sizes, aspect_ratios: per pyramid level P2..P6 (every level needs the same number
      of anchors, as the RPN head is shared).
    rpn_*, box_*: torchvision's hyperparameters, same names and defaults.
    box_candidates: static cap on the (RoI, class) pairs that enter the inference NMS, the
      best-scoring ones; exact whenever at most that many pass ``box_score_thresh`` (a
      trained COCO model typically has a few hundred to ~2000 at 0.05). None: all
      ``R * (num_classes - 1)`` pairs (exact, O(pairs^2) NMS).
    paste_masks: return ``masks`` pasted at canvas resolution; False returns the 28x28
      ``mask_probs`` instead (paste on the host with :func:`paste_masks`).
    mask_supervision: what trains the mask head. "masks" (torchvision): ``mask_targets`` are
      the matched ``instance_masks`` projected on the RoIs. "boxes" (BoxInst): training reads
      only ``boxes``/``box_classes``; ``mask_targets`` are the matched gt boxes' footprints
      in the RoIs' 28x28 frames, and the outputs add ``mask_colors`` for the pairwise term
      (train with ``maskrcnn_loss(..., mask_loss="boxinst")``). Inference is the same.
    sampler: ``(labels [K] int32, key, num_samples, positive_fraction) -> (pos, neg)`` bool
      [K] masks; labels >= 1 positive, 0 negative, -1 ignored. Used by the RPN and RoI heads
      (inject a deterministic one for parity tests).
    dtype: computation dtype of the networks (parameters and outputs are float32).
    remat: recompute each ResNet block of the backbone in the backward pass
      (``jax.checkpoint``) instead of storing its activations; same parameters and results.

  Call: ``model.apply(variables, images, train=False)`` or, in training,
  ``model.apply(variables, images, train=True, targets=batch, rngs={"sampling": key})``
  (the library's train step does this). Parameters: ``model.init(key, images, train=False)``.
  """
  num_classes: int = 91
  backbone_name: str = "resnet50"
  width_multiplier: float = 1.0
  frozen_bn_eps: float = 1e-5
  fpn_channels: int = 256
  representation_size: int = 1024
  mask_head_channels: int = 256
  anchor_sizes: Sequence[Sequence[float]] = ops.DEFAULT_SIZES
  aspect_ratios: Sequence[Sequence[float]] = ops.DEFAULT_ASPECT_RATIOS
  rpn_pre_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 1000
  rpn_post_nms_top_n_train: int = 2000
  rpn_post_nms_top_n_test: int = 1000
  rpn_nms_thresh: float = 0.7
  rpn_fg_iou_thresh: float = 0.7
  rpn_bg_iou_thresh: float = 0.3
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_score_thresh: float = 0.0
  box_score_thresh: float = 0.05
  box_nms_thresh: float = 0.5
  box_detections_per_img: int = 100
  box_fg_iou_thresh: float = 0.5
  box_bg_iou_thresh: float = 0.5
  box_batch_size_per_image: int = 512
  box_positive_fraction: float = 0.25
  box_candidates: Optional[int] = 5000
  paste_masks: bool = True
  mask_supervision: str = "masks"
  sampler: Callable = ops.balanced_sample
  dtype: Any = jnp.float32
  remat: bool = False

  # The library's train step passes ``targets=batch`` to such models in training.
  takes_targets = True

  def setup(self):
    self._check_config()
    num_anchors = len(self.anchor_sizes[0]) * len(self.aspect_ratios[0])
    self.backbone = ResNetFPN(self.backbone_name, self.width_multiplier, self.frozen_bn_eps,
                              self.fpn_channels, self.dtype, self.remat)
    self.rpn = RPNHead(num_anchors, self.dtype)
    self.box_head = TwoMLPHead(self.representation_size, self.dtype)
    self.box_predictor = FastRCNNPredictor(self.num_classes, self.dtype)
    self.mask_head = MaskRCNNHeads((self.mask_head_channels,) * 4, self.dtype)
    self.mask_predictor = MaskRCNNPredictor(self.num_classes, self.mask_head_channels,
                                            self.dtype)

  # --------------------------------------------------------------------------
  # Validation
  # --------------------------------------------------------------------------

  def _check_config(self):
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
        or self.num_classes < 2:
      raise ValueError(f"maskrcnn: num_classes must be an int >= 2 (background included), got "
                       f"{self.num_classes!r}")
    if self.backbone_name not in RESNETS:
      raise ValueError(f"maskrcnn: backbone {self.backbone_name!r} is not supported; "
                       f"supported: {', '.join(RESNETS)}")
    if len(self.anchor_sizes) != 5 or len(self.aspect_ratios) != 5:
      raise ValueError("maskrcnn: anchor_sizes and aspect_ratios need one entry per pyramid "
                       f"level P2..P6 (5), got {len(self.anchor_sizes)} and "
                       f"{len(self.aspect_ratios)}")
    counts = {len(s) * len(a) for s, a in zip(self.anchor_sizes, self.aspect_ratios)}
    if len(counts) != 1:
      raise ValueError("maskrcnn: every pyramid level needs the same number of anchors "
                       f"(shared RPN head), got sizes {self.anchor_sizes} and aspect ratios "
                       f"{self.aspect_ratios}")
    for name in ("rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
                 "rpn_post_nms_top_n_test", "rpn_batch_size_per_image",
                 "box_detections_per_img", "box_batch_size_per_image"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"maskrcnn: {name} must be a positive int, got {value!r}")
    if self.box_candidates is not None and (not isinstance(self.box_candidates, int)
                                            or self.box_candidates < 1):
      raise ValueError(f"maskrcnn: box_candidates must be a positive int or None, got "
                       f"{self.box_candidates!r}")
    for name in ("rpn_positive_fraction", "box_positive_fraction"):
      if not 0 < getattr(self, name) <= 1:
        raise ValueError(f"maskrcnn: {name} must be in (0, 1], got {getattr(self, name)!r}")
    if int(self.box_batch_size_per_image * self.box_positive_fraction) < 1:
      raise ValueError("maskrcnn: box_batch_size_per_image * box_positive_fraction must be >= 1")
    if self.mask_supervision not in MASK_SUPERVISION:
      raise ValueError(f"maskrcnn: mask_supervision must be one of {MASK_SUPERVISION}, got "
                       f"{self.mask_supervision!r}")

  def _check_images(self, images) -> Tuple[int, int]:
    layers.check_images(images, "maskrcnn")
    h, w = images.shape[1:3]
    if h % CANVAS_MULTIPLE or w % CANVAS_MULTIPLE:
      raise ValueError(f"maskrcnn: the image canvas must be a multiple of {CANVAS_MULTIPLE} in "
                       f"height and width (pad it in the data pipeline), got {h}x{w}")
    return h, w

  def _check_targets(self, targets, images) -> Dict[str, jax.Array]:
    keys = TARGET_KEYS if self.mask_supervision == "masks" else TARGET_KEYS[:2]
    if targets is None:
      raise ValueError(f"maskrcnn: train=True needs targets=batch with {list(keys)}")
    if not hasattr(targets, "keys"):
      raise TypeError(f"maskrcnn: targets must be a dict (the batch), got "
                      f"{type(targets).__name__}")
    missing = [k for k in keys if k not in targets]
    if missing:
      hint = ""
      if "instance_masks" in missing:
        hint = ("; without instance masks, build the model with mask_supervision='boxes' "
                "(BoxInst: the mask head learns from the boxes)")
      raise ValueError(f"maskrcnn: targets lack {missing}; need {list(keys)}{hint}")
    n, h, w = images.shape[:3]
    boxes, classes = targets["boxes"], targets["box_classes"]
    if boxes.ndim != 3 or boxes.shape[0] != n or boxes.shape[2] != 4:
      raise ValueError(f"maskrcnn: targets['boxes'] must be [N,M,4] with N={n}, got "
                       f"{tuple(boxes.shape)}")
    m = boxes.shape[1]
    if m < 1:
      raise ValueError("maskrcnn: targets['boxes'] needs at least one (possibly padding) slot")
    if tuple(classes.shape) != (n, m):
      raise ValueError(f"maskrcnn: targets['box_classes'] must be [N,M]=({n}, {m}), got "
                       f"{tuple(classes.shape)}")
    if not jnp.issubdtype(classes.dtype, jnp.integer):
      raise TypeError(f"maskrcnn: targets['box_classes'] must be integer, got {classes.dtype}")
    if _concrete(boxes) and _concrete(classes):
      check_target_values({"boxes": boxes, "box_classes": classes}, (h, w), self.num_classes)
    if self.mask_supervision == "boxes":
      return {"boxes": boxes, "box_classes": classes}
    masks = targets["instance_masks"]
    if tuple(masks.shape) != (n, m, h, w):
      raise ValueError(f"maskrcnn: targets['instance_masks'] must be [N,M,H,W]=({n}, {m}, {h}, "
                       f"{w}) (canvas size), got {tuple(masks.shape)}")
    return {"boxes": boxes, "box_classes": classes, "instance_masks": masks}

  # --------------------------------------------------------------------------
  # Network pieces
  # --------------------------------------------------------------------------

  def _anchors(self, features, image_size):
    return ops.grid_anchors(image_size, [f.shape[1:3] for f in features], self.anchor_sizes,
                            self.aspect_ratios)

  def _box_branch(self, fpn, boxes, image_size):
    """RoI features [N,K,7,7,C], class logits [N,K,C] and deltas [N,K,C,4] of ``boxes``."""
    feats = ops.multiscale_roi_align(list(fpn[:4]), boxes, BOX_ROI_SIZE, image_size=image_size,
                                     sampling_ratio=2)
    logits, deltas = self.box_predictor(self.box_head(feats))
    return feats, logits, deltas

  def _mask_branch(self, fpn, boxes, image_size):
    """Mask logits [N,K,28,28,num_classes] of ``boxes`` [N,K,4]."""
    n, k = boxes.shape[:2]
    feats = ops.multiscale_roi_align(list(fpn[:4]), boxes, MASK_ROI_SIZE,
                                     image_size=image_size, sampling_ratio=2)
    feats = feats.reshape((n * k,) + feats.shape[2:])
    logits = self.mask_predictor(self.mask_head(feats))
    return logits.reshape((n, k) + logits.shape[1:])

  def _positive_mask_branch(self, fpn, boxes, valid, image_size):
    """``_mask_branch`` of the leading slots that hold every image's positives.

    torchvision runs the mask head on the positives alone (about 25 per image early in
    training, at most P); a static P-slot branch did up to 5x its work. The slots are cut to
    the first bucket of P/4, P/2 or P that holds the largest image's positives (``valid``
    slots come first), so the result equals the full branch on every valid slot; the others
    are zero (the loss ignores them).

    Args:
      boxes: [N,P,4] mask RoIs, positives first; valid: bool [N,P].
    Returns:
      mask logits [N,P,28,28,num_classes].
    """
    p = boxes.shape[1]
    caps = sorted({max(1, p // 4), max(1, p // 2), p})
    count = jnp.max(jnp.sum(valid, axis=1))
    index = jnp.searchsorted(jnp.asarray(caps), count)  # the first cap >= count

    def branch(cap):
      # Rematerialised: a switch's backward keeps the residuals of every branch (zero-filled
      # for those not taken), which cost more than recomputing the taken branch's forward.
      @nn.checkpoint
      def run(module, fpn, boxes):
        logits = module._mask_branch(fpn, boxes[:, :cap], image_size)
        return jnp.pad(logits, ((0, 0), (0, p - cap), (0, 0), (0, 0), (0, 0)))
      return run

    return nn.switch(index, [branch(c) for c in caps], self, fpn, boxes)

  def _proposals(self, fpn, logits, deltas, image_size, train: bool):
    anchors = self._anchors(fpn, image_size)
    pre = self.rpn_pre_nms_top_n_train if train else self.rpn_pre_nms_top_n_test
    post = self.rpn_post_nms_top_n_train if train else self.rpn_post_nms_top_n_test
    fn = functools.partial(rpn.proposals, anchors=anchors, image_size=image_size,
                           pre_nms_top_n=pre, post_nms_top_n=post,
                           nms_thresh=self.rpn_nms_thresh, score_thresh=self.rpn_score_thresh)
    boxes, _, valid = jax.vmap(fn)(logits, deltas)
    return anchors, boxes, valid

  # --------------------------------------------------------------------------
  # Public entry points
  # --------------------------------------------------------------------------

  def predict_for_boxes(self, images, boxes) -> Dict[str, jax.Array]:
    """Box and mask head outputs for given RoIs (parity tests, research).

    Args:
      images: float [N,H,W,3] in [0,1] (canvas rules as ``__call__``).
      boxes: float [N,K,4] (y0, x0, y1, x1) RoIs in canvas pixels.

    Returns:
      ``class_logits`` [N,K,C], ``box_deltas`` [N,K,C,4] (dy, dx, dh, dw; weights
      (10, 10, 5, 5)), ``mask_logits`` [N,K,28,28,C].
    """
    image_size = self._check_images(images)
    boxes = jnp.asarray(boxes, jnp.float32)
    if boxes.ndim != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[2] != 4:
      raise ValueError(f"maskrcnn.predict_for_boxes: boxes must be [N,K,4] with "
                       f"N={images.shape[0]}, got {tuple(boxes.shape)}")
    fpn = self.backbone(images, train=False)
    if self.is_initializing():
      self.rpn(fpn)
    _, logits, deltas = self._box_branch(fpn, boxes, image_size)
    return {"class_logits": logits, "box_deltas": deltas,
            "mask_logits": self._mask_branch(fpn, boxes, image_size)}

  def __call__(self, images, *, train: bool, targets: Optional[Dict[str, Any]] = None):
    """Detections (``train=False``) or everything ``maskrcnn_loss`` needs (``train=True``).

    Args:
      images: float [N,H,W,3] in [0,1]; H, W multiples of 32.
      train: training mode (target assignment and sampling; needs ``targets`` and the
        ``"sampling"`` RNG).
      targets: the batch: ``boxes`` float32 [N,M,4] inclusive pixel boxes, ``box_classes``
        int32 [N,M] (-1 padding), ``instance_masks`` uint8 [N,M,H,W] (not read with
        ``mask_supervision="boxes"``).

    Returns:
      ``train=False``: ``boxes`` [N,K,4], ``scores`` [N,K], ``classes`` int32 [N,K],
      ``masks`` [N,K,H,W] probabilities (or ``mask_probs`` [N,K,28,28] with
      ``paste_masks=False``), ``valid`` bool [N,K]; K = ``box_detections_per_img``, sorted
      by score, invalid entries zero.
      ``train=True``: ``rpn_logits`` [N,A], ``rpn_deltas`` [N,A,4], ``rpn_labels`` int32
      [N,A] (1/0 sampled positive/negative, -1 not sampled), ``rpn_targets`` [N,A,4];
      ``class_logits`` [N,S,C], ``box_deltas`` [N,S,4] (of each RoI's gt class),
      ``roi_labels`` int32 [N,S], ``roi_valid`` bool [N,S], ``roi_targets`` [N,S,4];
      ``mask_logits`` [N,P,28,28] (gt-class channel), ``mask_targets`` [N,P,28,28],
      ``mask_valid`` bool [N,P]; S = ``box_batch_size_per_image``, P = int(S *
      ``box_positive_fraction``). With ``mask_supervision="boxes"``, ``mask_targets`` are
      the gt boxes' footprints and ``mask_colors`` [N,P,28,28,3] is the image (in [0,1])
      sampled on the same RoI grids (RoIAlign, 2x2 samples per bin; no gradient), zero on
      invalid slots.

    Also sows into ``intermediates``: ``fpn`` (P2..P6), ``rpn_logits``, ``rpn_deltas``,
    ``proposals`` [N,R,4], ``proposal_valid`` [N,R]; in eval ``box_roi_features``
    [N,R,7,7,C], ``class_logits`` [N,R,C], ``box_deltas`` [N,R,C,4]; in training
    ``sampled_boxes`` [N,S,4] (the RoIs of the box branch).

    ``init`` builds the parameters through ``predict_for_boxes`` on one dummy box (no
    proposal or NMS work); its output is not a detection dict.
    """
    image_size = self._check_images(images)
    if self.is_initializing():
      dummy = jnp.broadcast_to(jnp.asarray([0.0, 0.0, *image_size], jnp.float32),
                               (images.shape[0], 1, 4))
      return self.predict_for_boxes(images, dummy)
    if train:
      targets = self._check_targets(targets, images)
    fpn = self.backbone(images, train=train)
    self.sow("intermediates", "fpn", fpn)
    rpn_logits, rpn_deltas = self.rpn(fpn)
    self.sow("intermediates", "rpn_logits", rpn_logits)
    self.sow("intermediates", "rpn_deltas", rpn_deltas)
    anchors, proposals, proposal_valid = self._proposals(fpn, rpn_logits, rpn_deltas,
                                                         image_size, train)
    self.sow("intermediates", "proposals", proposals)
    self.sow("intermediates", "proposal_valid", proposal_valid)
    if train:
      return self._train_outputs(images, fpn, rpn_logits, rpn_deltas, np.concatenate(anchors),
                                 proposals, proposal_valid, targets, image_size)
    return self._detect(fpn, proposals, proposal_valid, image_size)

  # --------------------------------------------------------------------------
  # Training and inference
  # --------------------------------------------------------------------------

  def _train_outputs(self, images, fpn, rpn_logits, rpn_deltas, anchors, proposals,
                     proposal_valid, targets, image_size):
    n = rpn_logits.shape[0]
    # Inclusive pixel boxes -> continuous boxes.
    gt_boxes = targets["boxes"].astype(jnp.float32) + jnp.asarray([0.0, 0.0, 1.0, 1.0])
    gt_classes = targets["box_classes"].astype(jnp.int32)
    gt_valid = gt_classes >= 0
    rpn_key, roi_key = jax.random.split(self.make_rng("sampling"))
    anchor_fn = functools.partial(
        rpn.anchor_targets, anchors, sampler=self.sampler, fg_iou_thresh=self.rpn_fg_iou_thresh,
        bg_iou_thresh=self.rpn_bg_iou_thresh, batch_size_per_image=self.rpn_batch_size_per_image,
        positive_fraction=self.rpn_positive_fraction)
    rpn_labels, rpn_targets = jax.vmap(anchor_fn)(gt_boxes, gt_valid,
                                                  jax.random.split(rpn_key, n))
    roi_fn = functools.partial(
        roi_heads.sample_rois, sampler=self.sampler, fg_iou_thresh=self.box_fg_iou_thresh,
        bg_iou_thresh=self.box_bg_iou_thresh, batch_size_per_image=self.box_batch_size_per_image,
        positive_fraction=self.box_positive_fraction)
    rois = jax.vmap(roi_fn)(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
                            jax.random.split(roi_key, n))
    self.sow("intermediates", "sampled_boxes", rois.boxes)
    _, class_logits, box_deltas = self._box_branch(fpn, rois.boxes, image_size)
    box_deltas = jnp.take_along_axis(box_deltas, rois.labels[:, :, None, None], axis=2)[:, :, 0]

    # The mask branch runs on the (at most P) positive RoIs, in sampled order.
    num_pos = int(self.box_batch_size_per_image * self.box_positive_fraction)
    positives = functools.partial(roi_heads.positive_slots, num_positive=num_pos)
    pos_idx, mask_valid = jax.vmap(positives)(rois.labels, rois.valid)

    def take(x):
      return jnp.take_along_axis(x, pos_idx.reshape(pos_idx.shape + (1,) * (x.ndim - 2)), axis=1)

    mask_boxes, mask_classes, mask_matched = (take(x) for x in (rois.boxes, rois.labels,
                                                                rois.matched))
    mask_logits = self._positive_mask_branch(fpn, mask_boxes, mask_valid, image_size)
    mask_logits = jnp.take_along_axis(mask_logits, mask_classes[:, :, None, None, None],
                                      axis=4)[..., 0]
    out = {
        "rpn_logits": rpn_logits, "rpn_deltas": rpn_deltas, "rpn_labels": rpn_labels,
        "rpn_targets": rpn_targets,
        "class_logits": class_logits, "box_deltas": box_deltas, "roi_labels": rois.labels,
        "roi_valid": rois.valid, "roi_targets": rois.targets,
        "mask_logits": mask_logits, "mask_valid": mask_valid,
    }
    if self.mask_supervision == "masks":
      out["mask_targets"] = jax.vmap(roi_heads.mask_targets)(
          targets["instance_masks"], mask_boxes, mask_matched, mask_valid)
      return out
    box_fn = functools.partial(roi_heads.box_mask_targets, image_size=image_size)
    out["mask_targets"] = jax.vmap(box_fn)(targets["boxes"].astype(jnp.float32), mask_boxes,
                                           mask_matched, mask_valid)
    # The pairwise term compares colours of neighbouring mask pixels, so the image is sampled
    # on the mask logits' own grid (the RoI's 28x28 bins).
    colors = ops.roi_align(images.astype(jnp.float32), mask_boxes, MASK_SIZE,
                           spatial_scale=1.0, sampling_ratio=2, aligned=False)
    out["mask_colors"] = jax.lax.stop_gradient(
        jnp.where(mask_valid[:, :, None, None, None], colors, 0.0))
    return out

  def _detect(self, fpn, proposals, proposal_valid, image_size):
    feats, class_logits, box_deltas = self._box_branch(fpn, proposals, image_size)
    self.sow("intermediates", "box_roi_features", feats)
    self.sow("intermediates", "class_logits", class_logits)
    self.sow("intermediates", "box_deltas", box_deltas)
    det_fn = functools.partial(
        roi_heads.detections, image_size=image_size, score_thresh=self.box_score_thresh,
        nms_thresh=self.box_nms_thresh, detections_per_img=self.box_detections_per_img,
        candidates=self.box_candidates)
    det = jax.vmap(det_fn)(class_logits, box_deltas, proposals, proposal_valid)
    mask_logits = self._mask_branch(fpn, det.boxes, image_size)
    mask_logits = jnp.take_along_axis(mask_logits, det.classes[:, :, None, None, None],
                                      axis=4)[..., 0]
    probs = jnp.where(det.valid[:, :, None, None], jax.nn.sigmoid(mask_logits), 0.0)
    out = {"boxes": det.boxes, "scores": det.scores, "classes": det.classes, "valid": det.valid}
    if self.paste_masks:
      out["masks"] = paste_masks_jax(probs, det.boxes, image_size)
    else:
      out["mask_probs"] = probs
    return out


# ----------------------------------------------------------------------------
# Builders and presets
# ----------------------------------------------------------------------------

@register("maskrcnn")
def maskrcnn(*, num_classes: int = 91, backbone: str = "resnet50", **fields) -> MaskRCNN:
  """``MaskRCNN`` on ``backbone`` (resnet18/34/50/101); ``fields`` set any other attribute.

  Raises:
    ValueError: unsupported backbone or invalid setting.
    TypeError: unknown field.
  """
  if backbone not in RESNETS:
    raise ValueError(f"maskrcnn: backbone {backbone!r} is not supported; supported: "
                     f"{', '.join(RESNETS)}")
  known = set(MaskRCNN.__dataclass_fields__) - {"parent", "name", "backbone_name"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise TypeError(f"maskrcnn: unknown option(s) {unknown}; valid: {', '.join(sorted(known))}")
  model = MaskRCNN(num_classes=num_classes, backbone_name=backbone, **fields)
  model._check_config()  # errors at build time, not at the first init
  return model


maskrcnn_resnet18_fpn = functools.partial(maskrcnn, backbone="resnet18")
maskrcnn_resnet34_fpn = functools.partial(maskrcnn, backbone="resnet34")
maskrcnn_resnet50_fpn = functools.partial(maskrcnn, backbone="resnet50")
maskrcnn_resnet101_fpn = functools.partial(maskrcnn, backbone="resnet101")
# torchvision's maskrcnn_resnet50_fpn(weights=COCO_V1) overwrites the frozen BN eps with 0.
maskrcnn_resnet50_fpn_coco_v1 = functools.partial(maskrcnn, backbone="resnet50", num_classes=91,
                                                  frozen_bn_eps=0.0)

# A thin variant for tests and smoke runs (canvases of 64..256 pixels).
TINY = dict(backbone="resnet18", width_multiplier=0.25, fpn_channels=32, representation_size=64,
            mask_head_channels=16, anchor_sizes=((8,), (16,), (32,), (64,), (128,)))
maskrcnn_tiny = functools.partial(maskrcnn, **TINY)
