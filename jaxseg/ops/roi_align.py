"""RoIAlign, adaptive RoIAlign for mask targets and FPN multi-scale RoIAlign (torchvision).

Reproduced semantics (``torchvision.ops.roi_align``, CPU/CUDA kernel, and
``torchvision.ops.MultiScaleRoIAlign``), per RoI and per axis (shown for y):

* ``start = y0 * spatial_scale - offset`` with ``offset = 0.5`` if ``aligned`` else 0;
  ``roi_h = y1 * spatial_scale - offset - start``, clamped to ``>= 1`` when not aligned;
  ``bin = roi_h / oh``.
* ``g`` samples per bin: ``sampling_ratio`` if > 0, else adaptive ``ceil(roi_h / oh)``. Sample
  ``i`` of output row ``p`` sits at ``start + p * bin + (i + 0.5) * bin / g``.
* A sample with ``y < -1`` or ``y > H`` (or the same for x) contributes 0. Otherwise ``y`` is
  clamped to ``>= 0``, ``low = floor(y)``, and if ``low >= H - 1`` then ``low = high = H - 1``
  and ``y = low``; else ``high = low + 1``. The value is bilinear in the 4 neighbours.
* The output is the sum over the ``g_h * g_w`` samples divided by ``max(g_h * g_w, 1)``.

Everything above is separable in y and x, so one RoI's output is ``Wy @ F @ Wx^T`` with
``Wy[p, h]`` the summed bilinear weights of row p's samples on feature row h. :func:`roi_align`
and :func:`multiscale_roi_align` gather the 4 neighbours of each of the ``(oh g) x (ow g)``
samples instead (cheaper than dense matrices for C-channel maps; differentiable w.r.t. the
features through the gather's scatter-add transpose). :func:`roi_align_adaptive` builds the
dense ``Wy``/``Wx`` of single-channel masks (mask targets) with a static cap on the adaptive
samples per bin.

:func:`multiscale_roi_align` follows ``MultiScaleRoIAlign``: per-level scale
``2 ** round(log2(feature_h / image_h))`` (torchvision uses the height only), level of each box
from :func:`roi_levels` (``LevelMapper``) with ``k_min``/``k_max`` from the first/last scale. All
levels are flattened into one array and each RoI gathers from its level at an offset, so every
shape is static and every RoI is pooled once.

Gradients flow to the features (the transpose of the gather, a scatter-add into one buffer)
and, as in torchvision, not to the boxes. XLA fuses some multiply-adds of the sample
coordinates that torch's CPU kernel rounds twice, so results agree to float32 rounding of the
coordinates (about 1e-5 relative at coordinates of a few hundred feature pixels), not bit for bit.

Boxes are ``(y0, x0, y1, x1)`` in input pixels; feature maps are NHWC.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.ops.boxes import box_area

_OutputSize = Union[int, Tuple[int, int]]


def _output_size(output_size, where: str) -> Tuple[int, int]:
  if isinstance(output_size, (int, np.integer)) and not isinstance(output_size, bool):
    output_size = (int(output_size), int(output_size))
  try:
    oh, ow = output_size
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: output_size must be an int or (oh, ow), got "
                     f"{output_size!r}") from e
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
             for v in (oh, ow)):
    raise ValueError(f"{where}: output_size must be positive ints, got {output_size!r}")
  return int(oh), int(ow)


def _check_boxes(boxes, lead: Tuple[int, ...], where: str):
  if not hasattr(boxes, "ndim") or boxes.ndim != len(lead) + 2 or boxes.shape[-1] != 4:
    shape = getattr(boxes, "shape", type(boxes).__name__)
    want = "[N, K, 4]" if lead else "[K, 4]"
    raise ValueError(f"{where}: boxes must be {want} (y0, x0, y1, x1), got {shape}")
  if tuple(boxes.shape[:len(lead)]) != lead:
    raise ValueError(f"{where}: boxes must have leading axes {lead} to match the features, got "
                     f"{tuple(boxes.shape)}")


def _axis_samples(start, size, extent, n_out: int, n_grid: int, grid):
  """Neighbours and weights of the samples along one axis.

  Args:
    start: [R] RoI start in feature coordinates.
    size: [R] RoI extent (already clamped as torchvision does).
    extent: [R] int32 feature-map length along this axis.
    n_out: output bins along this axis.
    n_grid: static number of sample slots per bin.
    grid: [R] float samples actually used per bin (<= n_grid); slots i >= grid get weight 0.

  Returns:
    low, high: int32 [R, n_out, n_grid] neighbour rows; w_low, w_high: [R, n_out, n_grid]
    bilinear weights with the out-of-range rule and the unused slots folded in.
  """
  dtype = start.dtype
  bin_size = size / n_out
  p = jnp.arange(n_out, dtype=dtype)[None, :, None]
  i = jnp.arange(n_grid, dtype=dtype)[None, None, :]
  b = bin_size[:, None, None]
  # Same association as the kernel: (start + p * bin) + ((i + 0.5) * bin) / grid.
  coord = (start[:, None, None] + p * b) + ((i + 0.5) * b) / grid[:, None, None]
  ext_f = extent.astype(dtype)[:, None, None]
  ext_i = extent[:, None, None]
  used = (i < grid[:, None, None]) & ~((coord < -1) | (coord > ext_f))
  # Clipping at the extent changes no used sample and keeps every index in range.
  c = jnp.clip(coord, 0, ext_f)
  low = jnp.floor(c).astype(jnp.int32)
  edge = low >= ext_i - 1
  low = jnp.where(edge, ext_i - 1, low)
  high = jnp.where(edge, ext_i - 1, low + 1)
  c = jnp.where(edge, low.astype(dtype), c)
  frac = c - low.astype(dtype)
  w_low = jnp.where(used, 1 - frac, 0)
  w_high = jnp.where(used, frac, 0)
  return low, high, w_low, w_high


def _roi_geometry(boxes, scale, aligned: bool):
  """Start and clamped size in feature coordinates, per axis. boxes [R, 4], scale [R]."""
  offset = 0.5 if aligned else 0.0
  s = boxes * scale[:, None] - offset
  start_y, start_x = s[:, 0], s[:, 1]
  size_y, size_x = s[:, 2] - start_y, s[:, 3] - start_x
  if not aligned:
    size_y = jnp.maximum(size_y, 1.0)
    size_x = jnp.maximum(size_x, 1.0)
  return start_y, start_x, size_y, size_x


def _pool_flat(flat, base, height, width, scale, boxes, oh: int, ow: int, sampling_ratio: int,
               aligned: bool):
  """RoIAlign of R RoIs over features flattened to [T, C].

  Args:
    flat: [T, C] all feature maps, row-major (y, x) per map.
    base: int32 [R] row of flat where each RoI's map starts.
    height, width: int32 [R] size of each RoI's map.
    scale: [R] spatial scale of each RoI's map.
    boxes: [R, 4] (y0, x0, y1, x1) input pixels.

  Returns:
    [R, oh, ow, C].
  """
  start_y, start_x, size_y, size_x = _roi_geometry(boxes, scale, aligned)
  sr = sampling_ratio
  grid = jnp.full(base.shape, sr, boxes.dtype)
  y_lo, y_hi, wy_lo, wy_hi = _axis_samples(start_y, size_y, height, oh, sr, grid)
  x_lo, x_hi, wx_lo, wx_hi = _axis_samples(start_x, size_x, width, ow, sr, grid)
  base = base[:, None, None]
  row_len = width[:, None, None]
  indices, weights = [], []
  for i in range(sr):
    for j in range(sr):
      for yi, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for xi, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
          indices.append(base + yi[:, :, None, i] * row_len + xi[:, None, :, j])  # [R, oh, ow]
          weights.append(wy[:, :, None, i] * wx[:, None, :, j])
  weights = jax.lax.stop_gradient(jnp.stack(weights) / float(max(sr * sr, 1)))
  return _weighted_gather(flat, jnp.stack(indices), weights)


@jax.custom_vjp
def _weighted_gather(flat, indices, weights):
  """``sum_s weights[s, ..., None] * flat[indices[s]]``: [T, C], [S, ...], [S, ...] -> [..., C].

  One gather per s, summed as it goes, so the peak memory is a few outputs rather than all S
  gathered maps; the backward pass scatter-adds into a single gradient buffer for the same
  reason (autodiff would make S scatters into S zero buffers). Like torchvision's roi_align,
  no gradient flows to the sampling positions (the boxes).
  """
  acc = None
  for s in range(indices.shape[0]):
    term = weights[s][..., None] * jnp.take(flat, indices[s], axis=0, mode="clip")
    acc = term if acc is None else acc + term
  return acc


def _weighted_gather_fwd(flat, indices, weights):
  # `flat` is kept only for its shape and dtype (it is alive anyway as the input).
  return _weighted_gather(flat, indices, weights), (flat, indices, weights)


def _weighted_gather_bwd(res, cotangent):
  flat, indices, weights = res

  def add_one(s, grad):
    return grad.at[indices[s]].add(weights[s][..., None] * cotangent, mode="clip")

  # A loop carry is updated in place; an unrolled chain of scatters may copy the buffer.
  grad = jax.lax.fori_loop(0, indices.shape[0], add_one,
                           jnp.zeros(flat.shape, jnp.result_type(cotangent, weights)))
  return (grad.astype(flat.dtype), np.zeros(indices.shape, jax.dtypes.float0),
          jnp.zeros_like(weights))


_weighted_gather.defvjp(_weighted_gather_fwd, _weighted_gather_bwd)


def roi_align(features: jnp.ndarray, boxes: jnp.ndarray, output_size: _OutputSize, *,
              spatial_scale: float, sampling_ratio: int, aligned: bool) -> jnp.ndarray:
  """RoIAlign with a fixed sampling ratio (``torchvision.ops.roi_align``).

  Args:
    features: [N, H, W, C] feature maps.
    boxes: [N, K, 4] (y0, x0, y1, x1) in input pixels, K RoIs per image.
    output_size: int or (oh, ow).
    spatial_scale: feature / input scale (e.g. 1/4 for P2).
    sampling_ratio: samples per bin and axis, > 0 (adaptive sampling: roi_align_adaptive).
    aligned: torchvision's ``aligned`` (shift by -0.5 pixel; no >= 1 size clamp).

  Returns:
    [N, K, oh, ow, C] in the features' dtype.
  """
  where = "roi_align"
  oh, ow = _output_size(output_size, where)
  if not hasattr(features, "ndim") or features.ndim != 4:
    raise ValueError(f"{where}: features must be [N, H, W, C], got "
                     f"{getattr(features, 'shape', type(features).__name__)}")
  n, h, w, c = features.shape
  _check_boxes(boxes, (n,), where)
  if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)) \
      or sampling_ratio <= 0:
    raise ValueError(f"{where}: sampling_ratio must be a positive python int (use "
                     f"roi_align_adaptive for torchvision's sampling_ratio=-1), got "
                     f"{sampling_ratio!r}")
  k = boxes.shape[1]
  boxes = jnp.asarray(boxes)
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  r = n * k
  base = jnp.repeat(jnp.arange(n, dtype=jnp.int32) * (h * w), k)
  out = _pool_flat(jnp.asarray(features).reshape(n * h * w, c), base,
                   jnp.full((r,), h, jnp.int32), jnp.full((r,), w, jnp.int32),
                   jnp.full((r,), spatial_scale, boxes.dtype), boxes.reshape(r, 4), oh, ow,
                   int(sampling_ratio), bool(aligned))
  return out.reshape(n, k, oh, ow, c).astype(features.dtype)


def default_max_sampling_ratio(mask_size: Tuple[int, int], output_size: _OutputSize) -> int:
  """The smallest cap for :func:`roi_align_adaptive` that is exact for RoIs inside the mask.

  Args:
    mask_size: (H, W) of the masks.
    output_size: int or (oh, ow).

  Returns:
    ``max(ceil(H / oh), ceil(W / ow))``: an RoI no larger than the mask needs at most this many
    adaptive samples per bin and axis.
  """
  oh, ow = _output_size(output_size, "default_max_sampling_ratio")
  h, w = mask_size
  return max(1, math.ceil(h / oh), math.ceil(w / ow))


def _dense_axis_weights(start, size, extent: int, n_out: int, cap: int):
  """Wy [R, n_out, extent] of adaptive sampling (ceil(size / n_out) samples, at most cap)."""
  grid = jnp.clip(jnp.ceil(size / n_out), 1, cap)
  r = start.shape[0]
  low, high, w_low, w_high = _axis_samples(start, size, jnp.full((r,), extent, jnp.int32),
                                           n_out, cap, grid)
  w_low = w_low / grid[:, None, None]
  w_high = w_high / grid[:, None, None]
  rr = jnp.arange(r)[:, None, None]
  pp = jnp.arange(n_out)[None, :, None]
  dense = jnp.zeros((r, n_out, extent), start.dtype)
  dense = dense.at[rr, pp, low].add(w_low)
  return dense.at[rr, pp, high].add(w_high)


def roi_align_adaptive(masks: jnp.ndarray, boxes: jnp.ndarray, output_size: _OutputSize, *,
                       max_sampling_ratio: Optional[int] = None) -> jnp.ndarray:
  """One single-channel RoIAlign per RoI with adaptive sampling (Mask R-CNN mask targets).

  Equals ``torchvision.ops.roi_align(mask[:, None], rois, output_size, spatial_scale=1,
  sampling_ratio=-1, aligned=False)`` (torchvision's ``project_masks_on_boxes``) as long as
  ``ceil(roi_h / oh)`` and ``ceil(roi_w / ow)`` are at most ``max_sampling_ratio``. A larger RoI
  is approximated with ``max_sampling_ratio`` evenly spaced samples per bin and axis.

  Args:
    masks: [K, H, W] one map per RoI (e.g. the matched gt mask; any real or integer dtype).
    boxes: [K, 4] (y0, x0, y1, x1) in mask pixels.
    output_size: int or (oh, ow), 28 for Mask R-CNN.
    max_sampling_ratio: static cap on the adaptive samples per bin and axis; None picks
      :func:`default_max_sampling_ratio`, exact for every box inside the mask.

  Returns:
    float32 [K, oh, ow] soft targets (not thresholded).
  """
  where = "roi_align_adaptive"
  oh, ow = _output_size(output_size, where)
  if not hasattr(masks, "ndim") or masks.ndim != 3:
    raise ValueError(f"{where}: masks must be [K, H, W], got "
                     f"{getattr(masks, 'shape', type(masks).__name__)}")
  k, h, w = masks.shape
  _check_boxes(boxes, (), where)
  if boxes.shape[0] != k:
    raise ValueError(f"{where}: boxes must be [K, 4] with K = {k} (one per mask), got "
                     f"{tuple(boxes.shape)}")
  if max_sampling_ratio is None:
    max_sampling_ratio = default_max_sampling_ratio((h, w), (oh, ow))
  if isinstance(max_sampling_ratio, bool) or not isinstance(max_sampling_ratio,
                                                            (int, np.integer)) \
      or max_sampling_ratio < 1:
    raise ValueError(f"{where}: max_sampling_ratio must be a positive python int, got "
                     f"{max_sampling_ratio!r}")
  boxes = jnp.asarray(boxes).astype(jnp.float32)
  start_y, start_x, size_y, size_x = _roi_geometry(boxes, jnp.ones((k,), jnp.float32), False)
  wy = _dense_axis_weights(start_y, size_y, h, oh, int(max_sampling_ratio))
  wx = _dense_axis_weights(start_x, size_x, w, ow, int(max_sampling_ratio))
  hi = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes: targets should equal torch's
  rows = jnp.einsum("kph,khw->kpw", wy, jnp.asarray(masks).astype(jnp.float32), precision=hi)
  return jnp.einsum("kpw,kqw->kpq", rows, wx, precision=hi)


def roi_levels(boxes: jnp.ndarray, *, k_min: int = 2, k_max: int = 5, canonical_scale: int = 224,
               canonical_level: int = 4, eps: float = 1e-6) -> jnp.ndarray:
  """FPN level of each box (torchvision ``LevelMapper``, FPN paper eq. 1).

  Args:
    boxes: [..., 4] (y0, x0, y1, x1) in input pixels.
    k_min, k_max: lowest and highest level.
    canonical_scale, canonical_level: a canonical_scale^2 box maps to canonical_level.
    eps: added before the floor, as torchvision does.

  Returns:
    int32 [...] level number in [k_min, k_max] (``- k_min`` is the index into the feature list;
    torchvision's mapper returns that index). Boxes with a NaN size map to k_min.
  """
  if not hasattr(boxes, "ndim") or boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"roi_levels: boxes must be [..., 4], got "
                     f"{getattr(boxes, 'shape', type(boxes).__name__)}")
  if k_min > k_max:
    raise ValueError(f"roi_levels: k_min ({k_min}) must be <= k_max ({k_max})")
  boxes = jnp.asarray(boxes)
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  s = jnp.sqrt(box_area(boxes))
  level = jnp.floor((canonical_level + jnp.log2(s / canonical_scale)) + jnp.asarray(eps, s.dtype))
  level = jnp.where(jnp.isnan(level), k_min, jnp.clip(level, k_min, k_max))
  return level.astype(jnp.int32)


def level_scales(feature_sizes: Sequence[Tuple[int, int]],
                 image_size: Tuple[int, int]) -> Tuple[float, ...]:
  """torchvision's inferred scale of each level: ``2 ** round(log2(feature_h / image_h))``.

  Args:
    feature_sizes: [(h, w), ...] per level.
    image_size: (H, W) of the largest unpadded image of the batch.

  Returns:
    One power-of-two scale per level (from the heights, as torchvision does).
  """
  out = []
  for fh, _ in feature_sizes:
    # float32 log2 and half-to-even rounding, as torch.tensor(x).log2().round().
    approx = np.float32(float(fh) / float(image_size[0]))
    out.append(2.0 ** float(np.round(np.log2(approx))))
  return tuple(out)


def multiscale_roi_align(features: Sequence[jnp.ndarray], boxes: jnp.ndarray,
                         output_size: _OutputSize, *, image_size: Tuple[int, int],
                         sampling_ratio: int = 2, aligned: bool = False) -> jnp.ndarray:
  """FPN RoIAlign over levels P2..P5 (``torchvision.ops.MultiScaleRoIAlign``).

  Args:
    features: per-level [N, Hl, Wl, C] maps, finest first (P2, P3, P4, P5).
    boxes: [N, K, 4] (y0, x0, y1, x1) in input pixels.
    output_size: int or (oh, ow): 7 for the box head, 14 for the mask head.
    image_size: (H, W) python ints, the largest unpadded image size of the batch (the level
      scales are powers of two rounded from ``Hl / H``, so the padded canvas gives the same).
    sampling_ratio: samples per bin and axis, > 0.
    aligned: torchvision's ``aligned`` (MultiScaleRoIAlign uses False).

  Returns:
    [N, K, oh, ow, C], each RoI pooled from the level :func:`roi_levels` assigns it.
  """
  where = "multiscale_roi_align"
  oh, ow = _output_size(output_size, where)
  if isinstance(features, (jnp.ndarray, np.ndarray)) or not isinstance(features, Sequence) \
      or not features:
    raise TypeError(f"{where}: features must be a non-empty sequence of [N, Hl, Wl, C] arrays")
  shapes = [getattr(f, "shape", None) for f in features]
  if any(s is None or len(s) != 4 for s in shapes):
    raise ValueError(f"{where}: every feature map must be [N, Hl, Wl, C], got {shapes}")
  n, c = shapes[0][0], shapes[0][3]
  if any(s[0] != n or s[3] != c for s in shapes):
    raise ValueError(f"{where}: feature maps must share N and C, got {shapes}")
  _check_boxes(boxes, (n,), where)
  try:
    img_h, img_w = (int(v) for v in image_size)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: image_size must be (H, W) python ints, got {image_size!r}") from e
  if img_h <= 0 or img_w <= 0:
    raise ValueError(f"{where}: image_size must be positive, got {image_size!r}")
  if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)) \
      or sampling_ratio <= 0:
    raise ValueError(f"{where}: sampling_ratio must be a positive python int, got "
                     f"{sampling_ratio!r}")
  k = boxes.shape[1]
  boxes = jnp.asarray(boxes)
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  if len(features) == 1:
    scale = level_scales([shapes[0][1:3]], (img_h, img_w))[0]
    return roi_align(features[0], boxes, (oh, ow), spatial_scale=scale,
                     sampling_ratio=sampling_ratio, aligned=aligned)

  scales = level_scales([s[1:3] for s in shapes], (img_h, img_w))
  # torchvision: int(-log2(scale)) of the first and last level.
  k_min = int(-np.log2(np.float32(scales[0])))
  k_max = int(-np.log2(np.float32(scales[-1])))
  level = roi_levels(boxes, k_min=k_min, k_max=k_max) - k_min  # [N, K] index into features
  sizes = [s[1] * s[2] for s in shapes]
  starts = np.concatenate([[0], np.cumsum([n * hw for hw in sizes])[:-1]]).astype(np.int64)
  if starts[-1] + n * sizes[-1] >= 2 ** 31:
    raise ValueError(f"{where}: features too large for int32 indexing ({shapes})")
  pick = lambda table, dtype: jnp.asarray(np.asarray(table), dtype)[level]  # noqa: E731
  image = jnp.arange(n, dtype=jnp.int32)[:, None]
  base = pick(starts, jnp.int32) + image * pick(sizes, jnp.int32)
  flat = jnp.concatenate([jnp.asarray(f).reshape(-1, c) for f in features], axis=0)
  r = n * k
  out = _pool_flat(flat, base.reshape(r), pick([s[1] for s in shapes], jnp.int32).reshape(r),
                   pick([s[2] for s in shapes], jnp.int32).reshape(r),
                   pick(scales, boxes.dtype).reshape(r), boxes.reshape(r, 4), oh, ow,
                   int(sampling_ratio), bool(aligned))
  return out.reshape(n, k, oh, ow, c).astype(features[0].dtype)
