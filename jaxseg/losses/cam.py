"""Image-level tags through class activation maps (the SEC / AffinityNet / IRN family).

A network trained as a multi-label classifier whose class scores are the global average of
its per-pixel logits has, in those logits, class activation maps (Zhou et al. 2016: a linear
classifier after global average pooling equals the average of per-pixel linear scores). The
maps localise the discriminative parts of each tagged class; a dense CRF snaps them to image
edges (Kolesnikov & Lampert's SEC "constrain", AffinityNet's pseudo-mask step), and the
network is then trained on the resulting masks with cross-entropy.

:func:`cam_loss` does the three stages in one jit-compatible loss, online: the multi-label
term from the first step, the cross-entropy on the CRF-refined CAM pseudo-masks ramped in over
``warmup_steps`` (the CAMs must first become meaningful). :func:`cam_pseudo_labels` is the
E-step alone, for offline use (compute masks once with a trained classifier, then train with
``cross_entropy``).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from jaxseg.constants import IGNORE_INDEX
from jaxseg.losses import _common
from jaxseg.losses import crf
from jaxseg.losses.supervised import cross_entropy


def _tags(batch, n, c, where):
  tags = _common.require(batch, "tags", where)
  if tuple(tags.shape) != (n, c):
    raise ValueError(f"{where}: batch['tags'] must be [N,C] = {(n, c)}, got {tuple(tags.shape)}")
  return jnp.asarray(tags, jnp.float32) > 0.5


def pooled_scores(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """Multi-label class scores: the mean of the logits over valid pixels, float32 [N,C]."""
  w = valid[..., None]
  return jnp.sum(logits * w, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1.0)


def class_activation_maps(logits: jax.Array, tags: jax.Array, valid: jax.Array, *,
                          background_class: Optional[int] = 0) -> jax.Array:
  """Normalised CAMs ``relu(logit_c) / max_pixels relu(logit_c)`` of the tagged classes.

  Args:
    logits: float32 [N,H,W,C].
    tags: bool [N,C].
    valid: float32 [N,H,W].
    background_class: its map is left at 0 (the background has no activation map of its own).

  Returns:
    float32 [N,H,W,C] in [0, 1]; 0 for untagged classes and the background.
  """
  c = logits.shape[-1]
  act = jax.nn.relu(logits) * valid[..., None]
  peak = jnp.max(act, axis=(1, 2), keepdims=True)
  cams = act / jnp.maximum(peak, 1e-6)
  keep = tags
  if background_class is not None:
    keep = keep & (jnp.arange(c) != background_class)
  return cams * keep[:, None, None, :]


def cam_pseudo_labels(logits: jax.Array, batch: dict, *,
                      background_class: int = 0,
                      background_score: float = 0.3,
                      iterations: int = 5,
                      bilateral_weight: float = 10.0,
                      bilateral_sigma_xy: float = 80.0,
                      bilateral_sigma_rgb: float = 13.0,
                      spatial_weight: float = 3.0,
                      spatial_sigma_xy: float = 3.0,
                      method: str = "grid",
                      min_confidence: float = 0.0,
                      max_grid_cells: int = crf.DEFAULT_MAX_GRID_CELLS) -> jax.Array:
  """Pseudo-masks from CAMs refined by a dense CRF (stop-gradient).

  Per pixel the scores are ``background_score`` for the background and the normalised CAM of
  each tagged class (untagged classes are excluded); their normalised logarithm is the CRF's
  unary, and the CRF's argmax the label. Images without tags keep every pixel ignored.

  Args:
    logits: float32 [N,H,W,C].
    batch: ``image`` float32 [N,H,W,3] in [0,1], ``tags`` float32 [N,C] (background included
      or not: it is always allowed), optional ``valid``.
    background_class: the background's index.
    background_score: the CAM value below which a pixel is background (IRN/AffinityNet use
      0.15-0.3 on VOC).
    iterations, bilateral_*, spatial_*, method, max_grid_cells: the dense CRF
      (:func:`jaxseg.losses.dense_crf`).
    min_confidence: pixels whose largest CRF marginal is below this become 255.

  Returns:
    int32 [N,H,W], 255 on ignored pixels.
  """
  where = "cam_pseudo_labels"
  logits = jax.lax.stop_gradient(_common.check_logits(logits, where))
  n, h, w, c = logits.shape
  if not 0 <= background_class < c:
    raise ValueError(f"{where}: background_class {background_class} is not in [0, {c})")
  if not 0.0 < background_score < 1.0:
    raise ValueError(f"{where}: background_score must be in (0, 1), got {background_score}")
  image = _common.get_image(batch, logits, where)
  valid = _common.get_valid(batch, (n, h, w), where)
  tags = _tags(batch, n, c, where)
  is_bg = jnp.arange(c) == background_class
  allowed = tags | is_bg
  cams = class_activation_maps(logits, tags, valid, background_class=background_class)
  scores = jnp.where(is_bg, background_score, cams)
  unary = jnp.where(allowed[:, None, None, :], jnp.log(jnp.maximum(scores, 1e-5)), -1e9)
  unary = unary - jax.nn.logsumexp(unary, axis=-1, keepdims=True)
  q = crf.mean_field(unary, image, valid, iterations=iterations,
                     bilateral_weight=bilateral_weight, bilateral_sigma_xy=bilateral_sigma_xy,
                     bilateral_sigma_rgb=bilateral_sigma_rgb, spatial_weight=spatial_weight,
                     spatial_sigma_xy=spatial_sigma_xy, method=method,
                     max_grid_cells=max_grid_cells, where=where)
  labels = jnp.argmax(q, axis=-1).astype(jnp.int32)
  tagged = jnp.any(tags & ~is_bg, axis=-1)[:, None, None]
  keep = (valid > 0) & (jnp.max(q, axis=-1) >= min_confidence) & tagged
  return jax.lax.stop_gradient(jnp.where(keep, labels, IGNORE_INDEX))


def multilabel_loss(logits: jax.Array, batch: dict, *,
                    background_class: Optional[int] = 0) -> jax.Array:
  """Binary cross-entropy of :func:`pooled_scores` against the tags (background left out)."""
  where = "multilabel_loss"
  logits = _common.check_logits(logits, where)
  n, h, w, c = logits.shape
  tags = _tags(batch, n, c, where).astype(jnp.float32)
  valid = _common.get_valid(batch, (n, h, w), where)
  scores = pooled_scores(logits, valid)
  bce = jnp.maximum(scores, 0.0) - scores * tags + jnp.log1p(jnp.exp(-jnp.abs(scores)))
  weight = jnp.ones((c,), jnp.float32)
  if background_class is not None:
    weight = weight.at[background_class].set(0.0)
  return jnp.mean(jnp.sum(bce * weight, axis=-1) / jnp.maximum(jnp.sum(weight), 1.0))


def cam_loss(logits: jax.Array, batch: dict, *,
             seg_weight: float = 1.0,
             warmup_steps: int = 0,
             step=None,
             background_class: int = 0,
             background_score: float = 0.3,
             min_confidence: float = 0.0,
             **crf_kwargs) -> jax.Array:
  """``multilabel + ramp(step) * seg_weight * CE(logits, cam_pseudo_labels(logits))``.

  Args:
    logits: float32 [N,H,W,C].
    batch: ``image``, ``tags`` float32 [N,C], optional ``valid``.
    seg_weight: weight of the cross-entropy on the pseudo-masks after the warm-up.
    warmup_steps: the pseudo-mask term ramps in linearly over these steps (the train step
      passes ``step``); 0 = from the start.
    step: the training step.
    background_class, background_score, min_confidence, **crf_kwargs: see
      :func:`cam_pseudo_labels`.

  Returns:
    float32 scalar.
  """
  where = "cam_loss"
  logits = _common.check_logits(logits, where)
  ramp = _common.warmup_factor(batch, step, warmup_steps, where)
  cls = multilabel_loss(logits, batch, background_class=background_class)
  labels = cam_pseudo_labels(logits, batch, background_class=background_class,
                             background_score=background_score, min_confidence=min_confidence,
                             **crf_kwargs)
  targets = {"mask": labels}
  if "valid" in batch:
    targets["valid"] = batch["valid"]
  return cls + ramp * seg_weight * cross_entropy(logits, targets)
