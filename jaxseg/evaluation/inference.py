"""Inference beyond one forward pass: sliding windows, multi-scale + flip.

Every function here takes ``apply_fn(images [B,h,w,3]) -> logits [B,h,w,C]``, e.g.
``lambda x: model.apply(variables, x, train=False)``, and is traceable: call it inside
``jax.jit`` (``make_eval_step`` does) and it compiles once per image size. Window
positions, scales and blending weights depend only on static shapes, so they are NumPy
constants at trace time.

* :func:`sliding_window` -- windows of a fixed size, blended logits.
* :func:`multi_scale_flip` -- mean softmax over rescaled (and flipped) copies.
* :func:`make_inference_fn` -- the config-driven entry point used by evaluation::

    dict(mode="whole")                                        # one forward pass (default)
    dict(mode="slide", window=(512, 512), stride=(341, 341),
         blend="gaussian", batch_windows=4)
    dict(mode="multiscale", scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True,
         slide=None)                                          # or slide=dict(window=..., ...)
"""
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.models.layers import resize_bilinear

ApplyFn = Callable[[jax.Array], jax.Array]
IntPair = Union[int, Sequence[int]]

MODES = ("whole", "slide", "multiscale")
BLENDS = ("gaussian", "flat")
PAD_MODES = ("constant", "reflect", "edge")
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
_SLIDE_KEYS = ("window", "stride", "blend", "sigma_scale", "batch_windows", "pad_mode")
_MULTISCALE_KEYS = ("scales", "flip", "base_size", "slide")
# A Gaussian profile never drops below this, so that a pixel seen only near window edges
# keeps a positive weight sum even for tiny sigma_scale (exp underflows to 0 in float32
# below ~1e-38 and the blend would divide 0 by 0).
_MIN_PROFILE = 1e-6


# ----------------------------------------------------------------------------- validation

def _positive_pair(value: Any, name: str) -> Tuple[int, int]:
  """An int or an (h, w) pair of positive ints, as a tuple."""
  pair = (value, value) if isinstance(value, (int, np.integer)) else value
  try:
    pair = tuple(pair)
  except TypeError:
    raise ValueError(f"{name} must be an int or an (h, w) pair of ints; got {value!r}") from None
  if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                               for v in pair):
    raise ValueError(f"{name} must be an int or an (h, w) pair of ints; got {value!r}")
  if min(pair) <= 0:
    raise ValueError(f"{name} must be positive; got {value!r}")
  return int(pair[0]), int(pair[1])


def _check_slide(window, stride, blend, sigma_scale, batch_windows, pad_mode) -> Dict[str, Any]:
  """Validated, normalised sliding-window options (raises ValueError naming the problem)."""
  if window is None:
    raise ValueError("sliding-window inference needs window=(h, w)")
  if stride is None:
    raise ValueError("sliding-window inference needs stride=(h, w) (<= window)")
  window = _positive_pair(window, "window")
  stride = _positive_pair(stride, "stride")
  if stride[0] > window[0] or stride[1] > window[1]:
    raise ValueError(f"stride {stride} must not exceed window {window}: pixels between "
                     "windows would get no prediction")
  if blend not in BLENDS:
    raise ValueError(f"blend must be one of {BLENDS}; got {blend!r}")
  if not isinstance(sigma_scale, (int, float)) or isinstance(sigma_scale, bool) or not (
      sigma_scale > 0 and math.isfinite(sigma_scale)):
    raise ValueError(f"sigma_scale must be a positive number; got {sigma_scale!r}")
  if not isinstance(batch_windows, (int, np.integer)) or isinstance(batch_windows, bool) or (
      batch_windows <= 0):
    raise ValueError(f"batch_windows must be a positive int; got {batch_windows!r}")
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode must be one of {PAD_MODES}; got {pad_mode!r}")
  return dict(window=window, stride=stride, blend=blend, sigma_scale=float(sigma_scale),
              batch_windows=int(batch_windows), pad_mode=pad_mode)


def _check_multiscale(scales, flip, base_size, slide) -> Dict[str, Any]:
  try:
    scales = tuple(float(s) for s in scales)
  except (TypeError, ValueError):
    raise ValueError(f"scales must be a sequence of positive numbers; got {scales!r}") from None
  if not scales or not all(s > 0 and math.isfinite(s) for s in scales):
    raise ValueError(f"scales must be a non-empty sequence of positive numbers; got {scales!r}")
  if not isinstance(flip, (bool, np.bool_)):
    raise ValueError(f"flip must be True or False; got {flip!r}")
  if base_size is not None and (not isinstance(base_size, (int, np.integer))
                                or isinstance(base_size, bool) or base_size <= 0):
    raise ValueError(f"base_size must be None or a positive int; got {base_size!r}")
  if slide is not None:
    slide = _slide_from_mapping(_as_dict(slide, "slide"), "slide")
  return dict(scales=scales, flip=bool(flip), base_size=base_size, slide=slide)


