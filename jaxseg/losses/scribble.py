"""Scribble supervision: partial cross-entropy + CRF pairwise term, and a ScribbleSup E-step.

Two ways to learn from scribbles (``batch["scribble"]``: class on scribbled pixels, 255
elsewhere):

* :func:`scribble_loss` -- regularised loss (Tang et al. 2018 "rloss", Obukhov et al. 2019
  "Gated CRF"): pCE on the scribbled pixels plus ``pairwise_weight`` times
  :func:`jaxseg.losses.crf_pairwise` on all valid pixels, optionally ramped in linearly.
* :func:`scribble_em_loss` -- ScribbleSup-style alternation (Lin et al. 2016) done online: an
  E-step (:func:`scribble_pseudo_labels`) proposes full labels from the scribbles, the current
  network's probabilities and mean-field smoothing with a dense CRF, under ``stop_gradient``;
  the M-step is cross-entropy on those labels. ScribbleSup works on superpixels with graph
  cuts; here the graph is the pixel grid with the fully connected bilateral kernel, solved by
  a fixed number of mean-field iterations, which keeps the E-step inside the jitted train step.
  To alternate offline instead (E-step with a frozen network, then training), call
  :func:`scribble_pseudo_labels` once per image and train with ``cross_entropy`` on them.
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jaxseg.constants import IGNORE_INDEX
from jaxseg.losses import _common
from jaxseg.losses import crf
from jaxseg.losses.supervised import cross_entropy, partial_cross_entropy



def scribble_loss(logits: jax.Array, batch: dict, *,
                  pairwise_weight: float = 1e-3,
                  warmup_steps: int = 0,
                  step=None,
                  kernel: str = "dense",
                  sigma_xy: Optional[float] = None,
                  sigma_rgb: Optional[float] = None,
                  scale: float = 1.0,
                  radius: int = 5,
                  method: str = "grid",
                  class_weights: Optional[Sequence[float]] = None,
                  max_grid_cells: int = crf.DEFAULT_MAX_GRID_CELLS) -> jax.Array:
  """``pCE + ramp(step) * pairwise_weight * crf_pairwise`` -- the regularised scribble loss.

  ``crf_pairwise`` is normalised by the valid pixel count (see its docstring for the relation
  to rloss' lambda): its value is the average over pixels of the kernel mass that disagrees
  with the pixel's label. Measured on CamVid frames with noisy predictions: the dense kernel at
  rloss' sigmas (100, 15) gives ~1e3 at 64x85, ~4e3 at 128x170, ~9e3 at 256x341 (gradient
  norms 0.5-1.2 against ~0.01-0.03 for pCE with 3% scribbled pixels), hence the small default
  weight (rloss' lambda = 2e-9 at its 257^2 filtering resolution corresponds to ~1.3e-4); the
  local kernel at its defaults gives 25-40 (2-4 for the true labels) and Gated CRF's weight
  0.1 applies. Tune the weight per dataset.

  Args:
    logits: float32 [N,H,W,C].
    batch: ``image`` float32 [N,H,W,3] in [0,1]; ``scribble`` int32 [N,H,W] (255 = none);
      optional ``valid`` bool [N,H,W]; optional ``step`` (scalar or [N]) for the warm-up.
    pairwise_weight: weight of the pairwise term after warm-up.
    warmup_steps: ramp the pairwise weight linearly from 0 at step 0 to full at this step
      (BoxInst-style ``min(step / warmup_steps, 1)``); 0 = no warm-up. The step is read as an
      array so a changing step does not recompile.
    step: the training step (overrides ``batch["step"]``).
    kernel, sigma_xy, sigma_rgb, scale, radius, method, max_grid_cells: passed to
      :func:`jaxseg.losses.crf_pairwise`.
    class_weights: optional [C] weights of the pCE term.

  Returns:
    float32 scalar.
  """
  where = "scribble_loss"
  logits = _common.check_logits(logits, where)
  scribble = _common.require(batch, "scribble", where)
  _common.check_labels(scribble, logits.shape[:3], "scribble", where)
  ramp = _common.warmup_factor(batch, step, warmup_steps, where)
  unary = partial_cross_entropy(logits, batch, class_weights=class_weights)
  pairwise = crf.crf_pairwise(logits, batch, kernel=kernel, sigma_xy=sigma_xy,
                              sigma_rgb=sigma_rgb, scale=scale, radius=radius, method=method,
                              max_grid_cells=max_grid_cells)
  return unary + ramp * pairwise_weight * pairwise


def scribble_pseudo_labels(logits: jax.Array, batch: dict, *,
                           iterations: int = 5,
                           bilateral_weight: float = 10.0,
                           bilateral_sigma_xy: float = 80.0,
                           bilateral_sigma_rgb: float = 13.0,
                           spatial_weight: float = 3.0,
                           spatial_sigma_xy: float = 3.0,
                           method: str = "grid",
                           min_confidence: float = 0.0,
                           max_grid_cells: int = crf.DEFAULT_MAX_GRID_CELLS) -> jax.Array:
  """ScribbleSup-style E-step: full labels proposed from scribbles and the network.

  Per image: the unary is the network's log-probabilities restricted to the classes scribbled
  in that image (ScribbleSup's scribble unary is infinite for other classes and constant among
  the scribbled ones; an image with no scribble keeps every class); scribbled pixels are held
  at their class (hard constraint); ``iterations`` mean-field updates of a dense CRF
  (:func:`jaxseg.losses.crf.mean_field`) smooth the result along image edges. The output is
  ``stop_gradient``-ed.

  Args:
    logits: float32 [N,H,W,C] network logits.
    batch: ``image``, ``scribble``, optional ``valid``.
    iterations, bilateral_*, spatial_*, method, max_grid_cells: the dense CRF
      (see :func:`jaxseg.losses.dense_crf`).
    min_confidence: pixels whose largest marginal is below this become 255 (ignored).

  Returns:
    int32 [N,H,W] labels, 255 on padding and low-confidence pixels.
  """
  where = "scribble_pseudo_labels"
  logits = jax.lax.stop_gradient(_common.check_logits(logits, where))
  scribble = _common.check_labels(_common.require(batch, "scribble", where), logits.shape[:3],
                                  "scribble", where)
  image = _common.get_image(batch, logits, where)
  n, h, w, c = logits.shape
  valid = _common.get_valid(batch, (n, h, w), where)
  if not 0.0 <= min_confidence < 1.0:
    raise ValueError(f"{where}: min_confidence must be in [0, 1), got {min_confidence}")
  scribbled = (scribble != IGNORE_INDEX) & (valid > 0)
  present = jnp.any(jax.nn.one_hot(jnp.where(scribbled, scribble, -1), c, dtype=jnp.bool_),
                    axis=(1, 2))
  allowed = present | ~jnp.any(present, axis=-1, keepdims=True)
  unary = jnp.where(allowed[:, None, None, :], jax.nn.log_softmax(logits, axis=-1), -1e9)
  q = crf.mean_field(unary, image, valid, iterations=iterations,
                     bilateral_weight=bilateral_weight, bilateral_sigma_xy=bilateral_sigma_xy,
                     bilateral_sigma_rgb=bilateral_sigma_rgb, spatial_weight=spatial_weight,
                     spatial_sigma_xy=spatial_sigma_xy, method=method,
                     clamp_labels=jnp.where(scribbled, scribble, IGNORE_INDEX),
                     max_grid_cells=max_grid_cells, where=where)
  labels = jnp.argmax(q, axis=-1).astype(jnp.int32)
  keep = (valid > 0) & (jnp.max(q, axis=-1) >= min_confidence)
  return jax.lax.stop_gradient(jnp.where(keep, labels, IGNORE_INDEX))


def scribble_em_loss(logits: jax.Array, batch: dict, *,
                     iterations: int = 5,
                     min_confidence: float = 0.0,
                     class_weights: Optional[Sequence[float]] = None,
                     **crf_kwargs) -> jax.Array:
  """Cross-entropy on :func:`scribble_pseudo_labels` of the current logits (online EM).

  Args:
    logits: float32 [N,H,W,C].
    batch: ``image``, ``scribble``, optional ``valid``.
    iterations, min_confidence: see :func:`scribble_pseudo_labels`.
    class_weights: optional [C] cross-entropy weights.
    **crf_kwargs: the other keyword arguments of :func:`scribble_pseudo_labels`
      (bilateral_*, spatial_*, method, max_grid_cells).

  Returns:
    float32 scalar.
  """
  labels = scribble_pseudo_labels(logits, batch, iterations=iterations,
                                  min_confidence=min_confidence, **crf_kwargs)
  targets = {"mask": labels}
  if "valid" in batch:
    targets["valid"] = batch["valid"]
  return cross_entropy(logits, targets, class_weights=class_weights)
