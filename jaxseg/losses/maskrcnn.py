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
"""
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from jaxseg.losses import _common

TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")

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


def _mask_term(outputs):
  logits = _get(outputs, "mask_logits", 4, True)
  targets = _get(outputs, "mask_targets", 4, True)
  valid = _get(outputs, "mask_valid", 2, False).astype(bool)
  if targets.shape != logits.shape:
    raise ValueError(f"{_WHERE}: outputs['mask_targets'] {targets.shape} must have the shape "
                     f"of outputs['mask_logits'] {logits.shape}")
  _check_leading([("mask_valid", valid)], logits.shape[:2], "[N, P] =")
  pixels = logits.shape[2] * logits.shape[3]
  count = jnp.sum(valid, dtype=jnp.float32) * pixels
  v = valid[..., None, None]
  bce = _bce_with_logits(jnp.where(v, logits, 0.0), jnp.where(v, targets, 0.0))
  return _common.global_mean(jnp.sum(jnp.where(v, bce, 0.0)), count)


def maskrcnn_loss_terms(outputs: Mapping[str, jax.Array], batch=None) -> dict:
  """The five torchvision Mask R-CNN loss terms.

  Args:
    outputs: the training outputs of ``jaxseg.models.MaskRCNN`` (``train=True``):
      ``rpn_logits`` [N,A], ``rpn_deltas`` [N,A,4], ``rpn_labels`` int [N,A] (1 sampled
      positive, 0 sampled negative, -1 not sampled), ``rpn_targets`` [N,A,4];
      ``class_logits`` [N,S,C], ``box_deltas`` [N,S,4] (each RoI's gt-class deltas; a
      class-specific [N,S,C,4] is also accepted and indexed with ``roi_labels``),
      ``roi_labels`` int [N,S] (0 = background), ``roi_valid`` bool [N,S] (sampled),
      ``roi_targets`` [N,S,4]; ``mask_logits`` [N,P,M,M] (gt-class channel),
      ``mask_targets`` [N,P,M,M] (soft, in [0, 1]), ``mask_valid`` bool [N,P]. Deltas are in
      any consistent coordinate order (the model uses (dy, dx, dh, dw)).
    batch: unused (the model already read the targets from it); accepted so the function
      has the trainer's ``loss_fn(outputs, batch)`` signature.

  Returns:
    ``{"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
    "loss_mask"}``, float32 scalars.

  Raises:
    ValueError/TypeError: a missing output, or one of the wrong rank, shape or dtype.
  """
  del batch
  if not isinstance(outputs, Mapping):
    raise TypeError(f"{_WHERE}: outputs must be the dict the MaskRCNN model returns with "
                    f"train=True, got {type(outputs).__name__}")
  objectness, rpn_box = _rpn_terms(outputs)
  classifier, box = _roi_terms(outputs)
  return {"loss_objectness": objectness, "loss_rpn_box_reg": rpn_box,
          "loss_classifier": classifier, "loss_box_reg": box, "loss_mask": _mask_term(outputs)}


def maskrcnn_loss(outputs: Mapping[str, jax.Array], batch=None, *,
                  weights: Optional[Mapping[str, float]] = None) -> jax.Array:
  """torchvision's Mask R-CNN training loss: the sum of :func:`maskrcnn_loss_terms`.

  Args:
    outputs: the model's training outputs (see :func:`maskrcnn_loss_terms`).
    batch: unused; the trainer passes it.
    weights: optional term name -> weight (default 1 for every term, as torchvision).

  Returns:
    float32 scalar.
  """
  terms = maskrcnn_loss_terms(outputs, batch)
  weights = dict(weights or {})
  unknown = sorted(set(weights) - set(TERMS))
  if unknown:
    raise ValueError(f"{_WHERE}: unknown loss terms in weights: {unknown}; "
                     f"valid: {', '.join(TERMS)}")
  return sum(float(weights.get(name, 1.0)) * terms[name] for name in TERMS)
