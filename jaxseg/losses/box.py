"""Bounding-box supervision for semantic segmentation.

Boxes arrive as ``batch["boxes"]`` float32 [N,M,4] = (y0, x0, y1, x1) inclusive pixel
coordinates (pixel (y, x) is in the box iff y0 <= y <= y1 and x0 <= x <= x1) with
``batch["box_classes"]`` int32 [N,M], -1 on padding. They are rasterised inside the graph, so
shapes are static and a new set of boxes never recompiles. :func:`box_loss` selects a method:

* ``"em_fixed"`` -- WSSL Bbox-EM-Fixed (Papandreou et al. 2015): E-step = argmax of the
  network's scores plus ``bg_bias`` on background everywhere and ``fg_bias`` on class l inside
  the boxes of class l; M-step = cross-entropy on that (stop-gradient) labelling.
* ``"em_adapt"`` -- WSSL EM-Adapt: per-image adaptive biases so that at least
  ``floor(portion * #valid pixels)`` pixels take each present class (background ``bg_portion``,
  classes with a box ``fg_portion``), then the argmax; cross-entropy on it.
* ``"bbox_seg"`` -- WSSL Bbox-Seg soft targets (``PasteSoftSegmentBboxByArea``): inside a box
  of class l, P(l) = 0.75 on an eroded core holding ~``erode_scale`` of the box area and 0.5
  on the rest, the remainder on background; background 1 outside all boxes; overlapping boxes
  averaged per class and renormalised; soft cross-entropy.
* ``"boxinst"`` -- BoxInst (Tian et al. 2021) adapted to semantic logits: for each class c with
  boxes, p_c = softmax probability of c and B_c = union of the class's boxes; loss = Dice of
  the max-projections of p_c and B_c on both axes + ``pairwise_weight`` * the colour-pairwise
  term (8 neighbours at dilation 2, Lab similarity >= ``color_threshold``, centre pixel in B_c,
  ``-log P(y_i = y_j)`` with ``P = p_i p_j + (1 - p_i)(1 - p_j)`` in log space) +
  ``label_set_weight`` * :func:`box_label_set_nll` (background outside the boxes).
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.losses import _common
from jaxseg.losses import crf
from jaxseg.losses.supervised import cross_entropy



# ----------------------------------------------------------------------------------------------
# Boxes.


def _get_boxes(batch, logits, where):
  boxes = _common.require(batch, "boxes", where)
  classes = _common.require(batch, "box_classes", where)
  n = logits.shape[0]
  if boxes.ndim != 3 or boxes.shape[0] != n or boxes.shape[-1] != 4:
    raise ValueError(f"{where}: batch['boxes'] must be [N,M,4] with N={n}, "
                     f"got {tuple(boxes.shape)}")
  if tuple(classes.shape) != tuple(boxes.shape[:2]):
    raise ValueError(f"{where}: batch['box_classes'] must be [N,M] = {tuple(boxes.shape[:2])}, "
                     f"got {tuple(classes.shape)}")
  if not jnp.issubdtype(classes.dtype, jnp.integer):
    raise TypeError(f"{where}: batch['box_classes'] must be integer, got {classes.dtype}")
  return jnp.asarray(boxes, jnp.float32), jnp.asarray(classes, jnp.int32)


def rasterize_boxes(boxes: jax.Array, box_classes: jax.Array, height: int, width: int):
  """Box masks bool [N,M,H,W]; padding boxes (class < 0) are empty."""
  ys = jnp.arange(height, dtype=jnp.float32)[None, None, :, None]
  xs = jnp.arange(width, dtype=jnp.float32)[None, None, None, :]
  y0, x0, y1, x1 = (boxes[..., i][..., None, None] for i in range(4))
  inside = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)
  return inside & (box_classes >= 0)[..., None, None]


def class_box_masks(boxes, box_classes, num_classes: int, height: int, width: int):
  """Per-class union of the boxes, bool [N,H,W,C]. Classes >= num_classes are dropped."""
  inside = rasterize_boxes(boxes, box_classes, height, width).astype(jnp.float32)
  onehot = jax.nn.one_hot(box_classes, num_classes)  # -1 -> zeros
  return jnp.einsum("nmhw,nmc->nhwc", inside, onehot) > 0


def _present(box_classes, num_classes):
  return jnp.any(jax.nn.one_hot(box_classes, num_classes, dtype=jnp.bool_), axis=1)


def _check_background(background_class, c, where):
  if not 0 <= background_class < c:
    raise ValueError(f"{where}: background_class {background_class} is not in [0, {c})")


# ----------------------------------------------------------------------------------------------
# WSSL E-steps.


def bbox_em_fixed_targets(logits, boxes, box_classes, *, bg_bias: float = 1.0,
                          fg_bias: float = 2.0, background_class: int = 0) -> jax.Array:
  """Bbox-EM-Fixed labels: argmax of scores + fixed biases (WSSL ``BiasChannel`` PIXEL mode).

  Background gets ``bg_bias`` everywhere; class l gets ``fg_bias`` inside its boxes; other
  classes get nothing.

  Args:
    logits: float32 [N,H,W,C] scores (gradient stopped).
    boxes, box_classes: [N,M,4], [N,M].

  Returns:
    int32 [N,H,W].
  """
  n, h, w, c = logits.shape
  in_box = class_box_masks(boxes, box_classes, c, h, w)
  bias = fg_bias * in_box.astype(jnp.float32)
  bias = bias + bg_bias * jax.nn.one_hot(background_class, c)
  return jnp.argmax(jax.lax.stop_gradient(logits) + bias, axis=-1).astype(jnp.int32)


def bbox_em_adapt_targets(logits, boxes, box_classes, valid=None, *, bg_portion: float = 0.2,
                          fg_portion: float = 0.2, num_iter: int = 1,
                          background_class: int = 0, margin: float = 1e-4) -> jax.Array:
  """EM-Adapt labels (WSSL ``AdaptiveBiasChannel``) with the classes present in the boxes.

  Per image: absent classes are clipped below the smallest present score (they never win);
  then for each present class in turn -- background first, then the others in increasing
  index (the reference shuffles them) -- the class's scores are raised by the
  ``k = floor(portion * #valid pixels)``-th smallest value of ``max_present - score_l`` (plus
  ``margin``), so that at that moment at least k pixels take the class. A class adjusted later
  can take pixels back from an earlier one; ``num_iter`` repeats the pass. (The reference's
  final shift of all scores by a constant does not change the argmax and is omitted.) The
  order statistic is a per-image sort with a dynamic index: jit-safe.

  Args:
    logits: float32 [N,H,W,C] (gradient stopped).
    boxes, box_classes: [N,M,4], [N,M]; their classes plus the background are "present".
    valid: optional float/bool [N,H,W].

  Returns:
    int32 [N,H,W].
  """
  n, h, w, c = logits.shape
  s = jax.lax.stop_gradient(logits).reshape(n, h * w, c)
  v = (jnp.ones((n, h * w)) if valid is None else jnp.asarray(valid).reshape(n, h * w)) > 0
  present = _present(box_classes, c) | (jnp.arange(c) == background_class)[None]
  pres = present[:, None, :]
  min_present = jnp.min(jnp.where(pres, s, jnp.inf), axis=-1, keepdims=True)
  s = jnp.where(pres, s, jnp.minimum(s, min_present - margin))
  count = jnp.sum(v, axis=-1)
  order = [background_class] + [l for l in range(c) if l != background_class]
  for _ in range(int(num_iter)):
    for l in order:
      portion = bg_portion if l == background_class else fg_portion
      k = jnp.floor(portion * count).astype(jnp.int32)
      gap = jnp.max(jnp.where(pres, s, -jnp.inf), axis=-1) - s[..., l]
      gap = jnp.sort(jnp.where(v, gap, jnp.inf), axis=-1)
      kth = jnp.take_along_axis(gap, jnp.maximum(k - 1, 0)[:, None], axis=-1)[:, 0]
      bias = jnp.where(present[:, l] & (k > 0), kth + margin, 0.0)
      s = s.at[..., l].add(bias[:, None])
  return jnp.argmax(s, axis=-1).reshape(n, h, w).astype(jnp.int32)


def _image_extent(valid, axis):
  """Per image, 1 + the last index along ``axis`` (1 = rows, 2 = cols) holding a valid pixel."""
  any_valid = jnp.any(valid > 0, axis=3 - axis)
  idx = jnp.arange(any_valid.shape[-1], dtype=jnp.float32) + 1.0
  return jnp.max(jnp.where(any_valid, idx, 0.0), axis=-1)


def _erosion_steps(h, w, target):
  """Smallest n >= 1 with (h - 2n)(w - 2n) < target * h * w (a 3x3 erosion shrinks each side
  by one pixel per step)."""
  s = h + w
  disc = jnp.maximum(s * s - 4.0 * h * w * (1.0 - target), 0.0)
  root = (s - jnp.sqrt(disc)) / 4.0
  steps = jnp.floor(root) + 1.0
  area = lambda k: jnp.maximum(h - 2 * k, 0.0) * jnp.maximum(w - 2 * k, 0.0)
  # Guard the floor against rounding on either side of an exact root.
  steps = jnp.where((steps > 1) & (area(steps - 1) < target * h * w), steps - 1, steps)
  steps = jnp.where(area(steps) < target * h * w, steps, steps + 1)
  return jnp.maximum(steps, 1.0)


def bbox_seg_targets(boxes, box_classes, num_classes: int, height: int, width: int,
                     valid=None, *, erode_scale: float = 0.2, core_prob: float = 0.75,
                     box_prob: float = 0.5, background_class: int = 0) -> jax.Array:
  """WSSL Bbox-Seg soft targets (``PasteSoftSegmentBboxByArea`` + ``TransformSegToProb``).

  Each box of class l gives P(l) = ``core_prob`` on its eroded core and ``box_prob`` on the
  rest of the box, 1 - P(l) to background. The core is the box minus the image's outer
  one-pixel frame, eroded n times with a 3x3 square, n the smallest number of erosions that
  leaves less than ``erode_scale + 0.05`` of that area; boxes under 121 px or under 10 px a side
  are not eroded (the whole box is core). Outside all boxes background is 1. Per class the
  contributions of overlapping boxes are averaged, every class gets a 1e-12 floor and the
  pixel's distribution is renormalised. The reference's paste order (by area) only matters for
  its optional occluder bias, which is not reproduced. The image frame is that of the valid
  region when ``valid`` is given, so padding does not move it.

  Returns:
    float32 [N,H,W,C] target distributions.
  """
  n, m = box_classes.shape
  c = num_classes
  real = box_classes >= 0
  inside = rasterize_boxes(boxes, box_classes, height, width)  # [N,M,H,W]
  y0 = jnp.ceil(boxes[..., 0])
  x0 = jnp.ceil(boxes[..., 1])
  y1 = jnp.floor(boxes[..., 2])
  x1 = jnp.floor(boxes[..., 3])
  bh, bw = y1 - y0 + 1, x1 - x0 + 1
  v = jnp.ones((n, height, width)) if valid is None else jnp.asarray(valid, jnp.float32)
  img_h = _image_extent(v, 1)[:, None]
  img_w = _image_extent(v, 2)[:, None]
  ey0, ey1 = jnp.maximum(y0, 1.0), jnp.minimum(y1, img_h - 2.0)
  ex0, ex1 = jnp.maximum(x0, 1.0), jnp.minimum(x1, img_w - 2.0)
  steps = _erosion_steps(ey1 - ey0 + 1, ex1 - ex0 + 1, erode_scale + 0.05)
  small = (bh * bw < 121) | (bh < 10) | (bw < 10) | (erode_scale >= 1.0)
  cy0 = jnp.where(small, y0, ey0 + steps)
  cy1 = jnp.where(small, y1, ey1 - steps)
  cx0 = jnp.where(small, x0, ex0 + steps)
  cx1 = jnp.where(small, x1, ex1 - steps)
  core = rasterize_boxes(jnp.stack([cy0, cx0, cy1, cx1], -1), box_classes, height, width)

  fg = jnp.where(core, core_prob, box_prob) * inside  # [N,M,H,W]
  cls = jax.nn.one_hot(jnp.where(real, box_classes, -1), c)  # [N,M,C]
  bg = jax.nn.one_hot(background_class, c)
  insidef = inside.astype(jnp.float32)
  prob = jnp.einsum("nmhw,nmc->nhwc", fg, cls) + jnp.einsum("nmhw,c->nhwc", insidef - fg, bg)
  counts = jnp.einsum("nmhw,nmc->nhwc", insidef, cls) + jnp.einsum("nmhw,c->nhwc", insidef, bg)
  outside = ~jnp.any(inside, axis=1)  # [N,H,W]
  prob = prob + outside[..., None] * bg
  counts = counts + outside[..., None] * bg
  prob = jnp.where(counts > 0, prob / jnp.maximum(counts, 1.0), 0.0) + 1e-12
  return prob / jnp.sum(prob, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# BoxInst.


def rgb_to_lab(image: jax.Array) -> jax.Array:
  """sRGB in [0,1] [...,3] to CIE-Lab (D65), the formulas of ``skimage.color.rgb2lab``."""
  rgb = jnp.clip(image, 0.0, 1.0)
  linear = jnp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  m = jnp.asarray([[0.412453, 0.357580, 0.180423],
                   [0.212671, 0.715160, 0.072169],
                   [0.019334, 0.119193, 0.950227]], jnp.float32)
  xyz = jnp.einsum("...k,jk->...j", linear, m, precision=jax.lax.Precision.HIGHEST)
  xyz = xyz / jnp.asarray([0.95047, 1.0, 1.08883], jnp.float32)
  f = jnp.where(xyz > 0.008856, jnp.cbrt(jnp.maximum(xyz, 0.008856)), 7.787 * xyz + 16.0 / 116.0)
  lum = 116.0 * f[..., 1] - 16.0
  a = 500.0 * (f[..., 0] - f[..., 1])
  b = 200.0 * (f[..., 1] - f[..., 2])
  return jnp.stack([lum, a, b], axis=-1)


def neighbour_offsets(size: int = 3, dilation: int = 2) -> np.ndarray:
  """Offsets of a ``size`` x ``size`` kernel with ``dilation``, centre excluded: int [K, 2]."""
  r = range(-(size // 2), size // 2 + 1)
  return np.asarray([(dy * dilation, dx * dilation) for dy in r for dx in r
                     if (dy, dx) != (0, 0)], np.int32)


def _shift(x, dy, dx):
  """``out[:, i, j] = x[:, i + dy, j + dx]``, zero outside (static offsets)."""
  h, w = x.shape[1], x.shape[2]
  pad = [(0, 0), (max(-dy, 0), max(dy, 0)), (max(-dx, 0), max(dx, 0))] + [(0, 0)] * (x.ndim - 3)
  xp = jnp.pad(x, pad)
  return xp[:, max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w]


def color_similarity(image: jax.Array, valid: jax.Array, offsets) -> jax.Array:
  """BoxInst's ``exp(-|Lab_i - Lab_j| / 2)`` per neighbour offset, 0 where j is out of the image
  or either pixel is invalid: float32 [N,H,W,K]."""
  lab = rgb_to_lab(image)
  sims = []
  for dy, dx in offsets:
    nb = _shift(lab, int(dy), int(dx))
    ok = _shift(valid, int(dy), int(dx)) * valid
    dist = jnp.sqrt(jnp.sum(jnp.square(lab - nb), axis=-1) + 1e-12)
    sims.append(jnp.exp(-0.5 * dist) * ok)
  return jax.lax.stop_gradient(jnp.stack(sims, axis=-1))


def _log1mexp(x):
  """log(1 - exp(x)) for x <= 0, clamped so p = 1 gives a finite value. (The second branch of
  the textbook form, log1p(-exp(x)) for x < -log 2, only gains relative accuracy on values
  within 1e-7 of 0, which do not matter here, and would double the cost.)"""
  return jnp.log(-jnp.expm1(jnp.minimum(x, -1e-7)))


def _logaddexp(a, b):
  """log(exp(a) + exp(b)) for finite inputs (jnp.logaddexp's inf handling costs ~2x on CPU)."""
  return jnp.maximum(a, b) + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


def _dice(x, t, axis):
  inter = jnp.sum(x * t, axis=axis)
  return 1.0 - 2.0 * inter / (jnp.sum(x * x, axis=axis) + jnp.sum(t * t, axis=axis) + 1e-5)


def boxinst_terms(logits, batch, *, color_threshold: float = 0.3, pairwise_size: int = 3,
                  pairwise_dilation: int = 2, where: str = "boxinst"):
  """BoxInst's two terms for semantic logits: (projection loss, pairwise loss), scalars.

  Projection: Dice of max-projections along y and along x, averaged over the (image, class)
  pairs that have a box. Pairwise: ``sum w (-log P(y_i=y_j)) / max(sum w, 1)`` over the batch,
  with w = [similarity >= color_threshold] * [i in a box of the class] * validity.
  """
  logits = _common.check_logits(logits, where)
  n, h, w, c = logits.shape
  boxes, classes = _get_boxes(batch, logits, where)
  image = _common.get_image(batch, logits, where) / 255.0
  valid = _common.get_valid(batch, (n, h, w), where)
  in_box = class_box_masks(boxes, classes, c, h, w).astype(jnp.float32)  # [N,H,W,C]
  present = _present(classes, c).astype(jnp.float32)  # [N,C]

  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p) * valid[..., None]
  proj = _dice(jnp.max(p, axis=1), jnp.max(in_box, axis=1), axis=1)  # along y -> [N,C]
  proj = proj + _dice(jnp.max(p, axis=2), jnp.max(in_box, axis=2), axis=1)
  proj_loss = jnp.sum(proj * present) / jnp.maximum(jnp.sum(present), 1.0)

  offsets = neighbour_offsets(pairwise_size, pairwise_dilation)
  sim = color_similarity(image, valid, offsets)  # [N,H,W,K]
  log_1mp = _log1mexp(log_p)
  similar = (sim >= color_threshold).astype(jnp.float32) * valid[..., None]  # [N,H,W,K]
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for k, (dy, dx) in enumerate(offsets):
    weight = (similar[..., k] * _shift(valid, int(dy), int(dx)))[..., None] * in_box
    same = _logaddexp(log_p + _shift(log_p, int(dy), int(dx)),
                      log_1mp + _shift(log_1mp, int(dy), int(dx)))
    total = total - jnp.sum(same * weight)
    count = count + jnp.sum(weight)
  pair_loss = total / jnp.maximum(count, 1.0)
  return proj_loss, pair_loss


