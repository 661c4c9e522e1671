"""UNet (Ronneberger, Fischer & Brox, MICCAI 2015).

Two variants share one module:

* ``padding="same"`` (default, registered as ``unet``): 3x3 convs padded by 1, so
  the output has the input's size. Inputs of any size (odd ones included) are
  zero-padded (in normalised units, i.e. with the mean colour) symmetrically up
  to the next multiple of ``2**depth`` and the logits are cropped back, so every
  pooling sees an even map. BatchNorm after every conv by default: it makes the
  small from-scratch training runs fast and stable.
* ``padding="valid"``: the paper's network. Unpadded convs, the encoder map is
  centre-cropped (offset (enc - dec) // 2) before each concatenation, and the
  output is smaller than the input (documented exception to the "logits at input
  resolution" convention): ``out = in - 4 * (3 * 2**depth - 2)`` (572 -> 388 for
  depth 4). Every pooling must see an even map, which holds iff
  ``H = 2**depth * c + 4 * (2**(depth+1) - 1)`` for an integer bottleneck size
  ``c``, i.e. ``H % 2**depth == (-4) % 2**depth`` (H = 12 mod 16 for depth 4), and
  ``c`` must be large enough for every decoder map to stay non-empty (H >= 188
  for depth 4). Other sizes raise a ValueError naming the nearest valid ones; use
  overlap-tile inference with mirror padding (as the paper does) for large images.
  ``build("unet", padding="valid")`` also applies the paper's other choices when
  not given explicitly: no normalisation layer and dropout 0.5.

Upsampling is either the paper's 2x2 stride-2 transposed conv halving the
channels (``"transpose"``, computed as a matmul + depth-to-space by
``layers.NonOverlappingConvTranspose``, much faster on CPU than a dilated
convolution) or bilinear x2 resizing followed by a 1x1 conv halving the channels
(``"bilinear"``); both double the size exactly, so the size rules above hold for
both. Convs use He-normal init, N(0, sqrt(2 / (k*k*C_in))), as in
the paper.

``remat=True`` puts every ``ConvBlock`` (the two 3x3 conv-norm-ReLU layers of a level)
under ``flax.linen.remat`` (``jax.checkpoint``, default policy: only the block's input is
stored, its inner activations are recomputed in the backward pass), for large inputs;
parameters and results are those of ``remat=False``. ``dtype=jnp.bfloat16`` computes in
bfloat16 with float32 parameters, BatchNorm statistics and logits.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.registry import register

_he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def valid_unet_output_size(size: int, depth: int) -> int:
  """Output length of the paper (unpadded) UNet for an input length ``size``."""
  return size - 4 * (3 * 2**depth - 2)


def _valid_unet_ok(size: int, depth: int) -> bool:
  c = size
  for _ in range(depth):
    c -= 4
    if c <= 0 or c % 2:
      return False
    c //= 2
  c -= 4
  if c < 1:
    return False
  for _ in range(depth):
    c = 2 * c - 4
    if c < 1:
      return False
  return True


def valid_unet_sizes(depth: int, limit: int = 4096) -> list:
  """All input lengths up to ``limit`` the paper UNet of this depth accepts."""
  return [s for s in range(1, limit + 1) if _valid_unet_ok(s, depth)]


def _check_valid_size(size: int, depth: int, axis: str):
  if _valid_unet_ok(size, depth):
    return
  step = 2**depth
  ok = [s for s in range(max(1, size - 2 * step), size + 2 * step + 1) if _valid_unet_ok(s, depth)]
  smallest = next(s for s in range(1, 16 * step * 8) if _valid_unet_ok(s, depth))
  below = [s for s in ok if s < size]
  above = [s for s in ok if s > size] or [smallest]
  near = ([below[-1]] if below else []) + [above[0]]
  raise ValueError(
      f"unet(padding='valid', depth={depth}): input {axis} {size} is not a valid size; "
      f"valid sizes satisfy {axis} % {step} == {(-4) % step} and {axis} >= {smallest}; "
      f"nearest valid: {near}. Use padding='same' for arbitrary sizes.")


class ConvBlock(nn.Module):
  """Two (3x3 conv -> [norm] -> ReLU) layers.

  ``train`` may be positional so that ``RematConvBlock`` can hold it static.
  """
  features: int
  padding: str = "same"
  norm: Optional[str] = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    pad = [(1, 1), (1, 1)] if self.padding == "same" else [(0, 0), (0, 0)]
    for i in range(2):
      x = layers.Conv(self.features, (3, 3), padding=pad, use_bias=self.norm is None,
                  kernel_init=_he_normal, dtype=self.dtype, name=f"conv{i}")(x)
      if self.norm == "batch":
        x = layers.batch_norm(use_running_average=not train, dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.relu(x)
    return x


# ``train`` (argument 2, counting ``self``) is a Python bool the block branches on.
RematConvBlock = nn.remat(ConvBlock, static_argnums=(2,))


class UNet(nn.Module):
  """UNet; see the module docstring for the two padding variants.

  Attributes:
    num_classes: output channels.
    depth: number of 2x2 poolings (the paper: 4).
    features: width of the first level; level i has ``features * 2**i``.
    padding: "same" (output size == input size, any size) or "valid" (paper).
    upsampling: "transpose" (2x2 s2 transposed conv) or "bilinear" (resize + 1x1 conv).
    norm: None or "batch" (BatchNorm after every 3x3 conv).
    dropout: dropout rate at the end of the contracting path (rng stream "dropout").
    mean, std: per-channel normalisation of the [0,1] RGB input.
    dtype: computation dtype; logits are returned as float32.
    remat: recompute each ``ConvBlock`` in the backward pass (see the module docstring).
  """
  num_classes: int
  depth: int = 4
  features: int = 64
  padding: str = "same"
  upsampling: str = "transpose"
  norm: Optional[str] = "batch"
  dropout: float = 0.0
  mean: Sequence[float] = layers.IMAGENET_MEAN
  std: Sequence[float] = layers.IMAGENET_STD
  dtype: Any = jnp.float32
  remat: bool = False

  def _check_config(self):
    if self.padding not in ("same", "valid"):
      raise ValueError(f"unet: padding must be 'same' or 'valid', got {self.padding!r}")
    if self.upsampling not in ("transpose", "bilinear"):
      raise ValueError("unet: upsampling must be 'transpose' or 'bilinear', got "
                       f"{self.upsampling!r}")
    if self.norm not in (None, "batch"):
      raise ValueError(f"unet: norm must be None or 'batch', got {self.norm!r}")
    if not isinstance(self.depth, int) or self.depth < 1:
      raise ValueError(f"unet: depth must be a positive int, got {self.depth!r}")
    if not isinstance(self.features, int) or self.features < 1:
      raise ValueError(f"unet: features must be a positive int, got {self.features!r}")

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images float [N,H,W,3] in [0,1] -> logits float32 [N,H',W',num_classes].

    H' = H for padding="same"; H' = H - 4 * (3 * 2**depth - 2) for "valid".
    """
    self._check_config()
    layers.check_images(images, "unet")
    n, h, w, _ = images.shape
    if self.padding == "valid":
      _check_valid_size(h, self.depth, "height")
      _check_valid_size(w, self.depth, "width")
    x = layers.normalize(images, self.mean, self.std, self.dtype)
    if self.padding == "same":
      step = 2**self.depth
      ph, pw = -h % step, -w % step
      x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))

    block = functools.partial(RematConvBlock if self.remat else ConvBlock, padding=self.padding,
                              norm=self.norm, dtype=self.dtype)
    skips = []
    for level in range(self.depth):
      x = block(self.features * 2**level, name=f"down{level}")(x, train)
      skips.append(x)
      x = layers.max_pool(x, 2, 2)
    x = block(self.features * 2**self.depth, name="bottleneck")(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    for level in reversed(range(self.depth)):
      width = self.features * 2**level
      if self.upsampling == "transpose":
        x = layers.NonOverlappingConvTranspose(width, 2, kernel_init=_he_normal, dtype=self.dtype,
                                               name=f"upconv{level}")(x)
      else:
        x = jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]),
                             "bilinear")
        x = layers.Conv(width, (1, 1), kernel_init=_he_normal, dtype=self.dtype,
                    name=f"upconv{level}")(x)
      skip = layers.center_crop(skips[level], x.shape[1:3])
      x = jnp.concatenate([skip, x], axis=-1)
      x = block(width, name=f"up{level}")(x, train)

    x = layers.Conv(self.num_classes, (1, 1), kernel_init=_he_normal, dtype=self.dtype,
                name="head")(x)
    if self.padding == "same":
      x = x[:, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
    return x.astype(jnp.float32)


PaperUNet = functools.partial(UNet, padding="valid", norm=None, dropout=0.5)

_UNSET = object()


@register("unet")
def unet(*, num_classes: int, padding: str = "same", norm=_UNSET, dropout=_UNSET, **kwargs) -> UNet:
  """UNet builder. padding="valid" defaults to the paper's norm=None, dropout=0.5."""
  paper = padding == "valid"
  if norm is _UNSET:
    norm = None if paper else "batch"
  if dropout is _UNSET:
    dropout = 0.5 if paper else 0.0
  return UNet(num_classes=num_classes, padding=padding, norm=norm, dropout=dropout, **kwargs)
