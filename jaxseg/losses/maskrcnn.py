"""Mask R-CNN training losses with torchvision's normalisation.

The model (``jaxseg.models.MaskRCNN`` with ``train=True``) assigns and samples the targets
itself and returns them next to the predictions, all with static shapes; these functions
only reduce them. The five terms and their normalisation are torchvision's
(``RegionProposalNetwork.compute_loss``, ``roi_heads.fastrcnn_loss``,
``roi_heads.maskrcnn_loss``), counts summed over the images of the batch:

| term | loss | divided by |
|---|---|---|
| ``loss_objectness`` | BCE of the objectness logit, sampled anchors | sampled anchors |
| ``loss_rpn_box_reg`` | smooth-L1 (beta 1/9) of the deltas, positive anchors | sampled anchors |
| ``loss_classifier`` | softmax CE, sampled RoIs | sampled RoIs |
| ``loss_box_reg`` | smooth-L1 (beta 1/9) of the gt-class deltas, positive RoIs | sampled RoIs |
| ``loss_mask`` | per-pixel BCE of the gt-class mask logits, positive RoIs | positive RoIs x M x M |

Counts go through ``_common.global_mean``, so the pmap train step (which traces the loss
per device inside ``batch_sharded_over``) gives the loss of the whole batch, as jit does.
Where torchvision divides by an empty count (no sampled anchor or RoI: a NaN there) the
term is 0 here; without positive RoIs ``loss_mask`` is 0 in both.

``mask_loss="boxinst"`` trains the mask head from boxes (a model built with
``mask_supervision="boxes"``): BoxInst's (Tian et al. 2021) two terms replace ``loss_mask``.
With m = sigmoid(mask logit) and b = ``mask_targets`` (the gt box's footprint in the RoI's
28x28 frame), per positive RoI:

| term | loss | divided by |
|---|---|---|
| ``loss_mask_projection`` | Dice(max_y m, max_y b) + Dice(max_x m, max_x b) | positive RoIs |
| ``loss_mask_pairwise`` | -log(m_i m_j + (1-m_i)(1-m_j)) over the edges (i, j) | the edges |

Edges join each pixel i with b_i >= 0.5 to its neighbours j whose colour similarity
exp(-|Lab_i - Lab_j| / 2) is >= tau (``color_threshold``); ``Dice(x, t) = 1 - 2 sum(x t) /
(sum(x^2) + sum(t^2) + 1e-5)``; the log-probabilities come from the logits (log-sigmoid and a
log-sum-exp), never from a rounded m.

The pairwise term is weighted by ``pairwise_weight * min(step / warmup_steps, 1)`` (BoxInst's
warm-up; the full weight when no ``step`` is given). Neighbours are those of a ``pairwise_size``
kernel at ``pairwise_dilation`` on the 28x28 grid, colours the model's ``mask_colors`` (the
image sampled on the same grid). The dilation is 1, not BoxInst's 2: the 28x28 mask comes out
of a stride-2 2x2 transposed convolution, so each pixel of a 2x2 block has its own weights, and
edges of length 2 never join the four sub-lattices of those blocks. With dilation 2 the mask
head learnt checkerboards that satisfy both terms (``maskrcnn_shapes.py:boxes``, 1200 steps:
mask AP 1.1 for box AP 66.6). Differences from BoxInst (CondInst's stride-4 image-sized
masks): the masks live in the RoI frame, so the box prior is the box's soft footprint there
and the colours are RoIAlign samples of the image (not a stride-4 average pool of a uint8
image); no bottom-rows mask (a COCO artefact).
"""
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from jaxseg.losses import _common
from jaxseg.losses import box as box_lib

TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
# The terms of mask_loss="boxinst": loss_mask is replaced by BoxInst's two terms.
BOXINST_TERMS = TERMS[:4] + ("loss_mask_projection", "loss_mask_pairwise")
MASK_LOSSES = ("bce", "boxinst")

# torchvision's smooth-L1 transition point for both box regressions.
_BETA = 1.0 / 9.0

_WHERE = "maskrcnn_loss"


def _smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  n = jnp.abs(x)
  return jnp.where(n < beta, 0.5 * n * n / beta, n - 0.5 * beta)


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  # softplus(x) - x*y is log(1 + e^x) - x*y, stable for large |x|.
  return jax.nn.softplus(logits) - logits * targets


