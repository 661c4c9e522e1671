"""Layers shared by the segmentation models.

Input checks and normalisation (``check_images``, ``normalize``), crops
(``crop_to``, ``center_crop``), pooling (``max_pool`` with ceil mode,
``argmax_pool`` / ``max_unpool``), resizing (``resize_bilinear``), bilinear
transposed convolutions (``bilinear_kernel``, ``conv_transpose``,
``BilinearConvTranspose``) and two CPU-friendly formulations of standard layers
(``MatmulConv``, ``NonOverlappingConvTranspose``), adaptive average pooling with
PyTorch's bin boundaries (``adaptive_avg_pool``) and the norm layers the backbones
take by injection (``batch_norm``, ``FrozenBatchNorm``). Heads (ASPP, pyramid
pooling, RefineNet blocks) live in ``jaxseg.models.heads``.

Everything here is NHWC. Pooling and padding are always explicit (never XLA
'SAME'), because 'SAME' places the odd pixel at the high end and so shifts
features against the PyTorch/Caffe originals.
"""
import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.ops import conv as conv_ops
from jaxseg.ops import pool as pool_ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch's default Conv/Linear init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


# torchvision ResNet/MobileNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu"),
# a plain (not truncated) normal.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Conv):
  """``nn.Conv`` (same parameters, names and results) running ``jaxseg.ops.conv_general_dilated``,
  whose CPU gradients are faster for the shapes where XLA's are slow."""
  conv_general_dilated: Any = staticmethod(conv_ops.conv_general_dilated)