def _as_dict(config: Any, name: str) -> Dict[str, Any]:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"{name} must be a dict; got {config!r}")
  return dict(config)


def _slide_from_mapping(config: Dict[str, Any], name: str) -> Dict[str, Any]:
  unknown = sorted(set(config) - set(_SLIDE_KEYS))
  if unknown:
    raise ValueError(f"{name} has unknown keys {unknown}; valid: {list(_SLIDE_KEYS)}")
  return _check_slide(config.get("window"), config.get("stride"),
                      config.get("blend", "gaussian"), config.get("sigma_scale", 1 / 8),
                      config.get("batch_windows", 4), config.get("pad_mode", "constant"))


# ----------------------------------------------------------------------------- sliding window

def window_starts(size: int, window: int, stride: int) -> np.ndarray:
  """Offsets of the windows along one axis of length ``size >= window``.

  Windows start every ``stride`` pixels; the last one is moved back to end exactly at the
  border, so ``ceil((size - window) / stride) + 1`` windows cover the axis.
  """
  count = -(-(size - window) // stride) + 1
  return np.minimum(np.arange(count) * stride, size - window)


def blend_profile(length: int, blend: str, sigma_scale: float = 1 / 8) -> np.ndarray:
  """1-D blending weights of a window side, float64 ``[length]``.

  ``flat``: ones. ``gaussian``: ``exp(-(i - c)^2 / (2 sigma^2))`` with the centre
  ``c = (length - 1) / 2`` (symmetric, so a mirrored window gets mirrored weights) and
  ``sigma = sigma_scale * length`` (nnU-Net's 1/8), floored at 1e-6. The 2-D weight of a
  window is the outer product of its two profiles.
  """
  if blend == "flat":
    return np.ones(length)
  offset = np.arange(length) - (length - 1) / 2
  sigma = sigma_scale * length
  return np.maximum(np.exp(-0.5 * (offset / sigma) ** 2), _MIN_PROFILE)


def _coverage(size: int, window: int, stride: int, profile: np.ndarray) -> np.ndarray:
  """Sum of the profiles of every window along one axis, float64 ``[size]``."""
  total = np.zeros(size)
  for start in window_starts(size, window, stride):
    total[start:start + window] += profile
  return total


def sliding_window(apply_fn: ApplyFn, images: jax.Array, *, num_classes: int, window: IntPair,
                   stride: IntPair, blend: str = "gaussian", sigma_scale: float = 1 / 8,
                   batch_windows: int = 4, pad_mode: str = "constant") -> jax.Array:
  """Logits of ``images`` blended from overlapping windows.

  Windows of size ``window`` start every ``stride`` pixels along each axis, the last one
  aligned to the bottom/right border (:func:`window_starts`), so the image is covered
  exactly. Each pixel's logit is the weighted mean of the window logits covering it, the
  weights given by ``blend`` (:func:`blend_profile`).

  An image smaller than the window along an axis is padded at the bottom/right up to the
  window size (``pad_mode`` as in ``jnp.pad``: ``"constant"`` = zeros, i.e. black in the
  [0, 1] input units; or ``"reflect"``, ``"edge"``) and the logits are cropped back, so the
  model only ever sees ``window``-sized inputs.

  Windows are run in a ``lax.scan`` over groups of ``batch_windows`` window positions; a
  group is one ``apply_fn`` call on ``[N * batch_windows, wh, ww, 3]`` (the same positions
  of every image). Peak memory is therefore that of one such call plus the float32
  accumulator ``[N, H, W, C]``, whatever the number of windows, and the program size does
  not grow with it. Surplus slots of the last group repeat the first window with weight 0.

  Args:
    apply_fn: ``apply_fn(images [B,h,w,3]) -> logits [B,h,w,C]``.
    images: ``[N,H,W,3]``.
    num_classes: C.
    window: window size, an int or ``(h, w)``.
    stride: step between window starts, ``<= window`` per axis.
    blend: ``"gaussian"`` (nnU-Net-style, favours window centres) or ``"flat"`` (mean).
    sigma_scale: Gaussian sigma as a fraction of the window side.
    batch_windows: window positions per ``apply_fn`` call (clipped to the window count).
    pad_mode: how images smaller than the window are padded (see above).

  Returns:
    float32 logits ``[N,H,W,C]``.
  """
  opts = _check_slide(window, stride, blend, sigma_scale, batch_windows, pad_mode)
  (wh, ww), (sh, sw) = opts["window"], opts["stride"]
  n, h, w, channels = images.shape
  ph, pw = max(h, wh), max(w, ww)
  if (ph, pw) != (h, w):
    images = jnp.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode=pad_mode)

  starts = np.stack(np.meshgrid(window_starts(ph, wh, sh), window_starts(pw, ww, sw),
                                indexing="ij"), axis=-1).reshape(-1, 2)
  count = len(starts)
  group = min(opts["batch_windows"], count)
  num_groups = -(-count // group)
  surplus = num_groups * group - count
  starts = np.concatenate([starts, np.repeat(starts[:1], surplus, axis=0)])
  starts = starts.reshape(num_groups, group, 2).astype(np.int32)
  live = (np.arange(num_groups * group) < count).reshape(num_groups, group)

  profile_y = blend_profile(wh, opts["blend"], opts["sigma_scale"])
  profile_x = blend_profile(ww, opts["blend"], opts["sigma_scale"])
  weight = jnp.asarray(np.outer(profile_y, profile_x), jnp.float32)[None, :, :, None]
  # The window grid and the weights are both separable, so the weight sum at a pixel is the
  # product of two 1-D sums: computed exactly on the host, never accumulated per window.
  norm = np.outer(_coverage(ph, wh, sh, profile_y), _coverage(pw, ww, sw, profile_x))
  expected = (n * group, wh, ww, num_classes)

  def run_group(acc, xs):
    group_starts, group_live = xs
    crops = [jax.lax.dynamic_slice(images, (0, group_starts[i, 0], group_starts[i, 1], 0),
                                   (n, wh, ww, channels)) for i in range(group)]
    logits = apply_fn(jnp.stack(crops, axis=1).reshape(n * group, wh, ww, channels))
    if tuple(logits.shape) != expected:
      raise ValueError(f"apply_fn must map [{n * group},{wh},{ww},{channels}] windows to logits "
                       f"of shape {list(expected)}; got {list(logits.shape)}")
    logits = logits.astype(jnp.float32).reshape(n, group, wh, ww, num_classes)
    for i in range(group):
      corner = (0, group_starts[i, 0], group_starts[i, 1], 0)
      contribution = jnp.where(group_live[i], logits[:, i] * weight, 0.0)
      region = jax.lax.dynamic_slice(acc, corner, contribution.shape)
      acc = jax.lax.dynamic_update_slice(acc, region + contribution, corner)
    return acc, None

  acc = jnp.zeros((n, ph, pw, num_classes), jnp.float32)
  acc, _ = jax.lax.scan(run_group, acc, (jnp.asarray(starts), jnp.asarray(live)))
  blended = acc / jnp.asarray(norm, jnp.float32)[None, :, :, None]
  return blended[:, :h, :w]


# ----------------------------------------------------------------------------- multi-scale

def scaled_size(size: Tuple[int, int], scale: float, base_size: Optional[int] = None
                ) -> Tuple[int, int]:
  """The ``(h, w)`` an image of ``size`` is resized to at ``scale``.

  ``base_size=None``: ``scale`` times the image size. ``base_size=b``: the aspect ratio is
  kept and the shorter side becomes ``b * scale`` (MMSeg's keep-ratio test scales). Sides
  are rounded half up, like MMSeg's ``rescale_size``, and are at least 1.
  """
  h, w = size
  factor = scale if base_size is None else scale * base_size / min(h, w)
  return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def multi_scale_flip(apply_fn: ApplyFn, images: jax.Array, *, num_classes: int,
                     scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
                     base_size: Optional[int] = None,
                     slide: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """Mean softmax probabilities over rescaled and (optionally) mirrored copies of ``images``.

  For every scale the image is resized (bilinear, half-pixel centres, no antialiasing:
  ``layers.resize_bilinear``) to :func:`scaled_size`, the logits are computed (one
  ``apply_fn`` call, or :func:`sliding_window` with the options in ``slide``), resized back
  to ``H, W`` and turned into probabilities with a softmax; with ``flip`` the horizontally
  mirrored image is added, its logits mirrored back. The result is the mean of these
  ``len(scales) * (1 + flip)`` probability maps: averaging probabilities (as MMSeg's
  test-time augmentation does) rather than logits keeps one over-confident view from
  dominating. The scales are a static Python loop, so each is its own ``apply_fn`` shape.

  Args:
    apply_fn: ``apply_fn(images [B,h,w,3]) -> logits [B,h,w,C]``.
    images: ``[N,H,W,3]``.
    num_classes: C.
    scales: positive resize factors.
    flip: also run the horizontally mirrored images.
    base_size: None, or the shorter side at scale 1.0 (see :func:`scaled_size`).
    slide: None, or :func:`sliding_window` options (``window``, ``stride``, ...) applied at
      every scale.

  Returns:
    float32 probabilities ``[N,H,W,C]`` (summing to 1 over C).
  """
  opts = _check_multiscale(scales, flip, base_size, slide)
  n, h, w, _ = images.shape

  def logits_of(x):
    if opts["slide"] is not None:
      return sliding_window(apply_fn, x, num_classes=num_classes, **opts["slide"])
    out = apply_fn(x)
    if tuple(out.shape) != (*x.shape[:3], num_classes):
      raise ValueError(f"apply_fn must map {list(x.shape)} images to logits of shape "
                       f"{[*x.shape[:3], num_classes]}; got {list(out.shape)}")
    return out.astype(jnp.float32)

  total = jnp.zeros((n, h, w, num_classes), jnp.float32)
  for scale in opts["scales"]:
    resized = resize_bilinear(images, scaled_size((h, w), scale, opts["base_size"]))
    views = [logits_of(resized)]
    if opts["flip"]:
      views.append(logits_of(resized[:, :, ::-1])[:, :, ::-1])
    for logits in views:
      total = total + jax.nn.softmax(resize_bilinear(logits, (h, w)), axis=-1)
  return total / (len(opts["scales"]) * (2 if opts["flip"] else 1))


# ----------------------------------------------------------------------------- entry point

InferenceFn = Callable[[ApplyFn, jax.Array, int], jax.Array]


def parse_config(config: Optional[Mapping[str, Any]]) -> Tuple[str, Dict[str, Any]]:
  """Validate an inference config; returns ``(mode, options)``.

  ``config`` is a dict or ``ConfigDict`` with ``mode`` in :data:`MODES` (None means
  ``whole``). Options of the other modes may be present (handy when a saved config is
  switched from the command line) and are ignored; keys of no mode raise ValueError.
  """
  config = {} if config is None else _as_dict(config, "inference config")
  # Unset placeholders of a recipe's default (``configs.default_inference``) are absent keys.
  config = {k: v for k, v in config.items() if v is not None}
  mode = config.pop("mode", "whole")
  if mode not in MODES:
    raise ValueError(f"inference mode must be one of {MODES}; got {mode!r}")
  unknown = sorted(set(config) - set(_SLIDE_KEYS) - set(_MULTISCALE_KEYS))
  if unknown:
    raise ValueError(f"inference config has unknown keys {unknown}; valid: "
                     f"{['mode', *_SLIDE_KEYS, *_MULTISCALE_KEYS]}")
  if mode == "slide":
    return mode, _slide_from_mapping({k: v for k, v in config.items() if k in _SLIDE_KEYS},
                                     "inference config")
  if mode == "multiscale":
    return mode, _check_multiscale(config.get("scales", DEFAULT_SCALES),
                                   config.get("flip", True), config.get("base_size"),
                                   config.get("slide"))
  return mode, {}


def make_inference_fn(config: Optional[Mapping[str, Any]] = None) -> InferenceFn:
  """``fn(apply_fn, images [N,H,W,3], num_classes) -> float32 logits [N,H,W,C]`` for a config.

  ``whole``: ``apply_fn(images)``. ``slide``: :func:`sliding_window`. ``multiscale``: the
  log of :func:`multi_scale_flip`'s mean probabilities, so that its softmax is exactly that
  mean and post-processing that expects logits (the dense CRF) sees consistent scores.
  The config is validated here, before anything is traced.
  """
  mode, opts = parse_config(config)

  def whole(apply_fn, images, num_classes):
    return apply_fn(images).astype(jnp.float32)

  def slide(apply_fn, images, num_classes):
    return sliding_window(apply_fn, images, num_classes=num_classes, **opts)

  def multiscale(apply_fn, images, num_classes):
    probs = multi_scale_flip(apply_fn, images, num_classes=num_classes, **opts)
    return jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))

  return {"whole": whole, "slide": slide, "multiscale": multiscale}[mode]