def _get(outputs, key: str, ndim: int, floating: bool, allow_bool: bool = True) -> jax.Array:
  if key not in outputs:
    raise ValueError(f"{_WHERE}: outputs[{key!r}] is missing (it comes from the MaskRCNN model "
                     f"applied with train=True); outputs has keys {sorted(outputs)}")
  value = jnp.asarray(outputs[key])
  if value.ndim != ndim:
    raise ValueError(f"{_WHERE}: outputs[{key!r}] must have {ndim} dimensions, "
                     f"got shape {value.shape}")
  if floating and not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(f"{_WHERE}: outputs[{key!r}] must be floating point, got {value.dtype}")
  is_bool = value.dtype == jnp.bool_
  if not floating and not (jnp.issubdtype(value.dtype, jnp.integer) or (allow_bool and is_bool)):
    kinds = "integer or bool" if allow_bool else "integer"
    raise TypeError(f"{_WHERE}: outputs[{key!r}] must be {kinds}, got {value.dtype}")
  return value.astype(jnp.float32) if floating else value


def _check_leading(names_arrays, leading, what: str):
  for name, array in names_arrays:
    if tuple(array.shape[:len(leading)]) != tuple(leading):
      raise ValueError(f"{_WHERE}: outputs[{name!r}] must start with {what} {tuple(leading)}, "
                       f"got shape {tuple(array.shape)}")


def _rpn_terms(outputs):
  logits = _get(outputs, "rpn_logits", 2, True)
  deltas = _get(outputs, "rpn_deltas", 3, True)
  labels = _get(outputs, "rpn_labels", 2, False, allow_bool=False).astype(jnp.int32)
  targets = _get(outputs, "rpn_targets", 3, True)
  _check_leading([("rpn_deltas", deltas), ("rpn_labels", labels), ("rpn_targets", targets)],
                 logits.shape, "[N, A] =")
  for name, array in (("rpn_deltas", deltas), ("rpn_targets", targets)):
    if array.shape[-1] != 4:
      raise ValueError(f"{_WHERE}: outputs[{name!r}] must be [N, A, 4], got {array.shape}")
  sampled = labels >= 0
  positive = labels > 0
  count = jnp.sum(sampled, dtype=jnp.float32)
  # Unsampled entries are zeroed before the loss, not only masked after it, so that
  # whatever they hold (a target of a padded gt) cannot leak NaN into the gradient.
  safe_logits = jnp.where(sampled, logits, 0.0)
  objectness = jnp.sum(jnp.where(sampled, _bce_with_logits(safe_logits, positive), 0.0))
  pos4 = positive[..., None]
  diff = jnp.where(pos4, deltas, 0.0) - jnp.where(pos4, targets, 0.0)
  box = jnp.sum(jnp.where(pos4, _smooth_l1(diff, _BETA), 0.0))
  return (_common.global_mean(objectness, count), _common.global_mean(box, count))