def conv2d(features: int, kernel: int, stride: int = 1, dilation: int = 1, *, name: str,
           use_bias: bool = False, kernel_init=kaiming_fan_out, dtype=jnp.float32) -> nn.Module:
  """``torch.nn.Conv2d(k, stride, padding=dilation*(k-1)//2, dilation)``.

  Padding is explicit and symmetric: XLA 'SAME' would pad (0, 1) for a stride-2 3x3
  conv on an even input and shift every feature against the PyTorch original.
  """
  pad = dilation * (kernel - 1) // 2
  return Conv(features, (kernel, kernel), (stride, stride), padding=[(pad, pad)] * 2,
                 kernel_dilation=(dilation, dilation), use_bias=use_bias,
                 kernel_init=kernel_init, dtype=dtype, name=name)


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init U(+-1/sqrt(fan_in)) (flax bias inits do not see fan_in)."""
  bound = 1 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ----------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------

# Largest and smallest pixel value accepted as RGB in [0, 1]. Augmentation that adds noise or
# jitters contrast without clipping overshoots [0, 1] by a few tenths at most; a 0-255 image
# reaches far beyond 1.5 unless it is almost black, and a mean/std-normalised one goes down
# to about -2 (ImageNet statistics), far below -0.5.
IMAGE_MAX = 1.5
IMAGE_MIN = -0.5


def _channel_hint(shape) -> str:
  """The likely cause of a [N,H,W,C] shape with C != 3, and its fix."""
  if shape[1] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
    return ("; this looks channels-first (NCHW): the models take channels-last [N,H,W,3]; "
            "transpose with x.transpose(0, 2, 3, 1)")
  if shape[-1] == 1:
    return ("; 1 channel looks grayscale: repeat it to 3 channels with "
            "np.repeat(x, 3, axis=-1)")
  if shape[-1] == 4:
    return "; 4 channels look RGBA: drop alpha with x[..., :3]"
  return ""


def check_images(images, model_name: str, *, min_size: int = 1):
  """Validates model input: float [N,H,W,3] RGB in [0, 1], H and W at least ``min_size``.

  Shapes and dtypes are checked always (also while tracing). Values are checked only when
  ``images`` is concrete (a NumPy array or a ``jax.Array``, not a tracer; see
  :func:`check_image_values`): under ``jax.jit`` / ``jax.export`` they are unknown, so the
  trainer checks its host batches (``jaxseg.train.state.check_images``) before each step.

  Args:
    images: [N,H,W,3] floating point, RGB in [0, 1].
    model_name: prefix of the error messages.
    min_size: smallest accepted H and W.

  Raises:
    TypeError: not an array, or a non-floating dtype (e.g. uint8 images not scaled to [0,1]).
    ValueError: wrong rank, channel count (NCHW, grayscale and RGBA say how to convert), a too
      small spatial size, or (concrete arrays) NaN/inf, 0-255 or mean/std-normalised values.
  """
  shape = getattr(images, "shape", None)
  if shape is None:
    raise TypeError(f"{model_name}: images must be an array, got {type(images).__name__}")
  shape = tuple(shape)
  if len(shape) != 4:
    hint = "; add the batch axis with x[None]" if len(shape) == 3 and shape[-1] == 3 else ""
    raise ValueError(f"{model_name}: images must have rank 4 [N,H,W,3], got shape "
                     f"{shape}{hint}")
  if shape[-1] != 3:
    raise ValueError(f"{model_name}: images must have 3 (RGB) channels last [N,H,W,3] "
                     f"(3 channels, not {shape[-1]}), got shape {shape}{_channel_hint(shape)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"{model_name}: images must be floating point RGB (float32 in [0, 1]), got "
                    f"dtype {images.dtype} (convert uint8 with images.astype(np.float32) / 255)")
  if shape[1] < min_size or shape[2] < min_size:
    raise ValueError(f"{model_name}: images must be at least {min_size}x{min_size}, "
                     f"got {shape[1]}x{shape[2]}")
  check_image_values(images, model_name)


@jax.jit
def _image_range(images):
  """(min, max) float32 [2]; NaN propagates into both, inf into one."""
  return jnp.stack([jnp.min(images), jnp.max(images)]).astype(jnp.float32)


def check_image_values(images, where: str) -> None:
  """Raises unless the values of concrete ``images`` look like RGB in [0, 1]; tracers pass.

  Costs a min and a max (NaN and inf show in them; they are counted only when present): on
  the host for NumPy, in one small jitted reduction for a ``jax.Array``, whose two scalars are
  fetched, which waits for the array (fine for eager calls; under ``jit`` nothing runs).

  Args:
    images: float [N,H,W,3] (NumPy, ``jax.Array`` or a tracer).
    where: prefix of the error messages.

  Raises:
    ValueError: NaN or inf values (their counts), values above ``IMAGE_MAX`` (0-255 images:
      divide by 255) or below ``IMAGE_MIN`` (already mean/std-normalised: the models
      normalise themselves).
  """
  if isinstance(images, jax.core.Tracer) or not getattr(images, "size", 0):
    return
  if isinstance(images, jax.Array):
    extremes = _image_range(images)
    if isinstance(extremes, jax.core.Tracer):
      return  # a constant closed over by a function being traced: nothing runs now
    lo, hi = np.asarray(extremes.addressable_data(0))
  else:
    images = np.asarray(images)
    lo, hi = images.min(), images.max()
  if not (np.isfinite(lo) and np.isfinite(hi)):
    # Only on the error path: the values are brought to this host to be counted.
    x = np.asarray(images) if getattr(images, "is_fully_addressable", True) else np.concatenate(
        [np.asarray(shard.data).ravel() for shard in images.addressable_shards])
    nan, inf = int(np.count_nonzero(np.isnan(x))), int(np.count_nonzero(np.isinf(x)))
    counts = (f"{nan} NaN and {inf} inf values (of {x.size})" if nan or inf else
              "NaN or inf values (in another process's rows of the global batch)")
    raise ValueError(f"{where}: images hold {counts}; find where the data pipeline produces "
                     "them (a failed decode, a division by zero) or replace them with "
                     "np.nan_to_num")
  # Negative values first: normalised images also exceed IMAGE_MAX, 0-255 ones are never < 0.
  if lo < IMAGE_MIN:
    raise ValueError(f"{where}: images go down to {float(lo):.4g}: they look mean/std-"
                     "normalised, but the models take raw RGB in [0, 1] and normalise "
                     "themselves: pass the images before normalisation")
  if hi > IMAGE_MAX:
    raise ValueError(f"{where}: images look like 0-255 (max {float(hi):.4g}), but the models "
                     "take RGB in [0, 1]: divide by 255 (images / 255.0)")


def normalize(images, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32):
  """(images - mean) / std per channel, cast to ``dtype``."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


# ----------------------------------------------------------------------------
# Cropping
# ----------------------------------------------------------------------------

def crop_to(x, offset: Tuple[int, int], size: Tuple[int, int]):
  """x[:, oy:oy+h, ox:ox+w] for NHWC ``x`` (Caffe ``Crop`` layer).

  Args:
    x: [N,H,W,C].
    offset: (oy, ox) top-left corner, non-negative.
    size: (h, w) of the result.
  Raises:
    ValueError: the window does not fit inside x.
  """
  (oy, ox), (h, w) = offset, size
  if oy < 0 or ox < 0 or oy + h > x.shape[1] or ox + w > x.shape[2]:
    raise ValueError(f"crop window offset {(oy, ox)} size {(h, w)} does not fit in a map of "
                     f"size {x.shape[1]}x{x.shape[2]}")
  return x[:, oy:oy + h, ox:ox + w, :]