def box_label_set_nll(logits, batch, *, background_class: int = 0,
                      where: str = "box_label_set_nll") -> jax.Array:
  """``mean_i -log P(y_i in {background} + classes of the boxes covering i)`` over valid pixels.

  What boxes say for sure about a semantic labelling: a pixel outside every box is background
  (the term is then plain cross-entropy there), and a pixel inside boxes can only take their
  classes or background. Instance-level BoxInst gets the first for free (a mask lives in its
  box); a semantic head needs it stated.

  Args:
    logits: float32 [N,H,W,C].
    batch: ``boxes``, ``box_classes``, optional ``valid``.
    background_class: index of the background class.

  Returns:
    float32 scalar.
  """
  logits = _common.check_logits(logits, where)
  n, h, w, c = logits.shape
  _check_background(background_class, c, where)
  boxes, classes = _get_boxes(batch, logits, where)
  valid = _common.get_valid(batch, (n, h, w), where)
  allowed = class_box_masks(boxes, classes, c, h, w) | (jnp.arange(c) == background_class)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  nll = -jax.nn.logsumexp(jnp.where(allowed, log_p, -jnp.inf), axis=-1)
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def boxinst_loss(logits, batch, *, pairwise_weight: float = 1.0, color_threshold: float = 0.3,
                 pairwise_size: int = 3, pairwise_dilation: int = 2, warmup_steps: int = 0,
                 label_set_weight: float = 1.0, background_class: int = 0,
                 step=None) -> jax.Array:
  """``L_proj + ramp(step) * pairwise_weight * L_pair + label_set_weight * L_set``.

  BoxInst warms the pairwise term up over 10k steps. Differences from BoxInst, which works per
  instance on stride-4 mask logits: here the masks are the semantic softmax probabilities at
  the input resolution, per class (union of the class's boxes); ``L_set`` is
  :func:`box_label_set_nll` (0 weight = BoxInst's two terms alone); the image is not pooled or
  quantised to uint8 before the Lab conversion; no bottom-rows mask (a COCO artefact).
  """
  where = "box_loss(boxinst)"
  ramp = _common.warmup_factor(batch, step, warmup_steps, where)
  proj, pair = boxinst_terms(logits, batch, color_threshold=color_threshold,
                             pairwise_size=pairwise_size, pairwise_dilation=pairwise_dilation,
                             where=where)
  loss = proj + ramp * pairwise_weight * pair
  if label_set_weight:
    loss = loss + label_set_weight * box_label_set_nll(
        logits, batch, background_class=background_class, where=where)
  return loss


