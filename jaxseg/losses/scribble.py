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



_BALANCE = ("gradient", "kernel_mass", "none")
# Measured on the embedded scenes (UNet, 600 steps, bench/weak_supervision.py; README): the
# gradient ratio 0.5 gives 56.5 mIoU, 1.0 29.0 (the Potts term wins before the network has
# learnt the scribbles); kernel-mass weights 5 and 10 give 44.6 and 30.0.
_DEFAULT_WEIGHT = {"gradient": 0.5, "kernel_mass": 5.0, "none": 1e-3}


def _l1(x):
  return _common.global_sum(jnp.sum(jnp.abs(x)))


def scribble_loss(logits: jax.Array, batch: dict, *,
                  pairwise_weight: Optional[float] = None,
                  balance: str = "gradient",
                  warmup_steps: int = 0,
                  step=None,
                  kernel: str = "local",
                  sigma_xy: Optional[float] = None,
                  sigma_rgb: Optional[float] = None,
                  scale: float = 1.0,
                  radius: int = 5,
                  method: str = "grid",
                  class_weights: Optional[Sequence[float]] = None,
                  max_grid_cells: int = crf.DEFAULT_MAX_GRID_CELLS) -> jax.Array:
  """``pCE + ramp(step) * weight * crf_pairwise`` -- the regularised scribble loss.

  The pairwise term's raw size depends on the kernel, the sigmas, the image size and the
  scribble coverage (measured on CamVid frames: the dense kernel at rloss' sigmas gives ~1e3 at
  64x85 and ~9e3 at 256x341, with gradients 20-100x pCE's), so a fixed weight only works after
  tuning per dataset, and a weight that is too large pulls an untrained network to the constant
  labelling. With ``balance="gradient"`` (default) the weight is scale-free: the pairwise term
  is multiplied by ``pairwise_weight * |dpCE/dlogits|_1 / |dpairwise/dlogits|_1`` (L1 norms
  over the global batch, under ``stop_gradient``), so the pairwise gradient's total mass is
  always ``pairwise_weight`` times pCE's, whatever the kernel, the resolution or the dataset.
  (L1, not L2: pCE's gradient sits on the ~3% scribbled pixels, the pairwise one spreads over
  all of them, and shared weights add a diffuse gradient coherently: at equal L2 norms the
  pairwise term's pull on the network is ~sqrt(P / #scribbled) times pCE's -- measured: ratio
  0.5 by L2 collapsed the shapes run to background, 15.3 mIoU.) With
  ``balance="none"`` the weight multiplies the raw term (rloss' / Gated CRF's convention; see
  :func:`jaxseg.losses.crf_pairwise` for the relation to their lambda).

  Args:
    logits: float32 [N,H,W,C].
    batch: ``image`` float32 [N,H,W,3] in [0,1]; ``scribble`` int32 [N,H,W] (255 = none);
      optional ``valid`` bool [N,H,W].
    pairwise_weight: the ratio of the pairwise gradient's L1 norm to pCE's
      (``balance="gradient"``, default 0.5), the weight of the kernel-mass-normalised term
      (``balance="kernel_mass"``, :func:`jaxseg.losses.crf_pairwise` with ``normalize=True``,
      default 5) or the raw weight (``balance="none"``, default 1e-3).
    balance: "gradient", "kernel_mass" or "none", see above.
    warmup_steps: ramp the pairwise weight linearly from 0 at step 0 to full at this step
      (BoxInst-style ``min(step / warmup_steps, 1)``); 0 = no warm-up. The train step passes
      ``step``; research code calling the loss directly passes it too.
    step: the training step (int scalar or array; an array does not recompile).
    kernel, sigma_xy, sigma_rgb, scale, radius, method, max_grid_cells: passed to
      :func:`jaxseg.losses.crf_pairwise` (default: Gated CRF's local window, r=5).
    class_weights: optional [C] weights of the pCE term.

  Returns:
    float32 scalar.
  """
  where = "scribble_loss"
  logits = _common.check_logits(logits, where)
  scribble = _common.require(batch, "scribble", where)
  _common.check_labels(scribble, logits.shape[:3], "scribble", where,
                       num_classes=logits.shape[-1])
  if balance not in _BALANCE:
    raise ValueError(f"{where}: unknown balance {balance!r}; valid: {', '.join(_BALANCE)}")
  if pairwise_weight is None:
    pairwise_weight = _DEFAULT_WEIGHT[balance]
  if not pairwise_weight >= 0:
    raise ValueError(f"{where}: pairwise_weight must be >= 0, got {pairwise_weight}")
  ramp = _common.warmup_factor(batch, step, warmup_steps, where)

  def unary_fn(x):
    return partial_cross_entropy(x, batch, class_weights=class_weights)

  def pairwise_fn(x, normalize=False):
    return crf.crf_pairwise(x, batch, kernel=kernel, sigma_xy=sigma_xy, sigma_rgb=sigma_rgb,
                            scale=scale, radius=radius, method=method, normalize=normalize,
                            max_grid_cells=max_grid_cells)

  if balance != "gradient":
    with _common.labels_checked():  # the scribbles were checked above
      unary = unary_fn(logits)
    return unary + ramp * pairwise_weight * pairwise_fn(
        logits, normalize=balance == "kernel_mass")
  # The pairwise backward pass is cheap (its custom_vjp keeps the forward filtering), so the
  # two gradients cost little more than the loss's own backward pass. With no scribbled pixel
  # pCE's gradient is 0, so the ratio and the loss are 0: the pairwise term alone would pull
  # the network to a constant labelling.
  with _common.labels_checked():
    unary, grad_unary = jax.value_and_grad(unary_fn)(logits)
  pairwise, grad_pairwise = jax.value_and_grad(pairwise_fn)(logits)
  ratio = _l1(grad_unary) / jnp.maximum(_l1(grad_pairwise), 1e-12)
  return unary + ramp * pairwise_weight * jax.lax.stop_gradient(ratio) * pairwise


def scribble_pseudo_labels(logits: jax.Array, batch: dict, *,
                           iterations: int = 5,
                           bilateral_weight: float = 10.0,
                           bilateral_sigma_xy: float = 80.0,
                           bilateral_sigma_rgb: float = 13.0,
                           spatial_weight: float = 3.0,
                           spatial_sigma_xy: float = 3.0,
                           method: str = "grid",
                           normalization: str = "symmetric",
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
    iterations, bilateral_*, spatial_*, method, normalization, max_grid_cells: the dense CRF
      (see :func:`jaxseg.losses.dense_crf`).
    min_confidence: pixels whose largest marginal is below this become 255 (ignored).

  Returns:
    int32 [N,H,W] labels, 255 on padding and low-confidence pixels.
  """
  where = "scribble_pseudo_labels"
  logits = jax.lax.stop_gradient(_common.check_logits(logits, where))
  scribble = _common.check_labels(_common.require(batch, "scribble", where), logits.shape[:3],
                                  "scribble", where, num_classes=logits.shape[-1])
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
                     normalization=normalization,
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
      (bilateral_*, spatial_*, method, normalization, max_grid_cells).

  Returns:
    float32 scalar.
  """
  labels = scribble_pseudo_labels(logits, batch, iterations=iterations,
                                  min_confidence=min_confidence, **crf_kwargs)
  targets = {"mask": labels}
  if "valid" in batch:
    targets["valid"] = batch["valid"]
  with _common.labels_checked():  # in [0, C) or 255 by construction
    return cross_entropy(logits, targets, class_weights=class_weights)