def center_crop(x, size: Tuple[int, int]):
  """Central (h, w) window of NHWC ``x``; offset (H-h)//2 as in the UNet paper."""
  h, w = size
  return crop_to(x, ((x.shape[1] - h) // 2, (x.shape[2] - w) // 2), (h, w))


# ----------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------

def pool_output_size(size: int, window: int, stride: int, padding: int = 0,
                     ceil_mode: bool = False) -> int:
  """Output length of a max pool, PyTorch/Caffe rules (ceil_mode as in torch)."""
  span = size + 2 * padding - window
  if span < 0:
    raise ValueError(f"pooling window {window} is larger than the padded input "
                     f"{size + 2 * padding}")
  if not ceil_mode:
    return span // stride + 1
  out = -(-span // stride) + 1
  # The last window must start inside the input or the left padding (torch rule).
  if (out - 1) * stride >= size + padding:
    out -= 1
  return out


def _ceil_pads(size, window, stride, padding, ceil_mode):
  out = pool_output_size(size, window, stride, padding, ceil_mode)
  extra = max((out - 1) * stride + window - (size + 2 * padding), 0)
  return (padding, padding + extra)


def max_pool(x, window: int = 2, stride: int = 2, padding: int = 0, ceil_mode: bool = False):
  """Max pooling over NHWC with symmetric ``padding`` and optional ceil mode.

  Padding is -inf, so padded cells never win. In ceil mode the extra cells
  needed for the last partial window are added at the high end, exactly like
  ``torch.nn.MaxPool2d(ceil_mode=True)`` and Caffe pooling.
  """
  pads = (_ceil_pads(x.shape[1], window, stride, padding, ceil_mode),
          _ceil_pads(x.shape[2], window, stride, padding, ceil_mode))
  return pool_ops.max_pool2d(x, (window, window), (stride, stride), pads)


def argmax_pool(x):
  """2x2 stride-2 max pooling that also returns where each maximum came from.

  Caffe/SegNet and ``torch.nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)``
  semantics: odd sizes are handled in ceil mode (the last row/column forms a
  partial window padded with -inf), ties go to the first maximum in row-major
  window order, and the index is the flat position ``h * W + w`` in the
  *unpadded* input plane of the same channel. The gradient flows to the
  selected element only (as in torch), not split among ties.

  Args:
    x: [N,H,W,C].
  Returns:
    (pooled [N,ceil(H/2),ceil(W/2),C], indices int32 of the same shape).
  """
  if x.ndim != 4:
    raise ValueError(f"argmax_pool expects [N,H,W,C], got shape {x.shape}")
  n, h, w, c = x.shape
  ho, wo = -(-h // 2), -(-w // 2)
  xp = jnp.pad(x, ((0, 0), (0, 2 * ho - h), (0, 2 * wo - w), (0, 0)), constant_values=-jnp.inf)
  # [N,Ho,2,Wo,2,C] -> [N,Ho,Wo,C,4] with window order (dy, dx) row-major.
  windows = xp.reshape(n, ho, 2, wo, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, 4)
  local = jnp.argmax(windows, axis=-1)  # first maximum wins
  pooled = jnp.take_along_axis(windows, local[..., None], axis=-1)[..., 0]
  rows = 2 * jnp.arange(ho)[:, None, None] + local // 2
  cols = 2 * jnp.arange(wo)[None, :, None] + local % 2
  return pooled, (rows * w + cols).astype(jnp.int32)


def max_unpool(x, indices, output_shape: Tuple[int, int]):
  """Inverse of ``argmax_pool``: scatters each value to its stored flat index.

  Positions that received no value are zero (``torch.nn.MaxUnpool2d``,
  SegNet's Upsample layer). Indices are flat ``h * W + w`` positions in the
  output plane of the same batch element and channel.

  Args:
    x: [N,h,w,C] pooled values.
    indices: int [N,h,w,C], from ``argmax_pool`` on a map of ``output_shape``.
    output_shape: (H, W) of the map before pooling.
  Returns:
    [N,H,W,C].
  """
  if x.shape != indices.shape:
    raise ValueError(f"max_unpool: values {x.shape} and indices {indices.shape} differ in shape")
  if x.ndim != 4:
    raise ValueError(f"max_unpool expects [N,h,w,C], got shape {x.shape}")
  n, _, _, c = x.shape
  oh, ow = output_shape
  # One scatter over (batch, position, channel) triples: out[b, idx, ch] = value.
  flat_vals = x.reshape(n, -1, c)
  flat_idx = indices.reshape(n, -1, c)
  b = jnp.arange(n)[:, None, None]
  ch = jnp.arange(c)[None, None, :]
  out = jnp.zeros((n, oh * ow, c), x.dtype)
  out = out.at[b, flat_idx, ch].set(flat_vals, mode="drop", unique_indices=True)
  return out.reshape(n, oh, ow, c)


# ----------------------------------------------------------------------------
# Resizing and bilinear transposed convolutions
# ----------------------------------------------------------------------------

def resize_bilinear(x, size: Tuple[int, int], *, align_corners: bool = False):
  """Bilinear resize of NHWC ``x`` to ``size`` with PyTorch semantics.

  ``align_corners=False`` equals ``F.interpolate(..., mode="bilinear")`` (no
  antialiasing, also when downsampling); ``align_corners=True`` maps corner to
  corner (Caffe ``Interp``, TF DeepLab, the DeepLab v1/v2 ports).
  """
  n, h, w, c = x.shape
  oh, ow = size
  if (oh, ow) == (h, w):
    return x
  if not align_corners:
    return jax.image.resize(x, (n, oh, ow, c), "bilinear", antialias=False)
  # A length-1 output takes the first row/column, like torch.
  if oh == 1:
    x, h = x[:, :1], 1
  if ow == 1:
    x, w = x[:, :, :1], 1
  # scale_and_translate samples at (dst + 0.5 - t) / scale - 0.5; with
  # t = 0.5 - scale / 2 that is dst * (in - 1) / (out - 1). A length-1 axis
  # is broadcast (plain resize).
  scale = [(o - 1) / (i - 1) if i > 1 else o / i for i, o in ((h, oh), (w, ow))]
  translation = [0.5 - s / 2 if i > 1 else 0.0 for i, s in zip((h, w), scale)]
  scale = jnp.asarray(scale, jnp.float32)
  translation = jnp.asarray(translation, jnp.float32)
  return jax.image.scale_and_translate(x, (n, oh, ow, c), (1, 2), scale, translation,
                                       method="linear", antialias=False)


def adaptive_avg_pool(x, bins: int):
  """``torch.nn.AdaptiveAvgPool2d(bins)`` on NHWC ``x``: [N,H,W,C] -> [N,bins,bins,C].

  Bin i covers rows ``floor(i*H/b)`` to ``ceil((i+1)*H/b)`` (exclusive), so bins
  overlap when H is not a multiple of b and repeat rows when H < b, exactly as
  PyTorch does. Sizes are static, so this is a python loop of static slices.
  """
  if bins < 1:
    raise ValueError(f"adaptive_avg_pool: bins must be >= 1, got {bins}")
  h, w = x.shape[1], x.shape[2]

  def edges(size):
    return [((i * size) // bins, -(-((i + 1) * size) // bins)) for i in range(bins)]

  if bins == 1:
    return jnp.mean(x, axis=(1, 2), keepdims=True)
  rows = [jnp.mean(x[:, r0:r1], axis=1) for r0, r1 in edges(h)]  # each [N,W,C]
  x = jnp.stack(rows, axis=1)                                       # [N,b,W,C]
  cols = [jnp.mean(x[:, :, c0:c1], axis=2) for c0, c1 in edges(w)]
  return jnp.stack(cols, axis=2)


def bilinear_kernel(k: int, channels: int, *, grouped: bool = False, dtype=jnp.float32):
  """Bilinear-interpolation kernel of a k x k transposed conv (Caffe ``upsample_filt``).

  factor = (k + 1) // 2, centre = factor - 1 (odd k) or factor - 0.5 (even k),
  weight (1 - |i - centre| / factor) * (1 - |j - centre| / factor).

  Args:
    k: kernel size (2 * upsampling factor - factor % 2 for exact interpolation).
    channels: number of channels C (input == output).
    grouped: per-channel (groups = C) layout.
  Returns:
    HWIO kernel: [k,k,C,C] with the filter on the channel diagonal only (FCN),
    or [k,k,1,C] when ``grouped`` (Dilation's depthwise deconv).
  """
  factor = (k + 1) // 2
  centre = factor - 1 if k % 2 == 1 else factor - 0.5
  og = np.arange(k, dtype=np.float64)
  f1 = 1 - np.abs(og - centre) / factor
  filt = np.outer(f1, f1)
  if grouped:
    kernel = np.tile(filt[:, :, None, None], (1, 1, 1, channels))
  else:
    kernel = np.zeros((k, k, channels, channels))
    kernel[:, :, np.arange(channels), np.arange(channels)] = filt[:, :, None]
  return jnp.asarray(kernel, dtype)


def conv_transpose(x, kernel, stride: int, padding: int = 0, groups: int = 1):
  """PyTorch ``conv_transpose2d`` geometry: output (i - 1) * s - 2 * p + k.

  ``kernel`` is in the layout of the equivalent forward convolution of the
  stride-dilated input, [k, k, C_in / groups, C_out]; a torch weight
  ``w[C_in, C_out / groups, k, k]`` maps to it by swapping in/out per group and
  flipping both spatial axes (see ``jaxseg.convert``).
  """
  k = kernel.shape[0]
  pad = k - 1 - padding
  if pad < 0:
    raise ValueError(f"conv_transpose: padding {padding} must be < kernel size {k}")
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1, 1), padding=[(pad, pad), (pad, pad)],
      lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


class BilinearConvTranspose(nn.Module):
  """Transposed conv initialised to bilinear upsampling (FCN ``upscore``, Dilation).

  Freezing (the papers' lr_mult 0): with ``trainable=False`` (default) the
  kernel is *not a parameter*; it is the constant ``bilinear_kernel`` built in
  the forward pass. Nothing in the optimizer (gradient, momentum, weight decay)
  can move it and checkpoints do not store it. This is simpler and safer than
  ``stop_gradient`` on a parameter, which still lets decoupled weight decay
  (``optax.adamw``) shrink the kernel. ``trainable=True`` makes it a normal
  parameter ``kernel`` initialised to the bilinear filter.

  Attributes:
    features: channels (input == output).
    kernel_size, stride, padding: PyTorch ConvTranspose2d geometry.
    grouped: one filter per channel (groups = C) instead of a dense C x C kernel
      with the filter on the diagonal.
    trainable: see above.
    use_bias: adds a zero-initialised bias (Caffe's deconvs have none).
  """
  features: int
  kernel_size: int
  stride: int
  padding: int = 0
  grouped: bool = False
  trainable: bool = False
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.shape[-1] != self.features:
      raise ValueError(f"BilinearConvTranspose: expected {self.features} input channels, "
                       f"got {x.shape[-1]}")
    init = lambda *_: bilinear_kernel(self.kernel_size, self.features, grouped=self.grouped)
    if self.trainable:
      kernel = self.param("kernel", init)
    else:
      kernel = init()
    y = conv_transpose(x, kernel, self.stride, self.padding,
                       groups=self.features if self.grouped else 1)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
    return y


class MatmulConv(nn.Module):
  """Stride-1 conv as a sum of kh*kw matrix products over shifted views.

  Same parameters and layout as ``nn.Conv`` (``kernel`` [kh,kw,C_in,C_out],
  ``bias``), so checkpoints convert the same way. Used for the fully connected
  layers recast as large convolutions (FCN/Dilation fc6: 7x7, 512 -> 4096) on
  small maps, where XLA:CPU's gradient of the convolution is pathologically
  slow (FCN fc6 at a 64 px input: 38 s per step vs 1.5 s as matmuls; torch 2.8 s).
  Every term is a plain GEMM, so forward and backward stay fast on any backend
  and no patch tensor is materialised.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    padding: symmetric zero padding in pixels.
    dilation: kernel dilation.
  """
  features: int
  kernel_size: Tuple[int, int]
  padding: int = 0
  dilation: int = 1
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
    p, d = self.padding, self.dilation
    if p:
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = x.shape[1] - d * (kh - 1), x.shape[2] - d * (kw - 1)
    if ho < 1 or wo < 1:
      raise ValueError(f"MatmulConv: a {kh}x{kw} kernel with dilation {d} does not fit a "
                       f"{x.shape[1]}x{x.shape[2]} (padded) map")
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    y = jnp.zeros((x.shape[0], ho, wo, self.features), self.dtype)
    for i in range(kh):
      for j in range(kw):
        view = x[:, i * d:i * d + ho, j * d:j * d + wo]
        y = y + jnp.einsum("nhwc,cd->nhwd", view, kernel[i, j])
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return y


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv (groups = channels) as k*k shifted multiply-adds.

  Same parameter as ``nn.Conv(C, (k, k), feature_group_count=C)`` (``kernel``
  [k,k,1,C], no bias), so torch weights [C,1,k,k] convert the same way. XLA:CPU runs
  grouped convolutions at a fraction of a GFLOP/s (MobileNetV2's depthwise layers at
  8x60x80x96: 0.11 s forward, 0.41 s forward+backward); the shifted views are
  elementwise work that XLA fuses (0.09 s forward+backward, identical results).
  Padding is ``dilation * (k - 1) // 2`` on each side, like torch's ``Conv2dNormActivation``.
  """
  kernel_size: int = 3
  stride: int = 1
  dilation: int = 1
  kernel_init: Any = kaiming_fan_out
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, d = self.kernel_size, self.stride, self.dilation
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, c)).astype(self.dtype)
    p = d * (k - 1) // 2
    h, w = x.shape[1], x.shape[2]
    ho, wo = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
    y = 0.0
    for i in range(k):
      for j in range(k):
        view = xp[:, i * d:i * d + (ho - 1) * s + 1:s, j * d:j * d + (wo - 1) * s + 1:s]
        y = y + view * kernel[i, j, 0]
    return y


class NonOverlappingConvTranspose(nn.Module):
  """Transposed conv whose kernel equals its stride (UNet's 2x2 stride-2 up-conv).

  Each input pixel writes its own s x s output block, so the layer is one
  matrix product followed by a depth-to-space reshape:
  ``y[s*i + a, s*j + b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o]``,
  i.e. ``torch.nn.ConvTranspose2d(C_in, C_out, s, s)`` with
  ``kernel = weight.transpose(2, 3, 0, 1)``. On XLA:CPU this is 10-25x faster
  than ``nn.ConvTranspose`` (a stride-dilated convolution) for forward+backward.
  ``transpose_kernel=True`` stores the kernel as ``[s,s,C_out,C_in]``, the parameter of
  ``nn.ConvTranspose(..., transpose_kernel=True)`` with ``padding=[(s-1, s-1)] * 2`` (same
  values, init and outputs), i.e. ``kernel = weight.transpose(2, 3, 1, 0)``.
  """
  features: int
  stride: int = 2
  transpose_kernel: bool = False
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = self.stride
    n, h, w, c = x.shape
    if self.transpose_kernel:
      kernel = self.param("kernel", self.kernel_init, (s, s, self.features, c))
      kernel = kernel.transpose(0, 1, 3, 2)
    else:
      kernel = self.param("kernel", self.kernel_init, (s, s, c, self.features))
    y = jnp.einsum("nhwc,abco->nhawbo", x.astype(self.dtype), kernel.astype(self.dtype))
    y = y.reshape(n, h * s, w * s, self.features)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return y


# ----------------------------------------------------------------------------
# Norm layers for injection into backbones and heads
# ----------------------------------------------------------------------------

# PyTorch BatchNorm2d defaults (momentum 0.1 there is 0.9 here; eps 1e-5). Flax keeps the
# biased batch variance in the running average where torch keeps the unbiased one, so
# running statistics drift by n/(n-1) in training; eval with converted weights matches.
# Two-pass variance (``use_fast_variance=False``) like torch: E[x^2] - E[x]^2 loses digits
# when |mean| >> std, which deep training-mode stacks amplify.
batch_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5,
                               use_fast_variance=False)


class FrozenBatchNorm(nn.Module):
  """``torchvision.ops.misc.FrozenBatchNorm2d``: a fixed per-channel affine map.

  ``y = (x - mean) * scale / sqrt(var + eps) + bias`` with all four vectors held in the
  ``batch_stats`` collection, so the optimizer never sees them and training-mode
  calls use them as they are (detection backbones fine-tuned at batch 1-2). Takes
  the same keyword arguments as ``nn.BatchNorm`` (``use_running_average`` and
  ``momentum`` are accepted and ignored), so it can be injected wherever a
  backbone takes ``norm``. Legacy torchvision COCO_V1 detection weights need
  ``epsilon=0.0``.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None):
    c = x.shape[-1]
    scale = self.variable("batch_stats", "scale", jnp.ones, (c,), jnp.float32).value
    bias = self.variable("batch_stats", "bias", jnp.zeros, (c,), jnp.float32).value
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32).value
    var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32).value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = x * mul + (bias - mean * mul)
    return y.astype(self.dtype or x.dtype)