# ----------------------------------------------------------------------------------------------
# The registered loss.


_MODES = ("em_fixed", "em_adapt", "bbox_seg", "boxinst")


def box_loss(logits: jax.Array, batch: dict, *, mode: str = "em_fixed",
             background_class: int = 0,
             bg_bias: float = 1.0, fg_bias: float = 2.0,
             bg_portion: float = 0.2, fg_portion: float = 0.2, num_iter: int = 1,
             erode_scale: float = 0.2, core_prob: float = 0.75, box_prob: float = 0.5,
             pairwise_weight: float = 1.0, color_threshold: float = 0.3,
             pairwise_size: int = 3, pairwise_dilation: int = 2,
             warmup_steps: int = 0, step=None, label_set_weight: float = 1.0,
             crf_weight: float = 0.0, crf_kwargs: Optional[dict] = None,
             class_weights: Optional[Sequence[float]] = None) -> jax.Array:
  """Box-supervised semantic segmentation loss; see the module docstring for the modes.

  Args:
    logits: float32 [N,H,W,C].
    batch: ``boxes`` float32 [N,M,4] (y0,x0,y1,x1 inclusive), ``box_classes`` int32 [N,M]
      (-1 = padding), optional ``valid`` bool [N,H,W]; ``image`` for "boxinst"; optional
      ``step`` for the BoxInst warm-up.
    mode: "em_fixed", "em_adapt", "bbox_seg" or "boxinst".
    background_class: index of the background class.
    bg_bias, fg_bias: "em_fixed" biases (WSSL proto defaults 1 and 2).
    bg_portion, fg_portion, num_iter: "em_adapt" (WSSL defaults 0.2, 0.2, 1).
    erode_scale, core_prob, box_prob: "bbox_seg" (0.2 = WSSL's bboxErode20).
    pairwise_weight, color_threshold, pairwise_size, pairwise_dilation, warmup_steps, step:
      "boxinst" (BoxInst: 1, 0.3, 3, 2, 10000).
    crf_weight, crf_kwargs: the WSSL modes: add ``ramp(step) * crf_weight *``
      :func:`jaxseg.losses.crf_pairwise` ``(logits, batch, **crf_kwargs)`` (the colour-aware
      Potts term of ``scribble_loss``; needs ``image``), ramped in over ``warmup_steps``.
    label_set_weight: "boxinst": weight of :func:`box_label_set_nll` (background outside the
      boxes, box classes or background inside); 0 = BoxInst's terms alone.
    class_weights: optional [C] cross-entropy weights (the WSSL modes).

  Returns:
    float32 scalar.
  """
  where = f"box_loss({mode})"
  if mode not in _MODES:
    raise ValueError(f"box_loss: unknown mode {mode!r}; valid: {', '.join(_MODES)}")
  if mode == "boxinst":
    return boxinst_loss(logits, batch, pairwise_weight=pairwise_weight,
                        color_threshold=color_threshold, pairwise_size=pairwise_size,
                        pairwise_dilation=pairwise_dilation, warmup_steps=warmup_steps,
                        label_set_weight=label_set_weight, background_class=background_class,
                        step=step)
  logits = _common.check_logits(logits, where)
  n, h, w, c = logits.shape
  _check_background(background_class, c, where)
  boxes, classes = _get_boxes(batch, logits, where)
  valid = _common.get_valid(batch, (n, h, w), where)
  if mode == "bbox_seg":
    if not 0.0 < erode_scale <= 1.0:
      raise ValueError(f"{where}: erode_scale must be in (0, 1], got {erode_scale}")
    target = bbox_seg_targets(boxes, classes, c, h, w, valid, erode_scale=erode_scale,
                              core_prob=core_prob, box_prob=box_prob,
                              background_class=background_class)
    nll = -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    weight = valid
    if class_weights is not None:
      weight = weight * jnp.einsum("nhwc,c->nhw", target, jnp.asarray(class_weights, jnp.float32))
    loss = jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1e-12)
  else:
    if mode == "em_fixed":
      labels = bbox_em_fixed_targets(logits, boxes, classes, bg_bias=bg_bias, fg_bias=fg_bias,
                                     background_class=background_class)
    else:
      for name, value in (("bg_portion", bg_portion), ("fg_portion", fg_portion)):
        if not 0.0 <= value <= 1.0:
          raise ValueError(f"{where}: {name} must be in [0, 1], got {value}")
      labels = bbox_em_adapt_targets(logits, boxes, classes, valid, bg_portion=bg_portion,
                                     fg_portion=fg_portion, num_iter=num_iter,
                                     background_class=background_class)
    targets = {"mask": labels, "valid": valid > 0}
    loss = cross_entropy(logits, targets, class_weights=class_weights)
  if crf_weight:
    ramp = _common.warmup_factor(batch, step, warmup_steps, where)
    loss = loss + ramp * crf_weight * crf.crf_pairwise(logits, batch, **dict(crf_kwargs or {}))
  return loss
