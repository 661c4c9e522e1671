"""Multi-scale context aggregation by dilated convolutions (Yu & Koltun, ICLR 2016).

Front-end (fyu/dilation): VGG16 without pool4/pool5, every conv unpadded, conv5
dilated by 2, fc6 a 7x7 conv dilated by 4 (4096), fc7 1x1 (4096), dropout 0.5
after both, and a 1x1 ``final`` layer to the classes (N(0, 0.001) init, no
ReLU). The image is reflect-padded by 186 px per side, which is exactly the
border the unpadded layers consume, so an input of 8L + 372 px gives L outputs
at stride 8 aligned with the image. For sizes that are not multiples of 8 the
bottom/right border is reflect-padded up to the next multiple of 8 and the
upsampled logits are cropped back, so any H, W >= 1 is accepted and the logits
have the input's size.

Context module (applied to the C front-end scores at stride 8; every 3x3 layer
padded by its dilation, ReLU after each layer but the last):

* ``basic``: C channels throughout; 3x3 dilations 1, 1, 2, 4, 8, 16, 1 then a 1x1
  (Dilation8; Dilation10 appends 32 and 64: ``context_dilations``). Identity init:
  centre tap = identity matrix, other taps and biases 0. Because of the ReLUs the
  fresh module is the identity on non-negative inputs (negative scores are
  clipped at the first layer).
* ``large``: the same layers with 2C, 2C, 4C, 8C, 16C, 32C, 32C channels (capped at
  32C for longer stacks), then C. Init ``C / c_out * 1[centre tap and
  floor(a C / c_in) == floor(b C / c_out)] + eps``, eps ~ N(0, ``context_noise``),
  which is again the identity on non-negative inputs when eps = 0.

Upsampling of the stride-8 scores: ``"bilinear"`` (default; exact bilinear
resize, align_corners=False) or ``"deconv"`` (the paper's frozen grouped k16 s8
p4 bilinear transposed conv, which fades towards zero within 4 px of the
border because it sees zeros outside the map).
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.models import layers
from jaxseg.models.backbones import vgg
from jaxseg.models.registry import register

FRONT_END_MARGIN = 186
OUTPUT_STRIDE = 8
DILATION8 = (1, 1, 2, 4, 8, 16, 1)
DILATION10 = (1, 1, 2, 4, 8, 16, 32, 64, 1)


def context_widths(num_classes: int, num_layers: int, kind: str):
  """Output channels of the context module's layers (the last one is C)."""
  if kind == "basic":
    return [num_classes] * num_layers
  mult = [min(2**max(i, 1), 32) for i in range(num_layers - 1)]
  return [m * num_classes for m in mult] + [num_classes]