def _roi_terms(outputs):
  logits = _get(outputs, "class_logits", 3, True)
  n, s, num_classes = logits.shape
  if num_classes < 2:
    raise ValueError(f"{_WHERE}: outputs['class_logits'] needs >= 2 classes (background "
                     f"included), got {num_classes}")
  labels = _get(outputs, "roi_labels", 2, False, allow_bool=False).astype(jnp.int32)
  valid = _get(outputs, "roi_valid", 2, False).astype(bool)
  targets = _get(outputs, "roi_targets", 3, True)
  if "box_deltas" not in outputs:
    raise ValueError(f"{_WHERE}: outputs['box_deltas'] is missing; outputs has keys "
                     f"{sorted(outputs)}")
  deltas = jnp.asarray(outputs["box_deltas"])
  if deltas.ndim == 4:  # class-specific [N, S, C, 4]: the gt class's deltas
    if deltas.shape[2] != num_classes:
      raise ValueError(f"{_WHERE}: outputs['box_deltas'] [N, S, C, 4] must have C = "
                       f"{num_classes} (class_logits), got shape {deltas.shape}")
    index = jnp.clip(labels, 0, num_classes - 1)[..., None, None]
    deltas = jnp.take_along_axis(deltas, index, axis=2)[:, :, 0]
  deltas = _get({"box_deltas": deltas}, "box_deltas", 3, True)
  _check_leading([("roi_labels", labels), ("roi_valid", valid), ("roi_targets", targets),
                  ("box_deltas", deltas)], (n, s), "[N, S] =")
  for name, array in (("box_deltas", deltas), ("roi_targets", targets)):
    if array.shape[-1] != 4:
      raise ValueError(f"{_WHERE}: outputs[{name!r}] must be [N, S, 4] (or [N, S, C, 4] for "
                       f"box_deltas), got {array.shape}")
  # The model copies the gt classes (batch['box_classes']) into roi_labels; one >= C would be
  # clipped below into a silently wrong class.
  _common.check_label_values(
      jnp.where(valid, labels, 0), num_classes, "outputs['roi_labels']", _WHERE,
      ignore_index=None,
      hint=f"class_logits have {num_classes} classes; roi_labels are the sampled RoIs' gt "
      "classes: keep batch['box_classes'] in 1..C-1 with -1 on padding "
      "(jaxseg.models.maskrcnn.check_target_values)")
  count = jnp.sum(valid, dtype=jnp.float32)
  safe = jnp.clip(labels, 0, num_classes - 1)
  log_z = jax.nn.logsumexp(jnp.where(valid[..., None], logits, 0.0), axis=-1)
  picked = jnp.take_along_axis(jnp.where(valid[..., None], logits, 0.0), safe[..., None],
                               axis=-1)[..., 0]
  classifier = jnp.sum(jnp.where(valid, log_z - picked, 0.0))
  pos4 = (valid & (labels > 0))[..., None]
  diff = jnp.where(pos4, deltas, 0.0) - jnp.where(pos4, targets, 0.0)
  box = jnp.sum(jnp.where(pos4, _smooth_l1(diff, _BETA), 0.0))
  return _common.global_mean(classifier, count), _common.global_mean(box, count)


def _mask_inputs(outputs):
  """mask_logits, mask_targets [N,P,M,M] and mask_valid [N,P] (checked)."""
  logits = _get(outputs, "mask_logits", 4, True)
  targets = _get(outputs, "mask_targets", 4, True)
  valid = _get(outputs, "mask_valid", 2, False).astype(bool)
  if targets.shape != logits.shape:
    raise ValueError(f"{_WHERE}: outputs['mask_targets'] {targets.shape} must have the shape "
                     f"of outputs['mask_logits'] {logits.shape}")
  _check_leading([("mask_valid", valid)], logits.shape[:2], "[N, P] =")
  return logits, targets, valid


def _mask_term(outputs):
  logits, targets, valid = _mask_inputs(outputs)
  pixels = logits.shape[2] * logits.shape[3]
  count = jnp.sum(valid, dtype=jnp.float32) * pixels
  v = valid[..., None, None]
  bce = _bce_with_logits(jnp.where(v, logits, 0.0), jnp.where(v, targets, 0.0))
  return _common.global_mean(jnp.sum(jnp.where(v, bce, 0.0)), count)


def _boxinst_mask_terms(outputs, *, color_threshold: float, pairwise_size: int,
                        pairwise_dilation: int):
  """BoxInst's (projection, pairwise) mask terms, unweighted float32 scalars."""
  logits, boxes, valid = _mask_inputs(outputs)
  if "mask_colors" not in outputs:
    raise ValueError(f"{_WHERE}: mask_loss='boxinst' needs outputs['mask_colors'], which the "
                     f"MaskRCNN model returns when built with mask_supervision='boxes'; "
                     f"outputs has keys {sorted(outputs)}")
  colors = _get(outputs, "mask_colors", 5, True)
  if colors.shape != logits.shape + (3,):
    raise ValueError(f"{_WHERE}: outputs['mask_colors'] must be [N, P, M, M, 3] = "
                     f"{logits.shape + (3,)}, got {colors.shape}")
  n, p, mh, mw = logits.shape
  v = valid[..., None, None]
  # Padding slots are zeroed before the loss so nothing they hold reaches the gradient.
  x = jnp.where(v, logits, 0.0)
  b = jnp.where(v, boxes, 0.0)

  m = jax.nn.sigmoid(x)
  proj = (box_lib.dice_loss(jnp.max(m, axis=2), jnp.max(b, axis=2), axis=-1)
          + box_lib.dice_loss(jnp.max(m, axis=3), jnp.max(b, axis=3), axis=-1))  # [N, P]
  projection = _common.global_mean(jnp.sum(jnp.where(valid, proj, 0.0)),
                                   jnp.sum(valid, dtype=jnp.float32))

  # One RoI per leading entry: shifts stay inside each RoI's 28x28 grid.
  x = x.reshape(n * p, mh, mw)
  roi_valid = jnp.broadcast_to(v, logits.shape).reshape(n * p, mh, mw).astype(jnp.float32)
  offsets = box_lib.neighbour_offsets(pairwise_size, pairwise_dilation)
  # 0 for a neighbour outside the grid or in a padding slot.
  sim = box_lib.color_similarity(colors.reshape(n * p, mh, mw, 3), roi_valid, offsets)
  inside = (b.reshape(n * p, mh, mw) >= 0.5).astype(jnp.float32) * roi_valid
  log_fg = jax.nn.log_sigmoid(x)
  log_bg = jax.nn.log_sigmoid(-x)
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for k, (dy, dx) in enumerate(offsets):
    dy, dx = int(dy), int(dx)
    weight = (sim[..., k] >= color_threshold).astype(jnp.float32) * inside
    weight = weight * box_lib.shift2d(roi_valid, dy, dx)
    log_same = box_lib.logaddexp_finite(log_fg + box_lib.shift2d(log_fg, dy, dx),
                                        log_bg + box_lib.shift2d(log_bg, dy, dx))
    total = total - jnp.sum(log_same * weight)
    count = count + jnp.sum(weight)
  return projection, _common.global_mean(total, count)


