"""Convolution with backend-aware gradients: ``conv_general_dilated``.

Same signature and forward result as ``jax.lax.conv_general_dilated``. On CPU, 1x1 kernels
run as matmuls (forward and backward), and for the shapes where XLA's own gradient is slow
(``gradient_plan``) the backward pass is computed another way inside a ``jax.custom_vjp``:

* weight gradient as one matrix product per kernel tap,
  ``dW[a, b] = X[a, b]^T dY`` with ``X[a, b]`` the input view the tap sees ([N*Ho*Wo, C_in])
  and ``dY`` [N*Ho*Wo, C_out]: no transposed copies of the activations (XLA's route turns
  the batch into the feature dimension and back);
* input gradient of a stride-1 convolution as the forward convolution of ``dY`` with the
  spatially flipped, in/out-swapped kernel (XLA's own lowering of this gradient was slower
  than its forward convolution, up to several times for dilated kernels on small maps).

``bench/conv_grad.py`` measured both routes per shape; ``gradient_plan`` encodes where the
custom route won (README: measured figures). GPU and TPU always take XLA's gradient.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
# Maps of at most this many positions per image run as tap sums on CPU (``_tap_sum``).
TINY_MAP = 16


def _is_plain_nhwc(lhs, rhs, window_strides, padding, lhs_dilation, dimension_numbers,
                   feature_group_count, batch_group_count):
  """Whether the call is a 2-D NHWC/HWIO convolution the custom gradient handles."""
  if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
    return False
  if lhs_dilation not in (None, (1, 1)) and tuple(lhs_dilation) != (1, 1):
    return False
  dn = dimension_numbers
  if isinstance(dn, lax.ConvDimensionNumbers):
    return dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return tuple(dn or ()) == _NHWC


def gradient_plan(x_shape, w_shape, strides, rhs_dilation, backend=None):
  """``(custom weight gradient, custom input gradient)`` for an NHWC conv on ``backend``.

  Read off ``bench/conv_grad.py`` on the 2-core CPU (README): the flipped-kernel input
  gradient beat or matched XLA's for the stride-1 shapes measured (0.55-0.95x its time:
  UNet/VGG maps at 128 px as much as dilated ResNet layers); the per-tap weight gradient wins
  on maps of at most 16x16 positions with 256+ input channels (deep ResNet/ASPP/RefineNet
  layers at the benchmark's sizes, 0.4-0.9x of XLA's time; about even for 64 RoIs of Mask
  R-CNN's 14x14 mask head) and loses on larger maps with few channels, where XLA's is kept.
  1x1 kernels never get here (``conv_general_dilated`` runs them as matmuls).
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return False, False
  _, h, w, cin = x_shape
  # Per image, not per batch: XLA:CPU runs convolutions nested in control flow (Mask R-CNN's
  # mask-head switch) on a generic path where its weight gradient of the 14x14, 256-channel
  # mask head took 40 s per layer; the per-tap matmuls take well under a second there.
  custom_dw = h * w <= 256 and cin >= 256
  custom_dx = tuple(strides) == (1, 1)
  return custom_dw, custom_dx


def _pointwise(x, w, strides, padding, precision):
  """A 1x1 convolution as a matmul over the (strided) positions; autodiff gives matmuls too.

  XLA:CPU ran 1x1 convolutions' forward and backward 1.3-5.5x slower than this (Mask R-CNN's
  mask_fcn_logits on 256 RoIs at 28x28: 1.42 s vs 0.26 s forward + backward).
  """
  if any(p for pair in padding for p in pair):
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  if tuple(strides) != (1, 1):
    x = x[:, ::strides[0], ::strides[1]]
  n, h, wd, cin = x.shape
  y = lax.dot_general(x.reshape(-1, cin), w.reshape(cin, -1), (((1,), (0,)), ((), ())),
                      precision=precision)
  return y.reshape(n, h, wd, -1)


def _taps(xp, out_hw, kernel_hw, strides, dilation):
  """The input view of every kernel tap, [N,Ho,Wo,C] each, row-major tap order."""
  n, _, _, c = xp.shape
  ho, wo = out_hw
  (sh, sw), (dh, dw) = strides, dilation
  for a in range(kernel_hw[0]):
    for b in range(kernel_hw[1]):
      yield lax.slice(xp, (0, a * dh, b * dw, 0),
                      (n, a * dh + (ho - 1) * sh + 1, b * dw + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))


def _weight_grad(x, g, w_shape, strides, padding, dilation, precision):
  kh, kw, cin, cout = w_shape
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  g2 = g.reshape(-1, cout)
  rows = [lax.dot_general(v.reshape(-1, cin), g2, (((0,), (0,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32)
          for v in _taps(xp, g.shape[1:3], (kh, kw), strides, dilation)]
  return jnp.stack(rows).reshape(w_shape)


def _input_grad_flipped(x_shape, w, g, padding, dilation, precision):
  """dX of a stride-1 conv = conv(dY, flip(W) with in/out swapped), re-padded."""
  kh, kw = w.shape[:2]
  dh, dw = dilation
  (pt, pb), (pl, pr) = padding
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  # The input-gradient's padding: full correlation minus what the forward padding added;
  # the forward's trailing cells that no output reached are covered by the end padding.
  h, wd = x_shape[1:3]
  ho, wo = g.shape[1:3]
  top, left = dh * (kh - 1) - pt, dw * (kw - 1) - pl
  bottom = h - (ho + top - dh * (kh - 1))
  right = wd - (wo + left - dw * (kw - 1))
  return lax.conv_general_dilated(g, w_t.astype(g.dtype), (1, 1), ((top, bottom), (left, right)),
                                  rhs_dilation=dilation, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv(x, w, strides, padding, dilation, precision, custom_dw, custom_dx):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def _conv_fwd(x, w, strides, padding, dilation, precision, custom_dw, custom_dx):
  return _conv(x, w, strides, padding, dilation, precision, custom_dw, custom_dx), (x, w)


def _conv_bwd(strides, padding, dilation, precision, custom_dw, custom_dx, res, g):
  x, w = res
  xla = None
  if not (custom_dw and custom_dx):
    _, xla = jax.vjp(lambda x, w: lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=_NHWC,
        precision=precision), x, w)
  if custom_dx:
    dx = _input_grad_flipped(x.shape, w, g, padding, dilation, precision).astype(x.dtype)
  if custom_dw:
    dw = _weight_grad(x, g, w.shape, strides, padding, dilation, precision).astype(w.dtype)
  if xla is not None:
    xla_dx, xla_dw = xla(g)  # XLA drops the half it does not need
    dx = dx if custom_dx else xla_dx
    dw = dw if custom_dw else xla_dw
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _tap_sum(x, w, strides, padding, dilation, precision):
  """A convolution as the sum over kernel taps of (shifted view) x (tap matrix); autodiff gives
  slices and matmuls. For maps of a few positions, where XLA:CPU's convolution is
  pathologically slow (RefineNet's stride-32 blocks: 2x2 maps at 64 px, 512 -> 512 3x3)."""
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  kh, kw = w.shape[:2]
  (sh, sw), (dh, dw) = strides, dilation
  ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
  wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
  y = None
  # Summed in float32 like a convolution's accumulator (bf16 partial sums lose digits).
  for a, view in enumerate(_taps(xp, (ho, wo), (kh, kw), strides, dilation)):
    term = lax.dot_general(view, w[a // kw, a % kw], (((3,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
    y = term if y is None else y + term
  return y.astype(jnp.result_type(x, w))


def live_taps(size: int, kernel: int, stride: int, dilation: int, pad_lo: int, pad_hi: int):
  """The kernel taps along one axis that ever read the input, as ``(first, last)``.

  Tap ``a`` reads input rows ``i * stride + a * dilation - pad_lo`` for the output rows ``i``;
  a tap whose rows all fall in the zero padding adds nothing (atrous rates at or above the map
  size: DeepLab's ASPP at 12-36 on 8x8 or 33x33 maps keeps only its centre tap). Live taps are
  contiguous; ``None`` when none is.
  """
  out = (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1
  live = [a for a in range(kernel)
          if (out - 1) * stride + a * dilation - pad_lo >= 0 and a * dilation - pad_lo < size]
  return (live[0], live[-1]) if live else None


def _trim_dead_taps(lhs, rhs, strides, pads, dilation):
  """``(rhs, pads)`` without the taps that only see padding: the same convolution, exactly
  (their weight gradient is zero either way), on fewer taps. Unchanged when every tap is live
  or trimming would need negative padding."""
  new_pads, cuts = [], []
  for axis in range(2):
    k, d, s = rhs.shape[axis], dilation[axis], strides[axis]
    lo, hi = pads[axis]
    live = live_taps(lhs.shape[1 + axis], k, s, d, lo, hi)
    if live is None:
      return rhs, pads
    a0, a1 = live
    lo2, hi2 = lo - a0 * d, hi - (k - 1 - a1) * d
    if lo2 < 0 or hi2 < 0:
      return rhs, pads
    new_pads.append((lo2, hi2))
    cuts.append(slice(a0, a1 + 1))
  if all(c == slice(0, rhs.shape[i]) for i, c in enumerate(cuts)):
    return rhs, pads
  return rhs[cuts[0], cuts[1]], tuple(new_pads)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``jax.lax.conv_general_dilated``, computed faster for plain 2-D NHWC/HWIO convolutions.

  Drop-in for ``nn.Conv(conv_general_dilated=...)`` (``jaxseg.models.layers.Conv``). For calls
  without input dilation, groups or an output type (every jaxseg conv): taps that only see
  padding are dropped (any backend, exact); on CPU 1x1 kernels become matmuls and the shapes
  ``gradient_plan`` names get the custom gradient. Every other call is
  ``lax.conv_general_dilated`` itself.
  """
  strides = tuple(window_strides)
  dilation = tuple(rhs_dilation or (1, 1))
  if preferred_element_type is None and _is_plain_nhwc(
      lhs, rhs, strides, padding, lhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count):
    if isinstance(padding, str):  # nn.Conv's default "SAME" (1x1 heads), "VALID"
      window = [d * (k - 1) + 1 for d, k in zip(dilation, rhs.shape[:2])]
      padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    rhs, pads = _trim_dead_taps(lhs, rhs, strides, pads, dilation)
    if rhs.shape[:2] == (1, 1) and jax.default_backend() == "cpu":
      return _pointwise(lhs, rhs, strides, pads, precision)
    if lhs.shape[1] * lhs.shape[2] <= TINY_MAP and jax.default_backend() == "cpu":
      return _tap_sum(lhs, rhs, strides, pads, dilation, precision)
    custom_dw, custom_dx = gradient_plan(lhs.shape, rhs.shape, strides, dilation)
    if custom_dw or custom_dx:
      return _conv(lhs, rhs, strides, pads, dilation, precision, custom_dw, custom_dx)
    return lax.conv_general_dilated(lhs, rhs, strides, pads, rhs_dilation=dilation,
                                    dimension_numbers=_NHWC, precision=precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