def identity_kernel_init(num_classes: int, noise_std: float = 0.0):
  """Initializer for the (large) context module: group-identity at the centre tap.

  For a kernel [k,k,c_in,c_out]: centre[a, b] = C / c_out when
  floor(a C / c_in) == floor(b C / c_out), else 0; plus N(0, noise_std) noise on
  every tap. With c_in == c_out == C this is the basic module's identity.
  """
  def init(key, shape, dtype=jnp.float32):
    kh, kw, c_in, c_out = shape
    a = np.arange(c_in)[:, None] * num_classes // c_in
    b = np.arange(c_out)[None, :] * num_classes // c_out
    kernel = np.zeros(shape, np.float32)
    kernel[kh // 2, kw // 2] = (a == b) * (num_classes / c_out)
    kernel = jnp.asarray(kernel, dtype)
    if noise_std:
      kernel = kernel + noise_std * jax.random.normal(key, shape, dtype)
    return kernel
  return init


class ContextModule(nn.Module):
  """Dilated context module on C score maps (see the module docstring)."""
  num_classes: int
  kind: str = "basic"
  dilations: Sequence[int] = DILATION8
  noise_std: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind not in ("basic", "large"):
      raise ValueError(f"context module kind must be 'basic' or 'large', got {self.kind!r}")
    if x.shape[-1] != self.num_classes:
      raise ValueError(f"context module expects {self.num_classes} channels, got {x.shape[-1]}")
    widths = context_widths(self.num_classes, len(self.dilations) + 1, self.kind)
    noise = self.noise_std if self.kind == "large" else 0.0
    init = identity_kernel_init(self.num_classes, noise)
    for i, (d, width) in enumerate(zip(self.dilations, widths)):
      name = "ctx_fc1" if i == len(self.dilations) - 1 else f"ctx_conv{i + 1}"
      x = layers.Conv(width, (3, 3), padding=[(d, d), (d, d)], kernel_dilation=(d, d),
                  kernel_init=init, dtype=self.dtype, name=name)(x)
      x = nn.relu(x)
    return layers.Conv(self.num_classes, (1, 1), kernel_init=init, dtype=self.dtype,
                   name="ctx_final")(x)


class Dilation(nn.Module):
  """Dilation front-end (+ optional context module), logits at input size.

  Attributes:
    num_classes: output channels.
    widths: VGG16 stage widths (``vgg16_widths(m)`` for thin variants).
    fc_features: channels of fc6/fc7 (4096).
    dropout: rate after fc6 and fc7 (rng stream "dropout").
    context: None (front-end only), "basic" or "large".
    context_dilations: 3x3 dilations of the context module (DILATION8 or DILATION10).
    context_noise: std of the large module's init noise.
    upsampling: "bilinear" or "deconv" (see the module docstring).
    mean, std, dtype: input normalisation and computation dtype.
    remat: recompute each VGG stage in the backward pass (``vgg.VGG16``).
  """
  num_classes: int
  widths: Sequence[int] = vgg.VGG16_WIDTHS
  fc_features: int = 4096
  dropout: float = 0.5
  context: Optional[str] = "basic"
  context_dilations: Sequence[int] = DILATION8
  context_noise: float = 1e-3
  upsampling: str = "bilinear"
  mean: Sequence[float] = layers.IMAGENET_MEAN
  std: Sequence[float] = layers.IMAGENET_STD
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images float [N,H,W,3] in [0,1] -> logits float32 [N,H,W,num_classes]."""
    if self.context not in (None, "basic", "large"):
      raise ValueError(f"dilation: context must be None, 'basic' or 'large', got {self.context!r}")
    if self.upsampling not in ("bilinear", "deconv"):
      raise ValueError(f"dilation: upsampling must be 'bilinear' or 'deconv', got "
                       f"{self.upsampling!r}")
    layers.check_images(images, "dilation")
    _, h, w, _ = images.shape
    x = layers.normalize(images, self.mean, self.std, self.dtype)
    m = FRONT_END_MARGIN
    x = jnp.pad(x, ((0, 0), (m, m + (-h % OUTPUT_STRIDE)), (m, m + (-w % OUTPUT_STRIDE)), (0, 0)),
                mode="reflect")
    feats = vgg.VGG16(widths=self.widths, conv1_padding=0, padded=False, conv5_dilation=2,
                      pools=((2, 2, 0),) * 3 + (None, None), dtype=self.dtype,
                      remat=self.remat, name="backbone")(x, train=train)
    x = feats["pool5"]
    # fc6 as shifted matmuls: XLA:CPU's gradient of this 7x7 conv is several times slower.
    x = layers.MatmulConv(self.fc_features, (7, 7), dilation=4, kernel_init=vgg.he_normal,
                          dtype=self.dtype, name="fc6")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    x = layers.Conv(self.fc_features, (1, 1), kernel_init=vgg.he_normal, dtype=self.dtype,
                name="fc7")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    x = layers.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(1e-3),
                dtype=self.dtype, name="final")(x)
    if self.context is not None:
      x = ContextModule(self.num_classes, self.context, self.context_dilations,
                        self.context_noise, dtype=self.dtype, name="context")(x)
    size = (OUTPUT_STRIDE * x.shape[1], OUTPUT_STRIDE * x.shape[2])
    if self.upsampling == "bilinear":
      x = layers.resize_bilinear(x, size)
    else:
      x = layers.BilinearConvTranspose(self.num_classes, 16, 8, padding=4, grouped=True,
                                       dtype=self.dtype, name="ctx_upsample")(x)
    return x[:, :h, :w].astype(jnp.float32)


@register("dilation")
def dilation(*, num_classes: int, backbone: str = "vgg16", width_multiplier: float = 1.0,
             fc_features: Optional[int] = None, **kwargs) -> Dilation:
  """Dilation front-end + context module; ``context="large"`` or None selects the others."""
  if backbone != "vgg16":
    raise ValueError(f"dilation: backbone must be 'vgg16', got {backbone!r}")
  if fc_features is None:
    fc_features = max(1, int(round(4096 * width_multiplier)))
  return Dilation(num_classes=num_classes, widths=vgg.vgg16_widths(width_multiplier),
                  fc_features=fc_features, **kwargs)