def _ramp(step, warmup_steps: int) -> jax.Array:
  """BoxInst's ``min(step / warmup_steps, 1)``; 1 without a step (outside the train step)."""
  if step is None or warmup_steps == 0:
    return jnp.ones((), jnp.float32)
  step = jnp.asarray(step, jnp.float32).reshape(-1)[0]
  return jnp.clip(step / float(warmup_steps), 0.0, 1.0)


def _check_settings(mask_loss, pairwise_weight, color_threshold, pairwise_size,
                    pairwise_dilation, warmup_steps):
  if mask_loss not in MASK_LOSSES:
    raise ValueError(f"{_WHERE}: mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
  if mask_loss != "boxinst":
    return
  if not pairwise_weight >= 0:
    raise ValueError(f"{_WHERE}: pairwise_weight must be >= 0, got {pairwise_weight!r}")
  if not 0 <= color_threshold <= 1:
    raise ValueError(f"{_WHERE}: color_threshold must be in [0, 1] (a similarity "
                     f"exp(-|dLab| / 2)), got {color_threshold!r}")
  if isinstance(pairwise_size, bool) or not isinstance(pairwise_size, int) \
      or pairwise_size < 3 or pairwise_size % 2 == 0:
    raise ValueError(f"{_WHERE}: pairwise_size must be an odd int >= 3, got {pairwise_size!r}")
  if isinstance(pairwise_dilation, bool) or not isinstance(pairwise_dilation, int) \
      or pairwise_dilation < 1:
    raise ValueError(f"{_WHERE}: pairwise_dilation must be an int >= 1, got "
                     f"{pairwise_dilation!r}")
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"{_WHERE}: warmup_steps must be an int >= 0, got {warmup_steps!r}")


