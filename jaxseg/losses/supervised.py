"""Fully and partially supervised pixel-wise cross-entropy.

Both follow the DESIGN.md contract ``loss_fn(logits, batch) -> scalar`` with
hyperparameters keyword-only, so they can be bound with ``functools.partial`` and
passed to ``jaxseg.train.make_train_step``.
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jaxseg.constants import IGNORE_INDEX
from jaxseg.losses import _common


def pixel_nll(logits: jax.Array, labels: jax.Array, *, ignore_index: int = IGNORE_INDEX):
  """Per-pixel negative log-likelihood and the mask of labelled pixels.

  Args:
    logits: float [N,H,W,C].
    labels: int [N,H,W] in [0, C); ``ignore_index`` marks unlabelled pixels.

  Returns:
    (nll float32 [N,H,W] with 0 at ignored pixels, labelled bool [N,H,W]).

  Raises:
    TypeError: non-integer labels (a float mask).
    ValueError: mismatched shapes or labels outside [0, C) other than ``ignore_index`` (see
      :func:`jaxseg.losses._common.check_label_values`, also under ``jax.jit``).
  """
  _check_logits(logits)
  if not hasattr(labels, "shape") or tuple(labels.shape) != tuple(logits.shape[:3]):
    raise ValueError(f"labels shape {getattr(labels, 'shape', None)} does not match logits "
                     f"{logits.shape[:3]}")
  labels = _common.check_labels(labels, logits.shape[:3], "labels", "pixel_nll",
                                num_classes=logits.shape[-1], ignore_index=ignore_index,
                                name="labels")
  return _pixel_nll(logits, labels, ignore_index)


def _check_logits(logits):
  if not hasattr(logits, "ndim") or logits.ndim != 4:
    raise ValueError(f"logits must be [N,H,W,C], got shape {getattr(logits, 'shape', None)}")


def _pixel_nll(logits, labels, ignore_index):
  labelled = labels != ignore_index
  safe = jnp.where(labelled, labels, 0).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  return jnp.where(labelled, nll, 0.0), labelled


def _weighted_mean(nll, labelled, labels, batch, class_weights, num_classes, where):
  weight = labelled.astype(jnp.float32)
  if "valid" in batch:
    weight = weight * batch["valid"].astype(jnp.float32)
  if class_weights is not None:
    cw = jnp.asarray(class_weights, jnp.float32)
    if cw.shape != (num_classes,):
      raise ValueError(f"{where}: class_weights must have one weight per class, shape "
                       f"({num_classes},), got {cw.shape}")
    weight = weight * cw[jnp.where(labelled, labels, 0)]
  # Normalised by the weight of the global batch, also under the pmap step where this shard
  # may hold few labelled pixels; a batch with no labelled pixel gives 0 rather than NaN.
  return _common.global_mean(jnp.sum(nll * weight), jnp.sum(weight), min_count=1e-12)


def cross_entropy(logits: jax.Array, batch: dict, *,
                  class_weights: Optional[Sequence[float]] = None,
                  ignore_index: int = IGNORE_INDEX,
                  label_key: str = "mask") -> jax.Array:
  """Softmax cross-entropy against full masks, averaged over labelled valid pixels.

  With ``class_weights`` the average is weighted like ``torch.nn.CrossEntropyLoss(weight=...)``:
  ``sum_i w[y_i] * nll_i / sum_i w[y_i]``.

  Args:
    logits: float [N,H,W,C].
    batch: dict with ``batch[label_key]`` int [N,H,W] (255 = ignore) and optional
      ``valid`` bool [N,H,W].
    class_weights: optional [C] per-class weights (e.g. median-frequency balancing).
    ignore_index: label value that contributes nothing.
    label_key: which batch entry holds the labels.

  Returns:
    float32 scalar; 0 (with zero gradients) when no pixel is labelled and valid.

  Raises:
    TypeError: non-integer labels (a float mask).
    ValueError: a missing label key, wrong shapes, ``class_weights`` not of length C, or labels
      outside [0, C) other than ``ignore_index``. Out-of-range labels are also caught inside
      ``jax.jit`` (a host callback; the call fails with a ``JaxRuntimeError`` holding the
      message) unless traced inside :func:`jaxseg.losses._common.labels_checked`.
  """
  return _cross_entropy(logits, batch, class_weights, ignore_index, label_key, "cross_entropy")


def _cross_entropy(logits, batch, class_weights, ignore_index, label_key, where):
  _check_logits(logits)
  labels = _common.check_labels(_common.require(batch, label_key, where), logits.shape[:3],
                                label_key, where, num_classes=logits.shape[-1],
                                ignore_index=ignore_index)
  nll, labelled = _pixel_nll(logits, labels, ignore_index)
  return _weighted_mean(nll, labelled, labels, batch, class_weights, logits.shape[-1],
                        where)


def partial_cross_entropy(logits: jax.Array, batch: dict, *,
                          class_weights: Optional[Sequence[float]] = None,
                          ignore_index: int = IGNORE_INDEX,
                          label_key: str = "scribble") -> jax.Array:
  """Partial cross-entropy (pCE): cross-entropy on scribbled pixels only.

  Identical to :func:`cross_entropy` but reads ``batch["scribble"]`` by default, where
  every unscribbled pixel is 255. Returns 0 for a batch with no scribbled pixel.

  Args:
    logits: float [N,H,W,C].
    batch: dict with ``scribble`` int [N,H,W] and optional ``valid`` bool [N,H,W].

  Returns:
    float32 scalar.
  """
  return _cross_entropy(logits, batch, class_weights, ignore_index, label_key,
                        "partial_cross_entropy")


def median_frequency_weights(masks, num_classes: int, *, ignore_index: int = IGNORE_INDEX):
  """Median-frequency class balancing (Eigen & Fergus; the SegNet CamVid recipe).

  ``freq[c]`` = pixels of class c / pixels of the images in which c appears, and
  ``w[c] = median(freq) / freq[c]``. Classes that never appear get weight 0.

  Args:
    masks: iterable of int label maps [H,W] (or [N,H,W]); ``ignore_index`` is skipped.
    num_classes: C.

  Returns:
    float32 NumPy array [C].
  """
  import numpy as np
  class_pixels = np.zeros(num_classes, np.float64)
  image_pixels = np.zeros(num_classes, np.float64)
  for m in masks:
    m = np.asarray(m)
    for img in m.reshape((-1,) + m.shape[-2:]):
      lab = img[img != ignore_index]
      counts = np.bincount(lab.ravel(), minlength=num_classes)[:num_classes]
      class_pixels += counts
      image_pixels += np.where(counts > 0, lab.size, 0)
  present = class_pixels > 0
  if not present.any():
    raise ValueError("median_frequency_weights: no labelled pixel in the given masks")
  freq = np.where(present, class_pixels / np.maximum(image_pixels, 1), 0.0)
  weights = np.where(present, np.median(freq[present]) / np.where(present, freq, 1.0), 0.0)
  return weights.astype(np.float32)