def maskrcnn_loss_terms(outputs: Mapping[str, jax.Array], batch=None, *, mask_loss: str = "bce",
                        pairwise_weight: float = 1.0, color_threshold: float = 0.3,
                        pairwise_size: int = 3, pairwise_dilation: int = 1,
                        warmup_steps: int = 10000, step=None) -> dict:
  """The five torchvision Mask R-CNN loss terms (or six with ``mask_loss="boxinst"``).

  Args:
    outputs: the training outputs of ``jaxseg.models.MaskRCNN`` (``train=True``):
      ``rpn_logits`` [N,A], ``rpn_deltas`` [N,A,4], ``rpn_labels`` int [N,A] (1 sampled
      positive, 0 sampled negative, -1 not sampled), ``rpn_targets`` [N,A,4];
      ``class_logits`` [N,S,C], ``box_deltas`` [N,S,4] (each RoI's gt-class deltas; a
      class-specific [N,S,C,4] is also accepted and indexed with ``roi_labels``),
      ``roi_labels`` int [N,S] (0 = background), ``roi_valid`` bool [N,S] (sampled),
      ``roi_targets`` [N,S,4]; ``mask_logits`` [N,P,M,M] (gt-class channel),
      ``mask_targets`` [N,P,M,M] (soft, in [0, 1]), ``mask_valid`` bool [N,P]; for
      "boxinst" also ``mask_colors`` [N,P,M,M,3] (RGB in [0, 1] on the mask grid). Deltas
      are in any consistent coordinate order (the model uses (dy, dx, dh, dw)).
    batch: unused (the model already read the targets from it); accepted so the function
      has the trainer's ``loss_fn(outputs, batch)`` signature.
    mask_loss: "bce" (torchvision: per-pixel BCE on instance-mask targets) or "boxinst"
      (BoxInst's projection + pairwise terms on box-footprint targets; see the module
      docstring).
    pairwise_weight, color_threshold, pairwise_size, pairwise_dilation, warmup_steps:
      "boxinst" (BoxInst: 1, 0.3, 3, 2, 10000).
    step: the training step of the warm-up (the train step passes it); None = full weight.
      Ignored by "bce".

  Returns:
    ``{"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
    "loss_mask"}``, float32 scalars; with "boxinst", ``loss_mask_projection`` and
    ``loss_mask_pairwise`` (already multiplied by ``pairwise_weight`` and the warm-up, so
    the terms still sum to the loss) instead of ``loss_mask``.

  Raises:
    ValueError/TypeError: a missing output, one of the wrong rank, shape or dtype, or an
      invalid setting.
  """
  del batch
  _check_settings(mask_loss, pairwise_weight, color_threshold, pairwise_size,
                  pairwise_dilation, warmup_steps)
  if not isinstance(outputs, Mapping):
    raise TypeError(f"{_WHERE}: outputs must be the dict the MaskRCNN model returns with "
                    f"train=True, got {type(outputs).__name__}")
  objectness, rpn_box = _rpn_terms(outputs)
  classifier, box = _roi_terms(outputs)
  terms = {"loss_objectness": objectness, "loss_rpn_box_reg": rpn_box,
           "loss_classifier": classifier, "loss_box_reg": box}
  if mask_loss == "bce":
    terms["loss_mask"] = _mask_term(outputs)
    return terms
  projection, pairwise = _boxinst_mask_terms(
      outputs, color_threshold=color_threshold, pairwise_size=pairwise_size,
      pairwise_dilation=pairwise_dilation)
  terms["loss_mask_projection"] = projection
  terms["loss_mask_pairwise"] = pairwise_weight * _ramp(step, warmup_steps) * pairwise
  return terms


def maskrcnn_loss(outputs: Mapping[str, jax.Array], batch=None, *, mask_loss: str = "bce",
                  pairwise_weight: float = 1.0, color_threshold: float = 0.3,
                  pairwise_size: int = 3, pairwise_dilation: int = 1,
                  warmup_steps: int = 10000, step=None,
                  weights: Optional[Mapping[str, float]] = None) -> jax.Array:
  """Mask R-CNN's training loss: the sum of :func:`maskrcnn_loss_terms`.

  With ``mask_loss="bce"`` this is torchvision's loss; "boxinst" trains the mask head from
  boxes (BoxInst, see the module docstring).

  Args:
    outputs: the model's training outputs (see :func:`maskrcnn_loss_terms`).
    batch: unused; the trainer passes it.
    mask_loss, pairwise_weight, color_threshold, pairwise_size, pairwise_dilation,
      warmup_steps, step: see :func:`maskrcnn_loss_terms`. ``jaxseg.train.make_train_step``
      passes ``step=state.step``; "bce" ignores it.
    weights: optional term name -> weight (default 1 for every term, as torchvision); the
      names are those :func:`maskrcnn_loss_terms` returns for ``mask_loss``.

  Returns:
    float32 scalar.
  """
  terms = maskrcnn_loss_terms(outputs, batch, mask_loss=mask_loss,
                              pairwise_weight=pairwise_weight, color_threshold=color_threshold,
                              pairwise_size=pairwise_size, pairwise_dilation=pairwise_dilation,
                              warmup_steps=warmup_steps, step=step)
  names = TERMS if mask_loss == "bce" else BOXINST_TERMS
  weights = dict(weights or {})
  unknown = sorted(set(weights) - set(names))
  if unknown:
    raise ValueError(f"{_WHERE}: unknown loss terms in weights: {unknown}; "
                     f"valid: {', '.join(names)}")
  return sum(float(weights.get(name, 1.0)) * terms[name] for name in names)
